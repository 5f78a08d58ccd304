//! The command-line contract: `check` on the shipped configs and on broken
//! ones, `keygen`, and exit codes.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::process::Command;

use common::{World, burrow_bin, run};

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

/// `text` with the first `from` replaced by `to`, and the 1-based line and
/// column where it was (where an error about the new value must point).
fn replace_at(text: &str, from: &str, to: &str) -> (String, usize, usize) {
    let offset = text
        .find(from)
        .unwrap_or_else(|| panic!("{from:?} not in the example"));
    let line = text[..offset].matches('\n').count() + 1;
    let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    (text.replacen(from, to, 1), line, col)
}

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{}/configs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Values that parse but would fail (or silently do nothing) at runtime:
/// each is refused by `check` with exit 78, its file:line:col and its key.
#[test]
fn values_that_would_fail_later_fail_check_at_their_position() {
    let w = World::new();
    let edge = example("edge.example.toml");
    let agent = example("agent.example.toml");
    let hash = "\"$argon2id$v=19$m=19456,t=2,p=1$a7NMe3BoQ3cPkekqu7hDFA$ZUYR6OMzxFxDPEkWCgLnWv6c4m9Pbe7PRGlfgT1ntjM\"";
    let cut_hash = &format!("{}\"", &hash[..hash.len() - 4]);
    let cases: Vec<(&str, &str, &str, &str, &str)> = vec![
        // (file, from, to, key in the message, part of the reason)
        (
            "edge",
            hash,
            "\"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA\"",
            "user[0].password",
            "salt",
        ),
        ("edge", hash, cut_hash, "user[0].password", "cut short"),
        (
            "edge",
            "\"localhost:11434\"",
            "\"bad host\\r\\n\"",
            "route[1].host_header",
            "control",
        ),
        (
            "edge",
            "\"localhost:11434\"",
            "\"a b\"",
            "route[1].host_header",
            "spaces",
        ),
        (
            "edge",
            "\"localhost:11434\"",
            "\"x@y\"",
            "route[1].host_header",
            "userinfo",
        ),
        (
            "edge",
            "\"localhost:11434\"",
            "\"\"",
            "route[1].host_header",
            "empty",
        ),
        (
            "edge",
            "hold = \"180s\"",
            "hold = \"99999999999d\"",
            "route[1].wake.hold",
            "7 days",
        ),
        (
            "edge",
            "idle_timeout = \"60s\"",
            "idle_timeout = \"99999999999d\"",
            "limits.idle_timeout",
            "7 days",
        ),
        (
            "edge",
            "idle_timeout = \"60s\"",
            "idle_timeout = \"0s\"",
            "limits.idle_timeout",
            "7 days",
        ),
        (
            "edge",
            "\"/static/*\"",
            "\"/static/**\"",
            "route[0].public_paths[1]",
            "'**'",
        ),
        (
            "edge",
            "\"/static/*\"",
            "\"/*.js\"",
            "route[0].public_paths[1]",
            "last character",
        ),
        (
            "edge",
            "\"/static/*\"",
            "\"/a%20b\"",
            "route[0].public_paths[1]",
            "escapes are not supported",
        ),
        (
            "agent",
            "# probe_interval = \"5s\"",
            "probe_interval = \"99999999999d\"",
            "service[0].probe_interval",
            "7 days",
        ),
    ];
    for (i, (file, from, to, key, why)) in cases.into_iter().enumerate() {
        let base = if file == "edge" { &edge } else { &agent };
        let (text, line, mut col) = replace_at(base, from, to);
        if let Some(value) = to.find(" = ") {
            col += value + 3; // the error points at the value, not the key
        }
        let path = w.write(&format!("{file}{i}.toml"), &text);
        let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{to}: {err}");
        let expected = format!("{}:{line}:{col}: {key}: ", path.display());
        assert!(
            err.starts_with(&expected),
            "expected {expected:?}, got {err:?}"
        );
        assert!(err.contains(why), "{to}: {err}");
        if key.ends_with("password") {
            assert!(
                !err.contains("a7NMe3BoQ3cPkekqu7hDFA"),
                "the salt leaked: {err}"
            );
            assert!(!err.contains("c2FsdA"), "the salt leaked: {err}");
        }
    }

    // An agent announces at most 128 services: the 129th entry is refused.
    let services: String = (0..129)
        .map(|i| {
            format!(
                "[[service]]\nname = \"s{i}\"\nurl = \"tcp://127.0.0.1:{}\"\n",
                i + 1
            )
        })
        .collect();
    let head = "[agent]\nname = \"home\"\nedge = \"edge.example.com:443\"\nkey = \"agent.key\"\n";
    let path = w.write("many.toml", &format!("{head}{services}"));
    let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    let expected = format!("{}:{}:1: service[128]: ", path.display(), 5 + 3 * 128);
    assert!(
        err.starts_with(&expected),
        "expected {expected:?}, got {err:?}"
    );
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

/// Logs that go to the journal or a file (stderr not a terminal) carry no
/// ANSI colour codes.
#[test]
fn logs_off_a_terminal_have_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let w = World::new();
    let (_, fp) = w.agent_key("home");
    let config = w.write("edge.toml", &common::tunnel_only_edge_toml(&w, &fp));
    let mut child = Command::new(burrow_bin())
        .args(["edge", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let done = line.contains("edge listening");
            if tx.send(line).is_err() || done {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(common::WAIT)
            .expect("the edge logs it listens");
        let done = line.contains("edge listening");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "a colour code in {line:?}");
    }
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
}
