//! The command-line contract: `check` on the shipped configs and on broken
//! ones, `keygen`, and exit codes.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::process::Command;

use common::{World, burrow_bin};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(burrow_bin())
        .args(args)
        .output()
        .expect("run burrow");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("configs/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = run(&["check", "--config", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            assert!(out.contains(": ok ("), "{out}");
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the edge and agent examples, checked {checked}"
    );
}

#[test]
fn misspelt_key_fails_with_line_and_column() {
    let w = World::new();
    let edge = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/edge.example.toml"
    ))
    .unwrap();
    let broken = edge.replacen("service = \"webui\"", "servise = \"webui\"", 1);
    let line = broken
        .lines()
        .position(|l| l.starts_with("servise"))
        .unwrap()
        + 1;
    let path = w.write("edge.toml", &broken);
    let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    let expected = format!("{}:{line}:1: unknown field `servise`", path.display());
    assert!(
        err.starts_with(&expected),
        "expected {expected:?}, got {err:?}"
    );

    // The daemons refuse the same file the same way, before binding anything.
    let (code, _, err) = run(&["edge", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn truncated_and_mistyped_configs_fail_with_positions() {
    let w = World::new();
    let cases = [
        (
            "truncated.toml",
            "[agent]\nname = \"home\"\nedge = \"e:1",
            "truncated.toml:3:",
        ),
        (
            "badaddr.toml",
            "[edge]\nstate_dir = \"/s\"\ntunnel = \"nowhere\"\n",
            "badaddr.toml:3:10:",
        ),
        (
            "neither.toml",
            "[other]\nx = 1\n",
            "neither.toml: expected exactly one",
        ),
        (
            "plain.toml",
            "[edge]\nstate_dir = \"/s\"\n[[user]]\nname = \"a\"\npassword = \"secret\"\n",
            "plain.toml:5:12: user[0].password",
        ),
    ];
    for (name, text, expected) in cases {
        let path = w.write(name, text);
        let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{name}: {err}");
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in {err:?}"
        );
        assert!(
            !err.contains("secret"),
            "a password leaked into the error: {err}"
        );
    }
    let (code, _, err) = run(&["check", "--config", "/nonexistent/edge.toml"]);
    assert_eq!(code, 78);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn keygen_prints_a_fingerprint_and_never_overwrites() {
    let w = World::new();
    let path = w.path("agent.key");
    let (code, out, err) = run(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let fp = out.trim();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    let key = burrow_proto::identity::Identity::load(&path).unwrap();
    assert_eq!(key.fingerprint().to_string(), fp);
    let (code, _, err) = run(&["keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("refusing to overwrite"), "{err}");
}
