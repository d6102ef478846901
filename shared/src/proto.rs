//! The client protocol (ALPN `lanmesh-client/1`), spoken by cores and, later,
//! by edges, and the [`Client`] that apps and the CLI use.
//!
//! Framing: every message is one length-delimited frame (tokio-util's codec,
//! 4-byte big-endian length, at most [`MAX_FRAME`] bytes) holding MessagePack
//! (`rmp-serde`, fields by name so messages can grow).
//!
//! Exchange: the first bidirectional stream of a connection carries the
//! [`Request::Hello`] with the versions the client speaks; the server answers
//! with the version it picked, or an error frame. Every later bidirectional
//! stream carries one request and one response. Every failure is a typed
//! [`ErrorFrame`]; a bad frame fails its stream, never the server.
//!
//! This module holds the message types, the framing and the client; the
//! server side lives with each node.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::link::{self, LinkError};

/// The protocol versions this build speaks, newest last.
pub const VERSIONS: &[u16] = &[1];
/// Largest frame accepted either way.
pub const MAX_FRAME: usize = 1 << 20;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First frame of a connection: the versions the client speaks.
    Hello {
        /// Supported versions.
        versions: Vec<u16>,
        /// Free-form client name, for logs.
        client: String,
    },
    /// Liveness check.
    Ping,
    /// Who the server thinks we are (needs a login).
    Whoami,
    /// Log in with a user name and password; answers `Token` and logs this
    /// connection in.
    Login {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// Log this connection in with a token from an earlier `Login`.
    Authenticate {
        /// The token.
        token: String,
    },
    /// Post a message to a channel. Retrying with the same `idempotency_key`
    /// stores it once and answers the first post's id.
    Post {
        /// Channel name.
        channel: String,
        /// Message body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// Chosen by the client, unique per message it means to send.
        idempotency_key: String,
    },
    /// A page of a channel's history, oldest first: messages received after
    /// `after` (a receive position from an earlier page), at most `limit`.
    History {
        /// Channel name.
        channel: String,
        /// Receive position to continue after (0 = from the start).
        after: u64,
        /// Page size (capped by the server).
        limit: u32,
    },
    /// Subscribe to a channel: answered `Subscribed` on this stream, which then
    /// stays open and carries every new message as a `Message` frame.
    Subscribe {
        /// Channel name.
        channel: String,
    },
    /// "I am here": keeps the logged-in subject present on this node.
    /// Answered `HeartbeatAck` with the interval to keep.
    Heartbeat {
        /// Free-form status ("online", "away", ...).
        status: String,
    },
    /// Who is present, on every core: answered `Presence`.
    Who,
    /// Presence changes: answered `Subscribed` on this stream, which then
    /// carries a `PresenceChanged` frame for each change.
    SubscribePresence,
    /// Your queued posts (on an edge: posts in its outbox not yet accepted
    /// upstream). Answered `Pending`.
    Pending,

    // ---- Edge link (ALPN `lanmesh-edge/1`, edge or core certificates only) ----
    /// Posts accepted by an edge for its clients, in order. Answered
    /// `PostedBatch` with one result per post, in the same order.
    EdgePost {
        /// The posts.
        posts: Vec<EdgePostItem>,
    },
    /// A heartbeat of a client of the sending edge.
    EdgeHeartbeat {
        /// The client's subject.
        subject: String,
        /// Its status.
        status: String,
    },
    /// Registry changes after revision `from` (0: everything), waiting up to
    /// `wait_ms` when there are none yet. Answered `Changes`.
    Changes {
        /// The last revision the edge applied.
        from: u64,
        /// How long to wait for a change.
        wait_ms: u64,
    },
    /// Audit records of the sending edge's own chain. Answered `AuditUpto`.
    EdgeAudit {
        /// Records, oldest first (an empty list asks how far the cluster has them).
        records: Vec<AuditRecord>,
    },
}

/// One post an edge forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgePostItem {
    /// Channel.
    pub channel: String,
    /// The edge's logged-in client.
    pub sender: String,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The client's idempotency key.
    pub idempotency_key: String,
}

/// The result of one forwarded post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostResult {
    /// Stored (or a retry of a stored post).
    Posted {
        /// Origin node.
        origin: String,
        /// Sequence there.
        seq: u64,
        /// A retry of an earlier post.
        duplicate: bool,
    },
    /// Refused.
    Error(ErrorFrame),
}

/// What an edge caches of the registries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// The revision this brings the edge to.
    pub revision: u64,
    /// True: `entries` and `revoked` are everything (replace the cache);
    /// false: they are the changes after the asked revision.
    pub full: bool,
    /// Registry entries: (registry, name, JSON data or `None` when deleted).
    /// Users carry no password hash.
    pub entries: Vec<(String, String, Option<String>)>,
    /// Revoked certificate serials (added).
    pub revoked: Vec<String>,
    /// The cluster's token-checking public key (Ed25519).
    #[serde(with = "serde_bytes")]
    pub token_public_key: Vec<u8>,
}

/// One audit record: a node's (or edge's) chain link. See `core-node`'s
/// audit module for the chain rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The node that wrote it.
    pub origin: String,
    /// Its position in that node's chain, from 1.
    pub seq: u64,
    /// Unix milliseconds.
    pub ts_ms: i64,
    /// What happened.
    pub kind: String,
    /// Who did it.
    pub actor: String,
    /// Free-form detail.
    pub detail: String,
    /// Hash of the previous record (hex SHA-256).
    pub prev_hash: String,
    /// This record's hash (hex SHA-256).
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record should carry: SHA-256 over the length-prefixed
    /// previous hash, origin, seq, time, kind, actor and detail.
    pub fn compute_hash(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for field in [
            self.prev_hash.as_bytes(),
            self.origin.as_bytes(),
            &self.seq.to_be_bytes(),
            &self.ts_ms.to_be_bytes(),
            self.kind.as_bytes(),
            self.actor.as_bytes(),
            self.detail.as_bytes(),
        ] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field);
        }
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// One subject present at one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// User, device or certificate name.
    pub subject: String,
    /// The node the subject heartbeats to.
    pub node: String,
    /// The status it gave.
    pub status: String,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The node that first accepted it.
    pub origin: String,
    /// Its sequence number at that node.
    pub seq: u64,
    /// Channel.
    pub channel: String,
    /// Logged-in sender.
    pub sender: String,
    /// Server timestamp, Unix milliseconds.
    pub ts_ms: i64,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Position in this node's store (for history paging).
    pub pos: u64,
}

/// A response from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The negotiated version and who answered.
    Hello {
        /// Chosen version.
        version: u16,
        /// Answering node.
        node_id: String,
        /// Its cluster.
        cluster_id: String,
    },
    /// Answer to `Ping`.
    Pong,
    /// Answer to `Whoami`.
    Identity {
        /// Name (user, device, or certificate name).
        subject: String,
        /// Role.
        role: String,
    },
    /// A login token (answer to `Login`).
    Token {
        /// The token: present it with `Authenticate` on later connections.
        token: String,
        /// Who it is for.
        subject: String,
        /// Expiry, Unix seconds.
        expires_at: i64,
    },
    /// A post was stored (or, for a retried idempotency key, had been).
    Posted {
        /// Origin node of the stored message.
        origin: String,
        /// Its sequence number there.
        seq: u64,
        /// True when this was a retry of an earlier post.
        duplicate: bool,
        /// True when an edge queued it in its outbox (its link upstream is
        /// down): `origin`/`seq` are then the edge's queue position, and the
        /// message gets its cluster id once delivered.
        #[serde(default)]
        pending: bool,
    },
    /// A page of history.
    Messages(Vec<Message>),
    /// The subscription is live; `Message` frames follow on this stream.
    Subscribed,
    /// A pushed message (on a subscription stream).
    Message(Message),
    /// Answer to `Heartbeat`: heartbeat again within this many ms.
    HeartbeatAck {
        /// Interval to keep, ms.
        interval_ms: u64,
    },
    /// Answer to `Who`: everyone present, sorted.
    Presence(Vec<PresenceEntry>),
    /// A pushed presence change (on a presence subscription).
    PresenceChanged {
        /// Who.
        entry: PresenceEntry,
        /// True when it appeared (or changed status), false when it expired.
        online: bool,
    },
    /// Answer to `Pending`: the caller's queued posts, oldest first.
    Pending(Vec<Message>),
    /// Answer to `EdgePost`.
    PostedBatch(Vec<PostResult>),
    /// Answer to `Changes`.
    Changes(ChangeSet),
    /// Answer to `EdgeAudit`: how far the cluster holds the sender's chain.
    AuditUpto(u64),
    /// The request failed.
    Error(ErrorFrame),
}

/// What went wrong, machine-readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame could not be decoded as a request.
    Malformed,
    /// The frame exceeded [`MAX_FRAME`].
    FrameTooLarge,
    /// No common protocol version.
    UnsupportedVersion,
    /// The first stream must carry `Hello`.
    HelloRequired,
    /// The request needs a login (client certificate or token).
    NotLoggedIn,
    /// Logged in, but not allowed.
    Forbidden,
    /// Unknown user or wrong password (deliberately not told apart).
    BadCredentials,
    /// A token that is forged, expired, for another cluster, or whose subject
    /// was revoked.
    InvalidToken,
    /// The named channel (or other object) does not exist.
    NotFound,
    /// Temporarily unable (no leader, shutting down): retry.
    Unavailable,
    /// A server-side failure.
    Internal,
}

/// A typed error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ErrorFrame {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorFrame {
    /// An error answer.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame {
            code,
            message: message.into(),
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended before a whole frame.
    #[error("stream ended before a frame")]
    Closed,
    /// Larger than [`MAX_FRAME`].
    #[error("frame larger than {MAX_FRAME} bytes")]
    TooLarge,
    /// Not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(std::io::Error),
}

impl FrameError {
    /// The error frame that tells the peer about this failure.
    pub fn to_error_frame(&self) -> ErrorFrame {
        match self {
            FrameError::TooLarge => ErrorFrame::new(ErrorCode::FrameTooLarge, self.to_string()),
            _ => ErrorFrame::new(ErrorCode::Malformed, self.to_string()),
        }
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Encodes `msg` as one frame (length prefix included) in a single buffer.
fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    rmp_serde::encode::write_named(&mut buf, msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge);
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes one message as one frame and finishes the stream.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame)
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    send.finish()
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    Ok(())
}

/// Writes a sequence of frames on one stream (subscription pushes).
pub struct FrameWriter<'a> {
    inner: FramedWrite<&'a mut quinn::SendStream, LengthDelimitedCodec>,
}

impl std::fmt::Debug for FrameWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter").finish_non_exhaustive()
    }
}

impl<'a> FrameWriter<'a> {
    /// Frames on `send`, which stays open.
    pub fn new(send: &'a mut quinn::SendStream) -> Self {
        FrameWriter {
            inner: FramedWrite::new(send, codec()),
        }
    }

    /// Queues one message without flushing (follow with [`FrameWriter::flush`]).
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes =
            rmp_serde::to_vec_named(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_FRAME {
            return Err(FrameError::TooLarge);
        }
        self.inner
            .feed(Bytes::from(bytes))
            .await
            .map_err(FrameError::Io)
    }

    /// Queues a pushed message (`Response::Message`) from a borrowed
    /// [`Message`]: the same bytes, without cloning the message.
    pub async fn feed_message(&mut self, m: &Message) -> Result<(), FrameError> {
        /// Serializes exactly like `Response::Message`.
        #[derive(Serialize)]
        enum Push<'a> {
            Message(&'a Message),
        }
        self.feed(&Push::Message(m)).await
    }

    /// Writes out what was queued.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::flush(&mut self.inner)
            .await
            .map_err(FrameError::Io)
    }

    /// Writes one message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.feed(msg).await?;
        self.flush().await
    }
}

/// Reads one frame and decodes it (one allocation, of the frame's size).
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> Result<T, FrameError> {
    use quinn::ReadExactError;
    let io = |e: quinn::ReadError| FrameError::Io(std::io::Error::other(e));
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Malformed(format!(
                "stream ended inside a length prefix ({n} of 4 bytes)"
            )));
        }
        Err(ReadExactError::ReadError(e)) => return Err(io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge);
    }
    let mut frame = vec![0u8; len];
    match recv.read_exact(&mut frame).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Malformed(format!(
                "stream ended inside a frame ({n} of {len} bytes)"
            )));
        }
        Err(ReadExactError::ReadError(e)) => return Err(io(e)),
    }
    rmp_serde::from_slice(&frame).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection (refused certificate, unreachable, timeout).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server answered with an error frame.
    #[error("server refused: {0}")]
    Server(ErrorFrame),
    /// The exchange failed.
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The stream could not be opened.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

/// A negotiated connection to a core or an edge.
#[derive(Debug, Clone)]
pub struct Client {
    conn: quinn::Connection,
    /// Negotiated protocol version.
    pub version: u16,
    /// The node that answered.
    pub node_id: String,
    /// Its cluster.
    pub cluster_id: String,
}

impl Client {
    /// Connects (TLS per the endpoint's client config, ALPN `lanmesh-client/1`)
    /// and negotiates the version.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: std::net::SocketAddr,
        client_name: &str,
    ) -> Result<Self, ClientError> {
        let link = link::connect(
            endpoint,
            addr,
            "lanmesh",
            None,
            link::DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await?;
        let hello = Request::Hello {
            versions: VERSIONS.to_vec(),
            client: client_name.to_owned(),
        };
        match call(&link.conn, &hello).await? {
            Response::Hello {
                version,
                node_id,
                cluster_id,
            } => Ok(Client {
                conn: link.conn,
                version,
                node_id,
                cluster_id,
            }),
            other => Err(ClientError::Frame(FrameError::Malformed(format!(
                "expected Hello, got {other:?}"
            )))),
        }
    }

    /// One request, one response; an error frame becomes `ClientError::Server`.
    pub async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        call(&self.conn, req).await
    }

    /// Subscribes to `channel`; the returned [`Subscription`] yields every new
    /// message of the channel.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, ClientError> {
        self.open_subscription(&Request::Subscribe {
            channel: channel.to_owned(),
        })
        .await
    }

    /// Subscribes to presence changes (see [`Subscription::next_presence`]).
    pub async fn subscribe_presence(&self) -> Result<Subscription, ClientError> {
        self.open_subscription(&Request::SubscribePresence).await
    }

    async fn open_subscription(&self, req: &Request) -> Result<Subscription, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let bytes =
            rmp_serde::to_vec_named(req).map_err(|e| FrameError::Malformed(e.to_string()))?;
        FramedWrite::new(&mut send, codec())
            .send(Bytes::from(bytes))
            .await
            .map_err(FrameError::Io)?;
        let mut sub = Subscription {
            _send: send,
            frames: FramedRead::new(recv, codec()),
        };
        match sub.frame().await? {
            Response::Subscribed => Ok(sub),
            Response::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::Frame(FrameError::Malformed(format!(
                "expected Subscribed, got {other:?}"
            )))),
        }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// A live subscription: the stream stays open and carries pushed messages.
pub struct Subscription {
    _send: quinn::SendStream,
    frames: FramedRead<quinn::RecvStream, LengthDelimitedCodec>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    async fn frame(&mut self) -> Result<Response, ClientError> {
        match self.frames.next().await {
            None => Err(FrameError::Closed.into()),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(FrameError::TooLarge.into())
            }
            Some(Err(e)) => Err(FrameError::Io(e).into()),
            Some(Ok(f)) => {
                rmp_serde::from_slice(&f).map_err(|e| FrameError::Malformed(e.to_string()).into())
            }
        }
    }

    /// The next pushed message.
    pub async fn next(&mut self) -> Result<Message, ClientError> {
        match self.frame().await? {
            Response::Message(m) => Ok(m),
            Response::Error(e) => Err(ClientError::Server(e)),
            other => Err(FrameError::Malformed(format!("expected Message, got {other:?}")).into()),
        }
    }

    /// The next pushed presence change: who, and whether they are online.
    pub async fn next_presence(&mut self) -> Result<(PresenceEntry, bool), ClientError> {
        match self.frame().await? {
            Response::PresenceChanged { entry, online } => Ok((entry, online)),
            Response::Error(e) => Err(ClientError::Server(e)),
            other => Err(
                FrameError::Malformed(format!("expected PresenceChanged, got {other:?}")).into(),
            ),
        }
    }
}

/// The admission rule of a client port (see `link::accept_admitting`): the
/// client protocol takes `client`/`operator` certificates or none; the edge
/// link (`lanmesh-edge/1`) takes only certificates of `edge_link_roles`.
pub fn admit(
    conn: &quinn::Connection,
    peer: Option<&crate::identity::Identity>,
    edge_link_roles: &[crate::identity::Role],
) -> Result<(), String> {
    use crate::identity::Role;
    let role = peer.map(|p| p.role);
    match link::alpn(conn).as_deref() {
        Some(p) if p == crate::tls::ALPN_EDGE => match role {
            Some(r) if edge_link_roles.contains(&r) => Ok(()),
            Some(r) => Err(format!(
                "a {r} certificate is not permitted on the edge link"
            )),
            None => Err("the edge link needs an edge certificate".into()),
        },
        _ => match role {
            None | Some(Role::Client | Role::Operator) => Ok(()),
            Some(r) => Err(format!(
                "a {r} certificate is not permitted on the client protocol"
            )),
        },
    }
}

/// Application close code: the client failed version negotiation.
pub const CLOSE_NEGOTIATION: u32 = 0x4c10;

/// The server side of version negotiation: reads the `Hello` on the
/// connection's first stream and answers it as `node_id` of `cluster_id`.
/// On failure (no common version, another request first, a bad frame) the
/// client gets the typed error and the connection is closed; returns
/// whether the connection may go on.
pub async fn negotiate(conn: &quinn::Connection, node_id: &str, cluster_id: &str) -> bool {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return false;
    };
    let answer = match read_frame::<Request>(&mut recv).await {
        Ok(Request::Hello { versions, client }) => {
            match versions.iter().filter(|v| VERSIONS.contains(v)).max() {
                Some(v) => {
                    tracing::debug!(remote = %conn.remote_address(), client = %client, version = v, "client connected");
                    Ok(Response::Hello {
                        version: *v,
                        node_id: node_id.to_owned(),
                        cluster_id: cluster_id.to_owned(),
                    })
                }
                None => Err(ErrorFrame::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "{node_id} speaks versions {VERSIONS:?}, the client offered {versions:?}"
                    ),
                )),
            }
        }
        Ok(_) => Err(ErrorFrame::new(
            ErrorCode::HelloRequired,
            "the first request of a connection must be Hello",
        )),
        Err(e) => Err(e.to_error_frame()),
    };
    let ok = answer.is_ok();
    let _ = write_frame(&mut send, &answer.unwrap_or_else(Response::Error)).await;
    if !ok {
        // Let the error frame reach the client before closing.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
        conn.close(CLOSE_NEGOTIATION.into(), b"version negotiation failed");
    }
    ok
}

/// Most pushed messages queued before a flush.
const PUSH_BATCH: usize = 256;

/// The body of a channel subscription, after `Subscribed`: every message of
/// `channel` from `live`, flushed a burst at a time, until the client goes
/// away. A subscriber that falls behind is told (`Unavailable`) and goes on.
pub async fn push_messages(
    out: &mut FrameWriter<'_>,
    live: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<Message>>,
    channel: &str,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match live.recv().await {
            Ok(m) if m.channel == channel => {
                if out.feed_message(&m).await.is_err() {
                    return;
                }
                for _ in 0..PUSH_BATCH {
                    match live.try_recv() {
                        Ok(m) if m.channel == channel => {
                            if out.feed_message(&m).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                if out.flush().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                let e = ErrorFrame::new(
                    ErrorCode::Unavailable,
                    format!("subscriber too slow: {n} messages skipped; read them with History"),
                );
                if out.send(&Response::Error(e)).await.is_err() {
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Sends `req` on a new bidirectional stream and reads the answer.
pub async fn call(conn: &quinn::Connection, req: &Request) -> Result<Response, ClientError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, req).await?;
    match read_frame::<Response>(&mut recv).await? {
        Response::Error(e) => Err(ClientError::Server(e)),
        ok => Ok(ok),
    }
}

/// Sends raw bytes (not a frame) on a new stream and reads the answer: for
/// tests that the server survives garbage.
pub async fn call_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Response, ClientError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes)
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    send.finish()
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    match read_frame::<Response>(&mut recv).await? {
        Response::Error(e) => Err(ClientError::Server(e)),
        ok => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for r in [
            Request::Hello {
                versions: vec![1, 2],
                client: "t".into(),
            },
            Request::Ping,
            Request::Whoami,
        ] {
            let b = rmp_serde::to_vec_named(&r).unwrap();
            assert_eq!(rmp_serde::from_slice::<Request>(&b).unwrap(), r);
        }
        let e = Response::Error(ErrorFrame::new(ErrorCode::NotLoggedIn, "x"));
        let b = rmp_serde::to_vec_named(&e).unwrap();
        assert_eq!(rmp_serde::from_slice::<Response>(&b).unwrap(), e);
    }
}

#[cfg(test)]
mod push_tests {
    use super::*;

    /// A pushed message written from a borrow is byte-for-byte a `Response::Message`.
    #[test]
    fn borrowed_push_encodes_like_the_owned_response() {
        let m = Message {
            origin: "node-1".into(),
            seq: 7,
            channel: "ops".into(),
            sender: "alice".into(),
            ts_ms: 1,
            body: b"hi".to_vec(),
            pos: 3,
        };
        #[derive(Serialize)]
        enum Push<'a> {
            Message(&'a Message),
        }
        let owned = rmp_serde::to_vec_named(&Response::Message(m.clone())).unwrap();
        let borrowed = rmp_serde::to_vec_named(&Push::Message(&m)).unwrap();
        assert_eq!(owned, borrowed);
        let back: Response = rmp_serde::from_slice(&borrowed).unwrap();
        assert_eq!(back, Response::Message(m));
    }
}
