//! `core-node` as real processes on loopback: single node, 3-node quorum,
//! leader failure, join/leave, snapshot catch-up, Raft-port certificate
//! checks, and bad API input.
//!
//! Cluster tests take a process-wide lock so that only one cluster runs at a
//! time: several 3-node clusters of debug builds on a 2-core CI machine would
//! starve each other's heartbeats and test the scheduler instead of Raft.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lanmesh_shared::identity::Role;
use lanmesh_shared::link::{self, AlertReason, LinkError};
use lanmesh_shared::pki::{Ca, KeyType, LeafRequest};
use lanmesh_shared::tls::{self, ALPN_RAFT, PeerPolicy, TlsMaterial, Transport};
use lanmesh_tests::cluster::{Cluster, NodeProc, get, get_json, http, put, wait_for, wait_voter};
use lanmesh_tests::{bin, run};
use tokio::sync::Mutex;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A single node started with no config file, no flags and no certificates
/// (only the addresses moved to port 0 through the environment) serves KV
/// from ./lanmesh-data/node-1, and a restart keeps the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_defaults_and_restart() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lanmesh-data/node-1");
    let mut node = NodeProc::new("node-1", &data, tmp.path(), Vec::new())
        .env("LANMESH_API_ADDR", "127.0.0.1:0")
        .env("LANMESH_RAFT_ADDR", "127.0.0.1:0")
        .env("LANMESH_CLIENT_ADDR", "127.0.0.1:0");
    node.start().await;
    assert!(
        data.join("tls/ca.crt").is_file(),
        "throw-away CA created under the data dir"
    );
    assert!(
        node.log_tail(50).contains("throw-away CA"),
        "and the log says so"
    );
    wait_for("the node to be ready", Duration::from_secs(20), || async {
        let (s, _) = http(Method::GET, &node.api, "/readyz", Vec::new()).await?;
        (s == StatusCode::OK).then_some(())
    })
    .await;
    let r1 = put(&node.api, "app/greeting", "hello").await;
    let r2 = put(&node.api, "app/greeting", "hello again").await;
    assert!(r2 > r1, "revisions grow");
    assert_eq!(
        get(&node.api, "app/greeting", false).await.as_deref(),
        Some("hello again")
    );

    // Restart (SIGTERM, then start again on new ports: the node fixes its
    // own address in the membership).
    assert!(
        node.terminate().is_some_and(|s| s.success()),
        "clean exit on SIGTERM"
    );
    node.start().await;
    let value = wait_for("the key after restart", Duration::from_secs(20), || async {
        get_json(&node.api, "/readyz").await?;
        get(&node.api, "app/greeting", false).await
    })
    .await;
    assert_eq!(value, "hello again");
    let r3 = put(&node.api, "app/other", "x").await;
    assert!(r3 > r2, "revisions keep growing after a restart");
}

/// Three nodes elect exactly one leader; a write sent to a follower lands; a
/// linearizable read after the acknowledged write sees it on every node; the
/// CLI works against a follower too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_leader_writes_through_followers() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, "").await;
    let (leader, _) = cluster.leader().await;
    let mut leaders = 0;
    for n in &cluster.nodes {
        let s = n.status().await.unwrap();
        leaders += usize::from(s["role"] == "leader");
        assert_eq!(s["members"].as_array().unwrap().len(), 3);
    }
    assert_eq!(leaders, 1, "exactly one leader");
    let follower = (leader + 1) % 3;
    for i in 0..20 {
        put(
            &cluster.nodes[follower].api,
            &format!("k{i}"),
            &format!("v{i}"),
        )
        .await;
        // Linearizable read on every node right after the acknowledgement.
        for n in &cluster.nodes {
            assert_eq!(
                get(&n.api, &format!("k{i}"), false).await.as_deref(),
                Some(format!("v{i}").as_str()),
                "node {} after write {i}",
                n.name
            );
        }
    }
    let cli = run(
        &bin("core-node"),
        cluster.dir(),
        &["kv", "get", "k7", "--api", &cluster.nodes[follower].api],
    )
    .ok();
    assert_eq!(cli.stdout, "v7");
    let status = run(
        &bin("core-node"),
        cluster.dir(),
        &["status", "--api", &cluster.nodes[follower].api],
    )
    .ok();
    assert!(status.stdout.contains("follower"), "{}", status.stdout);
}

/// `kill -9` of the leader: the other two elect a new leader within a few
/// election timeouts, every write acknowledged before the kill is still there,
/// writes go on, and the old leader rejoins as a follower with all the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_loses_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, "").await;
    let (old, old_name) = cluster.leader().await;
    let survivor = (old + 1) % 3;
    let mut acked = Vec::new();
    for i in 0..40 {
        // Alternate between leader and follower entry points.
        let via = if i % 2 == 0 { old } else { survivor };
        put(
            &cluster.nodes[via].api,
            &format!("acked/{i:03}"),
            &i.to_string(),
        )
        .await;
        acked.push(i);
    }
    cluster.nodes[old].kill9();
    let killed = Instant::now();
    let (new, new_name) = cluster.leader().await;
    let elected_after = killed.elapsed();
    assert_ne!(new, old);
    eprintln!("new leader {new_name} after {elected_after:?}");
    assert!(
        elected_after < Duration::from_secs(5),
        "a new leader within a few election timeouts (took {elected_after:?})"
    );
    for i in &acked {
        for n in cluster.nodes.iter().filter(|n| n.is_running()) {
            assert_eq!(
                get(&n.api, &format!("acked/{i:03}"), false).await,
                Some(i.to_string()),
                "on {}",
                n.name
            );
        }
    }
    put(&cluster.nodes[survivor].api, "after/kill", "yes").await;

    cluster.nodes[old].restart().await;
    let api = cluster.nodes[old].api.clone();
    wait_for(
        &format!("{old_name} to rejoin as a follower"),
        Duration::from_secs(20),
        || async {
            let s = get_json(&api, "/v1/status").await?;
            (s["role"] == "follower" && s["leader_id"] == new_name.as_str()).then_some(())
        },
    )
    .await;
    assert_eq!(get(&api, "after/kill", false).await.as_deref(), Some("yes"));
    assert_eq!(get(&api, "acked/039", true).await.as_deref(), Some("39"));
}

/// A 4th node started with `--join` asks a member (a follower here) to add it,
/// is added as a learner and promoted to voter with no operator step; joining
/// again is harmless; `leave` removes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_node_joins_as_voter_and_leaves() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, "").await;
    let (leader, _) = cluster.leader().await;
    for i in 0..30 {
        put(&cluster.nodes[leader].api, &format!("pre/{i}"), "x").await;
    }
    let via = (leader + 1) % 3;
    let four = cluster.join_new("node-4", via).await;
    let api0 = cluster.nodes[leader].api.clone();
    wait_voter(&api0, "node-4", Duration::from_secs(30)).await;
    assert_eq!(
        get(&cluster.nodes[four].api, "pre/29", false)
            .await
            .as_deref(),
        Some("x")
    );

    // Joining again with the same id and address changes nothing.
    let raft = cluster.nodes[four].raft.unwrap().to_string();
    let (s, body) = http(
        Method::POST,
        &api0,
        &format!("/join?node_id=node-4&addr={raft}"),
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "already a member");
    assert_eq!(v["voters"].as_array().unwrap().len(), 4);

    // Leave through the CLI, via a follower.
    run(
        &bin("core-node"),
        cluster.dir(),
        &["leave", "node-4", "--api", &cluster.nodes[via].api],
    )
    .ok();
    let members = get_json(&api0, "/v1/members").await.unwrap();
    let ids: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains(&"node-4"));
    // Leaving an unknown node is a clear 404.
    let (s, _) = http(Method::POST, &api0, "/leave?node_id=node-9", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The cluster still writes with three voters.
    put(&cluster.nodes[via].api, "after/leave", "ok").await;
}

/// After the leader has snapshotted and purged its log, a new node can only
/// catch up through a snapshot; it does, and ends with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_node_catches_up_through_snapshot() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, "snapshot_every = 40\nkeep_logs = 5").await;
    let (leader, _) = cluster.leader().await;
    let api = cluster.nodes[leader].api.clone();
    for i in 0..150 {
        put(&api, &format!("snap/{i:03}"), &format!("value {i}")).await;
    }
    let (s, _) = http(Method::POST, &api, "/v1/snapshot", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    let purged = wait_for(
        "the leader to purge its log",
        Duration::from_secs(20),
        || async {
            let st = get_json(&api, "/v1/status").await?;
            st["purged_index"].as_u64().filter(|p| *p > 100)
        },
    )
    .await;
    eprintln!("leader purged up to {purged}");

    let four = cluster.join_new("node-4", leader).await;
    let api4 = cluster.nodes[four].api.clone();
    wait_for(
        "node-4 to have every key",
        Duration::from_secs(30),
        || async {
            (get(&api4, "snap/149", true).await.as_deref() == Some("value 149")).then_some(())
        },
    )
    .await;
    for i in (0..150).step_by(7) {
        assert_eq!(
            get(&api4, &format!("snap/{i:03}"), true).await,
            Some(format!("value {i}"))
        );
    }
    let st = get_json(&api4, "/v1/status").await.unwrap();
    assert!(
        st["snapshot_index"].as_u64().unwrap_or(0) >= purged,
        "node-4 installed a snapshot: {st}"
    );
    assert!(
        cluster.nodes[four]
            .log_tail(200)
            .contains("installed snapshot")
    );

    // The leader that purged its log comes back correctly after kill -9:
    // from its snapshot, its state and the rest of its log.
    cluster.nodes[leader].kill9();
    cluster.nodes[leader].restart().await;
    let api = cluster.nodes[leader].api.clone();
    wait_for(
        "the restarted node to serve every key locally",
        Duration::from_secs(30),
        || async {
            (get(&api, "snap/149", true).await.as_deref() == Some("value 149")).then_some(())
        },
    )
    .await;
    for i in (0..150).step_by(11) {
        assert_eq!(
            get(&api, &format!("snap/{i:03}"), false).await,
            Some(format!("value {i}"))
        );
    }
}

/// `core-node backup` writes a consistent copy; `core-node restore` turns it
/// into a data directory that boots a new single-node cluster with every key,
/// and revisions continue after the backup's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, "").await;
    let (leader, _) = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut last = 0;
    for i in 0..25 {
        last = put(
            &cluster.nodes[leader].api,
            &format!("b/{i:02}"),
            &i.to_string(),
        )
        .await;
    }
    let backup = cluster.dir().join("state.db");
    let backup = backup.to_str().unwrap();
    let out = run(
        &bin("core-node"),
        cluster.dir(),
        &["backup", backup, "--api", &cluster.nodes[follower].api],
    )
    .ok();
    assert!(out.stdout.contains("consistent backup"), "{out:?}");

    let restored = cluster.dir().join("restored");
    let dir = restored.to_str().unwrap();
    let out = run(
        &bin("core-node"),
        cluster.dir(),
        &["restore", backup, "--data-dir", dir, "--node-id", "solo"],
    )
    .ok();
    assert!(out.stdout.contains("restored state"), "{out:?}");
    // A second restore into the now non-empty directory is refused.
    let again = run(
        &bin("core-node"),
        cluster.dir(),
        &["restore", backup, "--data-dir", dir],
    );
    assert_eq!(again.code, Some(1));

    let args: Vec<String> = [
        "run",
        "--node-id",
        "solo",
        "--cluster-id",
        &cluster.cluster_id,
        "--data-dir",
        dir,
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
    let mut solo = NodeProc::new("solo", &restored, cluster.dir(), args);
    solo.start().await;
    let api = solo.api.clone();
    let value = wait_for(
        "the restored node to serve",
        Duration::from_secs(20),
        || async {
            get_json(&api, "/readyz").await?;
            get(&api, "b/24", false).await
        },
    )
    .await;
    assert_eq!(value, "24");
    assert_eq!(get(&api, "b/00", false).await.as_deref(), Some("0"));
    let next = put(&api, "after/restore", "x").await;
    assert!(
        next > last,
        "revisions continue after the backup's ({next} > {last})"
    );
}

/// The Raft port accepts a core certificate of this cluster and refuses a
/// core certificate of another cluster, an edge certificate, and no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_port_refuses_foreign_certificates() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(1, "").await;
    let raft_addr = cluster.nodes[0].raft.unwrap();
    let ca_pem = cluster.pki.ca.cert_pem().as_bytes().to_vec();
    let cluster_id: &str = &cluster.cluster_id;
    let dial = |material: TlsMaterial| async move {
        let policy = PeerPolicy::only(cluster_id, &[Role::Core]);
        let tls = tls::client_config(&material, policy, &[ALPN_RAFT]).unwrap();
        let endpoint = link::client_endpoint(
            tls::quinn_client_config(tls, Transport::default()).unwrap(),
            raft_addr,
        )
        .unwrap();
        link::connect(
            &endpoint,
            raft_addr,
            "lanmesh",
            None,
            Duration::from_secs(5),
        )
        .await
    };
    let with = |issued: &lanmesh_shared::pki::Issued| {
        TlsMaterial::from_pem(
            &ca_pem,
            Some((issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())),
            None,
        )
        .unwrap()
    };

    let good = cluster.pki.issue(Role::Core, "node-9");
    let ok = dial(with(&good))
        .await
        .expect("a core certificate of this cluster is accepted");
    assert_eq!(ok.peer.unwrap().name, "node-1");

    let other = Ca::generate("other", 30, KeyType::EcdsaP256).unwrap();
    let foreign = other
        .issue(&LeafRequest::new(&other, Role::Core, "node-1", 30).unwrap())
        .unwrap();
    let refused = dial(with(&foreign)).await;
    assert!(
        matches!(
            refused,
            Err(LinkError::RefusedByPeer {
                reason: AlertReason::UnknownCa,
                ..
            })
        ),
        "{refused:?}"
    );

    let edge = cluster.pki.issue(Role::Edge, "edge-1");
    let refused = dial(with(&edge)).await;
    assert!(
        matches!(
            refused,
            Err(LinkError::RefusedByPeer {
                reason: AlertReason::NotPermitted,
                ..
            })
        ),
        "{refused:?}"
    );

    let anonymous = TlsMaterial::from_pem(&ca_pem, None, None).unwrap();
    let refused = dial(anonymous).await;
    assert!(
        matches!(
            refused,
            Err(LinkError::RefusedByPeer {
                reason: AlertReason::CertificateRequired,
                ..
            })
        ),
        "{refused:?}"
    );
    // The node logged the refusals and still serves.
    put(&cluster.nodes[0].api, "still", "serving").await;
}

/// Malformed, oversized and misdirected API requests get a JSON 4xx, and the
/// node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_gets_4xx() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(1, "").await;
    let api = cluster.nodes[0].api.clone();
    let cases: Vec<(Method, &str, Vec<u8>, StatusCode)> = vec![
        (
            Method::POST,
            "/v1/channels",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/channels",
            b"{\"nameless\":1}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/channels",
            b"{\"name\":\"bad/name\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/users",
            b"{\"name\":\"u\",\"password\":5}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/kv/big",
            vec![b'x'; 2 << 20],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::PUT,
            "/v1/kv/bad%01key",
            b"v".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/kv/%ff",
            b"v".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PATCH,
            "/v1/kv/k",
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::DELETE,
            "/v1/status",
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/v1/nothing",
            Vec::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/kv/absent",
            Vec::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/kv/k?consistency=weird",
            Vec::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/join?node_id=x",
            Vec::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/join?node_id=x&addr=nowhere",
            Vec::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/leave?node_id=ghost",
            Vec::new(),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = http(method.clone(), &api, path, body)
            .await
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        assert_eq!(
            status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer)
        );
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .unwrap_or_else(|_| panic!("{method} {path}: JSON error body"));
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    // Garbage on the socket: hyper answers 400 and closes; the node is fine.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(api.trim_start_matches("http://"))
            .await
            .unwrap();
        s.write_all(b"\x00\x01garbage that is not HTTP\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
            "{answer:?}"
        );
    }
    // Users: the password is stored hashed and never returned.
    let (s, _) = http(
        Method::POST,
        &api,
        "/v1/users",
        b"{\"name\":\"alice\",\"password\":\"s3cret\"}".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    let (_, body) = http(Method::GET, &api, "/v1/users/alice", Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("s3cret") && !text.contains("argon2"),
        "{text}"
    );
    put(&api, "still", "serving").await;
    let metrics = http(Method::GET, &api, "/metrics", Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.1);
    assert!(
        text.contains("lanmesh_api_requests_total") && text.contains("code=\"413\""),
        "{text}"
    );
}

/// `transfer-leader` moves leadership to the named voter; a leader stopped
/// with SIGTERM hands leadership over before it exits, so writes continue
/// without waiting for an election timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_and_clean_stop_hand_over_leadership() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, "").await;
    let (leader, _) = cluster.leader().await;
    let target = (leader + 1) % 3;
    let target_name = cluster.nodes[target].name.clone();
    let via = cluster.nodes[(leader + 2) % 3].api.clone();
    run(
        &bin("core-node"),
        cluster.dir(),
        &["transfer-leader", &target_name, "--api", &via],
    )
    .ok();
    let (now, _) = cluster.leader().await;
    assert_eq!(now, target, "leadership moved to {target_name}");

    put(&cluster.nodes[now].api, "before/stop", "1").await;
    let status = cluster.nodes[now].terminate().expect("was running");
    assert!(status.success(), "clean exit");
    assert!(
        cluster.nodes[now]
            .log_tail(20)
            .contains("handed leadership over"),
        "{}",
        cluster.nodes[now].log_tail(20)
    );
    let (next, _) = cluster.leader().await;
    assert_ne!(next, now);
    put(&cluster.nodes[next].api, "after/stop", "2").await;
    assert_eq!(
        get(&cluster.nodes[next].api, "before/stop", false)
            .await
            .as_deref(),
        Some("1")
    );
}

/// Without a quorum a write is answered with 503 and a retryable JSON error
/// within seconds — never a hang — and the node keeps answering reads it can
/// serve locally and its health endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_means_503_not_a_hang() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, "").await;
    let (leader, _) = cluster.leader().await;
    put(&cluster.nodes[leader].api, "k", "v").await;
    let survivor = (leader + 1) % 3;
    // Make sure the survivor has applied the write before the others die.
    assert_eq!(
        get(&cluster.nodes[survivor].api, "k", false)
            .await
            .as_deref(),
        Some("v")
    );
    for i in 0..3 {
        if i != survivor {
            cluster.nodes[i].kill9();
        }
    }
    let api = cluster.nodes[survivor].api.clone();
    let started = Instant::now();
    let (status, body) = http(Method::PUT, &api, "/v1/kv/k2", b"v2".to_vec())
        .await
        .expect("an answer");
    let took = started.elapsed();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["retryable"], true, "{v}");
    assert!(took < Duration::from_secs(10), "answered in {took:?}");
    let (status, _) = http(Method::GET, &api, "/v1/kv/k", Vec::new())
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a linearizable read needs a quorum too"
    );
    assert_eq!(
        get(&api, "k", true).await.as_deref(),
        Some("v"),
        "a local read is served"
    );
    let (status, _) = http(Method::GET, &api, "/healthz", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, _) = http(Method::GET, &api, "/readyz", Vec::new())
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready without a leader"
    );
}

/// With `--api-tls on` the admin API is HTTPS: health and metrics are open,
/// everything else needs an operator or core client certificate; the CLI
/// works with an operator certificate; other roles are refused in the
/// handshake and anonymous callers get 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_api_requires_operator_certificates() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let pki = lanmesh_tests::cluster::Pki::new(tmp.path(), "test");
    let mut args = vec![
        "run".to_owned(),
        "--node-id".into(),
        "node-1".into(),
        "--cluster-id".into(),
        "test".into(),
        "--data-dir".into(),
        tmp.path().join("node-1").display().to_string(),
        "--api-addr".into(),
        "127.0.0.1:0".into(),
        "--raft-addr".into(),
        "127.0.0.1:0".into(),
        "--api-tls".into(),
        "on".into(),
    ];
    args.extend(pki.node_args("node-1"));
    let mut node = NodeProc::new("node-1", &tmp.path().join("node-1"), tmp.path(), args);
    node.start().await;
    let https = node.api.clone();
    assert!(https.starts_with("https://"), "{https}");
    pki.issue(Role::Operator, "alice");
    pki.issue(Role::Client, "app");
    let file = |n: &str| tmp.path().join(n).display().to_string();
    let cli = |who: Option<&str>, extra: &[&str]| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--api".into(),
            https.clone(),
            "--api-ca".into(),
            file("ca.crt"),
        ]);
        if let Some(w) = who {
            a.extend([
                "--api-cert".into(),
                file(&format!("{w}.crt")),
                "--api-key".into(),
                file(&format!("{w}.key")),
            ]);
        }
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&bin("core-node"), tmp.path(), &refs)
    };
    let ok = wait_for(
        "the HTTPS API to accept the operator",
        Duration::from_secs(20),
        || {
            let r = cli(Some("alice"), &["kv", "put", "secure", "yes"]);
            async move { (r.code == Some(0)).then_some(r) }
        },
    )
    .await;
    assert!(ok.stdout.contains("revision"), "{ok:?}");
    assert_eq!(
        cli(Some("alice"), &["kv", "get", "secure"]).ok().stdout,
        "yes"
    );
    let anonymous = cli(None, &["status"]);
    assert_eq!(anonymous.code, Some(1));
    assert!(anonymous.stderr.contains("403"), "{anonymous:?}");
    let wrong_role = cli(Some("app"), &["status"]);
    assert_eq!(wrong_role.code, Some(1), "{wrong_role:?}");
    assert!(!wrong_role.stdout.contains("leader"), "{wrong_role:?}");
    // Plain HTTP is not served on an HTTPS port.
    assert!(
        get_json(&node.api.replace("https://", "http://"), "/v1/status")
            .await
            .is_none()
    );
}
