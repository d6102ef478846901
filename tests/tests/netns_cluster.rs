//! Multi-host tests: each node in its own network namespace with its own
//! address, on a bridge (see `lanmesh_tests::netns`). Needs root (CI is root).
//!
//! Tests here take a lock: one simulated LAN at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use core_node::http::HttpClient;
use hyper::{Method, StatusCode};
use lanmesh_shared::identity::Role;
use lanmesh_shared::tls::{self, PeerPolicy, TlsFiles, TlsMaterial};
use lanmesh_tests::bin;
use lanmesh_tests::cluster::{NodeProc, Pki, wait_for};
use lanmesh_tests::netns::{Host, Net};
use tokio::sync::Mutex;

static ONE_LAN_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn args(
    pki: &Pki,
    dir: &Path,
    cluster: &str,
    name: &str,
    host: &Host,
    extra: &[String],
) -> Vec<String> {
    let ip = host.ip;
    let mut a: Vec<String> = vec![
        "run".into(),
        "--node-id".into(),
        name.into(),
        "--cluster-id".into(),
        cluster.into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--api-addr".into(),
        format!("{ip}:0"),
        "--raft-addr".into(),
        format!("{ip}:0"),
        "--client-addr".into(),
        format!("{ip}:0"),
    ];
    a.extend(pki.node_args(name));
    a.extend(extra.iter().cloned());
    a
}

/// Three cores in three namespaces with no peer list find each other by mDNS
/// and form one cluster with one leader; a node of another cluster id on the
/// same segment is ignored; a fourth core started later joins by itself and
/// becomes a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_forms_one_cluster_across_hosts() {
    let _one = ONE_LAN_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::new(1);
    let hosts: Vec<Host> = (0..5).map(|_| net.add_host()).collect();
    let cluster = format!("lan-{}", std::process::id());
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir, &cluster);
    let clustered: Vec<String> = ["--mode", "local-cluster", "--bootstrap-expect", "3"]
        .map(String::from)
        .to_vec();

    // A stranger: a node of another cluster on the same segment, also looking.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_pki = Pki::new(&other_dir, "strangers");
    let mut stranger = NodeProc::new(
        "stranger",
        &other_dir.join("stranger"),
        tmp.path(),
        args(
            &other_pki,
            &other_dir,
            "strangers",
            "stranger",
            &hosts[4],
            &clustered,
        ),
    )
    .in_netns(&hosts[4].ns);
    stranger.start().await;

    let started = Instant::now();
    let mut nodes = Vec::new();
    for (i, host) in hosts.iter().take(3).enumerate() {
        let name = format!("node-{}", i + 1);
        let mut n = NodeProc::new(
            &name,
            &tmp.path().join(&name),
            tmp.path(),
            args(&pki, tmp.path(), &cluster, &name, host, &clustered),
        )
        .in_netns(&host.ns);
        n.start().await;
        nodes.push(n);
    }
    // Off loopback, with certificates, the API is HTTPS: talk to it as an operator.
    let client = operator_client(&pki);
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    assert!(apis.iter().all(|a| a.starts_with("https://")), "{apis:?}");
    let leader = wait_for(
        "three hosts to form one cluster by mDNS",
        Duration::from_secs(60),
        || {
            let apis = apis.clone();
            let client = client.clone();
            async move {
                let mut leaders = std::collections::BTreeSet::new();
                for api in &apis {
                    let s = status(&client, api).await?;
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
    eprintln!(
        "FORMED: 3 hosts formed one cluster by mDNS in {:?} (leader {leader})",
        started.elapsed()
    );
    let (s, b) = kv(&client, Method::PUT, &apis[1], "lan/key", "over-the-bridge")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");

    let mut four = NodeProc::new(
        "node-4",
        &tmp.path().join("node-4"),
        tmp.path(),
        args(
            &pki,
            tmp.path(),
            &cluster,
            "node-4",
            &hosts[3],
            &["--mode".into(), "local-cluster".into()],
        ),
    )
    .in_netns(&hosts[3].ns);
    four.start().await;
    let joined_at = Instant::now();
    let api0 = apis[0].clone();
    let members = wait_for(
        "node-4 to join by itself and become a voter",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let api0 = api0.clone();
            async move {
                let (s, body) = client
                    .request(Method::GET, &api0, "/v1/members", Vec::new())
                    .await
                    .ok()?;
                if s != StatusCode::OK {
                    return None;
                }
                let m: serde_json::Value = serde_json::from_slice(&body).ok()?;
                let list = m["members"].as_array()?.clone();
                list.iter()
                    .any(|m| m["id"] == "node-4" && m["suffrage"] == "voter")
                    .then_some(list)
            }
        },
    )
    .await;
    eprintln!(
        "JOINED: node-4 found the cluster by mDNS and became a voter in {:?}",
        joined_at.elapsed()
    );
    let ids: Vec<&str> = members.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert!(
        !ids.contains(&"stranger"),
        "the other cluster's node is ignored: {ids:?}"
    );
    let (s, value) = kv(&client, Method::GET, &four.api, "lan/key", "")
        .await
        .unwrap();
    assert_eq!((s, value.as_str()), (StatusCode::OK, "over-the-bridge"));
    let stranger_client = operator_client(&other_pki);
    let st = status(&stranger_client, &stranger.api).await.unwrap();
    assert_eq!(
        st["initialized"], false,
        "the stranger did not join us: {st}"
    );
}

fn operator_client(pki: &Pki) -> HttpClient {
    pki.issue(Role::Operator, "ops");
    let material = TlsMaterial::load(&TlsFiles::new(
        pki.dir.join("ca.crt"),
        Some(pki.dir.join("ops.crt")),
        Some(pki.dir.join("ops.key")),
    ))
    .unwrap();
    let cluster = material.ca_cluster_id().unwrap().to_owned();
    let tls = tls::client_config(
        &material,
        PeerPolicy::only(cluster, &[Role::Core]),
        &[b"http/1.1"],
    )
    .unwrap();
    HttpClient::new(Some(tls), Some(Duration::from_secs(10)))
}

async fn status(c: &HttpClient, api: &str) -> Option<serde_json::Value> {
    match c
        .request(Method::GET, api, "/v1/status?consistency=local", Vec::new())
        .await
        .ok()?
    {
        (StatusCode::OK, body) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

async fn kv(
    c: &HttpClient,
    method: Method,
    api: &str,
    key: &str,
    body: &str,
) -> Option<(StatusCode, String)> {
    let (s, b) = c
        .request(
            method,
            api,
            &format!("/v1/kv/{key}"),
            body.as_bytes().to_vec(),
        )
        .await
        .ok()?;
    Some((s, String::from_utf8_lossy(&b).into_owned()))
}

/// Air-gapped mode: no multicast, nodes joined by address, mutual TLS on every
/// link including the API. Then the leader's cable is pulled: the other two
/// elect a new leader and keep accepting writes, the old leader cannot commit,
/// and after healing all three agree with no acknowledged write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn air_gapped_cluster_survives_a_partitioned_leader() {
    let _one = ONE_LAN_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::new(2);
    let hosts: Vec<Host> = (0..3).map(|_| net.add_host()).collect();
    let cluster = format!("gap-{}", std::process::id());
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir, &cluster);
    let client = operator_client(&pki);
    let gapped = ["--mode".to_owned(), "air-gapped".to_owned()];

    let mut nodes = Vec::new();
    let mut first = NodeProc::new(
        "node-1",
        &tmp.path().join("node-1"),
        tmp.path(),
        args(&pki, tmp.path(), &cluster, "node-1", &hosts[0], &gapped),
    )
    .in_netns(&hosts[0].ns);
    first.start().await;
    assert!(
        first.api.starts_with("https://"),
        "air-gapped APIs are HTTPS"
    );
    let join: Vec<String> = [gapped.to_vec(), vec!["--join".into(), first.api.clone()]].concat();
    nodes.push(first);
    for (i, host) in hosts.iter().enumerate().skip(1) {
        let name = format!("node-{}", i + 1);
        let mut n = NodeProc::new(
            &name,
            &tmp.path().join(&name),
            tmp.path(),
            args(&pki, tmp.path(), &cluster, &name, host, &join),
        )
        .in_netns(&host.ns);
        n.start().await;
        nodes.push(n);
    }
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let agreed = |apis: Vec<String>, client: HttpClient, voters: usize| async move {
        let mut leaders = std::collections::BTreeSet::new();
        for api in &apis {
            let s = status(&client, api).await?;
            let n = s["members"]
                .as_array()?
                .iter()
                .filter(|m| m["suffrage"] == "voter")
                .count();
            if n != voters {
                return None;
            }
            leaders.insert(s["leader_id"].as_str()?.to_owned());
        }
        (leaders.len() == 1).then(|| leaders.into_iter().next().unwrap())
    };
    let leader = wait_for("three air-gapped voters", Duration::from_secs(60), || {
        agreed(apis.clone(), client.clone(), 3)
    })
    .await;
    let old = nodes.iter().position(|n| n.name == leader).unwrap();
    for i in 0..20 {
        let (s, b) = kv(
            &client,
            Method::PUT,
            &apis[old],
            &format!("before/{i}"),
            "x",
        )
        .await
        .unwrap();
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    net.cut(&hosts[old]);
    let cut_at = Instant::now();
    let others: Vec<String> = (0..3)
        .filter(|i| *i != old)
        .map(|i| apis[i].clone())
        .collect();
    let new_leader = wait_for(
        "the majority to elect a new leader",
        Duration::from_secs(30),
        || {
            let others = others.clone();
            let client = client.clone();
            let leader = leader.clone();
            async move {
                let l = agreed(others, client, 3).await?;
                (l != leader).then_some(l)
            }
        },
    )
    .await;
    eprintln!(
        "REPLACED: partitioned leader {leader} replaced by {new_leader} after {:?}",
        cut_at.elapsed()
    );
    for i in 0..20 {
        let (s, b) = kv(
            &client,
            Method::PUT,
            &others[i % 2],
            &format!("during/{i}"),
            "y",
        )
        .await
        .unwrap();
        assert_eq!(
            s,
            StatusCode::OK,
            "the majority keeps accepting writes: {b}"
        );
    }
    // The old leader, asked from inside its own host, cannot commit.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &hosts[old].ns])
        .arg(bin("core-node"))
        .args(["kv", "put", "lost/write", "z", "--api", &apis[old]])
        .args(["--api-ca", &pki.dir.join("ca.crt").display().to_string()])
        .args(["--api-cert", &pki.dir.join("ops.crt").display().to_string()])
        .args(["--api-key", &pki.dir.join("ops.key").display().to_string()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the partitioned old leader must not commit: {out:?}"
    );

    net.heal(&hosts[old]);
    let api_old = apis[old].clone();
    wait_for(
        "the old leader to rejoin as a follower",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let api_old = api_old.clone();
            let new_leader = new_leader.clone();
            async move {
                let s = status(&client, &api_old).await?;
                (s["role"] == "follower" && s["leader_id"] == new_leader.as_str()).then_some(())
            }
        },
    )
    .await;
    for api in &apis {
        for key in ["before/0", "before/19", "during/0", "during/19"] {
            let (s, b) = kv(&client, Method::GET, api, key, "").await.unwrap();
            assert_eq!(s, StatusCode::OK, "{key} on {api}: {b}");
        }
        let (s, _) = kv(&client, Method::GET, api, "lost/write", "")
            .await
            .unwrap();
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "the partitioned write never committed ({api})"
        );
    }
}

/// A core and an edge on two hosts: the core's link is cut at the bridge (the
/// edge sees only a dead link). Clients on the edge keep posting (queued);
/// after the link is healed every queued post reaches the core exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_keeps_a_site_working_through_a_cut_link() {
    use lanmesh_shared::proto::{Request, Response};
    use lanmesh_tests::client::{all_history, endpoint, login, post};

    let _one = ONE_LAN_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::new(3);
    let hosts: Vec<Host> = (0..2).map(|_| net.add_host()).collect();
    let cluster = format!("site-{}", std::process::id());
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir, &cluster);
    let admin = operator_client(&pki);

    let mut core = NodeProc::new(
        "node-1",
        &tmp.path().join("node-1"),
        tmp.path(),
        args(&pki, tmp.path(), &cluster, "node-1", &hosts[0], &[]),
    )
    .in_netns(&hosts[0].ns);
    core.start().await;
    for (path, body) in [
        ("/v1/users", r#"{"name":"alice","password":"pw"}"#),
        ("/v1/channels", r#"{"name":"ops"}"#),
    ] {
        wait_for("an admin write", Duration::from_secs(20), || {
            let (admin, api) = (admin.clone(), core.api.clone());
            async move {
                let (s, _) = admin
                    .request(Method::POST, &api, path, body.as_bytes().to_vec())
                    .await
                    .ok()?;
                (s == StatusCode::CREATED).then_some(())
            }
        })
        .await;
    }

    pki.issue(Role::Edge, "edge-1");
    let ip = hosts[1].ip;
    let f = |n: &str| pki.dir.join(n).display().to_string();
    let edge_args: Vec<String> = [
        "run",
        "--node-id",
        "edge-1",
        "--cluster-id",
        &cluster,
        "--data-dir",
        &tmp.path().join("edge-1").display().to_string(),
        "--client-addr",
        &format!("{ip}:0"),
        "--http-addr",
        &format!("{ip}:0"),
        "--upstream",
        &core.client.unwrap().to_string(),
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
    let mut edge = NodeProc::edge("edge-1", &tmp.path().join("edge-1"), tmp.path(), edge_args)
        .in_netns(&hosts[1].ns);
    edge.start().await;
    let plain = HttpClient::new(None, Some(Duration::from_secs(5)));
    let linked = |want: bool| {
        let (plain, url) = (plain.clone(), edge.api.clone());
        async move {
            let (_, body) = plain
                .request(Method::GET, &url, "/v1/status", Vec::new())
                .await
                .ok()?;
            let s: serde_json::Value = serde_json::from_slice(&body).ok()?;
            (s["upstream"]["connected"] == want && s["revision"].as_u64()? > 0).then_some(())
        }
    };
    wait_for(
        "the edge linked across hosts",
        Duration::from_secs(30),
        || linked(true),
    )
    .await;

    let at_edge = edge.client.unwrap();
    let alice = login(
        &endpoint(&pki, &cluster, None, at_edge),
        at_edge,
        "alice",
        "pw",
    )
    .await;
    alice.request(&post("ops", "on", "online")).await.unwrap();

    let cut = Instant::now();
    net.cut(&hosts[0]);
    wait_for(
        "the edge to notice the cut",
        Duration::from_secs(20),
        || linked(false),
    )
    .await;
    eprintln!("edge noticed the cut after {:?}", cut.elapsed());
    for i in 0..5 {
        let r = alice
            .request(&post("ops", &format!("cut-{i}"), &format!("cut {i}")))
            .await
            .unwrap();
        assert!(matches!(r, Response::Posted { pending: true, .. }), "{r:?}");
    }
    let Response::Pending(p) = alice.request(&Request::Pending).await.unwrap() else {
        panic!()
    };
    assert_eq!(p.len(), 5);

    net.heal(&hosts[0]);
    wait_for("the edge linked again", Duration::from_secs(30), || {
        linked(true)
    })
    .await;
    let at_core = core.client.unwrap();
    let reader = login(
        &endpoint(&pki, &cluster, None, at_core),
        at_core,
        "alice",
        "pw",
    )
    .await;
    wait_for(
        "every post on the core, once",
        Duration::from_secs(20),
        || async {
            let h = all_history(&reader, "ops").await;
            let bodies: Vec<String> = h
                .iter()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                .collect();
            let unique: std::collections::BTreeSet<_> = bodies.iter().collect();
            (bodies.len() == 6 && unique.len() == 6).then_some(())
        },
    )
    .await;
    drop(edge);
    drop(core);
}
