//! Edges (real processes): a client on an edge works as on a core; with the
//! edge's link cut it still logs in with a token, reads and posts, and after
//! the link returns every offline post reaches the cluster exactly once and
//! what was posted meanwhile reaches the edge; `kill -9` of an edge with a
//! full outbox loses nothing; the edge moves to another core when its core
//! dies; an edge behind a relay edge works the same; the registry feed
//! resumes incrementally or with a full copy and ends equal to the core's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use lanmesh_shared::identity::Role;
use lanmesh_shared::proto::{Client, Request, Response};
use lanmesh_tests::client::{all_history, create, endpoint, login, login_to, post};
use lanmesh_tests::cluster::{Cluster, NodeProc, get_json, wait_for};
use serde_json::Value;

/// Starts edge `name` with `upstream` (client ports, in priority order).
async fn start_edge(cluster: &Cluster, name: &str, upstream: &[SocketAddr]) -> NodeProc {
    cluster.pki.issue(Role::Edge, name);
    let dir = cluster.dir();
    let list: Vec<String> = upstream.iter().map(|a| a.to_string()).collect();
    let args = vec![
        "run".to_owned(),
        "--node-id".into(),
        name.into(),
        "--cluster-id".into(),
        cluster.cluster_id.clone(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--client-addr".into(),
        "127.0.0.1:0".into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        list.join(","),
        "--ca".into(),
        cluster.pki.dir.join("ca.crt").display().to_string(),
        "--cert".into(),
        cluster
            .pki
            .dir
            .join(format!("{name}.crt"))
            .display()
            .to_string(),
        "--key".into(),
        cluster
            .pki
            .dir
            .join(format!("{name}.key"))
            .display()
            .to_string(),
    ];
    let mut edge = NodeProc::edge(name, &dir.join(name), dir, args);
    edge.start().await;
    edge
}

async fn edge_status(edge: &NodeProc) -> Option<Value> {
    get_json(&edge.api, "/v1/status").await
}

/// Waits until the edge's link is up (to `node`, if given) and it has synced.
async fn wait_linked(edge: &NodeProc, node: Option<&str>) -> Value {
    wait_for(
        "the edge's link upstream",
        Duration::from_secs(20),
        || async {
            let s = edge_status(edge).await?;
            let ok = s["upstream"]["connected"] == true
                && s["revision"].as_u64()? > 0
                && node.is_none_or(|n| s["upstream"]["node_id"] == n);
            ok.then_some(s)
        },
    )
    .await
}

async fn wait_unlinked(edge: &NodeProc) {
    wait_for(
        "the edge to notice its link is down",
        Duration::from_secs(20),
        || async {
            let s = edge_status(edge).await?;
            (s["upstream"]["connected"] == false).then_some(())
        },
    )
    .await;
}

async fn on_edge(cluster: &Cluster, edge: &NodeProc, user: &str) -> Client {
    let addr = edge.client.unwrap();
    login(
        &endpoint(&cluster.pki, &cluster.cluster_id, None, addr),
        addr,
        user,
        "pw",
    )
    .await
}

fn bodies(h: &[lanmesh_shared::proto::Message]) -> Vec<String> {
    h.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

async fn setup(cluster: &Cluster) {
    let api = &cluster.nodes[0].api;
    create(api, "/v1/users", r#"{"name":"alice","password":"pw"}"#).await;
    create(api, "/v1/users", r#"{"name":"bob","password":"pw"}"#).await;
    create(api, "/v1/channels", r#"{"name":"ops"}"#).await;
}

/// A client on an edge logs in, posts, reads, follows live and sees
/// presence; with the edge's only core down it logs in with its token,
/// reads and posts (pending); when the core returns, every offline post is
/// in the cluster once and the post made on another core meanwhile reaches
/// the edge's subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_serves_clients_and_works_offline() {
    let mut cluster = Cluster::start(3, "").await;
    setup(&cluster).await;
    let edge = start_edge(&cluster, "edge-1", &[cluster.nodes[0].client.unwrap()]).await;
    wait_linked(&edge, Some("node-1")).await;

    // Online, exactly as against a core.
    let alice = on_edge(&cluster, &edge, "alice").await;
    let Response::Identity { subject, .. } = alice.request(&Request::Whoami).await.unwrap() else {
        panic!()
    };
    assert_eq!(subject, "alice");
    let mut sub = alice.subscribe("ops").await.unwrap();
    let r = alice
        .request(&post("ops", "k1", "hello from the site"))
        .await
        .unwrap();
    assert!(
        matches!(&r, Response::Posted { pending: false, origin, .. } if origin == "node-1"),
        "{r:?}"
    );
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body, b"hello from the site");
    let on2 = login_to(&cluster, 1, "bob", "pw").await;
    wait_for(
        "the edge's post on node-2",
        Duration::from_secs(10),
        || async {
            bodies(&all_history(&on2, "ops").await)
                .contains(&"hello from the site".to_owned())
                .then_some(())
        },
    )
    .await;
    alice
        .request(&Request::Heartbeat {
            status: "online".into(),
        })
        .await
        .unwrap();
    wait_for(
        "alice present at the edge, seen from node-2",
        Duration::from_secs(10),
        || async {
            match on2.request(&Request::Who).await {
                Ok(Response::Presence(v)) => v
                    .iter()
                    .any(|e| e.subject == "alice" && e.node == "edge-1")
                    .then_some(()),
                _ => None,
            }
        },
    )
    .await;
    let token = match alice
        .request(&Request::Login {
            user: "alice".into(),
            password: "pw".into(),
        })
        .await
        .unwrap()
    {
        Response::Token { token, .. } => token,
        other => panic!("{other:?}"),
    };

    // Cut: the edge's only upstream dies.
    cluster.nodes[0].kill9();
    wait_unlinked(&edge).await;
    let addr = edge.client.unwrap();
    let offline = Client::connect(
        &endpoint(&cluster.pki, &cluster.cluster_id, None, addr),
        addr,
        "t",
    )
    .await
    .unwrap();
    let r = offline
        .request(&Request::Login {
            user: "alice".into(),
            password: "pw".into(),
        })
        .await;
    assert!(r.is_err(), "password login needs the link: {r:?}");
    offline
        .request(&Request::Authenticate {
            token: token.clone(),
        })
        .await
        .expect("token login works offline");
    let h = all_history(&offline, "ops").await;
    assert_eq!(bodies(&h), vec!["hello from the site"]);
    for i in 0..3 {
        let r = offline
            .request(&post("ops", &format!("off-{i}"), &format!("offline {i}")))
            .await
            .unwrap();
        assert!(matches!(r, Response::Posted { pending: true, .. }), "{r:?}");
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.body,
            format!("offline {i}").as_bytes(),
            "local subscribers see it at once"
        );
    }
    // A retry while offline is the same queued post.
    let again = offline
        .request(&post("ops", "off-0", "offline 0"))
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            Response::Posted {
                duplicate: true,
                pending: true,
                ..
            }
        ),
        "{again:?}"
    );
    let Response::Pending(p) = offline.request(&Request::Pending).await.unwrap() else {
        panic!()
    };
    assert_eq!(p.len(), 3);
    // Meanwhile on the rest of the cluster.
    on2.request(&post("ops", "core-1", "posted on node-2"))
        .await
        .unwrap();

    // Restore.
    cluster.nodes[0].restart().await;
    wait_linked(&edge, Some("node-1")).await;
    let want: BTreeSet<String> = [
        "hello from the site",
        "offline 0",
        "offline 1",
        "offline 2",
        "posted on node-2",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    wait_for(
        "every post once on node-2",
        Duration::from_secs(20),
        || async {
            let b = bodies(&all_history(&on2, "ops").await);
            (b.len() == want.len() && b.iter().cloned().collect::<BTreeSet<_>>() == want)
                .then_some(())
        },
    )
    .await;
    wait_for(
        "node-2's post and the delivered posts at the edge",
        Duration::from_secs(20),
        || async {
            let h = all_history(&offline, "ops").await;
            let b = bodies(&h);
            let pending = h.iter().any(|m| m.origin == "edge-1");
            (!pending
                && b.len() == want.len()
                && b.iter().cloned().collect::<BTreeSet<_>>() == want)
                .then_some(())
        },
    )
    .await;
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body, b"posted on node-2");
    let Response::Pending(p) = offline.request(&Request::Pending).await.unwrap() else {
        panic!()
    };
    assert!(p.is_empty());

    // The edge's own audit chain reached the leader; `edge-node status` reads.
    let api = cluster.nodes[1].api.clone();
    wait_for(
        "the edge's login record at the leader",
        Duration::from_secs(20),
        || async {
            let v = get_json(&api, "/v1/audit?origin=edge-1&kind=login").await?;
            (!v["records"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;
    let out = lanmesh_tests::run(
        &lanmesh_tests::bin("edge-node"),
        cluster.dir(),
        &["status", "--http", &edge.api],
    )
    .ok();
    assert!(
        out.stdout.contains("upstream    node-1") && out.stdout.contains("outbox      0"),
        "{}",
        out.stdout
    );
}

/// `kill -9` of an edge with a non-empty outbox: after a restart every
/// queued post reaches the cluster once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_outbox_survives_kill9() {
    let mut cluster = Cluster::start(1, "").await;
    setup(&cluster).await;
    let mut edge = start_edge(&cluster, "edge-1", &[cluster.nodes[0].client.unwrap()]).await;
    wait_linked(&edge, None).await;
    let alice = on_edge(&cluster, &edge, "alice").await;
    cluster.nodes[0].kill9();
    wait_unlinked(&edge).await;
    for i in 0..20 {
        let r = alice
            .request(&post("ops", &format!("q{i}"), &format!("queued {i}")))
            .await
            .unwrap();
        assert!(matches!(r, Response::Posted { pending: true, .. }), "{r:?}");
    }
    edge.kill9();
    edge.restart().await;
    let s = edge_status(&edge).await.unwrap();
    assert_eq!(s["outbox_depth"], 20, "{s}");
    cluster.nodes[0].restart().await;
    wait_linked(&edge, None).await;
    let core = login_to(&cluster, 0, "bob", "pw").await;
    wait_for(
        "the 20 queued posts on the core, once each",
        Duration::from_secs(20),
        || async {
            let b = bodies(&all_history(&core, "ops").await);
            let set: BTreeSet<_> = b.iter().cloned().collect();
            (b.len() == 20 && set.len() == 20).then_some(())
        },
    )
    .await;
    wait_for("an empty outbox", Duration::from_secs(10), || async {
        (edge_status(&edge).await?["outbox_depth"] == 0).then_some(())
    })
    .await;
}

/// The edge's core dies: the edge moves to the next core within seconds and
/// a client's session on the edge carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_moves_to_another_core() {
    let mut cluster = Cluster::start(3, "").await;
    setup(&cluster).await;
    let ups: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.client.unwrap()).collect();
    let edge = start_edge(&cluster, "edge-1", &ups).await;
    wait_linked(&edge, Some("node-1")).await;
    let alice = on_edge(&cluster, &edge, "alice").await;
    alice.request(&post("ops", "a", "before")).await.unwrap();
    let on3 = login_to(&cluster, 2, "bob", "pw").await;
    // An anti-entropy post lives on node-1 until the others pull it (a
    // moment); let them, so the check below is about the edge.
    wait_for(
        "the first post on node-3",
        Duration::from_secs(10),
        || async {
            bodies(&all_history(&on3, "ops").await)
                .contains(&"before".to_owned())
                .then_some(())
        },
    )
    .await;
    cluster.nodes[0].kill9();
    let moved = std::time::Instant::now();
    let s = wait_for(
        "the edge on another core",
        Duration::from_secs(15),
        || async {
            let s = edge_status(&edge).await?;
            (s["upstream"]["connected"] == true && s["upstream"]["node_id"] != "node-1")
                .then_some(s)
        },
    )
    .await;
    eprintln!(
        "edge moved to {} after {:?}",
        s["upstream"]["node_id"],
        moved.elapsed()
    );
    let r = alice.request(&post("ops", "b", "after")).await.unwrap();
    assert!(
        matches!(r, Response::Posted { pending: false, .. }),
        "{r:?}"
    );
    wait_for(
        "both posts in the cluster",
        Duration::from_secs(10),
        || async {
            let b = bodies(&all_history(&on3, "ops").await);
            (b.contains(&"before".to_owned()) && b.contains(&"after".to_owned())).then_some(())
        },
    )
    .await;
}

/// An edge behind another edge (multi-LAN relay) reaches the cores, and
/// works offline the same way when the cores are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_chain_reaches_the_cores_and_works_offline() {
    let mut cluster = Cluster::start(1, "").await;
    setup(&cluster).await;
    let edge_a = start_edge(&cluster, "edge-a", &[cluster.nodes[0].client.unwrap()]).await;
    wait_linked(&edge_a, None).await;
    let edge_b = start_edge(&cluster, "edge-b", &[edge_a.client.unwrap()]).await;
    wait_linked(&edge_b, Some("edge-a")).await;
    let alice = on_edge(&cluster, &edge_b, "alice").await;
    let r = alice
        .request(&post("ops", "r1", "via the relay"))
        .await
        .unwrap();
    assert!(
        matches!(&r, Response::Posted { pending: false, origin, .. } if origin == "node-1"),
        "{r:?}"
    );
    let core = login_to(&cluster, 0, "bob", "pw").await;
    let mut sub = alice.subscribe("ops").await.unwrap();
    core.request(&post("ops", "c1", "from the core"))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body, b"from the core", "pushed through two edges");

    cluster.nodes[0].kill9();
    wait_unlinked(&edge_a).await;
    let r = alice
        .request(&post("ops", "r2", "relay offline"))
        .await
        .unwrap();
    assert!(matches!(r, Response::Posted { pending: true, .. }), "{r:?}");
    cluster.nodes[0].restart().await;
    let core = login_to(&cluster, 0, "bob", "pw").await;
    wait_for(
        "the relayed offline post on the core, once",
        Duration::from_secs(20),
        || async {
            let b = bodies(&all_history(&core, "ops").await);
            (b.iter().filter(|x| *x == "relay offline").count() == 1).then_some(())
        },
    )
    .await;
    // edge-b's own audit chain reached the leader through the relay.
    let api = cluster.nodes[0].api.clone();
    wait_for(
        "edge-b's login record at the leader",
        Duration::from_secs(20),
        || async {
            let v = get_json(&api, "/v1/audit?origin=edge-b&kind=login").await?;
            (!v["records"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;
}

/// The edge link takes edge certificates only: a client certificate is
/// refused there (at connect, typed), and an edge certificate on the client
/// protocol too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_link_refuses_client_certificates() {
    use lanmesh_shared::link::{self, AlertReason, LinkError};
    use lanmesh_shared::tls::{self, ALPN_EDGE, PeerPolicy, TlsMaterial, Transport};
    let cluster = Cluster::start(1, "").await;
    cluster.pki.issue(Role::Client, "tablet");
    let addr = cluster.nodes[0].client.unwrap();
    let ca = cluster.pki.ca.cert_pem().as_bytes().to_vec();
    let cert = std::fs::read(cluster.pki.dir.join("tablet.crt")).unwrap();
    let key = std::fs::read(cluster.pki.dir.join("tablet.key")).unwrap();
    let material = TlsMaterial::from_pem(&ca, Some((&cert, &key)), None).unwrap();
    let cfg = tls::client_config(
        &material,
        PeerPolicy::only(cluster.cluster_id.clone(), &[Role::Core]),
        &[ALPN_EDGE],
    )
    .unwrap();
    let ep = link::client_endpoint(
        tls::quinn_client_config(cfg, Transport::default()).unwrap(),
        addr,
    )
    .unwrap();
    let r = link::connect(&ep, addr, "lanmesh", None, link::DEFAULT_HANDSHAKE_TIMEOUT).await;
    assert!(
        matches!(
            r,
            Err(LinkError::RefusedByPeer {
                reason: AlertReason::NotPermitted,
                ..
            })
        ),
        "{r:?}"
    );
}

fn cache_of(edge_dir: &std::path::Path) -> BTreeSet<(String, String)> {
    let c = rusqlite::Connection::open(edge_dir.join("cache.db")).unwrap();
    let mut stmt = c.prepare("SELECT kind, name FROM registry").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

async fn core_registries(api: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for kind in ["channels", "devices", "users", "edges"] {
        let v = get_json(api, &format!("/v1/{kind}")).await.unwrap();
        for e in v[kind].as_array().unwrap() {
            out.insert((kind.to_owned(), e["name"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// The registry feed resumes from the edge's revision while the core still
/// has the changes since (incremental), and from a full copy once it does
/// not (`changes_retained = 5`); both end with the core's registries,
/// deletions included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_feed_resumes_incrementally_or_from_a_full_copy() {
    use hyper::Method;
    use lanmesh_tests::cluster::http;
    let cluster = Cluster::start(1, "changes_retained = 5").await;
    setup(&cluster).await;
    let api = cluster.nodes[0].api.clone();
    let mut edge = start_edge(&cluster, "edge-1", &[cluster.nodes[0].client.unwrap()]).await;
    let s = wait_linked(&edge, None).await;
    assert_eq!(s["full_syncs"], 1, "the first sync is a full copy");
    let dir = edge.data_dir.clone();

    // A few changes while the edge is away: within the retained history.
    edge.kill9();
    create(&api, "/v1/devices", r#"{"name":"sensor-1"}"#).await;
    http(Method::DELETE, &api, "/v1/users/bob", Vec::new())
        .await
        .unwrap();
    edge.restart().await;
    let want = core_registries(&api).await;
    wait_for(
        "the edge's cache equal to the core's",
        Duration::from_secs(15),
        || async { (cache_of(&dir) == want).then_some(()) },
    )
    .await;
    assert_eq!(
        edge_status(&edge).await.unwrap()["full_syncs"],
        0,
        "resumed incrementally"
    );

    // Many changes while away: older than the core keeps.
    edge.kill9();
    for i in 0..12 {
        create(&api, "/v1/channels", &format!(r#"{{"name":"c{i}"}}"#)).await;
    }
    http(Method::DELETE, &api, "/v1/channels/ops", Vec::new())
        .await
        .unwrap();
    edge.restart().await;
    let want = core_registries(&api).await;
    wait_for(
        "the edge's cache equal to the core's again",
        Duration::from_secs(15),
        || async { (cache_of(&dir) == want).then_some(()) },
    )
    .await;
    assert_eq!(
        edge_status(&edge).await.unwrap()["full_syncs"],
        1,
        "a full copy"
    );
    assert!(!cache_of(&dir).contains(&("channels".into(), "ops".into())));
}
