//! The shape of the code, checked like its behaviour: no production
//! function over 80 lines without a reason written next to it, and no
//! import cycle between the modules of a crate (a module that imports one
//! that imports it back cannot be read, or changed, on its own).
//!
//! Read from the sources with a small scanner (not a Rust parser): a `fn`
//! item's length runs from its line to its closing brace; test modules
//! (`#[cfg(test)] mod tests`) and `tests.rs` files are not production code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use egressguard_e2e::cluster::root;

/// The crates whose sources are checked.
const CRATES: &[&str] = &["crds", "operator", "node-shaper"];
/// Longest function without a reason.
const MAX_LINES: usize = 80;
/// The marker of a reason: `// long: why` on a line just above the `fn`
/// (or above its doc comment and attributes).
const REASON: &str = "// long:";

fn sources(krate: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = vec![];
    walk(&root().join(krate).join("src"), &mut out);
    out.sort();
    out
}

/// The production part of a source: its lines without the test modules
/// (`#[cfg(test)] mod ... { ... }`, wherever they stand).
fn production(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let test_mod = lines[i].trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod ") && l.trim_end().ends_with('{'));
        if !test_mod {
            out.push(lines[i]);
            i += 1;
            continue;
        }
        let mut depth = 0i32;
        i += 1;
        while i < lines.len() {
            depth += lines[i].matches('{').count() as i32 - lines[i].matches('}').count() as i32;
            i += 1;
            if depth <= 0 {
                break;
            }
        }
    }
    out
}

/// `(name, first line, lines)` of every `fn` with a body.
fn functions(lines: &[&str]) -> Vec<(String, usize, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let name = t
            .split_whitespace()
            .skip_while(|w| *w != "fn")
            .nth(1)
            .filter(|_| !t.starts_with("//"))
            .map(|n| n.split(['(', '<']).next().unwrap_or_default().to_string());
        let Some(name) = name else {
            i += 1;
            continue;
        };
        let (mut depth, mut opened, mut j) = (0i32, false, i);
        while j < lines.len() {
            for c in lines[j].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                break;
            }
            if !opened && lines[j].trim_end().ends_with(';') {
                break;
            }
            j += 1;
        }
        if opened {
            out.push((name, i, j - i + 1));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Is there a `// long:` reason above line `at` (through its doc comment
/// and attributes)?
fn has_reason(lines: &[&str], at: usize) -> bool {
    lines[..at]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["))
        .any(|l| l.starts_with(REASON))
}

#[test]
fn no_production_function_is_over_80_lines_without_a_reason() {
    let mut long = vec![];
    for krate in CRATES {
        for path in sources(krate) {
            if path.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let lines = production(&text);
            for (name, at, n) in functions(&lines) {
                if n > MAX_LINES && !has_reason(&lines, at) {
                    let rel = path
                        .strip_prefix(root())
                        .unwrap_or(&path)
                        .display()
                        .to_string();
                    long.push(format!("{rel}:{} {name}: {n} lines", at + 1));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these into named steps, or write why one is better whole as `{REASON} ...` above it:\n{}",
        long.join("\n")
    );
}

/// A source's module path in its crate: `src/a/b.rs` and `src/a/b/mod.rs`
/// are `a::b`; `lib.rs` and `main.rs` are the root.
fn module_of(src: &Path, path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The modules a source names through `crate::`, `super::` or a child
/// module of its own, resolved to the longest existing module path.
fn imports(text: &str, here: &[String], modules: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let code: String = production(text)
        .iter()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    for (i, _) in code.match_indices("::") {
        // The path that ends at this `::`: walk back over `ident::ident::`.
        let start = code[..i]
            .rfind(|c: char| !(is_ident(c) || c == ':'))
            .map_or(0, |s| s + 1);
        let end = code[i..]
            .find(|c: char| !(is_ident(c) || c == ':'))
            .map_or(code.len(), |e| i + e);
        let path: Vec<&str> = code[start..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .collect();
        let Some(first) = path.first() else { continue };
        let (mut base, rest): (Vec<String>, &[&str]) = match *first {
            "crate" => (vec![], &path[1..]),
            "super" => {
                let mut b = here.to_vec();
                let mut k = 0;
                while path.get(k) == Some(&"super") {
                    b.pop();
                    k += 1;
                }
                (b, &path[k..])
            }
            "self" => (here.to_vec(), &path[1..]),
            // A child module of this one, named bare.
            m if modules.contains(&[here, &[m.to_string()]].concat()) => (here.to_vec(), &path[..]),
            _ => continue,
        };
        let mut best = None;
        for seg in rest {
            base.push(seg.to_string());
            if modules.contains(&base) {
                best = Some(base.clone());
            } else {
                break;
            }
        }
        if let Some(m) = best.filter(|m| m != here && !here.starts_with(m) && !m.starts_with(here))
        {
            out.insert(m);
        }
    }
    out
}

/// Every cycle's modules, found by depth-first search.
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    fn visit(
        m: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|s| s == m) {
            found.push(stack[at..].iter().map(|s| s.join("::")).collect());
            return;
        }
        if done.contains(m) {
            return;
        }
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, stack, done, found);
        }
        stack.pop();
        done.insert(m.clone());
    }
    let (mut done, mut found) = (BTreeSet::new(), vec![]);
    for m in graph.keys() {
        visit(m, graph, &mut vec![], &mut done, &mut found);
    }
    found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut all = vec![];
    for krate in CRATES {
        let src = root().join(krate).join("src");
        // The library's modules (binaries under src/bin stand apart).
        let files: Vec<PathBuf> = sources(krate)
            .into_iter()
            .filter(|p| !p.strip_prefix(&src).is_ok_and(|r| r.starts_with("bin")))
            .filter(|p| p.file_name().is_none_or(|n| n != "main.rs"))
            .collect();
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
        let graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = files
            .iter()
            .map(|f| {
                let here = module_of(&src, f);
                let text = std::fs::read_to_string(f).expect("source");
                let to = imports(&text, &here, &modules);
                (here, to)
            })
            .collect();
        all.extend(
            cycles(&graph)
                .into_iter()
                .map(|c| format!("{krate}: {}", c.join(" -> "))),
        );
    }
    assert!(all.is_empty(), "import cycles:\n{}", all.join("\n"));
}

#[test]
fn the_scanner_sees_long_functions_reasons_and_cycles() {
    let body = format!("/// Doc.\nfn short() {{\n}}\n// long: a flat match\nfn flat() {{\n{}}}\nfn long() {{\n{}}}\n", "x;\n".repeat(90), "y;\n".repeat(90));
    let lines: Vec<&str> = body.lines().collect();
    let fns = functions(&lines);
    let long: Vec<(&str, bool)> = fns
        .iter()
        .filter(|(_, _, n)| *n > MAX_LINES)
        .map(|(name, at, _)| (name.as_str(), has_reason(&lines, *at)))
        .collect();
    assert_eq!(long, [("flat", true), ("long", false)]);
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let modules: BTreeSet<_> = [m("a"), m("b"), m("c")].into();
    assert_eq!(
        imports(
            "use crate::b::Thing;\nfn f() { super::c::g(); }",
            &m("a"),
            &modules
        ),
        [m("b"), m("c")].into()
    );
    let graph = [
        (m("a"), [m("b")].into()),
        (m("b"), [m("c")].into()),
        (m("c"), [m("a")].into()),
    ]
    .into();
    assert_eq!(cycles(&graph).len(), 1);
}
