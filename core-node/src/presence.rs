//! Presence: who is connected, kept in memory on every core.
//!
//! * A logged-in client heartbeats (`Heartbeat`) to the core it is connected
//!   to; that core holds it present for `presence.ttl_ms` after each beat and
//!   tells the client to beat every third of that.
//! * Each core sends its own table to every other core every third of the
//!   TTL, and at once when it changes (`AppRequest::Presence`). A received
//!   table replaces the previous one from that core and lapses after the TTL
//!   if the core stops sending (it died, or the link is cut).
//! * Nothing is written to disk: after a restart or a failover, the table
//!   fills again from the clients' next heartbeats and the other cores'
//!   next tables.
//! * Subscribers get a `PresenceChanged` for every entry that appears,
//!   changes status, or expires.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanmesh_shared::proto::PresenceEntry;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::node::{AppRequest, Node};

/// A presence change: the entry and whether it is online.
pub type Change = (PresenceEntry, bool);
/// (subject, node, status), as cores send their tables.
pub type Entry = (String, String, String);

/// One core's presence table.
pub struct Presence {
    node_id: String,
    ttl: Duration,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    local_changed: Notify,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    /// (subject, node) -> (status, expiry), for clients of this node (node =
    /// this node) and of the edges connected to it (node = the edge).
    local: HashMap<(String, String), (String, Instant)>,
    /// origin core -> (expiry, its table of (subject, node, status)).
    remote: HashMap<String, (Instant, Vec<Entry>)>,
    /// The merged view subscribers were last told about: (subject, node) -> status.
    view: BTreeMap<(String, String), String>,
}

impl Presence {
    /// An empty table for node `node_id`.
    pub fn new(node_id: &str, ttl: Duration) -> Self {
        let (changes, _) = broadcast::channel(4096);
        Presence {
            node_id: node_id.to_owned(),
            ttl,
            inner: Mutex::new(Inner::default()),
            changes,
            local_changed: Notify::new(),
        }
    }

    /// How often clients should heartbeat.
    pub fn interval(&self) -> Duration {
        self.ttl / 3
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A heartbeat from a client of this node.
    pub fn heartbeat(&self, subject: &str, status: &str) {
        let me = self.node_id.clone();
        self.heartbeat_via(subject, &me, status);
    }

    /// A heartbeat from a client of `node` (this node, or an edge that
    /// forwards its clients' heartbeats here).
    pub fn heartbeat_via(&self, subject: &str, node: &str, status: &str) {
        let mut inner = self.lock();
        let old = inner.local.insert(
            (subject.to_owned(), node.to_owned()),
            (status.to_owned(), Instant::now() + self.ttl),
        );
        if old.is_none_or(|(s, _)| s != status) {
            self.recompute(&mut inner);
            self.local_changed.notify_one();
        }
    }

    /// A table received from another core.
    pub fn receive(&self, origin: &str, entries: Vec<Entry>) {
        if origin == self.node_id {
            return;
        }
        let mut inner = self.lock();
        inner
            .remote
            .insert(origin.to_owned(), (Instant::now() + self.ttl, entries));
        self.recompute(&mut inner);
    }

    /// This node's own table, to send to the other cores.
    pub fn local_entries(&self) -> Vec<Entry> {
        let now = Instant::now();
        self.lock()
            .local
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|((s, n), (st, _))| (s.clone(), n.clone(), st.clone()))
            .collect()
    }

    /// Everyone present, sorted by subject then node.
    pub fn who(&self) -> Vec<PresenceEntry> {
        let inner = self.lock();
        inner
            .view
            .iter()
            .map(|((subject, node), status)| PresenceEntry {
                subject: subject.clone(),
                node: node.clone(),
                status: status.clone(),
            })
            .collect()
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Drops what expired.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        let before = (inner.local.len(), inner.remote.len());
        inner.local.retain(|_, (_, exp)| *exp > now);
        inner.remote.retain(|_, (exp, _)| *exp > now);
        if before != (inner.local.len(), inner.remote.len()) {
            if before.0 != inner.local.len() {
                self.local_changed.notify_one();
            }
            self.recompute(&mut inner);
        }
    }

    /// Rebuilds the merged view and tells subscribers what changed.
    fn recompute(&self, inner: &mut Inner) {
        let mut view = BTreeMap::new();
        for (key, (status, _)) in &inner.local {
            view.insert(key.clone(), status.clone());
        }
        for (_, entries) in inner.remote.values() {
            for (subject, node, status) in entries {
                view.insert((subject.clone(), node.clone()), status.clone());
            }
        }
        let entry = |(subject, node): &(String, String), status: &String| PresenceEntry {
            subject: subject.clone(),
            node: node.clone(),
            status: status.clone(),
        };
        for (k, status) in &view {
            if inner.view.get(k) != Some(status) {
                let _ = self.changes.send((entry(k, status), true));
            }
        }
        for (k, status) in &inner.view {
            if !view.contains_key(k) {
                let _ = self.changes.send((entry(k, status), false));
            }
        }
        inner.view = view;
    }
}

/// The body of a presence subscription, after `Subscribed`: everyone present
/// now (as `PresenceChanged` online frames), then every change from `live`
/// (taken before the snapshot, so nothing falls in between).
pub async fn push_changes(
    out: &mut lanmesh_shared::proto::FrameWriter<'_>,
    presence: &Presence,
    mut live: broadcast::Receiver<Change>,
) {
    use lanmesh_shared::proto::{ErrorCode, ErrorFrame, Response};
    use tokio::sync::broadcast::error::RecvError;
    for entry in presence.who() {
        let frame = Response::PresenceChanged {
            entry,
            online: true,
        };
        if out.send(&frame).await.is_err() {
            return;
        }
    }
    loop {
        let frame = match live.recv().await {
            Ok((entry, online)) => Response::PresenceChanged { entry, online },
            Err(RecvError::Lagged(n)) => Response::Error(ErrorFrame::new(
                ErrorCode::Unavailable,
                format!("subscriber too slow: {n} presence changes skipped; ask Who"),
            )),
            Err(RecvError::Closed) => return,
        };
        if out.send(&frame).await.is_err() {
            return;
        }
    }
}

/// Expires entries and shares this node's table with the other cores until
/// `shutdown`.
pub async fn run(node: Arc<Node>, shutdown: CancellationToken) {
    let presence = node.presence().clone();
    let share_every = presence.interval();
    let tick = (presence.ttl / 10).max(Duration::from_millis(50));
    let mut next_share = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
            _ = presence.local_changed.notified() => next_share = Instant::now(),
        }
        presence.expire();
        node.metrics()
            .presence_online
            .set(presence.lock().view.len() as i64);
        if Instant::now() < next_share {
            continue;
        }
        next_share = Instant::now() + share_every;
        let entries = presence.local_entries();
        for (peer, addr) in node.other_cores() {
            let node = node.clone();
            let req = AppRequest::Presence {
                origin: node.id().to_owned(),
                entries: entries.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = node.call_core(&peer, &addr, req, share_every).await {
                    tracing::debug!(peer = %peer.0, error = %e, "presence share failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_appear_merge_and_expire() {
        let p = Presence::new("a", Duration::from_secs(3));
        let mut changes = p.subscribe();
        p.heartbeat("alice", "online");
        p.receive("b", vec![("bob".into(), "b".into(), "away".into())]);
        let names: Vec<_> = p.who().into_iter().map(|e| (e.subject, e.node)).collect();
        assert_eq!(
            names,
            vec![("alice".into(), "a".into()), ("bob".into(), "b".into())]
        );
        assert!(changes.try_recv().unwrap().1);
        assert!(changes.try_recv().unwrap().1);
        // A repeated beat with the same status is not a change.
        p.heartbeat("alice", "online");
        assert!(changes.try_recv().is_err());

        tokio::time::advance(Duration::from_secs(2)).await;
        p.heartbeat("alice", "online");
        tokio::time::advance(Duration::from_millis(1500)).await;
        p.expire();
        // bob's core stopped sending: gone; alice beat in time: still here.
        let (gone, online) = changes.try_recv().unwrap();
        assert_eq!((gone.subject.as_str(), online), ("bob", false));
        assert_eq!(p.who().len(), 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        p.expire();
        assert!(p.who().is_empty());
        assert!(p.local_entries().is_empty());
    }
}
