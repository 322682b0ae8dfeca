//! `flotilla-coordinator --config FILE` as a service manager runs it: a bad
//! file stops the daemon before it touches its store, naming file, key and reason.

#![allow(clippy::expect_used)]

use std::process::Command;

fn run_with(config: &str, extra: &[&str]) -> (Option<i32>, String, bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("coordinator.toml");
    let data = dir.path().join("data");
    std::fs::write(&file, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-coordinator"))
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(extra)
        .output()
        .expect("run coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&*file.to_string_lossy(), "FILE");
    (out.status.code(), stderr, data.exists())
}

#[test]
fn a_bad_config_file_is_refused_with_file_key_and_reason() {
    let (code, err, touched) = run_with("listen = '127.0.0.1:0'\nstrategy = 'random'\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim(),
        "flotilla-coordinator: FILE: error: invalid value 'random' for '--strategy <STRATEGY>'"
    );
    assert!(!touched, "the store was created despite the bad config");

    let (code, err, _) = run_with("heartbeat_timeout = 10\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("flotilla-coordinator: FILE: error: unknown key 'heartbeat_timeout' (known: listen, data-dir,"),
        "{err}"
    );

    let (code, err, _) = run_with("listen = '127.0.0.1:0\n", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("flotilla-coordinator: FILE:1:22: error: "),
        "{err}"
    );
}

#[test]
fn a_flag_overrides_a_bad_value_only_if_the_file_is_valid_on_its_own() {
    // The file is checked alone: a command-line flag does not excuse a bad
    // value in it, or the next restart without that flag would fail.
    let (code, err, _) = run_with("strategy = 'random'\n", &["--strategy", "spread"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid value 'random'"), "{err}");
}
