//! `/metrics`: a per-node prometheus-client registry (several nodes can run in
//! one test process), fed by the API, the storage layer and a task that copies
//! openraft's metrics watch into gauges.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

/// Every metric a core node exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    /// Current Raft term.
    pub term: Gauge<i64, AtomicI64>,
    /// Times the known leader changed.
    pub leader_changes: Counter<u64, AtomicU64>,
    /// 1 when this node is the leader.
    pub is_leader: Gauge<i64, AtomicI64>,
    /// Highest log index known committed.
    pub commit_index: Gauge<i64, AtomicI64>,
    /// Highest log index applied to the state machine.
    pub applied_index: Gauge<i64, AtomicI64>,
    /// Last log index.
    pub last_log_index: Gauge<i64, AtomicI64>,
    replication_lag: Family<PeerLabels, Gauge<i64, AtomicI64>>,
    /// Duration of each durable storage commit (log append, vote, apply batch).
    pub fsync_seconds: Histogram,
    /// Entries applied to the state machine.
    pub applied_entries: Counter<u64, AtomicU64>,
    /// Messages accepted from clients on this node.
    pub messages_posted: Counter<u64, AtomicU64>,
    /// Messages received from other cores by anti-entropy.
    pub messages_synced: Counter<u64, AtomicU64>,
    /// Presence entries known (all cores).
    pub presence_online: Gauge<i64, AtomicI64>,
    /// Audit records appended on this node.
    pub audit_records: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lanmesh");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        let m = Metrics {
            requests,
            request_seconds,
            term: Gauge::default(),
            leader_changes: Counter::default(),
            is_leader: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            replication_lag: Family::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            applied_entries: Counter::default(),
            messages_posted: Counter::default(),
            messages_synced: Counter::default(),
            presence_online: Gauge::default(),
            audit_records: Counter::default(),
            registry: Mutex::new(Registry::default()),
        };
        registry.register(
            "api_requests",
            "Admin API requests by method, route and status",
            m.requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Admin API request latency by route",
            m.request_seconds.clone(),
        );
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "raft_leader_changes",
            "Times the known leader changed",
            m.leader_changes.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 when this node is the leader",
            m.is_leader.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Highest log index known committed",
            m.commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest log index applied",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Last log index",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_replication_lag_entries",
            "Entries a follower is behind the leader's last log index (leader only)",
            m.replication_lag.clone(),
        );
        registry.register(
            "storage_fsync_duration_seconds",
            "Duration of durable storage commits (transaction + fsync)",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "raft_applied_entries",
            "Entries applied to the state machine",
            m.applied_entries.clone(),
        );
        registry.register(
            "messages_posted",
            "Messages accepted from clients on this node",
            m.messages_posted.clone(),
        );
        registry.register(
            "messages_synced",
            "Messages received from other cores (anti-entropy)",
            m.messages_synced.clone(),
        );
        registry.register(
            "presence_online",
            "Presence entries known on this node (from every core)",
            m.presence_online.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records appended on this node",
            m.audit_records.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    /// Records one API request.
    pub fn observe_request(&self, method: &str, route: &str, code: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                code,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets a follower's replication lag.
    pub fn set_lag(&self, peer: &str, lag: i64) {
        self.replication_lag
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .set(lag);
    }

    /// Forgets all per-peer lags (on losing leadership).
    pub fn clear_lags(&self) {
        self.replication_lag.clear();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
