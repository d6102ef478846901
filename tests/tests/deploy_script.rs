//! `deploy/local-cluster.sh` as a newcomer runs it: start three cores, write
//! through one and read through another, stop, start again with the data
//! kept, clean up. Ports come from a free base picked at run time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use lanmesh_tests::bin;
use lanmesh_tests::cluster::free_port;

fn script(dir: &Path, base: u16, cmd: &str) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    Command::new("bash")
        .arg(root.join("deploy/local-cluster.sh"))
        .arg(cmd)
        .env("LANMESH_LOCAL_DIR", dir)
        .env("LANMESH_BASE_PORT", base.to_string())
        .env("LANMESH_BIN_DIR", bin("core-node").parent().unwrap())
        .output()
        .unwrap()
}

fn core(args: &[&str]) -> String {
    let out = Command::new(bin("core-node")).args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// start (three cores and an edge linked to them) → write/read across nodes →
/// stop → start keeps data → clean.
#[test]
fn local_cluster_script_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    // Node N uses base + 1000*(N-1) + {0,1,2}: keep the range inside the port space.
    let base = loop {
        let p = free_port();
        if p < 60_000 {
            break p;
        }
    };
    let out = script(&dir, base, "start");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("leader") && text.contains("node-3"), "{text}");
    assert!(
        text.contains("edge        edge-1") && text.contains("upstream    node-"),
        "the edge links to a core: {text}"
    );
    let api = |n: u16| format!("http://127.0.0.1:{}", base + 1000 * (n - 1));
    core(&["kv", "put", "hello", "world", "--api", &api(1)]);
    assert_eq!(core(&["kv", "get", "hello", "--api", &api(3)]), "world");

    let out = script(&dir, base, "stop");
    assert!(out.status.success(), "{out:?}");
    let out = script(&dir, base, "start");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(core(&["kv", "get", "hello", "--api", &api(2)]), "world");
    let out = script(&dir, base, "clean");
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.exists());
}
