//! Client-protocol helpers for tests: endpoints trusting a test cluster's CA,
//! password login (waiting out the first election), registry set-up.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::{Method, StatusCode};
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::proto::{Client, ClientError, ErrorCode, Request, Response};
use lanmesh_shared::tls::{self, ALPN_CLIENT, PeerPolicy, TlsMaterial, Transport};

use crate::cluster::{Pki, http, wait_for};

/// A client endpoint (to a core or an edge) trusting `pki`'s CA, with `who`'s certificate (issued
/// into the PKI directory) or none.
pub fn endpoint(pki: &Pki, cluster: &str, who: Option<&str>, addr: SocketAddr) -> quinn::Endpoint {
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let material = match who {
        None => TlsMaterial::from_pem(&ca, None, None).expect("CA"),
        Some(name) => {
            let cert = std::fs::read(pki.dir.join(format!("{name}.crt"))).expect("cert");
            let key = std::fs::read(pki.dir.join(format!("{name}.key"))).expect("key");
            TlsMaterial::from_pem(&ca, Some((&cert, &key)), None).expect("material")
        }
    };
    let tls = tls::client_config(
        &material,
        PeerPolicy::only(cluster, &[Role::Core, Role::Edge]),
        &[ALPN_CLIENT],
    )
    .expect("client TLS");
    link::client_endpoint(
        tls::quinn_client_config(tls, Transport::default()).expect("quinn config"),
        addr,
    )
    .expect("endpoint")
}

/// The error code of a failed request (panics on anything else).
pub fn server_code(r: Result<Response, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// POSTs a JSON body to the admin API and expects 201 Created.
pub async fn create(api: &str, path: &str, body: &str) {
    let (s, b) = http(Method::POST, api, path, body.as_bytes().to_vec())
        .await
        .expect("admin API");
    assert_eq!(s, StatusCode::CREATED, "POST {path}: {b:?}");
}

/// Connects to `addr` and logs in as `user` (retrying while the cluster is
/// still writing its token key, or the user is not replicated here yet).
pub async fn login(ep: &quinn::Endpoint, addr: SocketAddr, user: &str, password: &str) -> Client {
    let c = Client::connect(ep, addr, "test").await.expect("connect");
    let req = Request::Login {
        user: user.into(),
        password: password.into(),
    };
    wait_for(&format!("login as {user}"), Duration::from_secs(20), || {
        let c = c.clone();
        let req = req.clone();
        async move {
            match c.request(&req).await {
                Ok(Response::Token { .. }) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    c
}

/// Logs in as `user` on node `i` of `cluster` (a fresh endpoint each time,
/// so it follows a restarted node to its new client port).
pub async fn login_to(
    cluster: &crate::cluster::Cluster,
    i: usize,
    user: &str,
    password: &str,
) -> Client {
    let addr = cluster.nodes[i].client.expect("node started");
    let ep = endpoint(&cluster.pki, &cluster.cluster_id, None, addr);
    login(&ep, addr, user, password).await
}

/// A post request.
pub fn post(channel: &str, key: &str, body: &str) -> Request {
    Request::Post {
        channel: channel.into(),
        body: body.as_bytes().to_vec(),
        idempotency_key: key.into(),
    }
}

/// Every message of `channel` visible through `c`, paging through history.
pub async fn all_history(c: &Client, channel: &str) -> Vec<lanmesh_shared::proto::Message> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let req = Request::History {
            channel: channel.into(),
            after,
            limit: 500,
        };
        match c.request(&req).await.expect("history") {
            Response::Messages(page) if page.is_empty() => return out,
            Response::Messages(page) => {
                after = page.last().map(|m| m.pos).unwrap_or(after);
                out.extend(page);
            }
            other => panic!("history answered {other:?}"),
        }
    }
}
