//! Real QUIC handshakes over 127.0.0.1 (quinn, port 0) between certificates
//! minted by `lanmesh_shared::pki`.
//!
//! Each test proves one property of the identity layer: a valid certificate of
//! an allowed role gets through, and every kind of bad certificate is refused
//! with a typed error on *both* sides — never a hang and never a connection
//! that only fails later.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanmesh_shared::identity::{Identity, Role};
use lanmesh_shared::link::{self, AlertReason, Link, LinkError};
use lanmesh_shared::pki::{Ca, Issued, KeyType, LeafRequest, Revoked, Validity};
use lanmesh_shared::tls::{
    self, ALPN_RAFT, ClientAuth, PeerPolicy, Refusal, RevokedSerials, TlsError, TlsFiles,
    TlsMaterial, Transport,
};
use time::OffsetDateTime;
use tokio::sync::oneshot;

const CLUSTER: &str = "c1";
const WAIT: Duration = Duration::from_secs(5);

fn issue(ca: &Ca, role: Role, name: &str) -> Issued {
    ca.issue(&LeafRequest::new(ca, role, name, 30).unwrap())
        .unwrap()
}

fn material(ca: &Ca, own: Option<&Issued>, crl: Option<&str>) -> TlsMaterial {
    TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        own.map(|i| (i.cert_pem.as_bytes(), i.key_pem.as_bytes())),
        crl.map(str::as_bytes),
    )
    .unwrap()
}

/// A one-connection server: returns its address and the outcome of accepting
/// the first incoming connection.
struct Server {
    addr: SocketAddr,
    outcome: oneshot::Receiver<Result<Link, LinkError>>,
    _endpoint: quinn::Endpoint,
}

fn serve(material: &TlsMaterial, policy: PeerPolicy, auth: ClientAuth) -> Server {
    let tls = tls::server_config(material, policy, auth, &[ALPN_RAFT]).unwrap();
    let config = tls::quinn_server_config(tls, Transport::default()).unwrap();
    let endpoint = link::server_endpoint(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, outcome) = oneshot::channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        if let Some(incoming) = ep.accept().await {
            let result = link::accept(incoming, WAIT).await;
            // Keep the connection open until the client has read the welcome.
            if let Ok(l) = &result {
                let conn = l.conn.clone();
                tokio::spawn(async move { conn.closed().await });
            }
            let _ = tx.send(result);
        }
    });
    Server {
        addr,
        outcome,
        _endpoint: endpoint,
    }
}

async fn dial(
    material: &TlsMaterial,
    policy: PeerPolicy,
    addr: SocketAddr,
    expect: Option<&str>,
) -> Result<Link, LinkError> {
    let tls = tls::client_config(material, policy, &[ALPN_RAFT]).unwrap();
    let config = tls::quinn_client_config(tls, Transport::default()).unwrap();
    let endpoint = link::client_endpoint(config, addr).unwrap();
    link::connect(&endpoint, addr, "lanmesh", expect, WAIT).await
}

fn raft_policy() -> PeerPolicy {
    PeerPolicy::only(CLUSTER, &[Role::Core])
}

/// Records the refusals a policy reports.
fn recording(policy: PeerPolicy) -> (PeerPolicy, Arc<Mutex<Vec<Refusal>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (
        policy.on_refusal(move |r| sink.lock().unwrap().push(r.clone())),
        seen,
    )
}

/// Runs one handshake of `client_cert` against a Raft server (core only) and
/// returns the client's and the server's outcomes plus what the server's
/// verifier reported.
async fn against_raft_server(
    ca: &Ca,
    client_cert: Option<&Issued>,
    server_crl: Option<&str>,
    revoked: RevokedSerials,
) -> (
    Result<Link, LinkError>,
    Result<Link, LinkError>,
    Vec<Refusal>,
) {
    let server_cert = issue(ca, Role::Core, "node-1");
    let (policy, seen) = recording(raft_policy().with_revoked(revoked));
    let server = serve(
        &material(ca, Some(&server_cert), server_crl),
        policy,
        ClientAuth::Required,
    );
    let client = dial(
        &material(ca, client_cert, None),
        raft_policy(),
        server.addr,
        None,
    )
    .await;
    let accepted = tokio::time::timeout(WAIT, server.outcome)
        .await
        .expect("server outcome in time")
        .expect("server task ran");
    let refusals = seen.lock().unwrap().clone();
    (client, accepted, refusals)
}

fn assert_refused(outcome: &Result<Link, LinkError>, want: AlertReason) {
    match outcome {
        Err(LinkError::RefusedByPeer { reason, .. }) => assert_eq!(*reason, want),
        other => panic!("expected the peer to refuse us with {want:?}, got {other:?}"),
    }
}

fn assert_we_refused(outcome: &Result<Link, LinkError>, want: AlertReason) {
    match outcome {
        Err(LinkError::RefusedPeer { reason, .. }) => assert_eq!(*reason, want),
        other => panic!("expected us to refuse the peer with {want:?}, got {other:?}"),
    }
}

/// A core certificate of the cluster is accepted on the Raft link, and each side
/// learns the other's verified identity.
#[tokio::test]
async fn core_certificate_is_accepted_with_identities() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&ca, Role::Core, "node-2");
    let (c, s, refusals) =
        against_raft_server(&ca, Some(&client), None, RevokedSerials::default()).await;
    let c = c.expect("client side connects");
    let s = s.expect("server side accepts");
    assert_eq!(
        c.peer,
        Some(Identity::new(CLUSTER, Role::Core, "node-1").unwrap())
    );
    assert_eq!(
        s.peer,
        Some(Identity::new(CLUSTER, Role::Core, "node-2").unwrap())
    );
    assert!(refusals.is_empty());
    // The link is usable: a stream round trip works.
    let (mut send, _recv) = c.conn.open_bi().await.unwrap();
    send.write_all(b"ping").await.unwrap();
}

/// Ed25519 keys work the same as ECDSA P-256 ones.
#[tokio::test]
async fn ed25519_certificates_are_accepted() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::Ed25519).unwrap();
    let mut req = LeafRequest::new(&ca, Role::Core, "node-2", 30).unwrap();
    req.key_type = KeyType::Ed25519;
    let client = ca.issue(&req).unwrap();
    let (c, s, _) = against_raft_server(&ca, Some(&client), None, RevokedSerials::default()).await;
    c.expect("client connects");
    s.expect("server accepts");
}

/// A certificate from another CA (even one claiming our cluster id) is refused: unknown CA.
#[tokio::test]
async fn certificate_of_another_ca_is_refused() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let rogue = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&rogue, Role::Core, "node-9");
    // The client trusts the real CA so the failure is the server's verdict.
    let server_cert = issue(&ca, Role::Core, "node-1");
    let (policy, seen) = recording(raft_policy());
    let server = serve(
        &material(&ca, Some(&server_cert), None),
        policy,
        ClientAuth::Required,
    );
    let client_material = TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        Some((client.cert_pem.as_bytes(), client.key_pem.as_bytes())),
        None,
    )
    .unwrap();
    let c = dial(&client_material, raft_policy(), server.addr, None).await;
    let s = server.outcome.await.unwrap();
    assert_refused(&c, AlertReason::UnknownCa);
    assert_we_refused(&s, AlertReason::UnknownCa);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Refusal::UnknownCa { .. }]
    ));
}

/// A certificate from another cluster's own CA is refused (unknown CA), and one
/// signed by our CA but stating another cluster id is refused as not permitted.
#[tokio::test]
async fn certificate_of_another_cluster_is_refused() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();

    let other_cluster_ca = Ca::generate("c2", 30, KeyType::EcdsaP256).unwrap();
    let foreign = issue(&other_cluster_ca, Role::Core, "node-1");
    let server_cert = issue(&ca, Role::Core, "node-1");
    let server = serve(
        &material(&ca, Some(&server_cert), None),
        raft_policy(),
        ClientAuth::Required,
    );
    let foreign_material = TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        Some((foreign.cert_pem.as_bytes(), foreign.key_pem.as_bytes())),
        None,
    )
    .unwrap();
    let c = dial(&foreign_material, raft_policy(), server.addr, None).await;
    assert_refused(&c, AlertReason::UnknownCa);

    let mut req = LeafRequest::new(&ca, Role::Core, "node-3", 30).unwrap();
    req.identity = Identity::new("c2", Role::Core, "node-3").unwrap();
    let wrong_id = ca.issue(&req).unwrap();
    let (c, s, refusals) =
        against_raft_server(&ca, Some(&wrong_id), None, RevokedSerials::default()).await;
    assert_refused(&c, AlertReason::NotPermitted);
    assert_we_refused(&s, AlertReason::NotPermitted);
    assert!(
        matches!(refusals.as_slice(), [Refusal::WrongCluster { expected, .. }] if expected == CLUSTER),
        "{refusals:?}"
    );
}

/// An edge, operator or client certificate is refused on the Raft link (core only).
#[tokio::test]
async fn role_not_allowed_on_link_is_refused() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    for role in [Role::Edge, Role::Operator, Role::Client] {
        let client = issue(&ca, role, "someone");
        let (c, s, refusals) =
            against_raft_server(&ca, Some(&client), None, RevokedSerials::default()).await;
        assert_refused(&c, AlertReason::NotPermitted);
        assert_we_refused(&s, AlertReason::NotPermitted);
        assert!(
            matches!(refusals.as_slice(), [Refusal::RoleNotAllowed { found, allowed }]
                if found.role == role && allowed == &[Role::Core]),
            "{role}: {refusals:?}"
        );
    }
}

/// An expired certificate is refused.
#[tokio::test]
async fn expired_certificate_is_refused() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let mut req = LeafRequest::new(&ca, Role::Core, "node-2", 30).unwrap();
    let now = OffsetDateTime::now_utc();
    req.validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let expired = ca.issue(&req).unwrap();
    let (c, s, refusals) =
        against_raft_server(&ca, Some(&expired), None, RevokedSerials::default()).await;
    assert_refused(&c, AlertReason::Expired);
    assert_we_refused(&s, AlertReason::Expired);
    assert!(matches!(refusals.as_slice(), [Refusal::Expired { .. }]));
}

/// A certificate on the CA's CRL is refused.
#[tokio::test]
async fn certificate_on_crl_is_refused() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&ca, Role::Core, "node-2");
    let crl = ca
        .revocation_list(
            1,
            &[Revoked {
                serial: client.info.serial.clone(),
                revoked_at: OffsetDateTime::now_utc(),
            }],
        )
        .unwrap();
    let (c, s, refusals) =
        against_raft_server(&ca, Some(&client), Some(&crl), RevokedSerials::default()).await;
    assert_refused(&c, AlertReason::Revoked);
    assert_we_refused(&s, AlertReason::Revoked);
    assert!(matches!(refusals.as_slice(), [Refusal::Revoked { .. }]));
    // Another certificate of the same CA still gets through with that CRL loaded.
    let fine = issue(&ca, Role::Core, "node-3");
    let (c, _, _) =
        against_raft_server(&ca, Some(&fine), Some(&crl), RevokedSerials::default()).await;
    c.expect("unrevoked certificate accepted");
}

/// A serial added to the live revocation set is refused from the next handshake on,
/// without rebuilding the server's configuration.
#[tokio::test]
async fn live_revocation_takes_effect_without_restart() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&ca, Role::Core, "node-2");
    let server_cert = issue(&ca, Role::Core, "node-1");
    let revoked = RevokedSerials::default();
    let tls = tls::server_config(
        &material(&ca, Some(&server_cert), None),
        raft_policy().with_revoked(revoked.clone()),
        ClientAuth::Required,
        &[ALPN_RAFT],
    )
    .unwrap();
    let endpoint = link::server_endpoint(
        tls::quinn_server_config(tls, Transport::default()).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                if let Ok(l) = link::accept(incoming, WAIT).await {
                    l.conn.closed().await;
                }
            });
        }
    });
    let m = material(&ca, Some(&client), None);
    dial(&m, raft_policy(), addr, None)
        .await
        .expect("accepted before revocation");
    revoked.insert(&client.info.serial);
    let c = dial(&m, raft_policy(), addr, None).await;
    assert_refused(&c, AlertReason::Revoked);
}

/// A client with no certificate is refused where mutual TLS is required, and
/// accepted anonymously where client authentication is optional.
#[tokio::test]
async fn missing_client_certificate() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let (c, s, refusals) = against_raft_server(&ca, None, None, RevokedSerials::default()).await;
    assert_refused(&c, AlertReason::CertificateRequired);
    assert_we_refused(&s, AlertReason::CertificateRequired);
    // rustls refuses an absent certificate before any verifier runs, so the
    // hook sees nothing; the accepting side's typed error is the record.
    assert!(refusals.is_empty(), "{refusals:?}");

    let server_cert = issue(&ca, Role::Core, "node-1");
    let client_port = PeerPolicy::only(CLUSTER, &[Role::Client, Role::Operator]);
    let server = serve(
        &material(&ca, Some(&server_cert), None),
        client_port,
        ClientAuth::Optional,
    );
    let c = dial(&material(&ca, None, None), raft_policy(), server.addr, None)
        .await
        .expect("anonymous client accepted on an optional-auth port");
    assert_eq!(c.peer.map(|p| p.name), Some("node-1".to_owned()));
    let s = server.outcome.await.unwrap().unwrap();
    assert_eq!(s.peer, None);
}

/// The client checks the server too: a server whose role is not allowed, or
/// that is not the node the client asked for, is refused.
#[tokio::test]
async fn client_verifies_the_server() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&ca, Role::Core, "node-2");
    let edge = issue(&ca, Role::Edge, "edge-1");
    let server = serve(
        &material(&ca, Some(&edge), None),
        PeerPolicy::only(CLUSTER, &[Role::Core]),
        ClientAuth::Required,
    );
    let c = dial(
        &material(&ca, Some(&client), None),
        raft_policy(),
        server.addr,
        None,
    )
    .await;
    assert_we_refused(&c, AlertReason::NotPermitted);

    let core = issue(&ca, Role::Core, "node-1");
    let server = serve(
        &material(&ca, Some(&core), None),
        raft_policy(),
        ClientAuth::Required,
    );
    let c = dial(
        &material(&ca, Some(&client), None),
        raft_policy(),
        server.addr,
        Some("node-7"),
    )
    .await;
    assert!(
        matches!(&c, Err(LinkError::UnexpectedPeer { expected, .. }) if expected == "node-7"),
        "{c:?}"
    );
}

/// Nothing listening: the caller gets a timeout, not a hang.
#[tokio::test]
async fn silent_address_times_out() {
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    let client = issue(&ca, Role::Core, "node-2");
    // A bound UDP socket that never answers.
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sink.local_addr().unwrap();
    let tls = tls::client_config(
        &material(&ca, Some(&client), None),
        raft_policy(),
        &[ALPN_RAFT],
    )
    .unwrap();
    let endpoint = link::client_endpoint(
        tls::quinn_client_config(tls, Transport::default()).unwrap(),
        addr,
    )
    .unwrap();
    let c = link::connect(&endpoint, addr, "lanmesh", None, Duration::from_millis(300)).await;
    assert!(matches!(c, Err(LinkError::Timeout { .. })), "{c:?}");
}

/// `TlsMaterial::load` refuses, with the file named, material a peer would refuse.
#[test]
fn loading_checks_our_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    ca.write(dir.path(), false).unwrap();
    let files = |name: &str| TlsFiles {
        ca: dir.path().join("ca.crt"),
        cert: Some(dir.path().join(format!("{name}.crt"))),
        key: Some(dir.path().join(format!("{name}.key"))),
        crl: None,
    };
    issue(&ca, Role::Core, "good")
        .write(dir.path(), "good", false)
        .unwrap();
    let loaded = TlsMaterial::load(&files("good")).unwrap();
    assert_eq!(loaded.identity().unwrap().name, "good");
    assert_eq!(loaded.ca_cluster_id(), Some(CLUSTER));

    let rogue = Ca::generate(CLUSTER, 30, KeyType::EcdsaP256).unwrap();
    issue(&rogue, Role::Core, "rogue")
        .write(dir.path(), "rogue", false)
        .unwrap();
    let err = TlsMaterial::load(&files("rogue")).unwrap_err();
    assert!(matches!(err, TlsError::OwnCertificate { .. }), "{err}");
    assert!(err.to_string().contains("rogue.crt"), "{err}");

    let err = TlsMaterial::load(&files("absent")).unwrap_err();
    assert!(
        matches!(err, TlsError::Read { .. }) && err.to_string().contains("absent.crt"),
        "{err}"
    );

    let half = TlsFiles {
        key: None,
        ..files("good")
    };
    assert!(matches!(TlsMaterial::load(&half), Err(TlsError::HalfPair)));
}
