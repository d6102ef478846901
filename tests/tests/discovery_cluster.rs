//! Automatic clustering over mDNS with real `core-node` processes on this
//! host (all ports 0, no peer lists), and the mode checks at start.
//!
//! Each test uses a cluster id unique to the run, so other lanmesh nodes
//! announcing on the same host are ignored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lanmesh_tests::cluster::{NodeProc, Pki, get, get_json, put, wait_for, wait_voter};
use lanmesh_tests::{bin, run};

fn node_args(
    pki: &Pki,
    dir: &std::path::Path,
    cluster: &str,
    name: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--node-id",
        name,
        "--cluster-id",
        cluster,
        "--api-addr",
        "127.0.0.1:0",
        "--raft-addr",
        "127.0.0.1:0",
        "--client-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--data-dir".into(), dir.join(name).display().to_string()]);
    args.extend(pki.node_args(name));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Three cores with no peer list find each other by mDNS and form exactly one
/// cluster with one leader; a fourth started later with only
/// `--mode local-cluster` joins by itself and becomes a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cores_form_a_cluster_by_mdns_and_a_fourth_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = format!("mdns-{}", std::process::id());
    let pki = Pki::new(tmp.path(), &cluster);
    let mut nodes: Vec<NodeProc> = (1..=3)
        .map(|i| {
            let name = format!("node-{i}");
            let args = node_args(
                &pki,
                tmp.path(),
                &cluster,
                &name,
                &["--mode", "local-cluster", "--bootstrap-expect", "3"],
            );
            NodeProc::new(&name, &tmp.path().join(&name), tmp.path(), args)
        })
        .collect();
    let started = std::time::Instant::now();
    for n in &mut nodes {
        n.start().await;
    }
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let leader = wait_for(
        "one cluster with one leader and three voters",
        Duration::from_secs(40),
        || {
            let apis = apis.clone();
            async move {
                let mut leaders = std::collections::BTreeSet::new();
                for api in &apis {
                    let s = get_json(api, "/v1/status?consistency=local").await?;
                    if s["members"].as_array()?.len() != 3 {
                        return None;
                    }
                    leaders.insert(s["leader_id"].as_str()?.to_owned());
                }
                (leaders.len() == 1).then(|| leaders.into_iter().next().unwrap())
            }
        },
    )
    .await;
    eprintln!("formed by mDNS in {:?}, leader {leader}", started.elapsed());
    put(&apis[0], "found", "by-mdns").await;

    let args = node_args(
        &pki,
        tmp.path(),
        &cluster,
        "node-4",
        &["--mode", "local-cluster"],
    );
    let mut four = NodeProc::new("node-4", &tmp.path().join("node-4"), tmp.path(), args);
    four.start().await;
    let api0 = apis[0].clone();
    wait_voter(&api0, "node-4", Duration::from_secs(40)).await;
    assert_eq!(
        get(&four.api, "found", false).await.as_deref(),
        Some("by-mdns")
    );

    // An edge with no --upstream finds the cores by mDNS too.
    pki.issue(lanmesh_shared::identity::Role::Edge, "edge-1");
    let f = |n: &str| pki.dir.join(n).display().to_string();
    let args: Vec<String> = [
        "run",
        "--node-id",
        "edge-1",
        "--cluster-id",
        &cluster,
        "--data-dir",
        &tmp.path().join("edge-1").display().to_string(),
        "--client-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--ca",
        &f("ca.crt"),
        "--cert",
        &f("edge-1.crt"),
        "--key",
        &f("edge-1.key"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut edge = NodeProc::edge("edge-1", &tmp.path().join("edge-1"), tmp.path(), args);
    edge.start().await;
    let s = wait_for(
        "the edge linked to a core found by mDNS",
        Duration::from_secs(30),
        || async {
            let s = get_json(&edge.api, "/v1/status").await?;
            (s["upstream"]["connected"] == true && s["revision"].as_u64()? > 0).then_some(s)
        },
    )
    .await;
    eprintln!("edge found {} by mDNS", s["upstream"]["node_id"]);
    drop(edge);
    drop(nodes);
}

/// An air-gapped node refuses to start without its certificates, with a clear
/// message naming the missing piece or file; mode and peer checks are errors
/// before anything starts.
#[test]
fn mode_checks_refuse_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let core = bin("core-node");
    let r = run(
        &core,
        d,
        &[
            "run",
            "--mode",
            "air-gapped",
            "--peers",
            "10.0.0.2:10000",
            "--bootstrap-expect",
            "2",
        ],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("air-gapped mode needs") && r.stderr.contains("--ca"),
        "{r:?}"
    );

    let r = run(
        &core,
        d,
        &[
            "run",
            "--mode",
            "air-gapped",
            "--join",
            "10.0.0.2:10000",
            "--ca",
            "missing/ca.crt",
            "--cert",
            "missing/node-1.crt",
            "--key",
            "missing/node-1.key",
            "--data-dir",
            "data",
        ],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("missing/ca.crt"), "names the file: {r:?}");

    let r = run(
        &core,
        d,
        &["run", "--mode", "single", "--peers", "10.0.0.2:10000"],
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("single takes no peers"), "{r:?}");

    let r = run(&core, d, &["run", "--mode", "air-gapped", "--join", "auto"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("needs this node's CA") || r.stderr.contains("multicast"),
        "{r:?}"
    );
    assert!(!d.join("lanmesh-data").exists(), "nothing was created");
}
