//! Raft RPC over QUIC (the Raft port), mutual TLS with `core` certificates only.
//!
//! Each RPC is one bidirectional stream: the caller writes a MessagePack
//! [`Rpc`] and finishes the stream; the callee answers with one [`Reply`].
//! Besides openraft's own messages the link carries the cluster's internal
//! requests (a write forwarded by a follower, a read index, join/leave), so a
//! caller never has to find the leader itself.
//!
//! [`Peers`] keeps one connection per peer, opened lazily, replaced when it
//! fails or the peer's address changes. A peer that cannot be reached is
//! reported to openraft as `Unreachable`, which makes it back off.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lanmesh_shared::link::{self, LinkError};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{CoreNode, NodeName, Raft, Snapshot, SnapshotMeta, TypeConfig, Vote, decode, encode};
use crate::node::{AppReply, AppRequest};

/// Largest RPC message accepted (a snapshot is one message).
pub const MAX_RPC_BYTES: usize = 256 << 20;

/// A request on the Raft link.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    /// openraft AppendEntries.
    Append(AppendEntriesRequest<TypeConfig>),
    /// openraft RequestVote.
    Vote(VoteRequest<TypeConfig>),
    /// openraft pre-vote.
    PreVote(VoteRequest<TypeConfig>),
    /// A whole snapshot (a SQLite file).
    Snapshot {
        /// The sender's vote.
        vote: Vote,
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// The database bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// openraft leadership transfer.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// A cluster-internal request (forwarded write, read index, join, leave).
    App(AppRequest),
}

/// The answer to an [`Rpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To `Append`.
    Append(AppendEntriesResponse<TypeConfig>),
    /// To `Vote` / `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// To `Snapshot`.
    Snapshot(SnapshotResponse<TypeConfig>),
    /// To `TransferLeader`.
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// To `App`.
    App(AppReply),
    /// The callee's Raft could not handle it (it is stopping or broken).
    Failed(String),
}

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No link to the peer (refused, unreachable, timed out connecting).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The link broke during the call.
    #[error("rpc to {peer} failed: {detail}")]
    Transport {
        /// The peer.
        peer: String,
        /// What happened.
        detail: String,
    },
    /// No answer in time.
    #[error("rpc to {peer} timed out after {after:?}")]
    Timeout {
        /// The peer.
        peer: String,
        /// How long we waited.
        after: Duration,
    },
    /// The answer could not be decoded, or was the wrong kind.
    #[error("bad reply from {peer}: {detail}")]
    BadReply {
        /// The peer.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The peer's Raft failed the request.
    #[error("{peer} failed the request: {detail}")]
    Remote {
        /// The peer.
        peer: String,
        /// Its message.
        detail: String,
    },
}

type Slot = Arc<Mutex<Option<(SocketAddr, quinn::Connection)>>>;

/// Connections to the other cores.
pub struct Peers {
    endpoint: quinn::Endpoint,
    slots: std::sync::Mutex<HashMap<NodeName, Slot>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// Uses `endpoint` (bound to the Raft port, with a client config) to dial peers.
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration) -> Self {
        Peers {
            endpoint,
            slots: std::sync::Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    fn slot(&self, target: &NodeName) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(target.clone()).or_default().clone()
    }

    async fn connection(
        &self,
        target: &NodeName,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, RpcError> {
        let slot = self.slot(target);
        let mut guard = slot.lock().await;
        if let Some((a, conn)) = guard.as_ref()
            && *a == addr
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let link = link::connect(
            &self.endpoint,
            addr,
            "lanmesh",
            Some(&target.0),
            self.connect_timeout,
        )
        .await?;
        *guard = Some((addr, link.conn.clone()));
        Ok(link.conn)
    }

    async fn forget(&self, target: &NodeName) {
        let slot = self.slot(target);
        *slot.lock().await = None;
    }

    /// Sends one RPC to `target` at `addr` and waits for its reply.
    pub async fn call(
        &self,
        target: &NodeName,
        addr: &str,
        rpc: &Rpc,
        timeout: Duration,
    ) -> Result<Reply, RpcError> {
        let peer = target.0.clone();
        let addr: SocketAddr = addr.parse().map_err(|_| RpcError::BadReply {
            peer: peer.clone(),
            detail: format!("peer address {addr:?} is not HOST:PORT"),
        })?;
        let bytes = encode(rpc).map_err(|e| RpcError::BadReply {
            peer: peer.clone(),
            detail: e.to_string(),
        })?;
        let attempt = async {
            let conn = self.connection(target, addr).await?;
            let transport = |e: String| RpcError::Transport {
                peer: peer.clone(),
                detail: e,
            };
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
            send.write_all(&bytes)
                .await
                .map_err(|e| transport(e.to_string()))?;
            send.finish().map_err(|e| transport(e.to_string()))?;
            let answer = recv
                .read_to_end(MAX_RPC_BYTES)
                .await
                .map_err(|e| transport(e.to_string()))?;
            decode::<Reply>(&answer).map_err(|e| RpcError::BadReply {
                peer: peer.clone(),
                detail: e.to_string(),
            })
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout {
                peer: peer.clone(),
                after: timeout,
            }),
        };
        match result {
            Ok(Reply::Failed(detail)) => Err(RpcError::Remote { peer, detail }),
            Ok(reply) => Ok(reply),
            Err(e) => {
                // A timed-out peer may be dead with its connection still looking
                // open (QUIC notices only at the idle timeout): redial next time.
                if matches!(
                    e,
                    RpcError::Link(_) | RpcError::Transport { .. } | RpcError::Timeout { .. }
                ) {
                    self.forget(target).await;
                }
                Err(e)
            }
        }
    }
}

/// openraft's view of the network: one [`PeerClient`] per target.
#[derive(Clone, Debug)]
pub struct Network {
    peers: Arc<Peers>,
}

impl Network {
    /// A factory that dials through `peers`.
    pub fn new(peers: Arc<Peers>) -> Self {
        Network { peers }
    }
}

/// The client side of the Raft link to one peer.
#[derive(Debug)]
pub struct PeerClient {
    peers: Arc<Peers>,
    target: NodeName,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeName, node: &CoreNode) -> PeerClient {
        PeerClient {
            peers: self.peers.clone(),
            target,
            addr: node.raft_addr.clone(),
        }
    }
}

fn rpc_error(e: RpcError) -> RPCError<TypeConfig> {
    match e {
        RpcError::Link(l) if !l.is_transient() => RPCError::Unreachable(Unreachable::new(&l)),
        RpcError::Link(l) => RPCError::Unreachable(Unreachable::new(&l)),
        RpcError::Transport { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        other => RPCError::Network(NetworkError::new(&other)),
    }
}

fn unexpected(target: &NodeName, reply: &Reply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&RpcError::BadReply {
        peer: target.0.clone(),
        detail: format!("unexpected reply {reply:?}"),
    }))
}

impl PeerClient {
    async fn call(&self, rpc: Rpc, timeout: Duration) -> Result<Reply, RpcError> {
        self.peers
            .call(&self.target, &self.addr, &rpc, timeout)
            .await
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(Rpc::Append(rpc), option.soft_ttl())
            .await
            .map_err(rpc_error)?
        {
            Reply::Append(r) => Ok(r),
            other => Err(unexpected(&self.target, &other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(Rpc::Vote(rpc), option.soft_ttl())
            .await
            .map_err(rpc_error)?
        {
            Reply::Vote(r) => Ok(r),
            other => Err(unexpected(&self.target, &other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(Rpc::PreVote(rpc), option.soft_ttl())
            .await
            .map_err(rpc_error)?
        {
            Reply::Vote(r) => Ok(r),
            other => Err(unexpected(&self.target, &other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let call = self.call(rpc, option.hard_ttl());
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = call => match r.map_err(rpc_error)? {
                Reply::Snapshot(r) => Ok(r),
                other => Err(unexpected(&self.target, &other).into()),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(Rpc::TransferLeader(req), option.soft_ttl())
            .await
            .map_err(rpc_error)?
        {
            Reply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(&self.target, &other)),
        }
    }
}

/// Handles the cluster-internal requests that arrive on the Raft link.
pub trait AppHandler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, req: AppRequest) -> BoxFuture<'static, AppReply>;

    /// Called for every AppendEntries (heartbeats included): only a leader
    /// sends them, so this is how a follower knows the leader is alive.
    fn heard_from_leader(&self);
}

/// Serves the Raft link on `endpoint` until `shutdown` fires.
pub async fn serve(
    endpoint: quinn::Endpoint,
    raft: Raft,
    app: Arc<dyn AppHandler>,
    shutdown: CancellationToken,
) {
    let stop = shutdown.clone();
    link::accept_loop(endpoint, shutdown, "Raft", move |link: link::Link| {
        let (raft, app, shutdown) = (raft.clone(), app.clone(), stop.clone());
        async move {
            let peer = link.peer.map(|p| p.name).unwrap_or_default();
            loop {
                let (send, recv) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    s = link.conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "Raft connection closed");
                            return;
                        }
                    },
                };
                let raft = raft.clone();
                let app = app.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(send, recv, &raft, app.as_ref()).await {
                        tracing::debug!(%peer, error = %e, "Raft RPC failed");
                    }
                });
            }
        }
    })
    .await;
}

async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raft: &Raft,
    app: &dyn AppHandler,
) -> Result<(), String> {
    let bytes = recv
        .read_to_end(MAX_RPC_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    let reply = match decode::<Rpc>(&bytes) {
        Err(e) => Reply::Failed(format!("undecodable request: {e}")),
        Ok(rpc) => dispatch(rpc, raft, app).await,
    };
    let out = encode(&reply).map_err(|e| e.to_string())?;
    send.write_all(&out).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}

async fn dispatch(rpc: Rpc, raft: &Raft, app: &dyn AppHandler) -> Reply {
    let failed = |e: &dyn std::fmt::Display| Reply::Failed(e.to_string());
    match rpc {
        Rpc::Append(req) => raft
            .append_entries(req)
            .await
            .map_or_else(|e| failed(&e), Reply::Append),
        Rpc::Vote(req) => raft
            .vote(req)
            .await
            .map_or_else(|e| failed(&e), Reply::Vote),
        Rpc::PreVote(req) => raft
            .pre_vote(req)
            .await
            .map_or_else(|e| failed(&e), Reply::Vote),
        Rpc::Snapshot { vote, meta, data } => raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_or_else(|e| failed(&e), Reply::Snapshot),
        Rpc::TransferLeader(req) => raft
            .handle_transfer_leader(req)
            .await
            .map_or_else(|e| failed(&e), Reply::TransferLeader),
        Rpc::App(req) => Reply::App(app.handle(req).await),
    }
}
