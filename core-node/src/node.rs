//! A running core node: Raft, storage, the Raft link and the admin API wired
//! together, plus the cluster logic that sits above openraft — forwarding
//! writes and reads to the leader, joining and leaving, bootstrap, and the
//! leader's housekeeping.
//!
//! [`start`] takes a validated config (addresses may have port 0) and a
//! shutdown token, and returns a [`RunningNode`] with the bound addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::pki::ensure_local_pki;
use lanmesh_shared::tls::{
    self, ALPN_RAFT, ClientAuth, PeerPolicy, RevokedSerials, TlsFiles, TlsMaterial, Transport,
};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::raft::linearizable_read::{Linearizer, ReadLogId};
use openraft::{ChangeMembers, RaftMetrics, ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ApiTls, Config, Mode};
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, AppHandler, Network, Peers, Reply, Rpc, RpcError};
use crate::raft::state_machine::StateMachine;
use crate::raft::{CoreNode, LogId, NodeName, Raft};
use crate::store::{self, Applied, Command, Member};
use lanmesh_shared::discovery::{self, Announcement, Discovery};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started (read index).
    Linearizable,
    /// Whatever this node has applied (may be stale on a lagging follower).
    Local,
}

/// Body of `POST /join` (the query string's `node_id` and `addr` win).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JoinRequest {
    /// Node id.
    pub node_id: String,
    /// Raft address (`addr` in the query string).
    #[serde(alias = "addr")]
    pub raft_addr: String,
    /// Admin API address.
    pub api_addr: String,
    /// Client protocol address.
    pub client_addr: String,
    /// Labels for the members table.
    pub labels: BTreeMap<String, String>,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinOutcome {
    /// Node id.
    pub node_id: String,
    /// `joined`, `already a member` or `address updated`.
    pub status: String,
    /// Voters after the change.
    pub voters: Vec<String>,
}

/// A cluster-internal request carried on the Raft link.
#[derive(Debug, Serialize, Deserialize)]
pub enum AppRequest {
    /// Apply this command (sent to the leader).
    Write(Command),
    /// Tell me a read index (sent to the leader).
    ReadIndex,
    /// Add or update a member (sent to the leader).
    Join(JoinRequest),
    /// Remove a member (sent to the leader).
    Leave(String),
    /// Hand leadership to this node (sent to the leader).
    TransferLeader(String),
    /// Messages beyond these per-origin high-water marks (sent to any core;
    /// answered within `wait_ms` even when there is nothing).
    Pull {
        /// The caller's marks.
        hw: std::collections::HashMap<String, u64>,
        /// How long to wait for something new.
        wait_ms: u64,
    },
    /// Audit records of `origin`'s chain (sent to the leader; an empty list
    /// asks how far the leader has it).
    Audit {
        /// The sending core.
        origin: String,
        /// Records, oldest first.
        records: Vec<crate::audit::Record>,
    },
    /// Query the leader's audit collection.
    AuditQuery(crate::audit::Filter),
    /// The sender's presence table (sent to every core).
    Presence {
        /// The sending core.
        origin: String,
        /// (subject, node, status) of its clients and its edges' clients.
        entries: Vec<crate::presence::Entry>,
    },
}

/// The answer to an [`AppRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum AppReply {
    /// The command was applied.
    Written(Applied),
    /// Reads must wait until this log id is applied.
    ReadIndex(LogId),
    /// Join result.
    Joined(JoinOutcome),
    /// Done.
    Done,
    /// Answer to `Pull`.
    Replicas(Vec<crate::messages::Replica>),
    /// Answer to `Audit`: how far the leader holds the sender's chain.
    AuditUpto(u64),
    /// Answer to `AuditQuery`.
    AuditRecords(Vec<crate::audit::Record>),
    /// It failed.
    Error(RemoteError),
}

/// A [`NodeError`] as it crosses the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteError {
    kind: String,
    message: String,
}

/// Why a node operation failed. The API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No leader right now (election in progress, or no quorum): retry.
    #[error("no leader available: {reason}; retry")]
    NoLeader {
        /// What was seen.
        reason: String,
    },
    /// The operation did not finish in time: retry.
    #[error("timed out after {after:?} waiting for {what}; retry")]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The leader could not be reached.
    #[error("cannot reach the leader: {0}")]
    Forward(String),
    /// The node is stopping.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The named node is not a member.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    /// The request cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    /// Another change is in the way.
    #[error("{0}")]
    Conflict(String),
    /// Local storage failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// Raft failed fatally.
    #[error("raft error: {0}")]
    Raft(String),
}

impl NodeError {
    fn to_remote(&self) -> RemoteError {
        let kind = match self {
            NodeError::NoLeader { .. } | NodeError::Timeout { .. } | NodeError::Forward(_) => {
                "retry"
            }
            NodeError::ShuttingDown => "retry",
            NodeError::UnknownNode(_) => "unknown_node",
            NodeError::Invalid(_) => "invalid",
            NodeError::Conflict(_) => "conflict",
            NodeError::Storage(_) | NodeError::Raft(_) => "internal",
        };
        RemoteError {
            kind: kind.into(),
            message: self.to_string(),
        }
    }

    fn from_remote(e: RemoteError) -> Self {
        match e.kind.as_str() {
            "retry" => NodeError::NoLeader { reason: e.message },
            "unknown_node" => NodeError::UnknownNode(e.message),
            "invalid" => NodeError::Invalid(e.message),
            "conflict" => NodeError::Conflict(e.message),
            _ => NodeError::Raft(e.message),
        }
    }

    /// Whether the caller should retry (no leader, timeout, shutting down).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            NodeError::NoLeader { .. } | NodeError::Forward(_) | NodeError::Timeout { .. }
        )
    }
}

impl From<std::io::Error> for NodeError {
    fn from(e: std::io::Error) -> Self {
        NodeError::Storage(e.to_string())
    }
}

/// The bound addresses of a node.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Addrs {
    /// Admin API.
    pub api: SocketAddr,
    /// Raft (QUIC).
    pub raft: SocketAddr,
    /// Client protocol (QUIC).
    pub client: SocketAddr,
}

/// One member as `GET /v1/members` and `/v1/status` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    /// Node id.
    pub id: String,
    /// `voter` or `learner`.
    pub suffrage: String,
    /// Raft address.
    pub raft_addr: String,
    /// Admin API address.
    pub api_addr: String,
    /// Client address.
    pub client_addr: String,
    /// Labels from the members table.
    pub labels: BTreeMap<String, String>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node_id: String,
    /// Cluster id.
    pub cluster_id: String,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Leader id, if known.
    pub leader_id: Option<String>,
    /// Leader's admin API address, if known.
    pub leader_api_addr: Option<String>,
    /// Highest committed index this node knows.
    pub commit_index: u64,
    /// Highest applied index.
    pub applied_index: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Index of the current snapshot.
    pub snapshot_index: Option<u64>,
    /// Highest purged index.
    pub purged_index: Option<u64>,
    /// Whether this node belongs to an initialized cluster.
    pub initialized: bool,
    /// Members (from the Raft membership).
    pub members: Vec<MemberView>,
    /// This node's addresses.
    pub addrs: Addrs,
    /// Process id (the benchmark uses it to kill the leader).
    pub pid: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// A running core node.
pub struct Node {
    id: NodeName,
    config: Config,
    raft: Raft,
    sm: StateMachine,
    peers: Arc<Peers>,
    metrics: Arc<Metrics>,
    membership_lock: tokio::sync::Mutex<()>,
    addrs: Addrs,
    started: Instant,
    /// Milliseconds after `started` of the last AppendEntries received.
    last_leader_contact_ms: std::sync::atomic::AtomicU64,
    http: HttpClient,
    /// Whether the cluster's admin APIs are HTTPS (as ours is).
    api_https: bool,
    /// Cores found by mDNS (local-cluster / multi-lan modes).
    discovered: Option<tokio::sync::watch::Receiver<discovery::Peers>>,
    /// This node's messages (not replicated through Raft).
    messages: Arc<crate::messages::MessageStore>,
    /// Who is connected (in memory, shared with the other cores).
    presence: Arc<crate::presence::Presence>,
    /// The audit log.
    audit: Arc<crate::audit::AuditLog>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn fatal(e: impl std::fmt::Display) -> NodeError {
    NodeError::Raft(e.to_string())
}

impl Node {
    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id.0
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This node's message store.
    pub fn messages(&self) -> &Arc<crate::messages::MessageStore> {
        &self.messages
    }

    /// This node's audit log.
    pub fn audit(&self) -> &Arc<crate::audit::AuditLog> {
        &self.audit
    }

    /// This node's presence table.
    pub fn presence(&self) -> &Arc<crate::presence::Presence> {
        &self.presence
    }

    /// Its metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// A copy of openraft's current metrics (never hold the watch borrow).
    pub fn raft_metrics(&self) -> RaftMetrics<crate::raft::TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Highest applied index.
    pub fn applied_index(&self) -> u64 {
        self.raft_metrics()
            .last_applied
            .as_ref()
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// Runs a query on the local state.
    pub fn query<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, NodeError> {
        Ok(self.sm.query(f)?)
    }

    /// Whether a certificate serial was revoked through the cluster.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.sm.is_revoked(serial)
    }

    /// A channel's replication (`"raft"` / `"anti-entropy"`), `None` if unknown.
    pub fn channel_replication(&self, name: &str) -> Result<Option<String>, NodeError> {
        Ok(self.sm.channel_replication(name)?)
    }

    /// The leader's id and node info, if known and not us.
    fn remote_leader(&self) -> Option<(NodeName, CoreNode)> {
        let m = self.raft_metrics();
        let leader = m.current_leader?;
        if leader == self.id {
            return None;
        }
        let node = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    /// Waits (up to `max`) for the Raft metrics to change, e.g. a new leader.
    async fn settle(&self, max: Duration) {
        let mut rx = self.raft.metrics();
        let _ = tokio::time::timeout(max, rx.changed()).await;
    }

    /// How long one forwarded request may take before we suspect the leader is
    /// gone and look again (an election takes about this long).
    fn forward_timeout(&self) -> Duration {
        Duration::from_millis(self.config.raft.election_timeout_max_ms * 2)
    }

    /// Resolves once the node believes someone other than `from` leads.
    async fn leader_moved_from(&self, from: &NodeName) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_watched().current_leader.as_ref() != Some(from) {
                return;
            }
            if rx.changed().await.is_err() {
                // Raft stopped: nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sends `req` to the leader. Gives up early when leadership moves while
    /// waiting (a dead leader's connection can look open for seconds), so the
    /// caller can retry against the new leader at once.
    async fn call_leader(&self, req: AppRequest, timeout: Duration) -> Result<AppReply, NodeError> {
        let Some((leader, node)) = self.remote_leader() else {
            return Err(NodeError::NoLeader {
                reason: "leader unknown (election in progress?)".into(),
            });
        };
        let rpc = Rpc::App(req);
        let call = self.peers.call(&leader, &node.raft_addr, &rpc, timeout);
        let answer = tokio::select! {
            a = call => a,
            () = self.leader_moved_from(&leader) => {
                return Err(NodeError::NoLeader { reason: format!("leadership moved away from {leader}") });
            }
        };
        match answer {
            Ok(Reply::App(AppReply::Error(e))) => Err(NodeError::from_remote(e)),
            Ok(Reply::App(reply)) => Ok(reply),
            Ok(other) => Err(NodeError::Forward(format!("unexpected reply {other:?}"))),
            Err(RpcError::Timeout { after, .. }) => Err(NodeError::Forward(format!(
                "{leader} did not answer within {after:?}"
            ))),
            Err(e) => Err(NodeError::Forward(e.to_string())),
        }
    }

    /// Applies `cmd` through Raft, on the leader wherever it is. Waits through
    /// elections up to the write timeout, then answers "no leader, retry".
    pub async fn write(&self, cmd: Command) -> Result<Applied, NodeError> {
        let timeout = self.config.write_timeout();
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no leader elected yet");
        loop {
            match self.raft.client_write(cmd.clone()).await {
                Ok(resp) => return Ok(resp.data),
                Err(RaftError::APIError(
                    ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
                )) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if self.remote_leader().is_some() && !remaining.is_zero() {
                        match self
                            .call_leader(
                                AppRequest::Write(cmd.clone()),
                                remaining.min(self.forward_timeout()),
                            )
                            .await
                        {
                            Ok(AppReply::Written(a)) => return Ok(a),
                            Ok(other) => {
                                return Err(NodeError::Forward(format!(
                                    "unexpected reply {other:?}"
                                )));
                            }
                            Err(e) if e.retryable() => last = e.to_string(),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(NodeError::Invalid(e.to_string())),
                Err(RaftError::Fatal(f)) => return Err(fatal(f)),
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NodeError::NoLeader { reason: last });
            }
            self.settle(remaining.min(Duration::from_millis(50))).await;
        }
    }

    /// Waits until a read at `consistency` may be served from local state.
    pub async fn read_barrier(&self, consistency: Consistency) -> Result<(), NodeError> {
        if consistency == Consistency::Local {
            return Ok(());
        }
        let timeout = self.config.write_timeout();
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no leader elected yet");
        loop {
            match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if self.remote_leader().is_some() && !remaining.is_zero() {
                        match self
                            .call_leader(
                                AppRequest::ReadIndex,
                                remaining.min(self.forward_timeout()),
                            )
                            .await
                        {
                            Ok(AppReply::ReadIndex(log_id)) => {
                                let remaining = deadline.saturating_duration_since(Instant::now());
                                let linearizer = Linearizer::new(
                                    self.id.clone(),
                                    ReadLogId::from_log_id(log_id),
                                    None,
                                );
                                return match linearizer
                                    .try_await_ready(&self.raft, Some(remaining))
                                    .await
                                {
                                    Ok(Ok(_)) => Ok(()),
                                    Ok(Err(_)) => Err(NodeError::Timeout {
                                        what: "this node to apply up to the leader's read index",
                                        after: timeout,
                                    }),
                                    Err(f) => Err(fatal(f)),
                                };
                            }
                            Ok(other) => {
                                return Err(NodeError::Forward(format!(
                                    "unexpected reply {other:?}"
                                )));
                            }
                            Err(e) if e.retryable() => last = e.to_string(),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(RaftError::APIError(e)) => last = e.to_string(),
                Err(RaftError::Fatal(f)) => return Err(fatal(f)),
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NodeError::NoLeader { reason: last });
            }
            self.settle(remaining.min(Duration::from_millis(50))).await;
        }
    }

    async fn leader_read_index(&self) -> Result<LogId, NodeError> {
        match self.raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
            Ok(l) => Ok(l.read_log_id().log_id().clone()),
            Err(RaftError::APIError(e)) => Err(NodeError::NoLeader {
                reason: e.to_string(),
            }),
            Err(RaftError::Fatal(f)) => Err(fatal(f)),
        }
    }

    /// Members as the Raft membership has them, with labels from the members table.
    pub fn members(&self) -> Result<Vec<MemberView>, NodeError> {
        let m = self.raft_metrics().membership_config.clone();
        let table: BTreeMap<String, Member> = self
            .query(store::members)?
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        let voters: BTreeSet<NodeName> = m.membership().voter_ids().collect();
        Ok(m.membership()
            .nodes()
            .map(|(id, node)| MemberView {
                id: id.0.clone(),
                suffrage: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                raft_addr: node.raft_addr.clone(),
                api_addr: node.api_addr.clone(),
                client_addr: node.client_addr.clone(),
                labels: table
                    .get(&id.0)
                    .map(|m| m.labels.clone())
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// The status document.
    pub fn status(&self) -> Status {
        let m = self.raft_metrics();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = m.membership_config.membership();
        let leader_api_addr = m
            .current_leader
            .as_ref()
            .and_then(|l| membership.get_node(l))
            .map(|n| n.api_addr.clone());
        let members = self.members().unwrap_or_default();
        let cluster_id = self
            .query(store::cluster_id)
            .ok()
            .flatten()
            .unwrap_or_else(|| self.config.cluster_id.clone());
        Status {
            node_id: self.id.0.clone(),
            cluster_id,
            role: role.into(),
            term: m.current_term,
            leader_id: m.current_leader.map(|l| l.0),
            leader_api_addr,
            commit_index: m.local_committed.as_ref().map(|l| l.index).unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index),
            purged_index: m.purged.as_ref().map(|l| l.index),
            initialized: membership.nodes().next().is_some(),
            members,
            addrs: self.addrs,
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// Ready: a leader is known and alive (a leader has had a quorum
    /// acknowledge it, a follower has heard from the leader, within two
    /// election timeouts), and this node has applied what it knows is committed.
    pub fn readiness(&self) -> Result<(), String> {
        let m = self.raft_metrics();
        if m.current_leader.is_none() {
            return Err("no leader".into());
        }
        let window = Duration::from_millis(self.config.raft.election_timeout_max_ms * 2);
        if m.state == ServerState::Leader {
            let acked = m
                .last_quorum_acked
                .map(|t| openraft::async_runtime::Instant::elapsed(&t.into_inner()));
            if acked.is_none_or(|age| age > window) {
                return Err("leader without a quorum (no majority acknowledged recently)".into());
            }
        } else {
            let last = self
                .last_leader_contact_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            let since = self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(last));
            if last == 0 || since > window {
                return Err(format!(
                    "no contact with the leader for {} ms",
                    since.as_millis()
                ));
            }
        }
        let committed = m.local_committed.as_ref().map(|l| l.index).unwrap_or(0);
        let applied = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0);
        if applied < committed {
            return Err(format!(
                "applied {applied} of {committed} committed entries"
            ));
        }
        Ok(())
    }

    /// Adds (or updates) a member; on a follower, hands the request to the leader.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinOutcome, NodeError> {
        if !self.raft.is_leader() {
            return match self
                .call_leader(AppRequest::Join(req), self.config.write_timeout() * 3)
                .await?
            {
                AppReply::Joined(o) => Ok(o),
                other => Err(NodeError::Forward(format!("unexpected reply {other:?}"))),
            };
        }
        let _guard = self.membership_lock.lock().await;
        let mut req = req;
        let id = NodeName(req.node_id.clone());
        let membership = self.raft_metrics().membership_config.clone();
        let existing = membership.membership().get_node(&id).cloned();
        // `POST /join?node_id=..&addr=..` names only the Raft address: keep the
        // other addresses we already know.
        if let Some(known) = &existing {
            if req.api_addr.is_empty() {
                req.api_addr = known.api_addr.clone();
            }
            if req.client_addr.is_empty() {
                req.client_addr = known.client_addr.clone();
            }
        }
        let node = CoreNode {
            raft_addr: req.raft_addr.clone(),
            api_addr: req.api_addr.clone(),
            client_addr: req.client_addr.clone(),
        };
        let is_voter = membership.membership().voter_ids().any(|v| v == id);
        let status = match (&existing, is_voter) {
            (Some(n), true) if *n == node => "already a member",
            (Some(_), true) => {
                self.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(
                    id.clone(),
                    node.clone(),
                )])))
                .await?;
                "address updated"
            }
            _ => {
                if existing.as_ref().is_some_and(|n| *n != node) {
                    self.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(
                        id.clone(),
                        node.clone(),
                    )])))
                    .await?;
                }
                tracing::info!(node = %id, raft_addr = %node.raft_addr, "adding learner");
                self.raft
                    .add_learner(id.clone(), node.clone(), true)
                    .await
                    .map_err(|e| NodeError::Invalid(e.to_string()))?;
                self.wait_caught_up(&id).await?;
                tracing::info!(node = %id, "learner caught up; promoting to voter");
                self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id.clone()])))
                    .await?;
                "joined"
            }
        };
        self.write(Command::SetMember(Member {
            id: req.node_id.clone(),
            role: Role::Core.to_string(),
            raft_addr: req.raft_addr,
            api_addr: req.api_addr,
            client_addr: req.client_addr,
            labels: req.labels,
        }))
        .await?;
        let voters = self
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .map(|v| v.0)
            .collect();
        Ok(JoinOutcome {
            node_id: req.node_id,
            status: status.into(),
            voters,
        })
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeName, CoreNode>,
    ) -> Result<(), NodeError> {
        self.raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                    NodeError::Conflict(c.to_string())
                }
                RaftError::APIError(e) => NodeError::NoLeader {
                    reason: e.to_string(),
                },
                RaftError::Fatal(f) => fatal(f),
            })
    }

    /// Waits until openraft's metrics satisfy `done`, or answers a timeout naming `what`.
    async fn wait_metrics(
        &self,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&RaftMetrics<crate::raft::TypeConfig>) -> bool + Send + 'static,
    ) -> Result<RaftMetrics<crate::raft::TypeConfig>, NodeError> {
        self.raft
            .wait(Some(timeout))
            .metrics(done, what)
            .await
            .map_err(|_| NodeError::Timeout {
                what,
                after: timeout,
            })
    }

    /// Forwards `req` to the leader, which answers `Done` on success.
    async fn leader_does(&self, req: AppRequest, timeout: Duration) -> Result<(), NodeError> {
        match self.call_leader(req, timeout).await? {
            AppReply::Done => Ok(()),
            other => Err(NodeError::Forward(format!("unexpected reply {other:?}"))),
        }
    }

    /// Waits until a learner has replicated everything the leader had when asked.
    async fn wait_caught_up(&self, id: &NodeName) -> Result<(), NodeError> {
        let target = self.raft_metrics().last_log_index.unwrap_or(0);
        let id = id.clone();
        self.wait_metrics(
            "the new node to catch up",
            Duration::from_secs(60),
            move |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|l| l.index >= target)
            },
        )
        .await
        .map(|_| ())
    }

    /// Removes a member; a leader asked to remove itself hands leadership over first.
    pub async fn leave(&self, id: &str) -> Result<(), NodeError> {
        if !self.raft.is_leader() {
            return self
                .leader_does(
                    AppRequest::Leave(id.to_owned()),
                    self.config.write_timeout() * 2,
                )
                .await;
        }
        let name = NodeName(id.to_owned());
        let membership = self.raft_metrics().membership_config.clone();
        if membership.membership().get_node(&name).is_none() {
            return Err(NodeError::UnknownNode(id.to_owned()));
        }
        let voters: Vec<NodeName> = membership.membership().voter_ids().collect();
        if name == self.id {
            let Some(successor) = voters.iter().find(|v| **v != self.id).cloned() else {
                return Err(NodeError::Invalid("cannot remove the last voter".into()));
            };
            self.hand_over(&successor).await?;
            return self
                .leader_does(
                    AppRequest::Leave(id.to_owned()),
                    self.config.write_timeout(),
                )
                .await;
        }
        let _guard = self.membership_lock.lock().await;
        let change = if voters.contains(&name) {
            if voters.len() == 1 {
                return Err(NodeError::Invalid("cannot remove the last voter".into()));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([name.clone()]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([name.clone()]))
        };
        self.change_membership(change).await?;
        self.write(Command::RemoveMember { id: id.to_owned() })
            .await?;
        tracing::info!(node = %id, "member removed");
        Ok(())
    }

    /// Moves leadership to `to` and waits for it to take over.
    async fn hand_over(&self, to: &NodeName) -> Result<(), NodeError> {
        tracing::info!(to = %to, "transferring leadership");
        self.raft
            .trigger()
            .transfer_leader(to.clone())
            .await
            .map_err(fatal)?;
        let to = to.clone();
        self.wait_metrics(
            "the new leader to take over",
            self.config.write_timeout(),
            move |m| m.current_leader.as_ref() == Some(&to),
        )
        .await
        .map(|_| ())
    }

    /// Hands leadership to `id` (a voter) and waits until it leads.
    pub async fn transfer_leader(&self, id: &str) -> Result<(), NodeError> {
        let name = NodeName(id.to_owned());
        let membership = self.raft_metrics().membership_config.clone();
        if !membership.membership().voter_ids().any(|v| v == name) {
            return Err(NodeError::UnknownNode(id.to_owned()));
        }
        let timeout = self.config.write_timeout();
        let deadline = Instant::now() + timeout;
        loop {
            // The goal, checked first: a forwarded request may be cut short
            // precisely because leadership moved to the target.
            if self.raft_metrics().current_leader.as_ref() == Some(&name) {
                return Ok(());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NodeError::Timeout {
                    what: "the new leader to take over",
                    after: timeout,
                });
            }
            let attempt = if self.raft.is_leader() {
                self.hand_over(&name).await
            } else {
                self.call_leader(AppRequest::TransferLeader(id.to_owned()), remaining)
                    .await
                    .map(|_| ())
            };
            match attempt {
                Ok(()) => {}
                Err(e) if e.retryable() => {
                    self.settle(remaining.min(Duration::from_millis(50))).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Builds a snapshot now (and lets the log be purged up to it).
    pub async fn snapshot(&self) -> Result<serde_json::Value, NodeError> {
        let target = self.applied_index();
        self.raft.trigger().snapshot().await.map_err(fatal)?;
        let m = self
            .wait_metrics("the snapshot", Duration::from_secs(60), move |m| {
                m.snapshot.as_ref().is_some_and(|s| s.index >= target)
            })
            .await?;
        Ok(serde_json::json!({
            "node_id": self.id.0,
            "snapshot_index": m.snapshot.map(|s| s.index),
        }))
    }

    /// A consistent copy of the state (a SQLite file), after a linearizable barrier.
    pub async fn backup(&self) -> Result<Vec<u8>, NodeError> {
        self.read_barrier(Consistency::Linearizable).await?;
        let sm = self.sm.clone();
        tokio::task::spawn_blocking(move || sm.copy_state())
            .await
            .map_err(|e| NodeError::Storage(e.to_string()))?
            .map_err(NodeError::from)
    }

    async fn handle_app(&self, req: AppRequest) -> AppReply {
        let result = match req {
            AppRequest::Write(cmd) => self.write(cmd).await.map(AppReply::Written),
            AppRequest::ReadIndex => self.leader_read_index().await.map(AppReply::ReadIndex),
            AppRequest::Join(j) => self.join(j).await.map(AppReply::Joined),
            AppRequest::Leave(id) => self.leave(&id).await.map(|()| AppReply::Done),
            AppRequest::TransferLeader(id) => {
                self.transfer_leader(&id).await.map(|()| AppReply::Done)
            }
            AppRequest::Pull { hw, wait_ms } => {
                crate::msgsync::answer_pull(&self.messages, hw, Duration::from_millis(wait_ms))
                    .await
                    .map(AppReply::Replicas)
                    .map_err(NodeError::from)
            }
            AppRequest::Presence { origin, entries } => {
                self.presence.receive(&origin, entries);
                Ok(AppReply::Done)
            }
            AppRequest::Audit { origin, records } => self.collect_audit(&origin, &records),
            AppRequest::AuditQuery(filter) => self.audit_query(filter).await,
        };
        result.unwrap_or_else(|e| AppReply::Error(e.to_remote()))
    }

    /// API addresses to try, in order: the static peer list (in the priority
    /// order the operator wrote), then cores found by mDNS, lowest announced
    /// priority first.
    fn peer_apis(&self) -> Vec<String> {
        let mut apis = self.config.peers.clone();
        if let Some(rx) = &self.discovered {
            let mut found: Vec<_> = rx
                .borrow()
                .values()
                .filter(|p| p.announcement.role == Role::Core)
                .filter_map(|p| Some((p.announcement.priority, p.announcement.api_addr?)))
                .collect();
            found.sort();
            for (_, api) in found {
                let url = if self.api_https {
                    format!("https://{api}")
                } else {
                    api.to_string()
                };
                if !apis.contains(&url) {
                    apis.push(url);
                }
            }
        }
        apis
    }

    fn collect_audit(
        &self,
        origin: &str,
        records: &[crate::audit::Record],
    ) -> Result<AppReply, NodeError> {
        if !self.is_leader() {
            return Err(NodeError::NoLeader {
                reason: "not the leader; audit records go to the leader".into(),
            });
        }
        self.audit
            .collect(origin, records)
            .map(AppReply::AuditUpto)
            .map_err(NodeError::Invalid)
    }

    /// Collects an edge's audit records on the leader (here or forwarded).
    pub async fn collect_audit_anywhere(
        &self,
        origin: &str,
        records: Vec<crate::audit::Record>,
    ) -> Result<u64, NodeError> {
        let reply = if self.is_leader() {
            self.collect_audit(origin, &records)?
        } else {
            self.call_leader(
                AppRequest::Audit {
                    origin: origin.to_owned(),
                    records,
                },
                self.forward_timeout(),
            )
            .await?
        };
        match reply {
            AppReply::AuditUpto(n) => Ok(n),
            AppReply::Error(e) => Err(NodeError::from_remote(e)),
            other => Err(NodeError::Forward(format!("unexpected answer {other:?}"))),
        }
    }

    /// Runs `f` with the applied index, under the state lock.
    pub fn query_applied<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection, u64) -> rusqlite::Result<T>,
    ) -> Result<(T, u64), NodeError> {
        Ok(self.sm.query_applied(f)?)
    }

    fn is_leader(&self) -> bool {
        self.raft_metrics().current_leader.as_ref() == Some(&self.id)
    }

    /// Queries the leader's audit collection (here, or forwarded).
    pub async fn audit_query(&self, filter: crate::audit::Filter) -> Result<AppReply, NodeError> {
        if self.is_leader() {
            return Ok(AppReply::AuditRecords(self.audit.query(&filter)?));
        }
        self.call_leader(AppRequest::AuditQuery(filter), self.forward_timeout())
            .await
    }

    /// The other cores of the membership (voters and learners), with their
    /// Raft addresses.
    pub(crate) fn other_cores(&self) -> Vec<(NodeName, String)> {
        let m = self.raft_metrics();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, n)| (id.clone(), n.raft_addr.clone()))
            .collect()
    }

    /// Sends a cluster-internal request to one core over the Raft link.
    pub(crate) async fn call_core(
        &self,
        target: &NodeName,
        raft_addr: &str,
        req: AppRequest,
        timeout: Duration,
    ) -> Result<AppReply, RpcError> {
        match self
            .peers
            .call(target, raft_addr, &Rpc::App(req), timeout)
            .await?
        {
            Reply::App(a) => Ok(a),
            other => Err(RpcError::BadReply {
                peer: target.0.clone(),
                detail: format!("expected an app reply, got {other:?}"),
            }),
        }
    }

    fn own_node(&self) -> CoreNode {
        CoreNode {
            raft_addr: self.addrs.raft.to_string(),
            api_addr: self.addrs.api.to_string(),
            client_addr: self.addrs.client.to_string(),
        }
    }

    /// On the leader: record the cluster id and token key once, keep the members
    /// table in step with the membership, and fix our own address after a
    /// restart on new ports. On a follower whose address changed: re-announce.
    async fn housekeeping(&self) -> Result<(), NodeError> {
        let m = self.raft_metrics();
        let membership = m.membership_config.membership().clone();
        let Some(own) = membership.get_node(&self.id).cloned() else {
            return Ok(());
        };
        let current = self.own_node();
        if m.state == ServerState::Leader {
            if own != current {
                let _g = self.membership_lock.lock().await;
                self.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(
                    self.id.clone(),
                    current,
                )])))
                .await?;
                return Ok(());
            }
            if self.query(store::cluster_id)?.is_none() {
                let key = ring::signature::Ed25519KeyPair::generate_pkcs8(
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|_| NodeError::Storage("cannot generate the token signing key".into()))?;
                self.write(Command::Bootstrap {
                    cluster_id: self.config.cluster_id.clone(),
                    token_key: key.as_ref().to_vec(),
                })
                .await?;
                tracing::info!(cluster_id = %self.config.cluster_id, "cluster bootstrapped: token signing key created");
            }
            let table: BTreeMap<String, Member> = self
                .query(store::members)?
                .into_iter()
                .map(|m| (m.id.clone(), m))
                .collect();
            for (id, node) in membership.nodes() {
                let want = (
                    node.raft_addr.as_str(),
                    node.api_addr.as_str(),
                    node.client_addr.as_str(),
                );
                let fresh = table.get(&id.0).is_some_and(|m| {
                    (
                        m.raft_addr.as_str(),
                        m.api_addr.as_str(),
                        m.client_addr.as_str(),
                    ) == want
                });
                if !fresh {
                    let labels = table
                        .get(&id.0)
                        .map(|m| m.labels.clone())
                        .unwrap_or_default();
                    self.write(Command::SetMember(Member {
                        id: id.0.clone(),
                        role: Role::Core.to_string(),
                        raft_addr: node.raft_addr.clone(),
                        api_addr: node.api_addr.clone(),
                        client_addr: node.client_addr.clone(),
                        labels,
                    }))
                    .await?;
                }
            }
        } else if own != current && m.current_leader.is_some() {
            tracing::info!("our addresses changed since we joined; telling the leader");
            self.call_leader(
                AppRequest::Join(JoinRequest {
                    node_id: self.id.0.clone(),
                    raft_addr: current.raft_addr,
                    api_addr: current.api_addr,
                    client_addr: current.client_addr,
                    labels: BTreeMap::new(),
                }),
                self.config.write_timeout(),
            )
            .await?;
        }
        Ok(())
    }
}

struct Handler(Arc<Node>);

impl AppHandler for Handler {
    fn handle(&self, req: AppRequest) -> BoxFuture<'static, AppReply> {
        let node = self.0.clone();
        async move { node.handle_app(req).await }.boxed()
    }

    fn heard_from_leader(&self) {
        let now = self.0.started.elapsed().as_millis().max(1) as u64;
        self.0
            .last_leader_contact_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A started node: its handle, bound addresses and background tasks.
#[derive(Debug)]
pub struct RunningNode {
    /// The node.
    pub node: Arc<Node>,
    /// Bound addresses.
    pub addrs: Addrs,
    /// Where its data lives.
    pub data_dir: PathBuf,
    /// Whether the admin API is HTTPS.
    pub api_https: bool,
    tasks: Vec<JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    client_endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    discovery: Option<Discovery>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Data directory problems.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS material problems.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Throw-away CA problems.
    #[error(transparent)]
    Pki(#[from] lanmesh_shared::pki::PkiError),
    /// The certificate does not fit the node.
    #[error("certificate {path}: {reason}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A socket could not be bound.
    #[error("cannot bind {what} to {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Storage(std::io::Error),
    /// openraft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// A multi-node cluster was asked for without certificates.
    #[error(
        "a cluster of more than one node needs certificates from one CA: mint them with `pki` and pass --ca/--cert/--key (the throw-away CA is for a single node)"
    )]
    NeedsCertificates,
}

/// Maps a failure to bind `what` on `addr` to a start error naming both.
fn bind_error(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Bind { what, addr, source }
}

/// Loads the node's TLS material: configured files, or the throw-away CA.
fn load_tls(
    config: &Config,
    data_dir: &std::path::Path,
    raft_ip: IpAddr,
) -> Result<(TlsMaterial, TlsFiles), StartError> {
    let files = match (&config.tls.ca, &config.tls.cert, &config.tls.key) {
        (Some(ca), Some(cert), Some(key)) => {
            TlsFiles::new(ca.clone(), Some(cert.clone()), Some(key.clone()))
        }
        _ => {
            if config.mode() != Mode::Single {
                return Err(StartError::NeedsCertificates);
            }
            let dir = data_dir.join("tls");
            let ips: Vec<IpAddr> = [raft_ip]
                .into_iter()
                .filter(|ip| !ip.is_unspecified())
                .collect();
            let local = ensure_local_pki(&dir, &config.cluster_id, &config.node_id, &ips)?;
            if local.created {
                tracing::info!(
                    dir = %dir.display(),
                    "no certificates configured: created a throw-away CA and a node certificate for this single node"
                );
            }
            TlsFiles::new(local.ca, Some(local.cert), Some(local.key))
        }
    };
    let material = TlsMaterial::load(&files)?;
    let cert_path = files.cert.clone().unwrap_or_default();
    let id = material.identity().ok_or_else(|| StartError::Identity {
        path: cert_path.clone(),
        reason: "has no lanmesh identity (issue it with `pki issue core`)".into(),
    })?;
    let mismatch = |reason: String| StartError::Identity {
        path: cert_path.clone(),
        reason,
    };
    if id.role != Role::Core {
        return Err(mismatch(format!(
            "is a {} certificate; a core node needs role core",
            id.role
        )));
    }
    if id.cluster_id != config.cluster_id {
        return Err(mismatch(format!(
            "is for cluster {:?}, but this node is configured for {:?} (--cluster-id)",
            id.cluster_id, config.cluster_id
        )));
    }
    if id.name != config.node_id {
        return Err(mismatch(format!(
            "is for node {:?}, but this node's id is {:?} (--node-id)",
            id.name, config.node_id
        )));
    }
    Ok((material, files))
}

/// Starts a node: binds its sockets (port 0 allowed), opens storage, starts
/// Raft, the Raft link, the admin API and the background tasks, and begins
/// bootstrap/join if the node is new.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<RunningNode, StartError> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let (material, _files) = load_tls(&config, &data_dir, config.advertise(config.raft_addr).ip())?;
    let audit = Arc::new(
        crate::audit::AuditLog::open(&data_dir.join(crate::audit::AUDIT_DB), &config.node_id)
            .map_err(StartError::Storage)?,
    );
    // Every refused certificate is audited, whichever port it came to.
    let audited = |port: &'static str| {
        let audit = audit.clone();
        move |r: &lanmesh_shared::tls::Refusal| {
            audit.record("cert_refused", "unknown", &format!("{port} port: {r}"));
        }
    };
    let revoked = RevokedSerials::default();
    let raft_policy = PeerPolicy::only(config.cluster_id.clone(), &[Role::Core])
        .with_revoked(revoked.clone())
        .on_refusal(audited("Raft"));
    let server_tls = tls::server_config(
        &material,
        raft_policy.clone(),
        ClientAuth::Required,
        &[ALPN_RAFT],
    )?;
    let client_tls = tls::client_config(&material, raft_policy, &[ALPN_RAFT])?;
    let transport = Transport::default();
    let mut endpoint = link::server_endpoint(
        tls::quinn_server_config(server_tls, transport)?,
        config.raft_addr,
    )
    .map_err(bind_error("the Raft port", config.raft_addr))?;
    endpoint.set_default_client_config(tls::quinn_client_config(client_tls, transport)?);
    let raft_bound = endpoint
        .local_addr()
        .map_err(bind_error("the Raft port", config.raft_addr))?;
    // The client port: TLS with optional client certificates (client or
    // operator role of this cluster), so apps may also log in otherwise.
    let client_policy = PeerPolicy::only(
        config.cluster_id.clone(),
        &[Role::Client, Role::Operator, Role::Edge, Role::Core],
    )
    .with_revoked(revoked.clone())
    .on_refusal(audited("client"));
    // Which role may speak which of the two protocols is checked per link
    // (client_port::admit): TLS verification cannot see the ALPN.
    let client_tls = tls::server_config(
        &material,
        client_policy,
        ClientAuth::Optional,
        &[tls::ALPN_CLIENT, tls::ALPN_EDGE],
    )?;
    let client_endpoint = link::server_endpoint(
        tls::quinn_server_config(client_tls, transport)?,
        config.client_addr,
    )
    .map_err(bind_error("the client port", config.client_addr))?;
    let client_bound = client_endpoint
        .local_addr()
        .map_err(bind_error("the client port", config.client_addr))?;
    let listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .map_err(bind_error("the admin API", config.api_addr))?;
    let api_bound = listener
        .local_addr()
        .map_err(bind_error("the admin API", config.api_addr))?;
    let addrs = Addrs {
        api: config.advertise(api_bound),
        raft: config.advertise(raft_bound),
        client: config.advertise(client_bound),
    };

    let metrics = Arc::new(Metrics::new());
    audit.count_in(metrics.audit_records.clone());
    let log = LogStore::open(
        &data_dir.join("raft.db"),
        Some(metrics.fsync_seconds.clone()),
    )
    .map_err(StartError::Storage)?;
    let sm = StateMachine::open(&data_dir, Some(metrics.clone()), revoked.clone())
        .map_err(StartError::Storage)?;
    let messages = Arc::new(
        crate::messages::MessageStore::open(&data_dir.join("messages.db"), &config.node_id)
            .map_err(StartError::Storage)?,
    );
    sm.publish_to(messages.fanout());
    sm.set_changes_retained(config.raft.changes_retained);
    let raft_config = config
        .raft_config()
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
    let peers = Arc::new(Peers::new(
        endpoint.clone(),
        Duration::from_millis(config.raft.election_timeout_min_ms),
    ));
    let raft = Raft::new(
        NodeName(config.node_id.clone()),
        Arc::new(raft_config),
        Network::new(peers.clone()),
        log,
        sm.clone(),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;

    // The admin API: HTTPS per api_tls, with operator/core client certificates.
    let tls_configured = config.tls.ca.is_some();
    let api_https = match config.api_tls {
        ApiTls::On => true,
        ApiTls::Off => false,
        ApiTls::Auto => {
            tls_configured && (!api_bound.ip().is_loopback() || config.mode() == Mode::AirGapped)
        }
    };
    let acceptor = if api_https {
        let policy = PeerPolicy::only(config.cluster_id.clone(), &[Role::Operator, Role::Core])
            .with_revoked(revoked.clone())
            .on_refusal(audited("admin API"));
        let cfg = tls::server_config(&material, policy, ClientAuth::Optional, &[b"http/1.1"])?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    } else {
        None
    };
    let http = {
        let policy = PeerPolicy::only(config.cluster_id.clone(), &[Role::Core]);
        HttpClient::new(
            Some(tls::client_config(&material, policy, &[b"http/1.1"])?),
            Some(Duration::from_secs(10)),
        )
    };

    let discovery = if config.mode().discovery() {
        let me = Announcement {
            cluster_id: config.cluster_id.clone(),
            node_id: config.node_id.clone(),
            role: Role::Core,
            raft_addr: Some(addrs.raft),
            api_addr: Some(addrs.api),
            client_addr: Some(addrs.client),
            priority: config.priority,
        };
        match Discovery::start(me, addrs.raft.ip()) {
            Ok(d) => {
                tracing::info!(
                    service = discovery::SERVICE_TYPE,
                    "announcing on mDNS and browsing for peers"
                );
                Some(d)
            }
            Err(e) => {
                tracing::warn!(error = %e, "mDNS discovery unavailable; only static peers will be used");
                None
            }
        }
    } else {
        None
    };

    let node = Arc::new(Node {
        id: NodeName(config.node_id.clone()),
        config: config.clone(),
        raft: raft.clone(),
        sm,
        peers,
        metrics: metrics.clone(),
        membership_lock: tokio::sync::Mutex::new(()),
        addrs,
        started: Instant::now(),
        last_leader_contact_ms: std::sync::atomic::AtomicU64::new(0),
        http,
        api_https,
        discovered: discovery.as_ref().map(Discovery::peers),
        messages,
        presence: Arc::new(crate::presence::Presence::new(
            &config.node_id,
            Duration::from_millis(config.presence.ttl_ms),
        )),
        audit: audit.clone(),
    });

    let tasks = vec![
        tokio::spawn(network::serve(
            endpoint.clone(),
            raft.clone(),
            Arc::new(Handler(node.clone())),
            shutdown.clone(),
        )),
        tokio::spawn(crate::api::serve(
            listener,
            acceptor,
            node.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::client_port::serve(
            client_endpoint.clone(),
            node.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_metrics(node.clone(), shutdown.clone())),
        tokio::spawn(bootstrap(node.clone(), shutdown.clone())),
        tokio::spawn(crate::msgsync::run(node.clone(), shutdown.clone())),
        tokio::spawn(crate::presence::run(node.clone(), shutdown.clone())),
        tokio::spawn(crate::audit::ship(node.clone(), shutdown.clone())),
    ];

    write_node_file(&data_dir, &node.status(), api_https);
    tracing::info!(
        node_id = %config.node_id,
        cluster_id = %config.cluster_id,
        api = %format!("{}://{}", if api_https { "https" } else { "http" }, addrs.api),
        raft = %addrs.raft,
        data_dir = %data_dir.display(),
        "core node started"
    );
    Ok(RunningNode {
        node,
        addrs,
        data_dir,
        api_https,
        tasks,
        endpoint,
        client_endpoint,
        shutdown,
        discovery,
    })
}

/// `<data_dir>/node.json`: where this node listens (tests and scripts read it).
fn write_node_file(dir: &std::path::Path, status: &Status, api_https: bool) {
    let scheme = if api_https { "https" } else { "http" };
    let doc = serde_json::json!({
        "node_id": status.node_id,
        "api_url": format!("{scheme}://{}", status.addrs.api),
        "api_addr": status.addrs.api,
        "raft_addr": status.addrs.raft,
        "client_addr": status.addrs.client,
        "pid": status.pid,
    });
    let tmp = dir.join("node.json.tmp");
    if std::fs::write(&tmp, doc.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("node.json"));
    }
}

impl RunningNode {
    /// Stops the node: a leader with other voters hands leadership over first,
    /// then Raft stops and sockets close.
    pub async fn stop(self) {
        let node = self.node.clone();
        if node.raft.is_leader() {
            let m = node.raft_metrics().membership_config.clone();
            if let Some(next) = m.membership().voter_ids().find(|v| *v != node.id) {
                match node.hand_over(&next).await {
                    Ok(()) => tracing::info!(to = %next, "handed leadership over before stopping"),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not hand leadership over before stopping")
                    }
                }
            }
        }
        // Withdraw the mDNS announcement first, so nobody tries to join us.
        drop(self.discovery);
        self.shutdown.cancel();
        if let Err(e) = node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        self.client_endpoint.close(0u32.into(), b"shutdown");
        for t in self.tasks {
            t.abort();
        }
        tracing::info!("core node stopped");
    }
}

/// Copies openraft's metrics into Prometheus gauges and runs housekeeping
/// whenever leadership or membership changes.
async fn watch_metrics(node: Arc<Node>, shutdown: CancellationToken) {
    let mut rx = node.raft.metrics();
    let mut last_leader = None;
    let mut last_housekeeping: Option<(Option<NodeName>, Option<LogId>)> = None;
    loop {
        let m = rx.borrow_watched().clone();
        let metrics = &node.metrics;
        metrics.term.set(m.current_term as i64);
        metrics
            .is_leader
            .set(i64::from(m.state == ServerState::Leader));
        metrics.commit_index.set(
            m.local_committed
                .as_ref()
                .map(|l| l.index as i64)
                .unwrap_or(0),
        );
        metrics
            .applied_index
            .set(m.last_applied.as_ref().map(|l| l.index as i64).unwrap_or(0));
        let last_log = m.last_log_index.unwrap_or(0);
        metrics.last_log_index.set(last_log as i64);
        match &m.replication {
            Some(r) => {
                for (peer, matched) in r {
                    if *peer != node.id {
                        let lag =
                            last_log.saturating_sub(matched.as_ref().map(|l| l.index).unwrap_or(0));
                        metrics.set_lag(&peer.0, lag as i64);
                    }
                }
            }
            None => metrics.clear_lags(),
        }
        if m.current_leader != last_leader {
            if m.current_leader.is_some() {
                metrics.leader_changes.inc();
            }
            tracing::info!(leader = ?m.current_leader.as_ref().map(|l| &l.0), term = m.current_term, "leader changed");
            if let Some(l) = &m.current_leader {
                node.audit.record(
                    "leader_change",
                    node.id(),
                    &format!("leader is {} (term {})", l.0, m.current_term),
                );
            }
            last_leader = m.current_leader.clone();
        }
        let key = (
            m.current_leader.clone(),
            m.membership_config.log_id().clone(),
        );
        let applied_membership = m.last_applied.as_ref().map(|l| l.index).unwrap_or(0)
            >= m.membership_config
                .log_id()
                .as_ref()
                .map(|l| l.index)
                .unwrap_or(0);
        if m.current_leader.is_some()
            && applied_membership
            && last_housekeeping.as_ref() != Some(&key)
        {
            let n = node.clone();
            last_housekeeping = Some(key);
            tokio::spawn(async move {
                if let Err(e) = n.housekeeping().await {
                    tracing::warn!(error = %e, "housekeeping failed; will retry on the next change");
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// First start: initialize a single node, join an existing cluster, or form a
/// new one with `bootstrap_expect` peers. A node with data resumes as it was.
async fn bootstrap(node: Arc<Node>, shutdown: CancellationToken) {
    match node.raft.is_initialized().await {
        Ok(true) => {
            tracing::info!("resuming from existing data");
            return;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read Raft state");
            return;
        }
    }
    let config = node.config.clone();
    let auto = config.join_auto()
        || (config.mode().discovery()
            && config.join.is_none()
            && config.bootstrap_expect <= 1
            && config.peers.is_empty());
    if auto {
        join_discovered(&node, &shutdown).await;
    } else if let Some(target) = &config.join {
        join_loop(&node, target, &shutdown).await;
    } else if config.bootstrap_expect > 1 {
        form_cluster(&node, &shutdown).await;
    } else {
        let members = BTreeMap::from([(node.id.clone(), node.own_node())]);
        match node.raft.initialize(members).await {
            Ok(()) => tracing::info!("initialized a new single-node cluster"),
            Err(e) => tracing::warn!(error = %e, "initialize"),
        }
    }
}

fn api_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// One join attempt through `target` (any member's API).
async fn try_join(node: &Node, target: &str) -> bool {
    let own = node.own_node();
    let body = serde_json::to_vec(&JoinRequest {
        node_id: node.id.0.clone(),
        raft_addr: own.raft_addr.clone(),
        api_addr: own.api_addr,
        client_addr: own.client_addr,
        labels: BTreeMap::new(),
    })
    .unwrap_or_default();
    let path = format!("/join?node_id={}&addr={}", node.id.0, own.raft_addr);
    match node
        .http
        .request(hyper::Method::POST, &api_url(target), &path, body)
        .await
    {
        Ok((status, _)) if status.is_success() => {
            tracing::info!(via = %target, "joined the cluster");
            true
        }
        Ok((status, body)) => {
            tracing::warn!(via = %target, %status, answer = %String::from_utf8_lossy(&body).trim(), "join refused; retrying");
            false
        }
        Err(e) => {
            tracing::warn!(via = %target, error = %e, "join failed; retrying");
            false
        }
    }
}

async fn joined(node: &Node) -> bool {
    node.raft.is_initialized().await.unwrap_or(false)
        && node.raft_metrics().current_leader.is_some()
}

/// Asks `target` (any member's API) to add us, until it succeeds or we are added.
async fn join_loop(node: &Arc<Node>, target: &str, shutdown: &CancellationToken) {
    let mut delay = Duration::from_millis(200);
    while !try_join(node, target).await && !joined(node).await {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// `--join auto`: join through the cores mDNS finds (priority order),
/// waiting for one to appear.
async fn join_discovered(node: &Arc<Node>, shutdown: &CancellationToken) {
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        if joined(node).await {
            return;
        }
        for api in node.peer_apis() {
            if try_join(node, &api).await {
                return;
            }
        }
        if logged.elapsed() > Duration::from_secs(10) {
            tracing::info!("looking for a cluster to join (mDNS)");
            logged = Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// `bootstrap_expect` N: wait until all N cores answer; the smallest node id
/// initializes the cluster with all of them, exactly once. If a peer already
/// belongs to a formed cluster, join that instead.
async fn form_cluster(node: &Arc<Node>, shutdown: &CancellationToken) {
    let expect = node.config.bootstrap_expect;
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        if node.raft.is_initialized().await.unwrap_or(false) {
            tracing::info!("cluster formed");
            return;
        }
        let mut found = BTreeMap::from([(node.id.clone(), node.own_node())]);
        let mut formed_peer = None;
        for peer in &node.peer_apis() {
            if let Ok((status, body)) = node
                .http
                .request(
                    hyper::Method::GET,
                    &api_url(peer),
                    "/v1/status?consistency=local",
                    Vec::new(),
                )
                .await
                && status.is_success()
                && let Ok(s) = serde_json::from_slice::<Status>(&body)
            {
                if s.initialized {
                    formed_peer = Some(peer.clone());
                }
                found.insert(
                    NodeName(s.node_id.clone()),
                    CoreNode {
                        raft_addr: s.addrs.raft.to_string(),
                        api_addr: s.addrs.api.to_string(),
                        client_addr: s.addrs.client.to_string(),
                    },
                );
            }
        }
        if let Some(peer) = formed_peer {
            tracing::info!(via = %peer, "a peer already belongs to a cluster; joining it");
            join_loop(node, &peer, shutdown).await;
            return;
        }
        if found.len() >= expect {
            let smallest = found.keys().next().cloned();
            if smallest.as_ref() == Some(&node.id) {
                let members: BTreeMap<_, _> = found.into_iter().take(expect).collect();
                tracing::info!(members = ?members.keys().map(|k| &k.0).collect::<Vec<_>>(), "all expected cores found; initializing the cluster");
                match node.raft.initialize(members).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, "initialize"),
                }
            }
        } else if logged.elapsed() > Duration::from_secs(5) {
            tracing::info!(
                found = found.len(),
                expect,
                "waiting for the expected cores to answer"
            );
            logged = Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
