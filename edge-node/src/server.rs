//! The edge's client port: the same client protocol as a core's (so a client
//! cannot tell them apart), answered from the cache and the link upstream,
//! and the edge link for edges that relay through this one.
//!
//! * Tokens are checked here, with the cluster's public key and the users
//!   and revocations from the cache: they work offline. A password login
//!   needs the link (the hashes stay on the cores).
//! * A post goes upstream at once when the link is up and the outbox is
//!   empty; otherwise it is fsynced into the outbox and answered `pending`
//!   (so a client's posts keep their order). Either way it reaches this
//!   edge's subscribers at once.
//! * History and subscriptions are served from the cache; the first read of
//!   a channel makes the edge follow it upstream (catching up first when the
//!   link is up).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lanmesh_shared::identity::{Identity, Role};
use lanmesh_shared::link;
use lanmesh_shared::proto::{
    EdgePostItem, ErrorCode, ErrorFrame, FrameError, FrameWriter, PostResult, Request, Response,
    read_frame, write_frame,
};
use lanmesh_shared::token;
use tokio_util::sync::CancellationToken;

use crate::edge::{Edge, catch_up, offline, passed_on};

#[derive(Debug, Clone)]
struct Session {
    subject: String,
    role: String,
    serial: Option<String>,
}

/// Which certificates each protocol takes here: clients (or none) on the
/// client protocol, edges relaying through this one on the edge link.
fn admit(conn: &quinn::Connection, peer: Option<&Identity>) -> Result<(), String> {
    lanmesh_shared::proto::admit(conn, peer, &[Role::Edge])
}

/// Serves the client port until `shutdown`.
pub async fn serve(endpoint: quinn::Endpoint, edge: Arc<Edge>, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    let audited = edge.clone();
    let check: link::Admit = Arc::new(move |conn, peer| {
        let r = admit(conn, peer);
        if let Err(reason) = &r {
            let who = peer
                .map(|p| p.name.clone())
                .unwrap_or_else(|| "anonymous".into());
            audited
                .audit
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
            let (edge, stop) = (edge.clone(), stop.clone());
            async move { connection(l.conn, l.peer, edge, stop).await }
        },
    )
    .await;
}

async fn connection(
    conn: quinn::Connection,
    peer: Option<Identity>,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    if !lanmesh_shared::proto::negotiate(&conn, &edge.config.node_id, &edge.config.cluster_id).await
    {
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
        let (edge, session) = (edge.clone(), session.clone());
        tokio::spawn(async move {
            let response = match read_frame::<Request>(&mut recv).await {
                Ok(Request::Subscribe { channel }) => {
                    subscription(&mut send, &channel, &edge, &session).await;
                    return;
                }
                Ok(Request::SubscribePresence) => {
                    presence_subscription(&mut send, &edge, &session).await;
                    return;
                }
                Ok(req) => handle(req, &edge, &session, remote).await,
                Err(FrameError::Closed) => return,
                Err(e) => Response::Error(e.to_error_frame()),
            };
            let _ = write_frame(&mut send, &response).await;
        });
    }
}

fn logged_in(edge: &Edge, session: &Mutex<Option<Session>>) -> Result<Session, ErrorFrame> {
    let mut guard = session.lock().unwrap_or_else(|p| p.into_inner());
    let s = guard.clone().ok_or_else(|| {
        ErrorFrame::new(
            ErrorCode::NotLoggedIn,
            "log in first (Login, Authenticate with a token, or a client certificate)",
        )
    })?;
    if let Some(serial) = &s.serial
        && edge.store.is_revoked(serial)
    {
        *guard = None;
        return Err(ErrorFrame::new(
            ErrorCode::InvalidToken,
            format!("certificate {serial} has been revoked"),
        ));
    }
    Ok(s)
}

fn edge_session(edge: &Edge, session: &Mutex<Option<Session>>) -> Result<Session, ErrorFrame> {
    let s = logged_in(edge, session)?;
    if s.role == "edge" {
        Ok(s)
    } else {
        Err(ErrorFrame::new(
            ErrorCode::Forbidden,
            "edge-link requests need an edge certificate",
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::Internal, e.to_string())
}

fn channel_exists(edge: &Edge, channel: &str) -> Result<(), ErrorFrame> {
    match edge
        .store
        .registry_get("channels", channel)
        .map_err(internal)?
    {
        Some(_) => Ok(()),
        None if edge.store.revision() == 0 => Err(ErrorFrame::new(
            ErrorCode::Unavailable,
            "this edge has not synced the registries yet; retry",
        )),
        None => Err(ErrorFrame::new(
            ErrorCode::NotFound,
            format!("no channel {channel:?}"),
        )),
    }
}

/// Starts keeping `channel`; the first time, with the link up, its history
/// is pulled before answering.
async fn ensure_followed(edge: &Edge, channel: &str) {
    if edge.store.follow(channel).unwrap_or(false)
        && let Some(up) = edge.up()
        && let Err(e) = catch_up(edge, &up, channel).await
    {
        tracing::debug!(channel, error = %e, "first catch-up failed; served from the cache");
    }
}

async fn handle(
    req: Request,
    edge: &Edge,
    session: &Mutex<Option<Session>>,
    remote: SocketAddr,
) -> Response {
    let set = |s: Session| {
        *session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    };
    let result = match req {
        Request::Ping => Ok(Response::Pong),
        Request::Hello { .. } => Err(ErrorFrame::new(
            ErrorCode::Malformed,
            "Hello was already negotiated",
        )),
        Request::Whoami => logged_in(edge, session).map(|s| Response::Identity {
            subject: s.subject,
            role: s.role,
        }),
        Request::Login { user, password } => match edge.login_upstream(&user, &password).await {
            Ok(Response::Token {
                token,
                subject,
                expires_at,
            }) => {
                let role = check_token(edge, &token)
                    .ok()
                    .and_then(|c| c.roles.first().cloned())
                    .unwrap_or_else(|| "user".into());
                set(Session {
                    subject: subject.clone(),
                    role,
                    serial: None,
                });
                edge.audit.record(
                    "login",
                    &subject,
                    &format!("password login at the edge from {remote}"),
                );
                Ok(Response::Token {
                    token,
                    subject,
                    expires_at,
                })
            }
            Ok(other) => Err(internal(format!("unexpected answer upstream: {other:?}"))),
            Err(e) => {
                if e.code == ErrorCode::BadCredentials {
                    edge.audit
                        .record("login_failed", &user, &format!("from {remote}"));
                }
                Err(e)
            }
        },
        Request::Authenticate { token } => match check_token(edge, &token) {
            Ok(claims) => {
                let s = Session {
                    subject: claims.sub,
                    role: claims.roles.first().cloned().unwrap_or_default(),
                    serial: None,
                };
                set(s.clone());
                Ok(Response::Identity {
                    subject: s.subject,
                    role: s.role,
                })
            }
            Err(e) => {
                edge.audit.record(
                    "token_refused",
                    &token::unverified_subject(&token).unwrap_or_else(|| "unknown".into()),
                    &format!("{} (from {remote})", e.message),
                );
                Err(e)
            }
        },
        Request::Post {
            channel,
            body,
            idempotency_key,
        } => match logged_in(edge, session) {
            Ok(who) => post(
                edge,
                EdgePostItem {
                    channel,
                    sender: who.subject,
                    body,
                    idempotency_key,
                },
            )
            .await
            .and_then(|r| match r {
                (
                    PostResult::Posted {
                        origin,
                        seq,
                        duplicate,
                    },
                    pending,
                ) => Ok(Response::Posted {
                    origin,
                    seq,
                    duplicate,
                    pending,
                }),
                (PostResult::Error(e), _) => Err(e),
            }),
            Err(e) => Err(e),
        },
        Request::History {
            channel,
            after,
            limit,
        } => match logged_in(edge, session).and_then(|_| channel_exists(edge, &channel)) {
            Ok(()) => {
                ensure_followed(edge, &channel).await;
                edge.store
                    .history(&channel, after, limit)
                    .map(Response::Messages)
                    .map_err(internal)
            }
            Err(e) => Err(e),
        },
        Request::Heartbeat { status } => logged_in(edge, session).map(|who| {
            edge.presence.heartbeat(&who.subject, &status);
            forward_heartbeat(edge, who.subject, status);
            Response::HeartbeatAck {
                interval_ms: edge.presence.interval().as_millis() as u64,
            }
        }),
        Request::Who => match logged_in(edge, session) {
            Ok(_) => match edge.up() {
                Some(up) => match up.client.request(&Request::Who).await {
                    Ok(r @ Response::Presence(_)) => Ok(r),
                    _ => Ok(Response::Presence(edge.presence.who())),
                },
                None => Ok(Response::Presence(edge.presence.who())),
            },
            Err(e) => Err(e),
        },
        Request::Pending => logged_in(edge, session).and_then(|who| {
            edge.store
                .pending_of(&who.subject)
                .map(Response::Pending)
                .map_err(internal)
        }),
        Request::Subscribe { .. } | Request::SubscribePresence => {
            Err(internal("subscriptions have their own stream"))
        }
        // The edge link, for edges relaying through this one.
        Request::EdgePost { posts } => match edge_session(edge, session) {
            // A relay queues nothing for the edges behind it: they keep their
            // own outboxes until the whole path is up.
            Ok(_) if edge.up().is_none() => Ok(Response::PostedBatch(
                posts.iter().map(|_| PostResult::Error(offline())).collect(),
            )),
            Ok(_) => {
                let mut out = Vec::with_capacity(posts.len());
                for p in posts {
                    out.push(match post(edge, p).await {
                        Ok((r, _)) => r,
                        Err(e) => PostResult::Error(e),
                    });
                }
                Ok(Response::PostedBatch(out))
            }
            Err(e) => Err(e),
        },
        Request::EdgeHeartbeat { subject, status } => edge_session(edge, session).map(|from| {
            edge.presence
                .heartbeat_via(&subject, &from.subject, &status);
            forward_heartbeat(edge, subject, status);
            Response::HeartbeatAck {
                interval_ms: edge.presence.interval().as_millis() as u64,
            }
        }),
        Request::Changes { from, wait_ms } => match edge_session(edge, session) {
            Ok(_) => {
                let mut rx = edge.store.revision_changes();
                let deadline = tokio::time::Instant::now()
                    + std::time::Duration::from_millis(wait_ms.min(30_000));
                // Answer once there is something newer than `from` (and
                // never an unsynced, empty cache).
                loop {
                    let rev = *rx.borrow_and_update();
                    if rev > from && rev != 0 {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                edge.store
                    .full_set()
                    .map(Response::Changes)
                    .map_err(internal)
            }
            Err(e) => Err(e),
        },
        Request::EdgeAudit { records } => match edge_session(edge, session) {
            Ok(_) => match edge.up() {
                Some(up) => up
                    .client
                    .request(&Request::EdgeAudit { records })
                    .await
                    .map_err(|e| passed_on(&e)),
                None => Err(offline()),
            },
            Err(e) => Err(e),
        },
    };
    result.unwrap_or_else(Response::Error)
}

fn forward_heartbeat(edge: &Edge, subject: String, status: String) {
    if let Some(up) = edge.up() {
        tokio::spawn(async move {
            let _ = up
                .client
                .request(&Request::EdgeHeartbeat { subject, status })
                .await;
        });
    }
}

/// Longest accepted idempotency key (as on a core).
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// One post: upstream when the link is up and nothing is queued, else into
/// the outbox. Returns the result and whether it is pending.
async fn post(edge: &Edge, item: EdgePostItem) -> Result<(PostResult, bool), ErrorFrame> {
    if item.idempotency_key.is_empty() || item.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ErrorFrame::new(
            ErrorCode::Malformed,
            format!("idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    channel_exists(edge, &item.channel)?;
    edge.stats.posts.fetch_add(1, Ordering::Relaxed);
    let channel = item.channel.clone();
    if edge.store.outbox_depth() == 0
        && let Some(r) = edge.post_upstream(item.clone()).await
    {
        if let PostResult::Posted { origin, seq, .. } = &r {
            let m = lanmesh_shared::proto::Message {
                origin: origin.clone(),
                seq: *seq,
                channel: item.channel.clone(),
                sender: item.sender.clone(),
                ts_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
                body: item.body.clone(),
                pos: 0,
            };
            let _ = edge.store.cache_messages(&[m]);
        }
        let _ = edge.store.follow(&channel);
        return Ok((r, false));
    }
    let (q, duplicate) = edge
        .store
        .enqueue(
            &item.channel,
            &item.sender,
            item.body,
            &item.idempotency_key,
        )
        .map_err(internal)?;
    let _ = edge.store.follow(&channel);
    Ok((
        PostResult::Posted {
            origin: edge.config.node_id.clone(),
            seq: q.id,
            duplicate,
        },
        true,
    ))
}

/// Checks a token with the cached key: signature, cluster, expiry, and that
/// its user is still in the cached users registry.
fn check_token(edge: &Edge, token: &str) -> Result<token::Claims, ErrorFrame> {
    let key = edge.store.token_public_key().ok_or_else(|| {
        ErrorFrame::new(
            ErrorCode::Unavailable,
            "this edge has not synced the cluster's key yet; retry",
        )
    })?;
    let claims = token::verify(&key, token, &edge.config.cluster_id, token::now())
        .map_err(|e| ErrorFrame::new(ErrorCode::InvalidToken, e.to_string()))?;
    if claims.kind == "user"
        && edge
            .store
            .registry_get("users", &claims.sub)
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

async fn subscription(
    send: &mut quinn::SendStream,
    channel: &str,
    edge: &Edge,
    session: &Mutex<Option<Session>>,
) {
    let check = logged_in(edge, session).and_then(|_| channel_exists(edge, channel));
    let mut live = edge.store.subscribe();
    let mut out = FrameWriter::new(send);
    if let Err(e) = check {
        let _ = out.send(&Response::Error(e)).await;
        return;
    }
    ensure_followed(edge, channel).await;
    if out.send(&Response::Subscribed).await.is_ok() {
        lanmesh_shared::proto::push_messages(&mut out, &mut live, channel).await;
    }
}

async fn presence_subscription(
    send: &mut quinn::SendStream,
    edge: &Edge,
    session: &Mutex<Option<Session>>,
) {
    let live = edge.presence.subscribe();
    let mut out = FrameWriter::new(send);
    if let Err(e) = logged_in(edge, session) {
        let _ = out.send(&Response::Error(e)).await;
        return;
    }
    if out.send(&Response::Subscribed).await.is_ok() {
        core_node::presence::push_changes(&mut out, &edge.presence, live).await;
    }
}
