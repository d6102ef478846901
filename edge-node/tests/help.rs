//! The `edge-node` command surface: help names every client command and the
//! flags the interface promises; usage and set-up errors are clear. (Login,
//! send, tail and who against a real core are tested as processes in
//! `tests/tests/edge_cli.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn edge(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-node"))
        .args(args)
        .env_remove("LANMESH_CA")
        .env_remove("LANMESH_SERVER")
        .output()
        .expect("run edge-node");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `edge-node --help` lists the client commands and a worked example.
#[test]
fn help_lists_the_client_commands() {
    let (code, out, _) = edge(&["--help"]);
    assert_eq!(code, Some(0));
    for sub in ["login", "send", "tail", "who", "run", "status"] {
        assert!(out.contains(sub), "help lacks {sub}:\n{out}");
    }
    assert!(out.contains("edge-node login --user alice"), "{out}");
    for (sub, flags) in [
        ("login", &["--user", "--server", "--ca", "--token-file"][..]),
        ("send", &["--idempotency-key", "--cert", "--key"][..]),
        ("tail", &["--limit", "--follow", "--json"][..]),
        ("who", &["--server", "--ca"][..]),
    ] {
        let (code, out, _) = edge(&[sub, "--help"]);
        assert_eq!(code, Some(0));
        for f in flags {
            assert!(out.contains(f), "{sub} --help lacks {f}:\n{out}");
        }
    }
}

/// Missing arguments are usage errors (exit 2); a missing CA file is named.
#[test]
fn usage_and_setup_errors_are_clear() {
    let (code, _, err) = edge(&["send", "ops"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = edge(&["who", "--ca", "/nonexistent/ca.crt"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("/nonexistent/ca.crt") && err.contains("--ca"),
        "{err}"
    );
    let (code, _, err) = edge(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("pki issue edge") && err.contains("--upstream"),
        "{err}"
    );
    let (code, _, err) = edge(&["run"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--ca, --cert and --key"), "{err}");
}
