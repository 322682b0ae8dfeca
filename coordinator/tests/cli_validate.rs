//! `flotilla validate` as an operator runs it: real files, real exit codes.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const GOOD_DOMAIN: &str = "<domain type='kvm'>\n  <name>web01</name>\n  \
    <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n  <memory unit='MiB'>64</memory>\n  \
    <os><type>hvm</type></os>\n  <devices>\n    \
    <graphics type='vnc'><listen type='network' network='public'/></graphics>\n  \
    </devices>\n</domain>\n";

struct Run {
    code: i32,
    stdout: String,
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write test file");
    p
}

fn validate(files: &[&Path]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("validate")
        .args(files)
        .output()
        .expect("run flotilla");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn rejected(name: &str, body: &[u8], expect: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = write(dir.path(), name, body);
    let run = validate(&[&f]);
    assert_eq!(run.code, 1, "{name}: {}", run.stdout);
    assert!(
        run.stdout.contains(expect),
        "{name}: expected {expect:?} in {}",
        run.stdout
    );
}

#[test]
fn accepts_a_good_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = write(dir.path(), "web01.xml", GOOD_DOMAIN.as_bytes());
    let run = validate(&[&f]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.contains("web01.xml: ok (domain web01)"),
        "{}",
        run.stdout
    );
}

#[test]
fn unclosed_tag_points_at_line_and_column() {
    let body = GOOD_DOMAIN.replace("</devices>", "");
    rejected(
        "unclosed.xml",
        body.as_bytes(),
        "unclosed.xml:9:1: error: /domain/devices: malformed XML: ill-formed document: expected `</devices>`",
    );
}

#[test]
fn bad_unit_is_named() {
    let body = GOOD_DOMAIN.replace("unit='MiB'", "unit='furlongs'");
    rejected(
        "unit.xml",
        body.as_bytes(),
        "unit.xml:4:3: error: /domain/memory: invalid <memory> '64 furlongs'",
    );
}

#[test]
fn short_uuid_is_rejected() {
    let body = GOOD_DOMAIN.replace("c7a5fdbd-edaf-9455-926a-d65c16db1809", "c7a5fdbd-edaf");
    rejected(
        "uuid.xml",
        body.as_bytes(),
        "uuid.xml:3:3: error: /domain/uuid: malformed uuid element",
    );
}

#[test]
fn conflicting_listen_addresses_are_rejected() {
    let body = GOOD_DOMAIN.replace(
        "<graphics type='vnc'><listen type='network' network='public'/></graphics>",
        "<graphics type='vnc' listen='127.0.0.1'><listen type='address' address='0.0.0.0'/></graphics>",
    );
    rejected(
        "listen.xml",
        body.as_bytes(),
        "listen.xml:7:45: error: /domain/devices/graphics/listen: graphics 'listen' attribute \
         '127.0.0.1' must match 'address' attribute of first listen element (found '0.0.0.0')",
    );
}

#[test]
fn entity_bomb_is_refused_without_expansion() {
    let mut body = String::from("<?xml version='1.0'?>\n<!DOCTYPE lolz [\n <!ENTITY lol 'lol'>\n");
    for i in 1..10 {
        let prev = if i == 1 {
            "lol".to_string()
        } else {
            format!("lol{}", i - 1)
        };
        body.push_str(&format!(
            " <!ENTITY lol{i} '{}'>\n",
            format!("&{prev};").repeat(10)
        ));
    }
    body.push_str("]>\n<domain type='kvm'><name>&lol9;</name></domain>\n");
    rejected(
        "bomb.xml",
        body.as_bytes(),
        "bomb.xml:2:1: error: /: DOCTYPE declarations are not accepted",
    );
}

#[test]
fn two_mebibyte_file_is_refused() {
    let mut body = GOOD_DOMAIN.replace("</domain>", "");
    body.push_str(&format!(
        "<description>{}</description></domain>",
        "x".repeat(2 << 20)
    ));
    rejected("big.xml", body.as_bytes(), "over the limit of 1048576");
}

#[test]
fn one_bad_file_fails_the_run_but_all_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), "good.xml", GOOD_DOMAIN.as_bytes());
    let bad = write(
        dir.path(),
        "bad.xml",
        b"<network><name>x</name><forward mode='warp'/></network>",
    );
    let run = validate(&[&good, &bad]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("good.xml: ok (domain web01)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("bad.xml:1:24: error: /network/forward: invalid attribute 'mode' 'warp'"),
        "{}",
        run.stdout
    );
}

#[test]
fn completion_scripts_cover_the_verbs() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["completion", shell])
            .output()
            .expect("run flotilla");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for verb in ["domdisplay", "migrate", "host-drain", "validate"] {
            assert!(script.contains(verb), "{shell} completion lacks {verb}");
        }
    }
}
