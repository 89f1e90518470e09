//! `melora bench data`, run as a user would, on the real Omniglot zips
//! (`../shared/data/omniglot`) and the system's WordNet (`scripts/fetch-data.sh`).
//! Where they are absent the test prints `skipped:`, unless `MELORA_REQUIRE_SHARED=1`.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::melora;

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn omniglot() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot")
}

#[test]
fn bench_data_writes_json_and_markdown() {
    let wordnet = Path::new("/usr/share/wordnet/data.noun");
    if !omniglot().exists() || !wordnet.exists() {
        assert!(
            std::env::var("MELORA_REQUIRE_SHARED").map_or(true, |v| v != "1"),
            "Omniglot ({}) or WordNet ({}) missing (MELORA_REQUIRE_SHARED=1)",
            omniglot().display(),
            wordnet.display()
        );
        eprintln!("skipped: Omniglot or WordNet not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let output = melora(&[
        "bench",
        "data",
        "--omniglot",
        omniglot().to_str().unwrap(),
        "--episodes",
        "20",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.contains("| Omniglot | 242 | 5840 | 20-way 1-shot, 5 queries |"),
        "{table}"
    );
    assert!(
        table.contains("| WordNet | 41 | 95882 | 5-way 5-shot, 5 queries |"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data.json")).unwrap()).unwrap();
    assert_eq!(json["data"][0]["episodes"], 20);
    assert!(json["data"][1]["episodes_per_second"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(out.join("data.md"))
        .unwrap()
        .starts_with("| data set |"));
}

#[test]
fn bench_data_names_missing_data_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-omniglot");
    let output = melora(&[
        "bench",
        "data",
        "--omniglot",
        missing.to_str().unwrap(),
        "--output",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("--omniglot PATH"),
        "{err}"
    );
    let output = melora(&[
        "bench",
        "data",
        "--omniglot",
        dir.path().to_str().unwrap(),
        "--wordnet",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("scripts/fetch-data.sh"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bench_data_tokenises_wordnet_with_a_given_tokenizer() {
    if !omniglot().exists() || !Path::new("/usr/share/wordnet/data.noun").exists() {
        assert!(
            std::env::var("MELORA_REQUIRE_SHARED").map_or(true, |v| v != "1"),
            "Omniglot or WordNet missing (MELORA_REQUIRE_SHARED=1)"
        );
        eprintln!("skipped: Omniglot or WordNet not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A tiny WordPiece tokenizer.json in BERT's layout.
    let words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "the", "of", "or"];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    });
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, json.to_string()).unwrap();
    let out = dir.path().join("results");
    let output = melora(&[
        "bench",
        "data",
        "--omniglot",
        omniglot().to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--episodes",
        "5",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data.json")).unwrap()).unwrap();
    assert_eq!(
        json["data"][1]["tokenizer"],
        tokenizer.display().to_string()
    );
}
