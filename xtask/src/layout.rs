//! `cargo xtask test` checks the layout rules a newcomer relies on: no production source file
//! past [`MAX_LINES`] (tests aside), and no import cycle between the modules of a crate (a
//! parent and its own child modules aside: a `mod.rs` declares and re-exports them).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Lines of production code a file may hold before its `#[cfg(test)]` module.
pub const MAX_LINES: usize = 800;

/// The crates whose `src/` folders are checked.
const CRATES: &[&str] = &[
    "tracer",
    "tracer-core",
    "tracer-common",
    "tracer-ebpf",
    "tracer-scrape",
    "xtask",
];

pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let files = rust_files(&src).with_context(|| format!("listing {}", src.display()))?;
        let mut modules = BTreeMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let production = production_part(&text);
            let lines = production.lines().count();
            if lines > MAX_LINES {
                problems.push(format!(
                    "{krate}/src/{}: {lines} lines before its tests (at most {MAX_LINES}): split it",
                    relative(&src, file)
                ));
            }
            modules.insert(module_path(&src, file), production.to_owned());
        }
        for cycle in cycles(&modules) {
            problems.push(format!("{krate}: import cycle {}", cycle.join(" -> ")));
        }
    }
    if !problems.is_empty() {
        bail!("layout rules broken:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn relative(src: &Path, file: &Path) -> String {
    file.strip_prefix(src).unwrap_or(file).display().to_string()
}

/// The code before the first top-level `#[cfg(test)]`.
fn production_part(text: &str) -> &str {
    match text.find("\n#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// `export/metrics/http.rs` -> `export::metrics::http`; `lib.rs`, `main.rs` -> the crate root.
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Modules `text` (the module `from`) refers to through `crate::` or `super::` paths, resolved
/// to the longest known module.
fn references(from: &str, text: &str, known: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent(from))] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let boundary = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
            rest = &rest[at + prefix.len()..];
            if !boundary {
                continue;
            }
            // `crate::a::{b, c}` and `crate::a::b::Item`: the path up to the first non-ident.
            let path: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut full = base.clone();
            for segment in path.split("::").filter(|s| !s.is_empty()) {
                let candidate = if full.is_empty() {
                    segment.to_owned()
                } else {
                    format!("{full}::{segment}")
                };
                if !known.contains(candidate.as_str()) {
                    break;
                }
                full = candidate;
            }
            if !full.is_empty() && full != from {
                found.insert(full);
            }
        }
    }
    found
}

fn parent(module: &str) -> String {
    module
        .rsplit_once("::")
        .map_or_else(String::new, |(p, _)| p.to_owned())
}

/// `a` is `b` or one of its ancestors (or the other way round).
fn related(a: &str, b: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    within(a, b) || within(b, a)
}

/// Each cycle among unrelated modules, as the modules along it.
fn cycles(modules: &BTreeMap<String, String>) -> Vec<Vec<String>> {
    let known: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
    let edges: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(from, text)| {
            let to = references(from, text, &known)
                .into_iter()
                .filter(|to| !related(from, to))
                .collect();
            (from.as_str(), to)
        })
        .collect();
    // Depth-first search from every module; a back edge closes a cycle. Small graphs only.
    let mut found: Vec<Vec<String>> = Vec::new();
    let mut reported = BTreeSet::new();
    for start in edges.keys() {
        let mut stack = vec![(start.to_string(), vec![start.to_string()])];
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(at.as_str()).into_iter().flatten() {
                if next == *start {
                    let mut members = path.clone();
                    members.sort();
                    if reported.insert(members) {
                        let mut cycle = path.clone();
                        cycle.push(next.clone());
                        found.push(cycle);
                    }
                } else if !path.contains(next) && path.len() < 8 {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(m, t)| ((*m).to_owned(), (*t).to_owned()))
            .collect()
    }

    #[test]
    fn a_cycle_between_siblings_is_found() {
        let g = graph(&[
            ("a", "use crate::b::Thing;"),
            ("b", "fn f() { crate::c::g() }"),
            ("c", "use crate::a;"),
            ("d", "use crate::a::x;"),
        ]);
        let found = cycles(&g);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].len(), 4, "{found:?}");
    }

    #[test]
    fn parents_and_children_and_one_way_flows_are_fine() {
        let g = graph(&[
            (
                "export",
                "pub use metrics::serve; use crate::export::metrics;",
            ),
            (
                "export::metrics",
                "use super::Thing; use crate::kernel::clock;",
            ),
            ("kernel", ""),
            ("kernel::clock", ""),
        ]);
        assert!(cycles(&g).is_empty(), "{:?}", cycles(&g));
    }

    #[test]
    fn super_paths_resolve_against_the_parent() {
        let known: BTreeSet<&str> = ["diagnose", "diagnose::render", "diagnose::findings"]
            .into_iter()
            .collect();
        let refs = references("diagnose::findings", "use super::render::wrap;", &known);
        assert_eq!(refs, BTreeSet::from(["diagnose::render".to_owned()]));
    }

    #[test]
    fn module_paths_follow_the_folders() {
        let src = Path::new("/x/src");
        assert_eq!(module_path(src, Path::new("/x/src/lib.rs")), "");
        assert_eq!(
            module_path(src, Path::new("/x/src/export/metrics/mod.rs")),
            "export::metrics"
        );
        assert_eq!(
            module_path(src, Path::new("/x/src/export/metrics/http.rs")),
            "export::metrics::http"
        );
    }

    #[test]
    fn tests_do_not_count_toward_the_size() {
        assert_eq!(
            production_part("a\nb\n#[cfg(test)]\nmod tests {}\n"),
            "a\nb"
        );
    }
}
