//! `cargo xtask boundaries`: the functional core stays pure, the hub's shell sees typed
//! commands only, and the shared types read no clock. Files under the core's folders may
//! not name a crate or call that does I/O or reads the clock; files of the hub's shell
//! (`hub/src/app`) may not name MQTT topics or clients, HTTP status codes or the store's
//! clients, which belong to their adapters; the agent's replica supervisor may not name a
//! runtime's variant or engine, and its runtimes neither the agent's loop nor its replicas;
//! files of `api/src` may not read the clock. A file's test module (last in the file) is
//! not checked. CI
//! runs this before the build, and it fails naming the file, line and the forbidden name.
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

/// Folders of the hub's imperative shell, from the repository root.
pub const SHELL: &[&str] = &["hub/src/app"];

/// What the shell may not name: topics, payload formats and clients of MQTT
/// (`crate::mqtt`), HTTP's types and status codes (`crate::http`), the store's clients
/// (`crate::store`, `crate::etcd`), the runtimes.
pub const ADAPTERS_ONLY: &[&str] = &[
    "topics",
    "rumqttc",
    "rumqttd",
    "axum",
    "hyper",
    "StatusCode",
    "sled",
    "etcd_client",
    "wasmtime",
    "containerd_client",
];

/// The types every program shares (`shoal_api`): wire messages, manifests, policies.
pub const API: &[&str] = &["api/src"];

/// What they may not name: the clock (whoever decides by time passes `now`; the daemons'
/// clock is `shoal_daemon::clock`).
pub const CLOCK: &[&str] = &["SystemTime", "Instant::now", "UNIX_EPOCH"];

/// The agent's replica supervisor drives the one runtime trait (`crate::runtime::Runtime`).
pub const AGENT_REPLICA: &[&str] = &["edge-agent/src/replica"];

/// What it may not name: a runtime's variant or engine.
pub const RUNTIME_VARIANTS: &[&str] = &[
    "VariantSpec::",
    "runtime::wasm",
    "runtime::containerd",
    "wasmtime",
    "containerd_client",
];

/// The agent's runtimes, used by the agent and its replicas, never the other way round.
pub const AGENT_RUNTIME: &[&str] = &["edge-agent/src/runtime"];

/// What they may not name: the agent's loop or its replicas.
pub const AGENT_PARTS: &[&str] = &["crate::app", "crate::replica", "crate::supervisor"];

/// A set of folders and the names their files may not use, and why.
struct Rule {
    dirs: &'static [&'static str],
    forbidden: &'static [&'static str],
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        dirs: CORE,
        forbidden: FORBIDDEN,
        why: "the functional core may not use it (I/O and the clock belong to the shell)",
    },
    Rule {
        dirs: SHELL,
        forbidden: ADAPTERS_ONLY,
        why: "the shell sees typed commands only (topics, payloads, status codes and clients belong to the adapters)",
    },
    Rule {
        dirs: AGENT_REPLICA,
        forbidden: RUNTIME_VARIANTS,
        why: "the supervisor drives the one Runtime trait, never a variant or its engine",
    },
    Rule {
        dirs: AGENT_RUNTIME,
        forbidden: AGENT_PARTS,
        why: "the runtimes know neither the agent's loop nor its replicas (they use the runtimes)",
    },
    Rule {
        dirs: API,
        forbidden: CLOCK,
        why: "the shared types read no clock (take `now` as a parameter; the daemons read shoal_daemon::clock)",
    },
];

/// One forbidden name in a core or shell file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub file: String,
    pub line: usize,
    pub name: &'static str,
    pub why: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: `{}`: {}",
            self.file, self.line, self.name, self.why
        )
    }
}

/// The core's forbidden names `text` (the file `file`) uses, outside comments.
#[cfg(test)]
fn check(file: &str, text: &str) -> Vec<Violation> {
    check_rule(&RULES[0], file, text)
}

fn check_rule(rule: &Rule, file: &str, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        // A file's unit tests come last (clippy's `items_after_test_module`): fakes there
        // may name what the code may not.
        if line.trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        for name in rule.forbidden {
            if uses(code, name) {
                out.push(Violation {
                    file: file.to_string(),
                    line: i + 1,
                    name,
                    why: rule.why,
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
pub(crate) fn sources(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
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

/// Checks every core and shell folder under `root`; the violations found.
pub fn run(root: &Path) -> anyhow::Result<Vec<Violation>> {
    let mut all = Vec::new();
    for rule in RULES {
        for dir in rule.dirs {
            let mut files = Vec::new();
            sources(&root.join(dir), &mut files)?;
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f)?;
                let shown = f.strip_prefix(root).unwrap_or(&f).display().to_string();
                all.extend(check_rule(rule, &shown, &text));
            }
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
        // The shell: a topic or a status code is the adapters' business.
        let shell = check_rule(
            &RULES[1],
            "hub/src/app/x.rs",
            "let t = shoal_api::wire::topics::desired(&d);\nlet ok = 1;\nreturn StatusCode::NOT_FOUND;\n",
        );
        assert_eq!(
            shell.iter().map(|v| (v.line, v.name)).collect::<Vec<_>>(),
            [(1, "topics"), (3, "StatusCode")]
        );
        assert!(
            shell[0].to_string().contains("typed commands"),
            "{}",
            shell[0]
        );
        // The agent: the supervisor sees no variant, the runtimes no supervisor; a test
        // module at the end of a file is not checked.
        let replica = check_rule(
            &RULES[2],
            "edge-agent/src/replica/x.rs",
            "let VariantSpec::Container(c) = &spec.variant else { return };\n#[cfg(test)]\nmod tests {\n    let VariantSpec::Wasm(w) = x;\n}\n",
        );
        assert_eq!(
            replica.iter().map(|v| (v.line, v.name)).collect::<Vec<_>>(),
            [(1, "VariantSpec::")]
        );
        let runtime = check_rule(
            &RULES[3],
            "edge-agent/src/runtime/x.rs",
            "use crate::replica::Shared;\n",
        );
        assert_eq!(runtime.len(), 1, "{runtime:?}");
        // The shared types: no clock.
        let api = check_rule(
            &RULES[4],
            "api/src/x.rs",
            "let t = std::time::SystemTime::now();\nlet n = now;\n",
        );
        assert_eq!(
            api.iter().map(|v| (v.line, v.name)).collect::<Vec<_>>(),
            [(1, "SystemTime")]
        );
        // Whole words only.
        assert_eq!(check("a.rs", "let tokioish = 1; let my_sled = 2;"), []);
        assert_eq!(
            check("a.rs", "let t = shoal_daemon::clock::now_ms();").len(),
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
