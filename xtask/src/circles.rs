//! `cargo xtask boundaries`, second half: no import circle between the files of the hub or
//! the agent. Each file is a module; a file that names `crate::a::b` (or `super::…`) outside
//! comments and its test module depends on the deepest file module that path reaches. A
//! circle (a strongly connected set of two or more files) fails the check, naming its files.
//!
//! Written by hand like the rest of this check (a few dozen lines of text matching and
//! Tarjan's algorithm): a crate graph tool would need a compile of its own, and this is the
//! module graph inside one crate, which cargo does not expose.

use crate::boundaries::sources;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The crates whose files may not import each other in a circle, from the repository root.
pub const CRATES: &[&str] = &["hub/src", "edge-agent/src"];

/// A module path inside its crate (`["app", "keys"]` for `app/keys.rs`).
type Module = Vec<String>;

/// The module `file` (relative to its crate's `src`) defines; `None` for the crate roots
/// and test files, which are not checked.
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.last()?.clone();
    if parts.len() == 1 && (last == "lib" || last == "main") || last == "tests" {
        return None;
    }
    if last == "mod" {
        parts.pop();
    }
    Some(parts)
}

/// The code of `text` that is checked: outside comments, before the test module.
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            break;
        }
        out.push_str(line.split("//").next().unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Every `prefix` path in `code`, as its segments (`crate::a::b` → `["a", "b"]`).
fn paths(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| word(c) || c == ':')
        {
            continue;
        }
        let mut segs = Vec::new();
        let mut rest = &code[at + prefix.len()..];
        loop {
            let end = rest.find(|c: char| !word(c)).unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            segs.push(rest[..end].to_string());
            rest = &rest[end..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The module graph of the crate whose files are `files` (module → its text).
fn graph(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut g = BTreeMap::new();
    for (m, text) in files {
        let code = code(text);
        let parent: Module = m[..m.len().saturating_sub(1)].to_vec();
        let mut targets: Vec<Vec<String>> = paths(&code, "crate::");
        for p in paths(&code, "super::") {
            targets.push(parent.iter().cloned().chain(p).collect());
        }
        let mut deps = BTreeSet::new();
        for t in targets {
            // The deepest file module the path reaches.
            if let Some(k) = (1..=t.len()).rev().find(|k| files.contains_key(&t[..*k])) {
                if t[..k] != m[..] {
                    deps.insert(t[..k].to_vec());
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// The circles of `g`: its strongly connected sets of two or more modules (Tarjan).
fn circles(g: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a Module) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    if let Some(lv) = self.low.get_mut(v) {
                        *lv = (*lv).min(lw);
                    }
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    if let Some(lv) = self.low.get_mut(v) {
                        *lv = (*lv).min(iw);
                    }
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    set.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    set.sort();
                    self.out.push(set);
                }
            }
        }
    }
    let mut walk = Walk {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.out
}

/// The import circles in each crate of [`CRATES`] under `root`, each shown as
/// `crate: a::b → c → …`.
pub fn run(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for krate in CRATES {
        let src = root.join(krate);
        let mut paths = Vec::new();
        sources(&src, &mut paths)?;
        let mut files = BTreeMap::new();
        for p in paths {
            let rel = p.strip_prefix(&src)?.to_path_buf();
            if let Some(m) = module_of(&rel) {
                files.insert(m, std::fs::read_to_string(&p)?);
            }
        }
        for set in circles(&graph(&files)) {
            let names: Vec<String> = set.iter().map(|m| m.join("::")).collect();
            found.push(format!(
                "{krate}: import circle between {}",
                names.join(", ")
            ));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> BTreeMap<Module, String> {
        files
            .iter()
            .filter_map(|(f, t)| Some((module_of(Path::new(f))?, t.to_string())))
            .collect()
    }

    #[test]
    fn a_planted_circle_is_found_and_a_line_is_not() {
        let line = crate_of(&[
            ("app/mod.rs", "mod command;\nuse crate::http::serve;\n"),
            ("app/command.rs", "pub enum Event {}\n"),
            (
                "http/mod.rs",
                "use crate::app::command::Event; // crate::app::mod\n",
            ),
        ]);
        assert!(circles(&graph(&line)).is_empty());
        // The port names its adapter: app::command → http → app::command.
        let circle = crate_of(&[
            ("app/mod.rs", "mod command;\n"),
            ("app/command.rs", "use crate::http::Request;\n"),
            ("http/mod.rs", "use super::app::command::Event;\n"),
            ("lib.rs", "use crate::app::command::Event;\n"),
        ]);
        let found = circles(&graph(&circle));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0],
            [
                vec!["app".to_string(), "command".into()],
                vec!["http".into()]
            ]
        );
        // A test module may name anything.
        let tests = crate_of(&[
            (
                "a.rs",
                "use crate::b::B;\n#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n",
            ),
            (
                "b.rs",
                "#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n",
            ),
        ]);
        assert!(circles(&graph(&tests)).is_empty());
    }

    #[test]
    fn the_hub_and_the_agent_have_no_circle_today() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let found = run(&root).unwrap();
        assert!(found.is_empty(), "{found:#?}");
    }
}
