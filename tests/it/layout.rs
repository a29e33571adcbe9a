//! The source tree's shape, checked: the top-level modules of `src/` (a file
//! `src/x.rs` with its folder `src/x/`) reference each other without a
//! circle, so each stage of the data path can be read, and changed, with
//! only the stages below it in mind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module and the top-level modules its files name as `crate::x`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(&src, &mut all);
    for f in all {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    g
}

/// A circle through `from`, if there is one (depth-first).
fn circle(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        goal: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == goal {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, goal, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_string()];
    walk(g, from, from, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_top_level_modules_form_no_circle() {
    let g = graph();
    assert!(g.len() > 10, "found the modules: {:?}", g.keys());
    assert!(
        g["server"].contains("shard"),
        "the reader sees references: {g:?}"
    );
    let circles: Vec<String> = g
        .keys()
        .filter_map(|m| circle(&g, m))
        .map(|c| c.join(" → "))
        .collect();
    assert!(
        circles.is_empty(),
        "module circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_circle_finder_finds_circles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(circle(&g, "a").unwrap(), vec!["a", "b", "c", "a"]);
    assert!(circle(&g, "d").is_none());
}

/// Every `.rs` file under `src/`, with its text.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let name = p.strip_prefix(root).unwrap().display().to_string();
                out.push((name, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    walk(&src, &src, &mut out);
    out
}

/// Functions longer than `max` lines whose docs give no reason ("Long: …").
fn long_functions(name: &str, text: &str, max: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        let is_fn = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "pub(crate) async fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if !is_fn || t.ends_with(';') {
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        let Some(len) = lines[i + 1..].iter().position(|x| *x == close) else {
            continue;
        };
        if len + 2 <= max {
            continue;
        }
        let docs = lines[..i]
            .iter()
            .rev()
            .take_while(|x| x.trim_start().starts_with("///") || x.trim_start().starts_with("#["));
        if !docs.into_iter().any(|d| d.contains("Long:")) {
            out.push(format!("{name}:{} ({} lines): {}", i + 1, len + 2, t));
        }
    }
    out
}

#[test]
fn long_functions_and_files_say_why() {
    const FUNCTION_LINES_MAX: usize = 120;
    const FILE_LINES_MAX: usize = 800;
    let mut found = Vec::new();
    for (name, text) in sources() {
        found.extend(long_functions(&name, &text, FUNCTION_LINES_MAX));
        // Unit tests at the end of a file do not count.
        let code = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or("");
        if code.lines().count() > FILE_LINES_MAX
            && !code
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .any(|l| l.contains("Long:"))
        {
            found.push(format!(
                "{name}: {} lines, no reason in its module docs",
                code.lines().count()
            ));
        }
    }
    assert!(
        found.is_empty(),
        "too long without a reason:\n{}",
        found.join("\n")
    );
    // The check sees a long function.
    let long = format!("fn f() {{\n{}}}\n", "    x();\n".repeat(130));
    assert_eq!(long_functions("t.rs", &long, FUNCTION_LINES_MAX).len(), 1);
    let said = format!("/// Long: a reason.\n{long}");
    assert!(long_functions("t.rs", &said, FUNCTION_LINES_MAX).is_empty());
}
