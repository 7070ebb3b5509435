//! `cargo xtask boundaries`: the functional core stays pure. Files under the core's folders
//! may not name a crate or call that does I/O or reads the clock; CI runs this before the
//! build, and it fails naming the file, line and the forbidden name.
//!
//! Written by hand (a few lines of text matching): a lint crate would need a compile of its
//! own, and what is forbidden here is a short list of names.

use std::path::{Path, PathBuf};

/// Folders of the functional core, from the repository root.
pub const CORE: &[&str] = &["hub/src/fleet", "edge-agent/src/core"];

/// What the core may not name: runtimes, stores, network and broker crates, the runtimes'
/// engines, the file system, sockets and the clock (addresses, `std::net::IpAddr`, are
/// plain values and allowed).
pub const FORBIDDEN: &[&str] = &[
    "tokio",
    "sled",
    "etcd_client",
    "rumqttc",
    "rumqttd",
    "axum",
    "hyper",
    "reqwest",
    "wasmtime",
    "containerd_client",
    "mdns_sd",
    "std::fs",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "SystemTime",
    "Instant::now",
    "now_ms()",
];

/// One forbidden name in a core file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub file: String,
    pub line: usize,
    pub name: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: the functional core may not use `{}` (I/O and the clock belong to the shell)",
            self.file, self.line, self.name
        )
    }
}

/// The forbidden names `text` (the file `file`) uses, outside comments.
pub fn check(file: &str, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for name in FORBIDDEN {
            if uses(code, name) {
                out.push(Violation {
                    file: file.to_string(),
                    line: i + 1,
                    name,
                });
            }
        }
    }
    out
}

/// Whether `code` names `name` as a whole word (`tokio::`, not `tokioish`).
fn uses(code: &str, name: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    // A name ending in a word character must not run on into one (`tokioish`).
    let open_end = name.ends_with(word);
    code.match_indices(name).any(|(at, _)| {
        let glued_before = code[..at].chars().next_back().is_some_and(word);
        let glued_after = open_end && code[at + name.len()..].chars().next().is_some_and(word);
        !glued_before && !glued_after
    })
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sources(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Checks every core folder under `root`; the violations found.
pub fn run(root: &Path) -> anyhow::Result<Vec<Violation>> {
    let mut all = Vec::new();
    for dir in CORE {
        let mut files = Vec::new();
        sources(&root.join(dir), &mut files)?;
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            let shown = f.strip_prefix(root).unwrap_or(&f).display().to_string();
            all.extend(check(&shown, &text));
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_import_fails_and_comments_do_not() {
        let clean =
            "use std::collections::BTreeMap;\n// tokio is the shell's\nfn f(now_ms: u64) {}\n";
        assert_eq!(check("a.rs", clean), []);
        let planted = "use std::collections::BTreeMap;\nuse tokio::sync::mpsc;\nlet t = std::time::SystemTime::now();\n";
        let v = check("hub/src/fleet/x.rs", planted);
        assert_eq!(
            v.iter().map(|v| (v.line, v.name)).collect::<Vec<_>>(),
            [(2, "tokio"), (3, "SystemTime")]
        );
        assert!(
            v[0].to_string().contains("hub/src/fleet/x.rs:2"),
            "{}",
            v[0]
        );
        // Whole words only.
        assert_eq!(check("a.rs", "let tokioish = 1; let my_sled = 2;"), []);
        assert_eq!(
            check("a.rs", "let t = shoal_api::messages::now_ms();").len(),
            1
        );
    }

    #[test]
    fn the_core_is_pure_today() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let v = run(&root).unwrap();
        assert!(v.is_empty(), "{v:?}");
    }
}
