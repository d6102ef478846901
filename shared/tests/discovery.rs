//! mDNS discovery on this host: nodes of one cluster find each other with
//! their announced addresses; a node of another cluster id is ignored; a
//! node that stops is removed from the table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use lanmesh_shared::discovery::{Announcement, Discovery, Peers};
use lanmesh_shared::identity::Role;

fn announcement(cluster: &str, node: &str, port: u16) -> Announcement {
    Announcement {
        cluster_id: cluster.into(),
        node_id: node.into(),
        role: Role::Core,
        raft_addr: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        api_addr: Some(format!("127.0.0.1:{}", port + 1).parse().unwrap()),
        client_addr: None,
        priority: 10,
    }
}

async fn wait_table(d: &Discovery, what: &str, ok: impl Fn(&Peers) -> bool) -> Peers {
    let mut rx = d.peers();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = rx.borrow_and_update().clone();
        if ok(&t) {
            return t;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}; table: {t:?}"
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

/// Two nodes of one cluster discover each other (with the addresses they
/// announced); a third of another cluster id is never in the table; a node
/// that stops disappears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_the_same_cluster_find_each_other() {
    // A cluster id unique to this run, so concurrent runs on the host do not mix.
    let cluster = format!("disc-{}", std::process::id());
    let ip = "127.0.0.1".parse().unwrap();
    let a = Discovery::start(announcement(&cluster, "node-a", 21001), ip).unwrap();
    let b = Discovery::start(announcement(&cluster, "node-b", 22001), ip).unwrap();
    let other = Discovery::start(announcement("some-other-cluster", "node-x", 23001), ip).unwrap();

    let t = wait_table(&a, "node-b in node-a's table", |t| t.contains_key("node-b")).await;
    assert_eq!(
        t["node-b"].announcement.raft_addr,
        Some("127.0.0.1:22001".parse().unwrap())
    );
    assert_eq!(
        t["node-b"].announcement.api_addr,
        Some("127.0.0.1:22002".parse().unwrap())
    );
    wait_table(&b, "node-a in node-b's table", |t| t.contains_key("node-a")).await;
    assert!(
        !a.peers().borrow().contains_key("node-x"),
        "other cluster ignored"
    );
    assert!(!a.peers().borrow().contains_key("node-a"), "no self entry");

    b.shutdown();
    wait_table(&a, "node-b to disappear", |t| !t.contains_key("node-b")).await;
    drop(other);
}
