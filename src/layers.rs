//! The layer check, run by `cargo test`: no import cycle between top-level
//! modules, and the few rules of the layer drawing in the README. It reads the
//! `crate::name` paths in `src/` (code under `#[cfg(test)]` at the end of a
//! file excluded: tests may reach anywhere) and prints any cycle it finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level module → the top-level modules its code names.
fn graph() -> Graph {
    let src = std::env::var("LAYERS_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut g = Graph::new();
    let mut files = Vec::new();
    walk(&src, &mut files);
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        // Tests may reach anywhere: sibling `tests.rs` files are test code.
        if module == "main"
            || module == "lib"
            || module == "layers"
            || file.file_name().is_some_and(|n| n == "tests.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let deps = g.entry(module.clone()).or_default();
        for name in crate_paths(code) {
            if name != module {
                deps.insert(name);
            }
        }
    }
    g
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first segment after each `crate::`, including `use crate::{a, b::c}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                // One level of grouping is what rustfmt leaves on a `use` line.
                let inner = group.split('}').next().unwrap();
                for part in inner.split(',') {
                    let name = ident(part.trim());
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            } else {
                let name = ident(after);
                if !name.is_empty() {
                    out.insert(name);
                }
            }
            rest = after;
        }
    }
    // Multi-line `use crate::{\n a,\n b::c,\n};` groups.
    let mut rest = code;
    while let Some(at) = rest.find("use crate::{") {
        let after = &rest[at + "use crate::{".len()..];
        let inner = after.split("};").next().unwrap();
        let mut depth = 0;
        let mut item = String::new();
        for c in inner.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.insert(ident(item.trim()));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                item.push(c);
            }
        }
        out.insert(ident(item.trim()));
        rest = after;
    }
    out.remove("");
    out.remove("self");
    out
}

/// Strongly connected components of more than one module: the import cycles.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: reachability both ways, fine at this size.
    let reach = |from: &str, rev: bool| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(n) = stack.pop() {
            let next: Vec<String> = if rev {
                g.iter()
                    .filter(|(_, d)| d.contains(&n))
                    .map(|(k, _)| k.clone())
                    .collect()
            } else {
                g.get(&n).into_iter().flatten().cloned().collect()
            };
            for m in next {
                if seen.insert(m.clone()) {
                    stack.push(m);
                }
            }
        }
        seen
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in g.keys() {
        if done.contains(n) {
            continue;
        }
        let fwd = reach(n, false);
        let back = reach(n, true);
        let scc: Vec<String> = fwd.intersection(&back).cloned().collect();
        if scc.len() > 1 {
            done.extend(scc.iter().cloned());
            out.push(scc);
        }
    }
    out
}

/// One path around a cycle, for the message: a → b → … → a.
fn one_loop(g: &Graph, scc: &[String]) -> String {
    let start = &scc[0];
    // Breadth-first from start's successors back to start, inside the component.
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(n) = queue.pop_front() {
        for m in g.get(&n).into_iter().flatten() {
            if !scc.contains(m) || prev.contains_key(m) {
                continue;
            }
            prev.insert(m.clone(), n.clone());
            if m == start {
                queue.clear();
                break;
            }
            queue.push_back(m.clone());
        }
    }
    let mut path = vec![start.clone()];
    let mut at = prev.get(start).cloned();
    while let Some(n) = at {
        if &n == start {
            break;
        }
        path.push(n.clone());
        at = prev.get(&n).cloned();
    }
    path.push(start.clone());
    path.reverse();
    path.join(" → ")
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = graph();
    let found = cycles(&g);
    let text: Vec<String> = found
        .iter()
        .map(|scc| format!("{} (e.g. {})", scc.join(", "), one_loop(&g, scc)))
        .collect();
    assert!(
        found.is_empty(),
        "import cycles between top-level modules:\n{}",
        text.join("\n")
    );
}

/// The drawing's rules that a cycle check alone would not catch.
#[test]
fn layers_keep_their_direction() {
    let g = graph();
    let forbidden: &[(&str, &[&str])] = &[
        // Time is the bottom: it imports nothing of Valet.
        ("clock", &["*"]),
        // Telemetry is a leaf: the clock and the decision types at most.
        ("telemetry", &["*", "!clock", "!decision"]),
        // Decision and request views are leaves, and so is the bounded cache.
        ("decision", &["*"]),
        ("bounded_cache", &["*"]),
        ("request", &["*"]),
        // gRPC dispatch by service name knows no Valet service.
        ("grpc_mux", &["*"]),
        // Parsing knows nothing of compiled policy or anything above it.
        (
            "config",
            &[
                "policy", "provider", "check", "driver", "service", "state", "stores", "load",
            ],
        ),
        // Compiled policy knows nothing of the core, the stores or the entry points.
        (
            "policy",
            &[
                "check",
                "driver",
                "service",
                "state",
                "stores",
                "jwks",
                "introspection",
                "revocation",
                "shared_store",
                "load",
            ],
        ),
        ("provider", &["*", "!config"]),
        // The core reads the policy and the stores; it is driven, never drives.
        (
            "check",
            &[
                "driver",
                "service",
                "http_authz",
                "state",
                "load",
                "reload",
                "app",
            ],
        ),
        ("stores", &["check", "driver", "service", "state", "load"]),
        // The shared store is a leaf of the stores: the policy's settings, telemetry.
        (
            "shared_store",
            &[
                "check",
                "driver",
                "service",
                "state",
                "load",
                "stores",
                "introspection",
                "revocation",
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (module, rules) in forbidden {
        let Some(deps) = g.get(*module) else { continue };
        let all = rules.contains(&"*");
        for d in deps {
            let allowed = rules
                .iter()
                .any(|r| r.strip_prefix('!') == Some(d.as_str()));
            if (all && !allowed) || rules.contains(&d.as_str()) {
                wrong.push(format!("{module} imports {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layer rules broken: {wrong:?}");
}

#[test]
fn the_reader_finds_grouped_and_inline_paths() {
    let found = crate_paths(
        "use crate::a::B;\nuse crate::{b, c::D};\nuse crate::{\n    d::{E, F},\n    e,\n};\nlet x = crate::f::g();\n",
    );
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
    let mut g = Graph::new();
    g.insert("a".into(), ["b".into()].into());
    g.insert("b".into(), ["c".into()].into());
    g.insert("c".into(), ["a".into()].into());
    g.insert("d".into(), ["a".into()].into());
    let c = cycles(&g);
    assert_eq!(c, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    assert_eq!(one_loop(&g, &c[0]), "a → b → c → a");
}
/// `cargo test --lib layers::print_graph -- --nocapture` prints the module graph;
/// `LAYERS_SRC=/other/src` reads another tree (e.g. an older commit's).
#[test]
fn print_graph() {
    for (k, v) in graph() {
        println!("{k}: {}", v.iter().cloned().collect::<Vec<_>>().join(" "));
    }
}
