//! The crate's layers import only the layers below them (README, Architecture): this
//! test reads every `crate::` path in the library's non-test code and fails on any
//! that points sideways or up, so the folder-level import graph has no cycle.
//!
//! `cargo test --test layers -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up; a layer may import the layers of earlier rows
/// only (those of its own row are peers and may not import each other).
const LAYERS: &[&[&str]] = &[
    &["error", "io"],
    &["tensor"],
    &["memory"],
    &["track"],
    &["nn", "optim"],
    &["config"],
    &["data"],
    &["models"],
    &["engine"],
    &["meta"],
    &["eval"],
    &["run"],
    &["plan"],
    &["train"],
    &["report"],
    &["bench", "selfcheck"],
    &["cli"],
];

/// Items of the crate root that every layer may name (`crate::Result`, …).
const ROOT_ITEMS: &[&str] = &["Error", "Result", "init"];

/// Test-only modules: tests may use any layer.
const TEST_MODULES: &[&str] = &["fixtures"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&layer))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a file holds only test code (`*_tests.rs`, `tests.rs`, test helpers).
fn is_test_file(path: &Path) -> bool {
    let name = path.file_stem().unwrap().to_string_lossy();
    name == "tests" || name.ends_with("_tests") || name.starts_with("test_")
}

/// The file's code without comments and without its trailing test module.
fn library_code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after each `crate::` in `code`, reading braces of grouped
/// imports (`use crate::{data::Batch, models::{…}}`) at their top level.
fn imported_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let start = from + at + "crate::".len();
        from = start;
        // `super::crate::` cannot occur; `$crate::` (macros) is the same crate.
        if bytes.get(start) == Some(&b'{') {
            let (mut depth, mut segment_start, mut i) = (0usize, start + 1, start);
            while i < bytes.len() {
                match bytes[i] {
                    b'{' => depth += 1,
                    b'}' | b',' if depth == 1 => {
                        found.insert(first_identifier(&code[segment_start..i]));
                        segment_start = i + 1;
                        if bytes[i] == b'}' {
                            break;
                        }
                    }
                    b'}' => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
        } else {
            found.insert(first_identifier(&code[start..]));
        }
    }
    found.remove("");
    found
}

fn first_identifier(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// layer → (imported layer → files).
fn import_graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for path in files {
        let relative = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let layer = relative
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if ["lib", "main"].contains(&layer.as_str())
            || TEST_MODULES.contains(&layer.as_str())
            || is_test_file(&path)
        {
            continue;
        }
        let code = library_code(&std::fs::read_to_string(&path).unwrap());
        for module in imported_modules(&code) {
            if module != layer && !ROOT_ITEMS.contains(&module.as_str()) {
                graph
                    .entry(layer.clone())
                    .or_default()
                    .entry(module)
                    .or_default()
                    .insert(relative.clone());
            }
        }
    }
    graph
}

#[test]
fn grouped_and_nested_imports_are_read() {
    let code = "use crate::{data::Batch, models::{a, b::{c}}, Result};\nlet x = crate::engine::X;";
    let found: Vec<_> = imported_modules(code).into_iter().collect();
    assert_eq!(found, ["Result", "data", "engine", "models"]);
}

#[test]
fn every_layer_imports_only_the_layers_below_it() {
    let graph = import_graph();
    let mut violations = Vec::new();
    for (layer, imports) in &graph {
        let Some(own) = rank(layer) else {
            violations.push(format!(
                "`src/{layer}` is not in the layer list of tests/layers.rs (and README)"
            ));
            continue;
        };
        let line: Vec<String> = imports
            .iter()
            .map(|(target, files)| format!("{target} ({})", files.len()))
            .collect();
        println!("{layer} -> {}", line.join(", "));
        for (target, files) in imports {
            match rank(target) {
                Some(r) if r < own => {}
                Some(_) => violations.push(format!(
                    "{layer} imports {target}, which is not below it: {}",
                    files.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
                None => violations.push(format!(
                    "{layer} imports `crate::{target}`, which is not a layer: {}",
                    files.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
