//! The `melora` binary's `config` command and its error reporting, run as a
//! user would.

use std::path::{Path, PathBuf};
use std::process::Output;

use melora::config::{Config, Method};

mod common;

use common::melora;

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts a failure reported as one `error: ...` line with the given status,
/// and returns that line.
fn one_line_failure(output: &Output, status: i32) -> String {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(status), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(output.stdout.is_empty(), "stdout: {}", stdout(output));
    err
}

fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn help_lists_the_config_command() {
    let output = melora(&["--help"]);
    assert!(output.status.success());
    let help = stdout(&output);
    assert!(help.contains("config"), "{help}");
    assert!(help.contains("--lora-rank"), "{help}");
}

#[test]
fn version_is_printed() {
    let output = melora(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output).trim(),
        format!("melora {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn no_arguments_prints_help_and_fails() {
    let output = melora(&[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("Usage: melora"));
}

#[test]
fn config_prints_yaml_that_parses_back_to_the_defaults() {
    let output = melora(&["config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let config = Config::from_yaml_str(&stdout(&output)).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn config_check_prints_config_ok() {
    let output = melora(&["config", "--check"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "config OK\n");
}

#[test]
fn config_reads_the_file_and_applies_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "c.yml", "lora:\n  rank: 4\nseed: 9\n");
    let output = melora(&[
        "--seed",
        "3",
        "config",
        "--config",
        path.to_str().unwrap(),
        "--method",
        "reptile",
        "--inner-steps",
        "5",
        "--synthetic-only",
        "--output",
        "out",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let config = Config::from_yaml_str(&stdout(&output)).unwrap();
    assert_eq!(config.lora.rank, 4);
    assert_eq!(config.seed, 3);
    assert_eq!(config.meta_learning.method, Method::Reptile);
    assert_eq!(config.meta_learning.inner.steps, 5);
    assert!(config.data.synthetic_only);
    assert_eq!(config.tracking.output_dir, PathBuf::from("out"));
}

#[test]
fn example_config_checks() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.yml");
    let output = melora(&["config", "--check", "--config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "config OK\n");
}

#[test]
fn malformed_configs_fail_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown-key.yml", "lora:\n  rnak: 4\n", "lora.rnak"),
        ("unknown-top.yml", "seed: 1\nlroa:\n  rank: 4\n", "lroa"),
        ("wrong-type.yml", "lora:\n  rank: \"eight\"\n", "lora.rank"),
        ("rank-zero.yml", "lora:\n  rank: 0\n", "lora.rank"),
        (
            "negative-lr.yml",
            "meta_learning:\n  inner:\n    lr: -0.01\n",
            "meta_learning.inner.lr",
        ),
        (
            "nan-lr.yml",
            "meta_learning:\n  outer:\n    lr: .nan\n",
            "meta_learning.outer.lr",
        ),
        (
            "bad-method.yml",
            "meta_learning:\n  method: mamll\n",
            "meta_learning.method",
        ),
    ];
    for (name, yaml, key) in cases {
        let path = write_config(dir.path(), name, yaml);
        for check in [false, true] {
            let mut args = vec!["config", "--config", path.to_str().unwrap()];
            if check {
                args.push("--check");
            }
            let err = one_line_failure(&melora(&args), 2);
            assert!(err.contains(&format!("`{key}`")), "{name}: {err}");
            assert!(err.contains(name), "{name}: the file is not named: {err}");
        }
    }
}

#[test]
fn missing_config_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yml");
    let err = one_line_failure(&melora(&["config", "--config", path.to_str().unwrap()]), 2);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("configuration file"), "{err}");
}

#[test]
fn invalid_override_names_the_flag_and_the_key() {
    let err = one_line_failure(&melora(&["config", "--lora-rank", "0"]), 2);
    assert!(err.contains("--lora-rank"), "{err}");
    assert!(err.contains("`lora.rank`"), "{err}");
    let err = one_line_failure(&melora(&["config", "--inner-lr", "-0.5"]), 2);
    assert!(err.contains("--inner-lr"), "{err}");
    assert!(err.contains("-0.5"), "{err}");
}

#[test]
fn override_can_correct_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "rank0.yml", "lora:\n  rank: 0\n");
    let output = melora(&[
        "config",
        "--config",
        path.to_str().unwrap(),
        "--lora-rank",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        Config::from_yaml_str(&stdout(&output)).unwrap().lora.rank,
        2
    );
}

#[test]
fn usage_errors_are_one_line() {
    let err = one_line_failure(&melora(&["config", "--no-such-flag"]), 2);
    assert!(err.contains("--no-such-flag"), "{err}");
    let err = one_line_failure(&melora(&["config", "--method", "mamll"]), 2);
    assert!(err.contains("maml, fomaml"), "{err}");
    let err = one_line_failure(&melora(&["config", "--lora-rank", "eight"]), 2);
    assert!(err.contains("--lora-rank"), "{err}");
    one_line_failure(&melora(&["no-such-command"]), 2);
}
