//! The messaging router across cores (real processes): a post on one core
//! reaches a subscriber on another; a core that was down catches up by
//! anti-entropy with no duplicates, including a retry that hit two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lanmesh_shared::proto::{Request, Response};
use lanmesh_tests::client::{all_history, create, login_to, post};
use lanmesh_tests::cluster::{Cluster, wait_for};

async fn setup(cluster: &Cluster) {
    let api = &cluster.nodes[0].api;
    create(api, "/v1/users", r#"{"name":"alice","password":"pw"}"#).await;
    create(api, "/v1/channels", r#"{"name":"ops"}"#).await;
}

/// A message posted on core A reaches a subscriber connected to core B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_on_one_core_reaches_subscriber_on_another() {
    let cluster = Cluster::start(3, "").await;
    setup(&cluster).await;
    let poster = login_to(&cluster, 0, "alice", "pw").await;
    let reader = login_to(&cluster, 1, "alice", "pw").await;
    let mut sub = reader.subscribe("ops").await.unwrap();

    for i in 0..20 {
        let sent = Instant::now();
        let r = poster
            .request(&post("ops", &format!("k{i}"), &format!("m{i}")))
            .await
            .unwrap();
        assert!(
            matches!(
                r,
                Response::Posted {
                    duplicate: false,
                    ..
                }
            ),
            "{r:?}"
        );
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivery on the other core")
            .unwrap();
        assert_eq!(m.body, format!("m{i}").as_bytes());
        assert_eq!(m.origin, "node-1");
        if i == 0 {
            eprintln!("first cross-core delivery took {:?}", sent.elapsed());
        }
    }
}

/// A core stopped while messages are posted elsewhere has all of them after
/// it restarts, each once; a post retried on a second core (same idempotency
/// key) shows once on every core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_core_catches_up_without_duplicates() {
    let mut cluster = Cluster::start(3, "").await;
    setup(&cluster).await;
    let on1 = login_to(&cluster, 0, "alice", "pw").await;
    let on2 = login_to(&cluster, 1, "alice", "pw").await;
    // Let node-3 see the user and channel before it goes down.
    on1.request(&post("ops", "before", "before")).await.unwrap();

    cluster.nodes[2].terminate();
    for i in 0..60 {
        let c = if i % 2 == 0 { &on1 } else { &on2 };
        c.request(&post("ops", &format!("k{i}"), &format!("m{i}")))
            .await
            .unwrap();
        // A client retry of the same post, once on the same core and once on
        // the other one.
        if i % 10 == 0 {
            c.request(&post("ops", &format!("k{i}"), &format!("m{i}")))
                .await
                .unwrap();
            let other = if i % 20 == 0 { &on2 } else { &on1 };
            other
                .request(&post("ops", &format!("k{i}"), &format!("m{i}")))
                .await
                .unwrap();
        }
    }

    let returned = Instant::now();
    cluster.nodes[2].restart().await;
    let on3 = login_to(&cluster, 2, "alice", "pw").await;
    let expected: BTreeSet<String> = std::iter::once("before".to_owned())
        .chain((0..60).map(|i| format!("m{i}")))
        .collect();
    let clients = [&on1, &on2, &on3];
    wait_for(
        "every core to hold the 61 messages",
        Duration::from_secs(30),
        || {
            let expected = expected.clone();
            async move {
                for c in clients {
                    let h = all_history(c, "ops").await;
                    let bodies: Vec<String> = h
                        .iter()
                        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                        .collect();
                    let set: BTreeSet<String> = bodies.iter().cloned().collect();
                    if set != expected || bodies.len() != expected.len() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    eprintln!("node-3 converged {:?} after restart", returned.elapsed());

    // Every core shows the same ids, and a retried post once.
    let mut ids = Vec::new();
    for c in clients {
        let mut v: Vec<(String, u64)> = all_history(c, "ops")
            .await
            .into_iter()
            .map(|m| (m.origin, m.seq))
            .collect();
        v.sort();
        ids.push(v);
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    // node-3 serves new posts and they flow back.
    on3.request(&post("ops", "after", "after")).await.unwrap();
    wait_for(
        "node-1 to get node-3's post",
        Duration::from_secs(10),
        || {
            let on1 = on1.clone();
            async move {
                all_history(&on1, "ops")
                    .await
                    .iter()
                    .any(|m| m.body == b"after" && m.origin == "node-3")
                    .then_some(())
            }
        },
    )
    .await;
    let r = on3
        .request(&Request::Post {
            channel: "ops".into(),
            body: b"m0".to_vec(),
            idempotency_key: "k0".into(),
        })
        .await
        .unwrap();
    assert!(
        matches!(
            r,
            Response::Posted {
                duplicate: true,
                ..
            }
        ),
        "a retry on the third core is recognised too: {r:?}"
    );
}

/// Posts, retrying (same idempotency key) while the cluster has no leader.
async fn post_until_stored(c: &lanmesh_shared::proto::Client, req: &Request) -> Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.request(req).await {
            Ok(r @ Response::Posted { .. }) => return r,
            other => {
                assert!(Instant::now() < deadline, "post never stored: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A channel with `replication = "raft"` keeps one order on every node
/// across a `kill -9` of the leader, with retried posts stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_channel_keeps_one_order_across_leader_kill() {
    let mut cluster = Cluster::start(3, "").await;
    let api = cluster.nodes[0].api.clone();
    create(&api, "/v1/users", r#"{"name":"alice","password":"pw"}"#).await;
    create(
        &api,
        "/v1/channels",
        r#"{"name":"orders","replication":"raft"}"#,
    )
    .await;
    let (leader, _) = cluster.leader().await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut clients = Vec::new();
    for &i in &followers {
        clients.push(login_to(&cluster, i, "alice", "pw").await);
    }
    let mut sub = clients[0].subscribe("orders").await.unwrap();

    for i in 0..40 {
        if i == 20 {
            cluster.nodes[leader].kill9();
        }
        let c = &clients[i % 2];
        let req = post("orders", &format!("k{i}"), &format!("m{i}"));
        let r = post_until_stored(c, &req).await;
        assert!(
            matches!(&r, Response::Posted { origin, .. } if origin == "raft"),
            "{r:?}"
        );
        // The same post again is a duplicate with the same id.
        let again = post_until_stored(c, &req).await;
        match (&r, &again) {
            (
                Response::Posted { seq: a, .. },
                Response::Posted {
                    seq: b,
                    duplicate: true,
                    ..
                },
            ) => assert_eq!(a, b),
            other => panic!("retry not recognised: {other:?}"),
        }
    }
    // The subscriber saw them in the committed order.
    let mut seen = Vec::new();
    while seen.len() < 40 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivery")
            .unwrap();
        seen.push(m.seq);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    cluster.nodes[leader].restart().await;
    clients.push(login_to(&cluster, leader, "alice", "pw").await);
    let orders: Vec<Vec<(u64, Vec<u8>)>> = wait_for(
        "every node to hold the 40 messages",
        Duration::from_secs(30),
        || {
            let clients = clients.clone();
            async move {
                let mut all = Vec::new();
                for c in &clients {
                    let h: Vec<(u64, Vec<u8>)> = all_history(c, "orders")
                        .await
                        .into_iter()
                        .map(|m| (m.seq, m.body))
                        .collect();
                    if h.len() != 40 {
                        return None;
                    }
                    all.push(h);
                }
                Some(all)
            }
        },
    )
    .await;
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    let seqs: Vec<u64> = orders[0].iter().map(|(s, _)| *s).collect();
    assert_eq!(seen, seqs, "subscriber order = history order");
}
