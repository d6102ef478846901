//! The client protocol on a real core node's client port: version
//! negotiation, login by client certificate, and typed errors for garbage,
//! oversized frames, an unknown version and a request before Hello — with
//! the server serving this and other clients throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lanmesh_shared::identity::Role;
use lanmesh_shared::link::{self, AlertReason, LinkError};
use lanmesh_shared::proto::{
    Client, ClientError, ErrorCode, MAX_FRAME, Request, Response, call, call_raw,
};
use lanmesh_tests::client::{endpoint, server_code};
use lanmesh_tests::cluster::Cluster;

/// Hello negotiates version 1; Ping works; Whoami needs a login and reports
/// the certificate's identity once logged in; bad frames get typed errors and
/// the same connection keeps working; so do other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_negotiates_authenticates_and_survives_bad_frames() {
    let cluster = Cluster::start(1, "").await;
    let addr = cluster.nodes[0].client.unwrap();
    let id = cluster.cluster_id.clone();

    let anon = Client::connect(&endpoint(&cluster.pki, &id, None, addr), addr, "test")
        .await
        .unwrap();
    assert_eq!((anon.version, anon.node_id.as_str()), (1, "node-1"));
    assert_eq!(anon.request(&Request::Ping).await.unwrap(), Response::Pong);
    assert_eq!(
        server_code(anon.request(&Request::Whoami).await),
        ErrorCode::NotLoggedIn
    );

    cluster.pki.issue(Role::Client, "sensor-7");
    let logged = Client::connect(
        &endpoint(&cluster.pki, &id, Some("sensor-7"), addr),
        addr,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        logged.request(&Request::Whoami).await.unwrap(),
        Response::Identity {
            subject: "sensor-7".into(),
            role: "client".into()
        }
    );

    // Garbage that frames as 5 bytes of nonsense.
    let code =
        server_code(call_raw(anon.connection(), b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1").await);
    assert_eq!(code, ErrorCode::Malformed);
    // A frame declaring more than MAX_FRAME bytes.
    let mut big = ((MAX_FRAME as u32) + 1).to_be_bytes().to_vec();
    big.extend_from_slice(&[0u8; 1024]);
    assert_eq!(
        server_code(call_raw(anon.connection(), &big).await),
        ErrorCode::FrameTooLarge
    );
    // Bytes that do not even make a length prefix.
    assert!(call_raw(anon.connection(), b"\x01").await.is_err());
    // The same connection and the other client are still served.
    assert_eq!(anon.request(&Request::Ping).await.unwrap(), Response::Pong);
    assert_eq!(
        logged.request(&Request::Ping).await.unwrap(),
        Response::Pong
    );
}

/// An unknown protocol version and a request before Hello each get a typed
/// error; a certificate of a role not allowed on the client port is refused in
/// the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_failures_are_typed() {
    let cluster = Cluster::start(1, "").await;
    let addr = cluster.nodes[0].client.unwrap();
    let id = cluster.cluster_id.clone();
    let ep = endpoint(&cluster.pki, &id, None, addr);

    let l = link::connect(&ep, addr, "lanmesh", None, link::DEFAULT_HANDSHAKE_TIMEOUT)
        .await
        .unwrap();
    let hello9 = Request::Hello {
        versions: vec![9],
        client: "future".into(),
    };
    assert_eq!(
        server_code(call(&l.conn, &hello9).await),
        ErrorCode::UnsupportedVersion
    );

    let l = link::connect(&ep, addr, "lanmesh", None, link::DEFAULT_HANDSHAKE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        server_code(call(&l.conn, &Request::Ping).await),
        ErrorCode::HelloRequired
    );

    cluster.pki.issue(Role::Edge, "edge-1");
    let refused = Client::connect(
        &endpoint(&cluster.pki, &id, Some("edge-1"), addr),
        addr,
        "edge",
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Link(LinkError::RefusedByPeer {
                reason: AlertReason::NotPermitted,
                ..
            }))
        ),
        "{refused:?}"
    );
    // And the port still serves a good client.
    let ok = Client::connect(&ep, addr, "after").await.unwrap();
    assert_eq!(ok.request(&Request::Ping).await.unwrap(), Response::Pong);
}

/// Password login answers a token signed by the cluster key; the token logs a
/// new connection in; wrong passwords, unknown users, altered and forged
/// tokens get typed errors; deleting the user revokes the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_login_and_tokens() {
    use hyper::{Method, StatusCode};
    use lanmesh_tests::cluster::{http, wait_for};
    use std::time::Duration;

    let cluster = Cluster::start(1, "").await;
    let addr = cluster.nodes[0].client.unwrap();
    let api = cluster.nodes[0].api.clone();
    let id = cluster.cluster_id.clone();
    let (s, _) = http(
        Method::POST,
        &api,
        "/v1/users",
        br#"{"name":"alice","password":"s3cret"}"#.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::CREATED);

    let ep = endpoint(&cluster.pki, &id, None, addr);
    let c = Client::connect(&ep, addr, "test").await.unwrap();
    let login = |user: &str, password: &str| Request::Login {
        user: user.into(),
        password: password.into(),
    };
    assert_eq!(
        server_code(c.request(&login("alice", "wrong")).await),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        server_code(c.request(&login("bob", "s3cret")).await),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        server_code(c.request(&Request::Whoami).await),
        ErrorCode::NotLoggedIn
    );
    // The token key is written right after the first election: allow for it.
    let token = wait_for("a login token", Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            match c.request(&login("alice", "s3cret")).await {
                Ok(Response::Token { token, subject, .. }) if subject == "alice" => Some(token),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(
        c.request(&Request::Whoami).await.unwrap(),
        Response::Identity {
            subject: "alice".into(),
            role: "user".into()
        }
    );

    // A fresh connection logs in with the token alone.
    let fresh = Client::connect(&ep, addr, "test").await.unwrap();
    let auth = |t: &str| Request::Authenticate { token: t.into() };
    assert!(matches!(
        fresh.request(&auth(&token)).await.unwrap(),
        Response::Identity { .. }
    ));
    assert!(matches!(
        fresh.request(&Request::Whoami).await.unwrap(),
        Response::Identity { .. }
    ));

    // Altered claims, and a token from another cluster's key.
    let (body, sig) = token.split_once('.').unwrap();
    let altered = format!("{}x.{sig}", &body[..body.len() - 1]);
    assert_eq!(
        server_code(fresh.request(&auth(&altered)).await),
        ErrorCode::InvalidToken
    );
    let rogue_key =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let forged = lanmesh_shared::token::sign(
        rogue_key.as_ref(),
        &lanmesh_shared::token::Claims {
            cluster: id.clone(),
            sub: "alice".into(),
            kind: "user".into(),
            roles: vec!["admin".into()],
            iat: 0,
            exp: i64::MAX,
        },
    )
    .unwrap();
    assert_eq!(
        server_code(fresh.request(&auth(&forged)).await),
        ErrorCode::InvalidToken
    );

    // A token signed with the real cluster key but expired. The key is in
    // the replicated state, so a backup of it has the key.
    let (s, backup) = http(Method::GET, &api, "/v1/backup", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("state.db"), &backup).unwrap();
    let key: Vec<u8> = rusqlite::Connection::open(tmp.path().join("state.db"))
        .unwrap()
        .query_row(
            "SELECT value FROM sm_meta WHERE key = 'token_key'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let now = lanmesh_shared::token::now();
    let expired = lanmesh_shared::token::sign(
        &key,
        &lanmesh_shared::token::Claims {
            cluster: id.clone(),
            sub: "alice".into(),
            kind: "user".into(),
            roles: vec!["user".into()],
            iat: now - 7200,
            exp: now - 3600,
        },
    )
    .unwrap();
    let e = fresh.request(&auth(&expired)).await;
    assert!(
        matches!(&e, Err(ClientError::Server(f)) if f.code == ErrorCode::InvalidToken && f.message.contains("expired")),
        "{e:?}"
    );

    // Deleting the user revokes the token.
    let (s, _) = http(Method::DELETE, &api, "/v1/users/alice", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        server_code(fresh.request(&auth(&token)).await),
        ErrorCode::InvalidToken
    );

    // Every refusal (altered, forged, expired, revoked) is audited.
    let refused = wait_for(
        "four audited token refusals",
        Duration::from_secs(10),
        || {
            let api = api.clone();
            async move {
                let v =
                    lanmesh_tests::cluster::get_json(&api, "/v1/audit?kind=token_refused").await?;
                let n = v["records"].as_array()?.len();
                (n >= 4).then_some(v)
            }
        },
    )
    .await;
    let details: Vec<&str> = refused["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(details.iter().any(|d| d.contains("expired")), "{details:?}");
    assert!(
        details.iter().any(|d| d.contains("no longer exists")),
        "{details:?}"
    );
}

/// Messaging on one node: a post reaches a subscriber on another connection
/// at once; a retried post (same idempotency key) is stored and delivered
/// once; history pages in receive order; an unknown channel, and posting or
/// subscribing before login, get typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_subscribe_history_on_one_node() {
    use hyper::{Method, StatusCode};
    use lanmesh_tests::cluster::{http, wait_for};
    use std::time::Duration;

    let cluster = Cluster::start(1, "").await;
    let addr = cluster.nodes[0].client.unwrap();
    let api = cluster.nodes[0].api.clone();
    let id = cluster.cluster_id.clone();
    for (path, body) in [
        ("/v1/users", &br#"{"name":"alice","password":"pw"}"#[..]),
        ("/v1/channels", &br#"{"name":"ops"}"#[..]),
    ] {
        let (s, _) = http(Method::POST, &api, path, body.to_vec()).await.unwrap();
        assert_eq!(s, StatusCode::CREATED);
    }
    let ep = endpoint(&cluster.pki, &id, None, addr);
    let login = || async {
        let c = Client::connect(&ep, addr, "test").await.unwrap();
        let req = Request::Login {
            user: "alice".into(),
            password: "pw".into(),
        };
        let c2 = c.clone();
        wait_for("login", Duration::from_secs(20), || {
            let c2 = c2.clone();
            let req = req.clone();
            async move { c2.request(&req).await.ok() }
        })
        .await;
        c
    };
    let poster = login().await;
    let listener = login().await;
    let mut sub = listener.subscribe("ops").await.unwrap();

    let post = |key: &str, body: &str| Request::Post {
        channel: "ops".into(),
        body: body.as_bytes().to_vec(),
        idempotency_key: key.into(),
    };
    let first = poster.request(&post("k-1", "hello")).await.unwrap();
    let Response::Posted {
        origin,
        seq,
        duplicate,
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!((origin.as_str(), duplicate), ("node-1", false));
    let again = poster.request(&post("k-1", "hello")).await.unwrap();
    assert_eq!(
        again,
        Response::Posted {
            origin: "node-1".into(),
            seq,
            duplicate: true,
            pending: false,
        }
    );
    poster.request(&post("k-2", "second")).await.unwrap();

    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.body.as_slice(), m.sender.as_str(), m.seq),
        (&b"hello"[..], "alice", seq)
    );
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.body, b"second",
        "the retried post was not delivered twice"
    );

    let history = |after: u64| Request::History {
        channel: "ops".into(),
        after,
        limit: 1,
    };
    let Response::Messages(page) = poster.request(&history(0)).await.unwrap() else {
        panic!()
    };
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].body, b"hello");
    let Response::Messages(page) = poster.request(&history(page[0].pos)).await.unwrap() else {
        panic!()
    };
    assert_eq!(page[0].body, b"second");

    let nowhere = Request::Post {
        channel: "nowhere".into(),
        body: b"x".to_vec(),
        idempotency_key: "k-3".into(),
    };
    assert_eq!(
        server_code(poster.request(&nowhere).await),
        ErrorCode::NotFound
    );
    let anon = Client::connect(&ep, addr, "anon").await.unwrap();
    assert_eq!(
        server_code(anon.request(&post("k-4", "x")).await),
        ErrorCode::NotLoggedIn
    );
    assert!(
        matches!(anon.subscribe("ops").await, Err(ClientError::Server(e)) if e.code == ErrorCode::NotLoggedIn)
    );
    assert_eq!(
        server_code(poster.request(&post("", "x")).await),
        ErrorCode::Malformed
    );
}

/// Revoking a client certificate through the cluster takes effect on every
/// node: a session already logged in with it ends at its next request, and
/// a new handshake with it is refused as revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificate_is_refused_everywhere() {
    use lanmesh_tests::cluster::wait_for;
    use lanmesh_tests::{bin, run};
    use std::time::Duration;

    let cluster = Cluster::start(3, "").await;
    let id = cluster.cluster_id.clone();
    cluster.pki.issue(Role::Client, "sensor-9");
    let on2 = cluster.nodes[1].client.unwrap();
    let on3 = cluster.nodes[2].client.unwrap();
    let device = Client::connect(
        &endpoint(&cluster.pki, &id, Some("sensor-9"), on2),
        on2,
        "device",
    )
    .await
    .unwrap();
    assert!(matches!(
        device.request(&Request::Whoami).await.unwrap(),
        Response::Identity { .. }
    ));

    let cert = cluster.pki.dir.join("sensor-9.crt");
    let out = run(
        &bin("core-node"),
        cluster.dir(),
        &[
            "revoke",
            "--cert",
            cert.to_str().unwrap(),
            "--api",
            &cluster.nodes[0].api,
        ],
    )
    .ok();
    assert!(out.stdout.contains("revoked"), "{}", out.stdout);

    wait_for("the open session to end", Duration::from_secs(10), || {
        let device = device.clone();
        async move {
            match device.request(&Request::Whoami).await {
                Err(ClientError::Server(e)) if e.code == ErrorCode::InvalidToken => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(
        server_code(device.request(&Request::Whoami).await),
        ErrorCode::NotLoggedIn,
        "the session stays ended"
    );
    let again = Client::connect(
        &endpoint(&cluster.pki, &id, Some("sensor-9"), on3),
        on3,
        "device",
    )
    .await;
    assert!(
        matches!(
            again,
            Err(ClientError::Link(LinkError::RefusedByPeer {
                reason: AlertReason::Revoked,
                ..
            }))
        ),
        "{again:?}"
    );
}
