//! The audit log across cores (real processes): logins, failed logins,
//! refused tokens, refused certificates and admin changes from every node
//! reach the leader's collection; `GET /v1/audit` filters it; editing a
//! record in the SQLite file makes `core-node audit verify` fail and name it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lanmesh_shared::identity::Role;
use lanmesh_shared::proto::{Client, ErrorCode, Request};
use lanmesh_tests::client::{create, endpoint, login, server_code};
use lanmesh_tests::cluster::{Cluster, get_json, wait_for};
use lanmesh_tests::{bin, run};
use serde_json::Value;

async fn records(api: &str, query: &str) -> Vec<Value> {
    get_json(api, &format!("/v1/audit?{query}"))
        .await
        .and_then(|v| v["records"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_reach_the_leader_and_tampering_is_detected() {
    let cluster = Cluster::start(3, "").await;
    let api = cluster.nodes[0].api.clone();
    create(&api, "/v1/users", r#"{"name":"alice","password":"pw"}"#).await;
    let id = cluster.cluster_id.clone();
    let addr = |i: usize| cluster.nodes[i].client.unwrap();

    // node-2: a login, then a forged token on a fresh connection.
    let ep2 = endpoint(&cluster.pki, &id, None, addr(1));
    login(&ep2, addr(1), "alice", "pw").await;
    let fresh = Client::connect(&ep2, addr(1), "test").await.unwrap();
    let forged = Request::Authenticate {
        token: "eyJzdWIiOiJtYWxsb3J5In0.AAAA".into(),
    };
    assert_eq!(
        server_code(fresh.request(&forged).await),
        ErrorCode::InvalidToken
    );
    // node-3: a wrong password, and a certificate of a role the client port refuses.
    let ep3 = endpoint(&cluster.pki, &id, None, addr(2));
    let c3 = Client::connect(&ep3, addr(2), "test").await.unwrap();
    assert_eq!(
        server_code(
            c3.request(&Request::Login {
                user: "alice".into(),
                password: "nope".into()
            })
            .await
        ),
        ErrorCode::BadCredentials
    );
    cluster.pki.issue(Role::Edge, "edge-1");
    let refused = Client::connect(
        &endpoint(&cluster.pki, &id, Some("edge-1"), addr(2)),
        addr(2),
        "edge",
    )
    .await;
    assert!(refused.is_err());

    // Every origin's records reach the leader, whichever node is asked.
    let want = [
        ("node-1", "registry_change"),
        ("node-2", "login"),
        ("node-2", "token_refused"),
        ("node-3", "login_failed"),
        ("node-3", "cert_refused"),
    ];
    for (origin, kind) in want {
        wait_for(
            &format!("{kind} from {origin} in the leader's audit collection"),
            Duration::from_secs(20),
            || {
                let api = cluster.nodes[2].api.clone();
                async move {
                    let found = records(&api, &format!("origin={origin}&kind={kind}")).await;
                    (!found.is_empty()).then_some(())
                }
            },
        )
        .await;
    }
    let alice = records(&api, "actor=alice").await;
    assert!(
        alice.iter().all(|r| r["actor"] == "alice") && alice.len() >= 2,
        "{alice:?}"
    );
    let none = records(&api, "since=32503680000000").await;
    assert!(none.is_empty(), "nothing from the year 3000");
    let (s, _) = lanmesh_tests::cluster::http(
        hyper::Method::GET,
        &api,
        "/v1/audit?since=yesterday",
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(s, hyper::StatusCode::BAD_REQUEST);

    // The leader's file verifies; after a record is edited in it, it does not.
    let (leader, _) = cluster.leader().await;
    let db = cluster.nodes[leader].data_dir.join("audit.db");
    let verify = || {
        run(
            &bin("core-node"),
            cluster.dir(),
            &["audit", "verify", "--file", db.to_str().unwrap()],
        )
    };
    let ok = verify();
    assert_eq!(ok.code, Some(0), "{ok:#?}");
    assert!(ok.stdout.contains("collected node-2"), "{}", ok.stdout);
    let seq: i64 = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let seq: i64 = c
            .query_row(
                "SELECT seq FROM collected WHERE origin = 'node-2' AND kind = 'login'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        c.execute(
            "UPDATE collected SET actor = 'bob' WHERE origin = 'node-2' AND seq = ?1",
            [seq],
        )
        .unwrap();
        seq
    };
    let bad = verify();
    assert_ne!(bad.code, Some(0), "{bad:#?}");
    assert!(
        bad.stdout.contains(&format!(
            "collected chain of node-2: record #{seq}: contents changed"
        )),
        "{}",
        bad.stdout
    );
}
