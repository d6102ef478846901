//! Presence across cores (real processes): a heartbeating client appears on
//! every core, disappears from every core after missed heartbeats, and is
//! back after a core restart once heartbeats resume.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lanmesh_shared::proto::{Client, Request, Response};
use lanmesh_tests::client::{create, login_to};
use lanmesh_tests::cluster::{Cluster, wait_for};

/// Heartbeats every 300 ms until aborted (a client's keep-alive loop).
fn heartbeat(c: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = c
                .request(&Request::Heartbeat {
                    status: "online".into(),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn who(c: &Client) -> Vec<(String, String)> {
    match c.request(&Request::Who).await {
        Ok(Response::Presence(v)) => v.into_iter().map(|e| (e.subject, e.node)).collect(),
        other => panic!("Who answered {other:?}"),
    }
}

async fn wait_who(clients: &[Client], want: Vec<(&str, &str)>, what: &str) {
    let want: Vec<(String, String)> = want
        .into_iter()
        .map(|(s, n)| (s.to_owned(), n.to_owned()))
        .collect();
    wait_for(what, Duration::from_secs(15), || {
        let clients = clients.to_vec();
        let want = want.clone();
        async move {
            for c in &clients {
                if who(c).await != want {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_appears_expires_and_is_rebuilt_on_every_core() {
    let mut cluster = Cluster::start(3, "[presence]\nttl_ms = 1500").await;
    let api = cluster.nodes[0].api.clone();
    create(&api, "/v1/users", r#"{"name":"alice","password":"pw"}"#).await;
    create(&api, "/v1/users", r#"{"name":"bob","password":"pw"}"#).await;
    // bob watches from every core; he never heartbeats.
    let mut observers = Vec::new();
    for i in 0..3 {
        observers.push(login_to(&cluster, i, "bob", "pw").await);
    }
    let mut changes = observers[1].subscribe_presence().await.unwrap();

    let alice = login_to(&cluster, 0, "alice", "pw").await;
    let Response::HeartbeatAck { interval_ms } = alice
        .request(&Request::Heartbeat {
            status: "online".into(),
        })
        .await
        .unwrap()
    else {
        panic!("no HeartbeatAck")
    };
    assert_eq!(interval_ms, 500, "a third of the TTL");
    let beating = heartbeat(alice);
    wait_who(&observers, vec![("alice", "node-1")], "alice on every core").await;
    let (entry, online) = tokio::time::timeout(Duration::from_secs(5), changes.next_presence())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((entry.subject.as_str(), online), ("alice", true));

    // An observer core restarts: it rebuilds presence from the others' tables.
    cluster.nodes[1].kill9();
    cluster.nodes[1].restart().await;
    observers[1] = login_to(&cluster, 1, "bob", "pw").await;
    wait_who(
        &observers,
        vec![("alice", "node-1")],
        "alice again after node-2 restarted",
    )
    .await;
    let mut changes = observers[2].subscribe_presence().await.unwrap();
    let (entry, online) = changes.next_presence().await.unwrap();
    assert_eq!(
        (entry.subject.as_str(), online),
        ("alice", true),
        "current state first"
    );

    // Missed heartbeats: gone everywhere.
    beating.abort();
    wait_who(&observers, vec![], "alice to expire on every core").await;
    let (entry, online) = tokio::time::timeout(Duration::from_secs(5), changes.next_presence())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((entry.subject.as_str(), online), ("alice", false));

    // alice's own core restarts: her client reconnects and beats again.
    let alice = login_to(&cluster, 2, "alice", "pw").await;
    let beating = heartbeat(alice);
    wait_who(&observers, vec![("alice", "node-3")], "alice on node-3").await;
    beating.abort();
    cluster.nodes[2].kill9();
    cluster.nodes[2].restart().await;
    observers[2] = login_to(&cluster, 2, "bob", "pw").await;
    let alice = login_to(&cluster, 2, "alice", "pw").await;
    let beating = heartbeat(alice);
    wait_who(
        &observers,
        vec![("alice", "node-3")],
        "alice rebuilt from heartbeats",
    )
    .await;
    beating.abort();
}
