//! A running edge: its state, the link upstream, and the background work
//! that link carries (registry feed, outbox drain, followed channels,
//! audit shipping).
//!
//! The link: one QUIC connection (ALPN `lanmesh-edge/1`, this edge's
//! certificate) to the first upstream that answers, in priority order; when
//! it fails the edge moves to the next one. While it is up:
//! * the registry feed asks `Changes { from: revision }` (a long poll) and
//!   applies each answer to the cache;
//! * the outbox drains oldest first, in batches of `EdgePost`; an entry
//!   leaves only once the cluster answered for it;
//! * every followed channel is subscribed upstream, after catching up on
//!   history from the cursor this edge keeps per upstream node;
//! * the edge's own audit chain is shipped (`EdgeAudit`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use core_node::audit::AuditLog;
use core_node::presence::Presence;
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::proto::{
    Client, ClientError, EdgePostItem, ErrorCode, ErrorFrame, PostResult, Request, Response,
};
use lanmesh_shared::tls::{self, PeerPolicy, RevokedSerials, TlsMaterial, Transport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::EdgeStore;

/// A link upstream with no traffic (keep-alives included) for this long is dead.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// The live link upstream.
#[derive(Debug, Clone)]
pub struct Up {
    /// The negotiated connection (logged in by this edge's certificate).
    pub client: Client,
    /// Where.
    pub addr: SocketAddr,
}

impl Up {
    /// The upstream node's id.
    pub fn node_id(&self) -> &str {
        &self.client.node_id
    }
}

/// Counters for `/metrics` and `/v1/status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Posts accepted from clients.
    pub posts: AtomicU64,
    /// Outbox entries delivered upstream.
    pub drained: AtomicU64,
    /// Messages received from upstream.
    pub received: AtomicU64,
    /// Times the link upstream was established.
    pub connects: AtomicU64,
    /// Unix ms of the last registry sync.
    pub last_sync_ms: AtomicI64,
    /// Full copies received (the edge was older than the core's change history).
    pub full_syncs: AtomicU64,
}

/// A running edge.
pub struct Edge {
    /// Configuration.
    pub config: Config,
    /// Cache and outbox.
    pub store: Arc<EdgeStore>,
    /// Presence of the site's clients.
    pub presence: Arc<Presence>,
    /// This edge's audit chain.
    pub audit: Arc<AuditLog>,
    /// Revoked serials, for the client port's TLS (kept in step with the cache).
    pub revoked: RevokedSerials,
    /// Counters.
    pub stats: Stats,
    up: watch::Sender<Option<Up>>,
    out: quinn::Endpoint,
    posts: tokio::sync::mpsc::UnboundedSender<Forward>,
    posts_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Forward>>>,
    discovered: Option<watch::Receiver<lanmesh_shared::discovery::Peers>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Edge {
    /// Builds the edge's state (no tasks yet).
    pub fn new(
        config: Config,
        store: Arc<EdgeStore>,
        audit: Arc<AuditLog>,
        material: &TlsMaterial,
        revoked: RevokedSerials,
        discovered: Option<watch::Receiver<lanmesh_shared::discovery::Peers>>,
    ) -> Result<Self> {
        let policy = PeerPolicy::only(config.cluster_id.clone(), &[Role::Core, Role::Edge]);
        let tls = tls::client_config(material, policy, &[tls::ALPN_EDGE])?;
        // A dead upstream is noticed within the idle timeout: keep it short
        // so the edge moves on within seconds.
        let transport = Transport {
            idle_timeout: UPSTREAM_IDLE_TIMEOUT,
            keep_alive: UPSTREAM_IDLE_TIMEOUT / 4,
        };
        let out = link::client_endpoint(
            tls::quinn_client_config(tls, transport)?,
            SocketAddr::from(([0, 0, 0, 0], 0)),
        )
        .context("opening the upstream UDP socket")?;
        let presence = Arc::new(Presence::new(
            &config.node_id,
            Duration::from_millis(config.presence_ttl_ms),
        ));
        let (posts, posts_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Edge {
            posts,
            posts_rx: std::sync::Mutex::new(Some(posts_rx)),
            config,
            store,
            presence,
            audit,
            revoked,
            stats: Stats::default(),
            up: watch::channel(None).0,
            out,
            discovered,
        })
    }

    /// The link upstream, if up.
    pub fn up(&self) -> Option<Up> {
        self.up.borrow().clone()
    }

    /// Upstream addresses in priority order: the configured list, else cores
    /// found by mDNS.
    async fn upstreams(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for u in &self.config.upstream {
            match tokio::net::lookup_host(u).await {
                Ok(mut addrs) => out.extend(addrs.next()),
                Err(e) => tracing::warn!(upstream = %u, error = %e, "cannot resolve upstream"),
            }
        }
        if out.is_empty()
            && let Some(rx) = &self.discovered
        {
            let mut found: Vec<_> = rx
                .borrow()
                .values()
                .filter(|p| {
                    p.announcement.role == Role::Core
                        && p.announcement.cluster_id == self.config.cluster_id
                })
                .filter_map(|p| Some((p.announcement.priority, p.announcement.client_addr?)))
                .collect();
            found.sort();
            out.extend(found.into_iter().map(|(_, a)| a));
        }
        out
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Up> {
        let client = tokio::time::timeout(
            Duration::from_secs(3),
            Client::connect(&self.out, addr, &self.config.node_id),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 3 s"))??;
        match client.request(&Request::Whoami).await? {
            Response::Identity { role, .. } if role == "edge" || role == "core" => {}
            other => anyhow::bail!("{addr} did not take our edge certificate: {other:?}"),
        }
        Ok(Up { client, addr })
    }

    /// A password login, checked upstream on a connection of its own (the
    /// link's session stays this edge's).
    pub async fn login_upstream(&self, user: &str, password: &str) -> Result<Response, ErrorFrame> {
        let Some(up) = self.up() else {
            return Err(offline());
        };
        let c = Client::connect(&self.out, up.addr, "edge login")
            .await
            .map_err(|e| passed_on(&e))?;
        let r = c
            .request(&Request::Login {
                user: user.to_owned(),
                password: password.to_owned(),
            })
            .await
            .map_err(|e| passed_on(&e));
        c.connection().close(0u32.into(), b"done");
        r
    }

    /// Forwards one post upstream (batched with whatever else is being
    /// posted at the same moment); `None` when the link failed (queue it).
    pub async fn post_upstream(&self, item: EdgePostItem) -> Option<PostResult> {
        self.up()?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.posts.send((item, reply)).ok()?;
        match rx.await.ok()? {
            Some(PostResult::Error(e)) if e.code == ErrorCode::Unavailable => None,
            other => other,
        }
    }

    /// Replaces the TLS revocation set with the cache's.
    fn refresh_revoked(&self) {
        if let Ok(set) = self.store.full_set() {
            self.revoked.replace(set.revoked);
        }
    }
}

/// The answer when a request needs the link upstream and it is down.
pub fn offline() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::Unavailable,
        "this edge's link upstream is down: log in with a token from an earlier login \
         (Authenticate) or a client certificate",
    )
}

/// A client error as the error frame to pass on.
pub fn passed_on(e: &ClientError) -> ErrorFrame {
    match e {
        ClientError::Server(f) => f.clone(),
        other => ErrorFrame::new(ErrorCode::Unavailable, format!("upstream: {other}")),
    }
}

/// A post waiting to go upstream, and where its result goes.
type Forward = (
    EdgePostItem,
    tokio::sync::oneshot::Sender<Option<PostResult>>,
);

/// Most posts in one forwarded batch, and batches in flight at once.
const FORWARD_BATCH: usize = 512;
const FORWARD_IN_FLIGHT: usize = 4;

/// Sends live posts upstream in batches: each batch takes every post that
/// arrived while the previous ones were in flight.
pub async fn run_forwarder(edge: Arc<Edge>, shutdown: CancellationToken) {
    let Some(mut rx) = edge
        .posts_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(FORWARD_IN_FLIGHT));
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            f = rx.recv() => match f {
                Some(f) => f,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < FORWARD_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let up = edge.up();
        tokio::spawn(async move {
            let _permit = permit;
            let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let n = items.len();
            let results = match up {
                Some(up) => match up.client.request(&Request::EdgePost { posts: items }).await {
                    Ok(Response::PostedBatch(r)) if r.len() == n => {
                        r.into_iter().map(Some).collect()
                    }
                    _ => vec![None; n],
                },
                None => vec![None; n],
            };
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        });
    }
}

/// Keeps the link upstream up until `shutdown`, moving along the list on failure.
pub async fn run_upstream(edge: Arc<Edge>, shutdown: CancellationToken) {
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(200);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let addrs = edge.upstreams().await;
        if addrs.is_empty() {
            tracing::debug!("no upstream known yet (none configured, none found by mDNS)");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        let addr = addrs[next % addrs.len()];
        match edge.connect(addr).await {
            Ok(up) => {
                backoff = Duration::from_millis(200);
                edge.stats.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(upstream = %addr, node = %up.node_id(), "link upstream up");
                edge.up.send_replace(Some(up.clone()));
                serve_link(&edge, &up, &shutdown).await;
                edge.up.send_replace(None);
                up.client.connection().close(0u32.into(), b"moving on");
                tracing::warn!(upstream = %addr, "link upstream lost; trying the next upstream");
                next += 1;
            }
            Err(e) => {
                tracing::info!(upstream = %addr, error = %e, "upstream unreachable");
                next += 1;
                if next.is_multiple_of(addrs.len()) {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Runs the link's work until the connection ends (or `shutdown`).
async fn serve_link(edge: &Arc<Edge>, up: &Up, shutdown: &CancellationToken) {
    let stop = shutdown.child_token();
    let tasks = vec![
        tokio::spawn(feed(edge.clone(), up.clone(), stop.clone())),
        tokio::spawn(drain(edge.clone(), up.clone(), stop.clone())),
        tokio::spawn(follow_all(edge.clone(), up.clone(), stop.clone())),
        tokio::spawn(ship_audit(edge.clone(), up.clone(), stop.clone())),
    ];
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = up.client.connection().closed() => {}
        _ = stop.cancelled() => {}
    }
    stop.cancel();
    for t in tasks {
        t.abort();
    }
}

/// Ends the link after a failure on it (the next upstream is tried).
fn fail(up: &Up, stop: &CancellationToken, what: &str, e: impl std::fmt::Display) {
    tracing::warn!(upstream = %up.addr, error = %e, "{what} failed; dropping the link");
    up.client.connection().close(1u32.into(), b"link failure");
    stop.cancel();
}

async fn feed(edge: Arc<Edge>, up: Up, stop: CancellationToken) {
    loop {
        let from = edge.store.revision();
        let req = Request::Changes {
            from,
            wait_ms: 5000,
        };
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            a = tokio::time::timeout(Duration::from_secs(15), up.client.request(&req)) => a,
        };
        match answer {
            Ok(Ok(Response::Changes(set))) => {
                if set.revision != 0 && (set.revision != from || set.full) {
                    if let Err(e) = edge.store.apply_changes(&set) {
                        tracing::error!(error = %e, "cannot store registry changes");
                    } else {
                        if set.full {
                            edge.stats.full_syncs.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(
                            revision = set.revision,
                            full = set.full,
                            entries = set.entries.len(),
                            "registry synced"
                        );
                        edge.refresh_revoked();
                    }
                }
                edge.stats.last_sync_ms.store(now_ms(), Ordering::Relaxed);
            }
            Ok(Ok(other)) => return fail(&up, &stop, "registry feed", format!("{other:?}")),
            Ok(Err(e)) => return fail(&up, &stop, "registry feed", e),
            Err(_) => return fail(&up, &stop, "registry feed", "no answer in 15 s"),
        }
    }
}

/// Most outbox entries per `EdgePost`.
pub const DRAIN_BATCH: usize = 2000;

async fn drain(edge: Arc<Edge>, up: Up, stop: CancellationToken) {
    loop {
        let batch = match edge.store.queued_after(0, DRAIN_BATCH) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = edge.store.queued.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let posts = batch
            .iter()
            .map(|q| EdgePostItem {
                channel: q.channel.clone(),
                sender: q.sender.clone(),
                body: q.body.clone(),
                idempotency_key: q.idem.clone(),
            })
            .collect();
        let req = Request::EdgePost { posts };
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            a = tokio::time::timeout(Duration::from_secs(30), up.client.request(&req)) => a,
        };
        let results = match answer {
            Ok(Ok(Response::PostedBatch(r))) if r.len() == batch.len() => r,
            Ok(Ok(other)) => return fail(&up, &stop, "outbox drain", format!("{other:?}")),
            Ok(Err(e)) => return fail(&up, &stop, "outbox drain", e),
            Err(_) => return fail(&up, &stop, "outbox drain", "no answer in 30 s"),
        };
        let mut done = Vec::new();
        let mut retry_later = false;
        for (q, r) in batch.iter().zip(results) {
            match r {
                PostResult::Posted { origin, seq, .. } => done.push((q.id, Some((origin, seq)))),
                PostResult::Error(e)
                    if e.code == ErrorCode::Unavailable || e.code == ErrorCode::Internal =>
                {
                    // Keep it and everything after it, in order.
                    tracing::info!(error = %e, "upstream cannot take queued posts yet; retrying");
                    retry_later = true;
                    break;
                }
                PostResult::Error(e) => {
                    edge.audit.record(
                        "outbox_dropped",
                        &q.sender,
                        &format!(
                            "queued post #{} to {:?} refused upstream: {e}",
                            q.id, q.channel
                        ),
                    );
                    done.push((q.id, None));
                }
            }
        }
        let n = done.len() as u64;
        if let Err(e) = edge.store.delivered(&done) {
            tracing::error!(error = %e, "cannot mark outbox entries delivered");
        }
        edge.stats.drained.fetch_add(n, Ordering::Relaxed);
        if retry_later {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

async fn follow_all(edge: Arc<Edge>, up: Up, stop: CancellationToken) {
    let mut running = std::collections::HashSet::new();
    loop {
        for ch in edge.store.follows().unwrap_or_default() {
            if running.insert(ch.clone()) {
                tokio::spawn(follow(edge.clone(), up.clone(), ch, stop.clone()));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = edge.store.follows_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Pulls a channel's history from the cursor for this upstream node.
pub async fn catch_up(edge: &Edge, up: &Up, channel: &str) -> Result<(), ClientError> {
    loop {
        let after = edge.store.cursor(up.node_id(), channel).unwrap_or(0);
        let page = match up
            .client
            .request(&Request::History {
                channel: channel.to_owned(),
                after,
                limit: 1000,
            })
            .await?
        {
            Response::Messages(p) => p,
            _ => return Ok(()),
        };
        let Some(last) = page.last().map(|m| m.pos) else {
            return Ok(());
        };
        let new = edge.store.cache_messages(&page).unwrap_or(0);
        edge.stats.received.fetch_add(new as u64, Ordering::Relaxed);
        let _ = edge.store.set_cursor(up.node_id(), channel, last);
    }
}

async fn follow(edge: Arc<Edge>, up: Up, channel: String, stop: CancellationToken) {
    let work = async {
        let mut sub = match up.client.subscribe(&channel).await {
            Ok(s) => s,
            Err(ClientError::Server(e)) => {
                tracing::info!(channel, error = %e, "cannot follow channel upstream");
                return;
            }
            Err(e) => return fail(&up, &stop, "subscribe", e),
        };
        if let Err(e) = catch_up(&edge, &up, &channel).await {
            return fail(&up, &stop, "history catch-up", e);
        }
        loop {
            match sub.next().await {
                Ok(m) => {
                    // Take whatever else has already arrived: one transaction
                    // and one cursor update per burst.
                    let mut batch = vec![m];
                    while batch.len() < 1000 {
                        match futures::FutureExt::now_or_never(sub.next()) {
                            Some(Ok(m)) => batch.push(m),
                            _ => break,
                        }
                    }
                    let pos = batch.iter().map(|m| m.pos).max().unwrap_or(0);
                    let new = edge.store.cache_messages(&batch).unwrap_or(0);
                    edge.stats.received.fetch_add(new as u64, Ordering::Relaxed);
                    let _ = edge.store.set_cursor(up.node_id(), &channel, pos);
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::Unavailable => {
                    // We fell behind the push: read what was skipped.
                    if let Err(e) = catch_up(&edge, &up, &channel).await {
                        return fail(&up, &stop, "history catch-up", e);
                    }
                }
                Err(e) => return fail(&up, &stop, "subscription", e),
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = work => {}
    }
}

async fn ship_audit(edge: Arc<Edge>, up: Up, stop: CancellationToken) {
    // Start from the beginning of the chain on every link: the leader skips
    // what it has and answers how far it holds the chain.
    let mut upto = 0u64;
    loop {
        let records = edge.audit.local_after(upto, 500).unwrap_or_default();
        if records.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
            }
        }
        match up.client.request(&Request::EdgeAudit { records }).await {
            Ok(Response::AuditUpto(n)) => upto = n,
            Ok(_) | Err(_) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}
