//! The `pki` command surface: every subcommand has help that names its flags,
//! and usage errors exit 2 with a clear first line. (End-to-end behaviour is
//! tested as a process in `tests/tests/pki_cli.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn pki(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pki"))
        .args(args)
        .output()
        .expect("run pki");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pki --help` lists every subcommand and a worked example.
#[test]
fn top_level_help_lists_subcommands() {
    let (code, out, _) = pki(&["--help"]);
    assert_eq!(code, Some(0));
    for sub in ["init", "issue", "list", "inspect", "revoke", "renew"] {
        assert!(out.contains(sub), "help lacks {sub}:\n{out}");
    }
    assert!(out.contains("pki init --cluster-id"), "{out}");
}

/// Each subcommand's help names the flags the interface promises.
#[test]
fn subcommand_help_names_flags() {
    for (sub, flags) in [
        ("init", &["--cluster-id", "--out", "--days", "--force"][..]),
        (
            "issue",
            &[
                "--name", "--ip", "--dns", "--days", "--ca-dir", "--out", "core", "client",
            ][..],
        ),
        ("list", &["--check"][..]),
        ("inspect", &["FILE"][..]),
        ("revoke", &["--serial", "--ca-dir", "--cert"][..]),
        ("renew", &["--ca-dir", "--days", "--out"][..]),
    ] {
        let (code, out, _) = pki(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub} --help");
        for flag in flags {
            assert!(
                out.contains(flag),
                "`pki {sub} --help` lacks {flag}:\n{out}"
            );
        }
    }
}

/// A usage error (unknown role) exits 2 and says what is wrong on its first line.
#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = pki(&[
        "issue", "king", "--name", "x", "--ca-dir", ".", "--out", ".",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("invalid value 'king'"),
        "{err}"
    );
}
