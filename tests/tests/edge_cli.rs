//! The command-line client (`edge-node login/send/tail/who`) and the admin
//! commands it needs (`core-node user add`, `channel add`), against a real
//! single-node default started with no TLS flags: the README walkthrough.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanmesh_tests::cluster::NodeProc;
use lanmesh_tests::{bin, run_env, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_send_tail_who_against_the_single_node_default() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    // The single-node default (embedded CA in ./lanmesh-data/node-1/tls), on port 0.
    let mut node = NodeProc::new(
        "node-1",
        &cwd.join("lanmesh-data/node-1"),
        cwd,
        [
            "run",
            "--api-addr",
            "127.0.0.1:0",
            "--raft-addr",
            "127.0.0.1:0",
            "--client-addr",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec(),
    );
    node.start().await;
    let api = node.api.clone();
    let server = node.client.unwrap().to_string();
    let token = cwd.join("token.json");
    let token = token.to_str().unwrap();
    let core = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = args.to_vec();
        all.extend(["--api", &api]);
        run_env(&bin("core-node"), cwd, &all, env)
    };
    // The default --ca is the single-node default's, relative to the cwd.
    let edge = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server, "--token-file", token]);
        run_env(&bin("edge-node"), cwd, &all, env)
    };

    // The first election writes the token key: user add waits on the API.
    wait_until("user add", Duration::from_secs(20), || {
        (core(&["user", "add", "alice"], &[("LANMESH_PASSWORD", "s3cret")]).code == Some(0))
            .then_some(())
    });
    core(&["channel", "add", "ops"], &[]).ok();
    let list = core(&["user", "list"], &[]).ok();
    assert!(
        list.stdout.contains("alice") && !list.stdout.contains("argon2"),
        "{}",
        list.stdout
    );

    let early = edge(&["send", "ops", "x"], &[]);
    assert_ne!(early.code, Some(0));
    assert!(early.stderr.contains("not logged in"), "{}", early.stderr);
    let wrong = edge(
        &["login", "--user", "alice"],
        &[("LANMESH_PASSWORD", "nope")],
    );
    assert!(wrong.stderr.contains("login refused"), "{wrong:#?}");
    let ok = edge(
        &["login", "--user", "alice"],
        &[("LANMESH_PASSWORD", "s3cret")],
    )
    .ok();
    assert!(ok.stdout.contains("logged in as alice"), "{}", ok.stdout);

    let sent = edge(&["send", "ops", "hello", "--idempotency-key", "k1"], &[]).ok();
    assert_eq!(sent.stdout.trim(), "posted node-1#1");
    let again = edge(&["send", "ops", "hello", "--idempotency-key", "k1"], &[]).ok();
    assert!(
        again.stdout.contains("already posted as node-1#1"),
        "{}",
        again.stdout
    );
    let missing = edge(&["send", "nowhere", "x"], &[]);
    assert!(
        missing.stderr.contains("core-node channel add"),
        "{missing:#?}"
    );
    for i in 0..5 {
        edge(&["send", "ops", &format!("m{i}")], &[]).ok();
    }
    let tail = edge(&["tail", "ops", "--limit", "3"], &[]).ok();
    let lines: Vec<&str> = tail.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", tail.stdout);
    assert!(
        lines[0].ends_with("alice: m2") && lines[2].ends_with("alice: m4"),
        "{lines:?}"
    );

    // tail --follow prints new messages live, and makes its user present.
    let mut follower = Command::new(bin("edge-node"))
        .args([
            "tail",
            "ops",
            "--follow",
            "--limit",
            "0",
            "--server",
            &server,
            "--token-file",
            token,
        ])
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let reader = {
        let out = out.clone();
        let stdout = follower.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        })
    };
    wait_until(
        "the follower to be present",
        Duration::from_secs(15),
        || {
            let who = edge(&["who"], &[]);
            who.stdout.contains("alice").then_some(())
        },
    );
    edge(&["send", "ops", "live one"], &[]).ok();
    wait_until("the live message", Duration::from_secs(10), || {
        out.lock()
            .unwrap()
            .contains("alice: live one")
            .then_some(())
    });
    assert!(
        !out.lock().unwrap().contains("m4"),
        "--limit 0 printed no history"
    );
    let _ = follower.kill();
    let _ = follower.wait();
    let _ = reader.join();
    let json = edge(&["who", "--json"], &[]).ok();
    assert!(
        json.stdout.contains("\"subject\":\"alice\""),
        "{}",
        json.stdout
    );
}
