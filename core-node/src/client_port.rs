//! The client port (QUIC, ALPN `lanmesh-client/1`): the server side of
//! `lanmesh_shared::proto`.
//!
//! Per connection: the first bidirectional stream must carry `Hello` and gets
//! the negotiated version (or `UnsupportedVersion` / `HelloRequired`, after
//! which the connection is closed); every later stream is one request, one
//! response. A malformed or oversized frame gets a typed error frame on its
//! own stream and the connection, and every other client, carry on.
//!
//! Login: by client certificate (`client` or `operator` role of this
//! cluster, checked in the TLS handshake), by `Login` (user and password,
//! checked against the Argon2id hash in the users registry; answers a token
//! signed with the cluster key), or by `Authenticate` with such a token. A
//! token is refused once its user is deleted. Messaging, presence and audit
//! requests come with the rest of #5.

use std::sync::{Arc, Mutex};

use lanmesh_shared::identity::Identity;
use lanmesh_shared::link;
use lanmesh_shared::proto::{
    ErrorCode, ErrorFrame, FrameError, FrameWriter, PostResult, Request, Response, read_frame,
    write_frame,
};
use lanmesh_shared::token::{self, Claims};
use tokio_util::sync::CancellationToken;

use crate::node::{Node, NodeError};
use crate::store::{self, Command, Registry};

/// How long a login token is valid.
pub const TOKEN_TTL_SECS: i64 = 12 * 3600;

/// Who a connection is logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    subject: String,
    role: String,
    /// Serial of the client certificate, for a certificate login.
    serial: Option<String>,
}

/// Serves the client port until `shutdown` fires.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    let audited = node.clone();
    let check: link::Admit = Arc::new(move |conn, peer| {
        let r = admit(conn, peer);
        if let Err(reason) = &r {
            let who = peer
                .map(|p| p.name.clone())
                .unwrap_or_else(|| "anonymous".into());
            audited
                .audit()
                .record("cert_refused", &who, &format!("client port: {reason}"));
        }
        r
    });
    link::accept_loop_admitting(
        endpoint,
        shutdown,
        "client",
        Some(check),
        move |l: link::Link| {
            let (node, stop) = (node.clone(), stop.clone());
            async move { connection(l.conn, l.peer, node, stop).await }
        },
    )
    .await;
}

/// Which certificates each protocol on the client port takes: the edge
/// link takes `edge` and `core` certificates (see `proto::admit`).
pub fn admit(conn: &quinn::Connection, peer: Option<&Identity>) -> Result<(), String> {
    use lanmesh_shared::identity::Role;
    lanmesh_shared::proto::admit(conn, peer, &[Role::Edge, Role::Core])
}

async fn connection(
    conn: quinn::Connection,
    peer: Option<Identity>,
    node: Arc<Node>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    if !lanmesh_shared::proto::negotiate(&conn, node.id(), &node.config().cluster_id).await {
        return;
    }
    let serial = link::peer_serial(&conn);
    let session = Arc::new(Mutex::new(peer.map(|id| Session {
        subject: id.name,
        role: id.role.to_string(),
        serial,
    })));
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let session = session.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let response = match read_frame::<Request>(&mut recv).await {
                Ok(Request::Subscribe { channel }) => {
                    subscription(&mut send, &channel, &node, &session).await;
                    return;
                }
                Ok(Request::SubscribePresence) => {
                    presence_subscription(&mut send, &node, &session).await;
                    return;
                }
                Ok(req) => handle(req, &node, &session, remote).await,
                Err(FrameError::Closed) => return,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "bad frame from client");
                    Response::Error(e.to_error_frame())
                }
            };
            let _ = write_frame(&mut send, &response).await;
        });
    }
}

async fn handle(
    req: Request,
    node: &Node,
    session: &Mutex<Option<Session>>,
    remote: std::net::SocketAddr,
) -> Response {
    let result = match req {
        Request::Ping => Ok(Response::Pong),
        Request::Hello { .. } => Err(ErrorFrame::new(
            ErrorCode::Malformed,
            "Hello was already negotiated",
        )),
        Request::Whoami => logged_in(node, session).map(|s| Response::Identity {
            subject: s.subject,
            role: s.role,
        }),
        Request::Login { user, password } => {
            login(node, &user, &password, remote)
                .await
                .map(|(claims, token)| {
                    *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(Session {
                        subject: claims.sub.clone(),
                        role: claims.roles.first().cloned().unwrap_or_default(),
                        serial: None,
                    });
                    Response::Token {
                        token,
                        subject: claims.sub,
                        expires_at: claims.exp,
                    }
                })
        }
        Request::Post {
            channel,
            body,
            idempotency_key,
        } => post(node, session, &channel, body, idempotency_key).await,
        Request::History {
            channel,
            after,
            limit,
        } => history(node, session, &channel, after, limit),
        Request::Heartbeat { status } => logged_in(node, session).and_then(|who| {
            if status.len() > 100 {
                return Err(ErrorFrame::new(
                    ErrorCode::Malformed,
                    "status must be at most 100 bytes",
                ));
            }
            node.presence().heartbeat(&who.subject, &status);
            Ok(Response::HeartbeatAck {
                interval_ms: node.presence().interval().as_millis() as u64,
            })
        }),
        Request::Who => logged_in(node, session).map(|_| Response::Presence(node.presence().who())),
        Request::Pending => logged_in(node, session).map(|_| Response::Pending(Vec::new())),
        Request::EdgePost { posts } => edge_post(node, session, posts).await,
        Request::EdgeHeartbeat { subject, status } => edge_session(node, session).map(|edge| {
            node.presence()
                .heartbeat_via(&subject, &edge.subject, &status);
            Response::HeartbeatAck {
                interval_ms: node.presence().interval().as_millis() as u64,
            }
        }),
        Request::Changes { from, wait_ms } => changes(node, session, from, wait_ms).await,
        Request::EdgeAudit { records } => edge_audit(node, session, records).await,
        // Served on their own streams.
        Request::Subscribe { .. } | Request::SubscribePresence => Err(ErrorFrame::new(
            ErrorCode::Internal,
            "subscriptions have their own stream",
        )),
        Request::Authenticate { token } => authenticate(node, &token, remote).map(|claims| {
            let s = Session {
                subject: claims.sub,
                role: claims.roles.first().cloned().unwrap_or_default(),
                serial: None,
            };
            *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
            Response::Identity {
                subject: s.subject,
                role: s.role,
            }
        }),
    };
    result.unwrap_or_else(Response::Error)
}

/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// The session, if logged in; a certificate revoked since the handshake
/// ends it (revocation reaches connections already open).
fn logged_in(node: &Node, session: &Mutex<Option<Session>>) -> Result<Session, ErrorFrame> {
    let mut guard = session.lock().unwrap_or_else(|p| p.into_inner());
    let s = guard.clone().ok_or_else(|| {
        ErrorFrame::new(
            ErrorCode::NotLoggedIn,
            "log in first (Login, Authenticate with a token, or a client certificate)",
        )
    })?;
    if let Some(serial) = &s.serial
        && node.is_revoked(serial)
    {
        *guard = None;
        drop(guard);
        node.audit().record(
            "cert_refused",
            &s.subject,
            &format!("client port: certificate {serial} was revoked; session ended"),
        );
        return Err(ErrorFrame::new(
            ErrorCode::InvalidToken,
            format!("certificate {serial} has been revoked"),
        ));
    }
    Ok(s)
}

/// How a channel's messages are replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replication {
    /// Stored by the accepting core, exchanged by anti-entropy.
    AntiEntropy,
    /// Committed through the Raft log (one total order).
    Raft,
}

fn channel_mode(node: &Node, channel: &str) -> Result<Replication, ErrorFrame> {
    match node.channel_replication(channel).map_err(internal)? {
        Some(r) if r == "raft" => Ok(Replication::Raft),
        Some(_) => Ok(Replication::AntiEntropy),
        None => Err(ErrorFrame::new(
            ErrorCode::NotFound,
            format!("no channel {channel:?}"),
        )),
    }
}

fn channel_exists(node: &Node, channel: &str) -> Result<(), ErrorFrame> {
    channel_mode(node, channel).map(|_| ())
}

/// A failed Raft write as an error frame: retryable failures are `Unavailable`.
fn write_error(e: NodeError) -> ErrorFrame {
    if e.retryable() {
        ErrorFrame::new(ErrorCode::Unavailable, e.to_string())
    } else {
        internal(e)
    }
}

fn history(
    node: &Node,
    session: &Mutex<Option<Session>>,
    channel: &str,
    after: u64,
    limit: u32,
) -> Result<Response, ErrorFrame> {
    logged_in(node, session)?;
    let limit = limit.min(crate::messages::MAX_PAGE);
    let page = match channel_mode(node, channel)? {
        Replication::AntiEntropy => node
            .messages()
            .history(channel, after, limit)
            .map_err(internal),
        Replication::Raft => node
            .query(|c| store::channel_history(c, channel, after, limit))
            .map_err(internal),
    };
    page.map(Response::Messages)
}

async fn post(
    node: &Node,
    session: &Mutex<Option<Session>>,
    channel: &str,
    body: Vec<u8>,
    idempotency_key: String,
) -> Result<Response, ErrorFrame> {
    let who = logged_in(node, session)?;
    store_post(node, &who.subject, channel, body, idempotency_key)
        .await
        .map(|(origin, seq, duplicate)| Response::Posted {
            origin,
            seq,
            duplicate,
            pending: false,
        })
}

/// Stores one post for `sender`: (origin, seq, duplicate).
async fn store_post(
    node: &Node,
    sender: &str,
    channel: &str,
    body: Vec<u8>,
    idempotency_key: String,
) -> Result<(String, u64, bool), ErrorFrame> {
    if idempotency_key.is_empty() || idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ErrorFrame::new(
            ErrorCode::Malformed,
            format!("idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    if channel_mode(node, channel)? == Replication::Raft {
        let ts_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let applied = node
            .write(Command::ChannelPost {
                channel: channel.to_owned(),
                sender: sender.to_owned(),
                ts_ms,
                body,
                idem: idempotency_key,
            })
            .await
            .map_err(write_error)?;
        if applied.changed {
            node.metrics().messages_posted.inc();
        }
        return Ok((
            store::RAFT_ORIGIN.to_owned(),
            applied.revision,
            !applied.changed,
        ));
    }
    let (m, duplicate) = node
        .messages()
        .post(channel, sender, body, &idempotency_key)
        .await
        .map_err(internal)?;
    if !duplicate {
        node.metrics().messages_posted.inc();
    }
    Ok((m.origin, m.seq, duplicate))
}

/// The session of an edge (or core) on the edge link.
fn edge_session(node: &Node, session: &Mutex<Option<Session>>) -> Result<Session, ErrorFrame> {
    let s = logged_in(node, session)?;
    if s.role == "edge" || s.role == "core" {
        Ok(s)
    } else {
        Err(ErrorFrame::new(
            ErrorCode::Forbidden,
            "edge-link requests need an edge certificate",
        ))
    }
}

/// `EdgePost`: the posts in order. Anti-entropy posts are all handed to the
/// message store before any is awaited, so they commit together, in order.
async fn edge_post(
    node: &Node,
    session: &Mutex<Option<Session>>,
    posts: Vec<lanmesh_shared::proto::EdgePostItem>,
) -> Result<Response, ErrorFrame> {
    edge_session(node, session)?;
    let results = futures::future::join_all(posts.into_iter().map(|p| async move {
        match store_post(node, &p.sender, &p.channel, p.body, p.idempotency_key).await {
            Ok((origin, seq, duplicate)) => PostResult::Posted {
                origin,
                seq,
                duplicate,
            },
            Err(e) => PostResult::Error(e),
        }
    }))
    .await;
    Ok(Response::PostedBatch(results))
}

/// `Changes`: the registry changes an edge lacks, waiting up to `wait_ms`
/// for one when it is up to date.
async fn changes(
    node: &Node,
    session: &Mutex<Option<Session>>,
    from: u64,
    wait_ms: u64,
) -> Result<Response, ErrorFrame> {
    edge_session(node, session)?;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms.min(30_000));
    use openraft::async_runtime::WatchReceiver;
    let mut metrics = node.raft().metrics();
    loop {
        let applied = node.applied_index();
        if applied > from || tokio::time::Instant::now() >= deadline {
            break;
        }
        if tokio::time::timeout_at(deadline, metrics.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    let key = signing_key(node)?;
    let public = token::public_key(&key).map_err(internal)?;
    let (set, _) = node
        .query_applied(|c, applied| store::change_set(c, from, applied, public))
        .map_err(internal)?;
    Ok(Response::Changes(set))
}

/// `EdgeAudit`: an edge's own chain, collected by the leader.
async fn edge_audit(
    node: &Node,
    session: &Mutex<Option<Session>>,
    records: Vec<lanmesh_shared::proto::AuditRecord>,
) -> Result<Response, ErrorFrame> {
    let s = edge_session(node, session)?;
    // An edge ships its own chain and, as a relay, those of the edges behind
    // it; never a core's (the leader also checks every link of a chain).
    let cores: std::collections::HashSet<String> = node
        .other_cores()
        .into_iter()
        .map(|(id, _)| id.0)
        .chain(std::iter::once(node.id().to_owned()))
        .collect();
    if let Some(r) = records.iter().find(|r| cores.contains(&r.origin)) {
        return Err(ErrorFrame::new(
            ErrorCode::Forbidden,
            format!("an edge cannot ship the audit chain of core {}", r.origin),
        ));
    }
    let origin = records
        .first()
        .map(|r| r.origin.clone())
        .unwrap_or_else(|| s.subject.clone());
    if records.iter().any(|r| r.origin != origin) {
        return Err(ErrorFrame::new(
            ErrorCode::Malformed,
            "one EdgeAudit carries one chain",
        ));
    }
    match node.collect_audit_anywhere(&origin, records).await {
        Ok(upto) => Ok(Response::AuditUpto(upto)),
        Err(e) => Err(write_error(e)),
    }
}

/// Serves one subscription: `Subscribed`, then every new message of the
/// channel on this stream until the client goes away.
async fn subscription(
    send: &mut quinn::SendStream,
    channel: &str,
    node: &Node,
    session: &Mutex<Option<Session>>,
) {
    let check = logged_in(node, session).and_then(|_| channel_exists(node, channel));
    // Subscribe before answering, so nothing posted after `Subscribed` is missed.
    let mut live = node.messages().subscribe();
    let mut out = FrameWriter::new(send);
    if let Err(e) = check {
        let _ = out.send(&Response::Error(e)).await;
        return;
    }
    if out.send(&Response::Subscribed).await.is_ok() {
        lanmesh_shared::proto::push_messages(&mut out, &mut live, channel).await;
    }
}

/// Serves a presence subscription: `Subscribed`, everyone present now, then
/// every change.
async fn presence_subscription(
    send: &mut quinn::SendStream,
    node: &Node,
    session: &Mutex<Option<Session>>,
) {
    let live = node.presence().subscribe();
    let mut out = FrameWriter::new(send);
    if let Err(e) = logged_in(node, session) {
        let _ = out.send(&Response::Error(e)).await;
        return;
    }
    if out.send(&Response::Subscribed).await.is_ok() {
        crate::presence::push_changes(&mut out, node.presence(), live).await;
    }
}

fn internal(e: impl std::fmt::Display) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::Internal, e.to_string())
}

fn signing_key(node: &Node) -> Result<Vec<u8>, ErrorFrame> {
    node.query(store::token_key)
        .map_err(internal)?
        .ok_or_else(|| {
            ErrorFrame::new(
                ErrorCode::Unavailable,
                "the cluster has no token key yet (bootstrapping); retry",
            )
        })
}

/// Checks a password against the users registry and issues a token.
async fn login(
    node: &Node,
    user: &str,
    password: &str,
    remote: std::net::SocketAddr,
) -> Result<(Claims, String), ErrorFrame> {
    let bad = || ErrorFrame::new(ErrorCode::BadCredentials, "unknown user or wrong password");
    let entry = node
        .query(|c| store::registry_get(c, Registry::Users, user))
        .map_err(internal)?
        .ok_or_else(|| {
            node.audit().record(
                "login_failed",
                user,
                &format!("unknown user, from {remote}"),
            );
            bad()
        })?;
    let hash = entry.data["password_hash"]
        .as_str()
        .ok_or_else(bad)?
        .to_owned();
    let password = password.to_owned();
    // Argon2 is deliberately slow: keep it off the async workers.
    let ok = tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&hash)
            .map(|h| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .map_err(internal)?;
    if !ok {
        node.audit().record(
            "login_failed",
            user,
            &format!("wrong password from {remote}"),
        );
        return Err(bad());
    }
    let roles = entry.data["roles"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| vec!["user".to_owned()]);
    let now = token::now();
    let claims = Claims {
        cluster: node.config().cluster_id.clone(),
        sub: user.to_owned(),
        kind: "user".into(),
        roles,
        iat: now,
        exp: now + TOKEN_TTL_SECS,
    };
    let token = token::sign(&signing_key(node)?, &claims).map_err(internal)?;
    node.audit()
        .record("login", user, &format!("password login from {remote}"));
    Ok((claims, token))
}

/// Checks a token: signature, cluster, expiry, and that its user still
/// exists. Every refusal is audited.
fn authenticate(
    node: &Node,
    token: &str,
    remote: std::net::SocketAddr,
) -> Result<Claims, ErrorFrame> {
    let result = check_token(node, token);
    if let Err(e) = &result
        && e.code == ErrorCode::InvalidToken
    {
        node.audit().record(
            "token_refused",
            &token::unverified_subject(token).unwrap_or_else(|| "unknown".into()),
            &format!("{} (from {remote})", e.message),
        );
    }
    result
}

fn check_token(node: &Node, token: &str) -> Result<Claims, ErrorFrame> {
    let public = token::public_key(&signing_key(node)?).map_err(internal)?;
    let claims = token::verify(&public, token, &node.config().cluster_id, token::now())
        .map_err(|e| ErrorFrame::new(ErrorCode::InvalidToken, e.to_string()))?;
    if claims.kind == "user"
        && node
            .query(|c| store::registry_get(c, Registry::Users, &claims.sub))
            .map_err(internal)?
            .is_none()
    {
        return Err(ErrorFrame::new(
            ErrorCode::InvalidToken,
            format!("user {:?} no longer exists", claims.sub),
        ));
    }
    Ok(claims)
}
