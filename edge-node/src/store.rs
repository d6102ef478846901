//! The edge's storage: `cache.db` (what it knows of the cluster: registries,
//! revocations, the token key, messages of followed channels, per-upstream
//! history cursors) and `outbox.db` (posts accepted while the link upstream
//! is down).
//!
//! The cache is a cache: written with `synchronous=NORMAL`, rebuilt from
//! upstream if lost. The outbox is the edge's promise to its clients: every
//! entry is fsynced (`synchronous=FULL`) before the post is acknowledged,
//! and leaves only once the cluster has accepted it.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lanmesh_shared::proto::{ChangeSet, Message};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, broadcast, watch};

/// Largest history page.
pub const MAX_PAGE: u32 = 1000;

/// One queued post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Outbox position.
    pub id: u64,
    /// Channel.
    pub channel: String,
    /// Sender.
    pub sender: String,
    /// Body.
    pub body: Vec<u8>,
    /// Idempotency key.
    pub idem: String,
    /// When the edge accepted it.
    pub ts_ms: i64,
}

/// The edge's storage.
pub struct EdgeStore {
    node_id: String,
    cache: Mutex<Connection>,
    outbox: Mutex<Connection>,
    fanout: broadcast::Sender<Arc<Message>>,
    /// Current registry revision (0 = never synced).
    revision: watch::Sender<u64>,
    /// Poked when the outbox gains an entry.
    pub queued: Notify,
    /// Poked when the set of followed channels grows.
    pub follows_changed: Notify,
    /// Entries in the outbox (kept in memory: checked on every post).
    depth: std::sync::atomic::AtomicU64,
    /// Followed channels (a memory copy of `follows`: checked on every post).
    followed: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for EdgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStore")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn open(path: &Path, sync: &str) -> io::Result<Connection> {
    let conn = Connection::open(path).map_err(io::Error::other)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=5000;"
    ))
    .map_err(io::Error::other)?;
    Ok(conn)
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

use core_node::messages::{COLUMNS, row};

fn err(e: rusqlite::Error) -> io::Error {
    io::Error::other(e)
}

impl EdgeStore {
    /// Opens (creating) the store in `dir` for edge `node_id`.
    pub fn open(dir: &Path, node_id: &str) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cache = open(&dir.join("cache.db"), "NORMAL")?;
        cache
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS registry (
                     kind TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
                     PRIMARY KEY (kind, name));
                 CREATE TABLE IF NOT EXISTS revoked (serial TEXT PRIMARY KEY);
                 CREATE TABLE IF NOT EXISTS messages (
                     pos INTEGER PRIMARY KEY AUTOINCREMENT,
                     origin TEXT NOT NULL, seq INTEGER NOT NULL,
                     channel TEXT NOT NULL, sender TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                     body BLOB NOT NULL, pending INTEGER NOT NULL DEFAULT 0,
                     UNIQUE (origin, seq));
                 CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, pos);
                 CREATE TABLE IF NOT EXISTS follows (channel TEXT PRIMARY KEY);
                 CREATE TABLE IF NOT EXISTS cursors (
                     upstream TEXT NOT NULL, channel TEXT NOT NULL, pos INTEGER NOT NULL,
                     PRIMARY KEY (upstream, channel));",
            )
            .map_err(err)?;
        let outbox = open(&dir.join("outbox.db"), "FULL")?;
        outbox
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS outbox (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     channel TEXT NOT NULL, sender TEXT NOT NULL, body BLOB NOT NULL,
                     idem TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                     UNIQUE (sender, idem));",
            )
            .map_err(err)?;
        let revision: u64 = cache
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()
            .map_err(err)?
            .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
            .unwrap_or(0);
        let (fanout, _) = broadcast::channel(16384);
        let store = EdgeStore {
            node_id: node_id.to_owned(),
            cache: Mutex::new(cache),
            outbox: Mutex::new(outbox),
            fanout,
            revision: watch::channel(revision).0,
            queued: Notify::new(),
            follows_changed: Notify::new(),
            depth: std::sync::atomic::AtomicU64::new(0),
            followed: Mutex::new(Default::default()),
        };
        let known = store.follows()?;
        store
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(known);
        let depth: i64 = store
            .outbox()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        store
            .depth
            .store(depth as u64, std::sync::atomic::Ordering::Relaxed);
        // A crash may have lost pending copies from the cache (not fsynced):
        // every queued post shows in history again.
        for q in store.queued_after(0, usize::MAX)? {
            store.cache_pending(&q)?;
        }
        Ok(store)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- registries ----

    /// The registry revision the cache reflects.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Changes of the revision.
    pub fn revision_changes(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Applies a change set from upstream.
    pub fn apply_changes(&self, set: &ChangeSet) -> io::Result<()> {
        let mut conn = self.cache();
        let tx = conn.transaction().map_err(err)?;
        if set.full {
            tx.execute_batch("DELETE FROM registry; DELETE FROM revoked;")
                .map_err(err)?;
        }
        for (kind, name, data) in &set.entries {
            match data {
                Some(d) => tx
                    .execute(
                        "INSERT OR REPLACE INTO registry (kind, name, data) VALUES (?1, ?2, ?3)",
                        params![kind, name, d],
                    )
                    .map_err(err)?,
                None => tx
                    .execute(
                        "DELETE FROM registry WHERE kind = ?1 AND name = ?2",
                        params![kind, name],
                    )
                    .map_err(err)?,
            };
        }
        for s in &set.revoked {
            tx.execute(
                "INSERT OR IGNORE INTO revoked (serial) VALUES (?1)",
                params![s],
            )
            .map_err(err)?;
        }
        for (k, v) in [
            ("revision", set.revision.to_string().into_bytes()),
            ("token_public_key", set.token_public_key.clone()),
        ] {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        drop(conn);
        self.revision.send_replace(set.revision);
        Ok(())
    }

    /// Everything cached, as a full change set (what a relay serves downstream).
    pub fn full_set(&self) -> io::Result<ChangeSet> {
        let token_public_key = self.token_public_key().unwrap_or_default();
        let conn = self.cache();
        let mut stmt = conn
            .prepare_cached("SELECT kind, name, data FROM registry ORDER BY kind, name")
            .map_err(err)?;
        let entries = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, Some(r.get(2)?))))
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        let mut stmt = conn
            .prepare_cached("SELECT serial FROM revoked")
            .map_err(err)?;
        let revoked = stmt
            .query_map([], |r| r.get(0))
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(err)?;
        Ok(ChangeSet {
            revision: self.revision(),
            full: true,
            entries,
            revoked,
            token_public_key,
        })
    }

    /// A cached registry entry's data.
    pub fn registry_get(&self, kind: &str, name: &str) -> io::Result<Option<serde_json::Value>> {
        let data: Option<String> = self
            .cache()
            .prepare_cached("SELECT data FROM registry WHERE kind = ?1 AND name = ?2")
            .map_err(err)?
            .query_row(params![kind, name], |r| r.get(0))
            .optional()
            .map_err(err)?;
        Ok(data.map(|d| serde_json::from_str(&d).unwrap_or_default()))
    }

    /// Number of cached entries per registry kind.
    pub fn registry_counts(&self) -> io::Result<Vec<(String, u64)>> {
        let conn = self.cache();
        let mut stmt = conn
            .prepare_cached("SELECT kind, COUNT(*) FROM registry GROUP BY kind ORDER BY kind")
            .map_err(err)?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(err)
    }

    /// Whether a certificate serial is revoked (as far as the cache knows).
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.cache()
            .prepare_cached("SELECT 1 FROM revoked WHERE serial = ?1")
            .and_then(|mut s| s.exists(params![serial]))
            .unwrap_or(false)
    }

    /// The cluster's token-checking key, once synced.
    pub fn token_public_key(&self) -> Option<Vec<u8>> {
        self.cache()
            .query_row(
                "SELECT value FROM meta WHERE key = 'token_public_key'",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .ok()
            .flatten()
            .filter(|k| !k.is_empty())
    }

    // ---- messages ----

    /// New messages for this edge's subscribers.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Message>> {
        self.fanout.subscribe()
    }

    /// Caches messages from upstream (ignoring ones already here) and hands
    /// the new ones to local subscribers; returns how many were new.
    pub fn cache_messages(&self, msgs: &[Message]) -> io::Result<usize> {
        let mut conn = self.cache();
        let tx = conn.transaction().map_err(err)?;
        let mut new = Vec::new();
        for m in msgs {
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO messages (origin, seq, channel, sender, ts_ms, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        m.origin,
                        m.seq as i64,
                        m.channel,
                        m.sender,
                        m.ts_ms,
                        m.body
                    ])
                })
                .map_err(err)?;
            if n > 0 {
                new.push(Message {
                    pos: tx.last_insert_rowid() as u64,
                    ..m.clone()
                });
            }
        }
        tx.commit().map_err(err)?;
        drop(conn);
        let count = new.len();
        for m in new {
            let _ = self.fanout.send(Arc::new(m));
        }
        Ok(count)
    }

    fn cache_pending(&self, q: &Queued) -> io::Result<Option<Message>> {
        let conn = self.cache();
        let n = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO messages (origin, seq, channel, sender, ts_ms, body, pending)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.node_id,
                    q.id as i64,
                    q.channel,
                    q.sender,
                    q.ts_ms,
                    q.body
                ])
            })
            .map_err(err)?;
        Ok((n > 0).then(|| Message {
            pos: conn.last_insert_rowid() as u64,
            origin: self.node_id.clone(),
            seq: q.id,
            channel: q.channel.clone(),
            sender: q.sender.clone(),
            ts_ms: q.ts_ms,
            body: q.body.clone(),
        }))
    }

    /// A page of a channel's cached history, oldest first.
    pub fn history(&self, channel: &str, after: u64, limit: u32) -> io::Result<Vec<Message>> {
        let conn = self.cache();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE channel = ?1 AND pos > ?2 ORDER BY pos LIMIT ?3"
            ))
            .map_err(err)?;
        stmt.query_map(params![channel, after as i64, limit.min(MAX_PAGE)], row)
            .map_err(err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(err)
    }

    /// Channels whose messages this edge keeps (some client read or followed them).
    pub fn follows(&self) -> io::Result<Vec<String>> {
        let conn = self.cache();
        let mut stmt = conn
            .prepare_cached("SELECT channel FROM follows ORDER BY channel")
            .map_err(err)?;
        stmt.query_map([], |r| r.get(0))
            .map_err(err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(err)
    }

    /// Starts keeping a channel; true if it is new.
    pub fn follow(&self, channel: &str) -> io::Result<bool> {
        if self
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(channel)
        {
            return Ok(false);
        }
        self.followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.to_owned());
        let n = self
            .cache()
            .execute(
                "INSERT OR IGNORE INTO follows (channel) VALUES (?1)",
                params![channel],
            )
            .map_err(err)?;
        if n > 0 {
            self.follows_changed.notify_waiters();
        }
        Ok(n > 0)
    }

    /// Where history from `upstream` (a node id) continues for `channel`.
    pub fn cursor(&self, upstream: &str, channel: &str) -> io::Result<u64> {
        Ok(self
            .cache()
            .prepare_cached("SELECT pos FROM cursors WHERE upstream = ?1 AND channel = ?2")
            .map_err(err)?
            .query_row(params![upstream, channel], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(err)?
            .unwrap_or(0) as u64)
    }

    /// Moves a cursor forward.
    pub fn set_cursor(&self, upstream: &str, channel: &str, pos: u64) -> io::Result<()> {
        self.cache()
            .execute(
                "INSERT INTO cursors (upstream, channel, pos) VALUES (?1, ?2, ?3)
                 ON CONFLICT (upstream, channel) DO UPDATE SET pos = MAX(pos, excluded.pos)",
                params![upstream, channel, pos as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    // ---- outbox ----

    /// Queues a post durably (fsync) and shows it to local subscribers as
    /// pending. A retried key answers the first entry: (entry, duplicate).
    pub fn enqueue(
        &self,
        channel: &str,
        sender: &str,
        body: Vec<u8>,
        idem: &str,
    ) -> io::Result<(Queued, bool)> {
        let conn = self.outbox();
        let existing = conn
            .prepare_cached(
                "SELECT id, channel, sender, body, idem, ts_ms FROM outbox
                 WHERE sender = ?1 AND idem = ?2",
            )
            .map_err(err)?
            .query_row(params![sender, idem], queued_row)
            .optional()
            .map_err(err)?;
        if let Some(q) = existing {
            return Ok((q, true));
        }
        let ts_ms = now_ms();
        conn.prepare_cached(
            "INSERT INTO outbox (channel, sender, body, idem, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut s| s.execute(params![channel, sender, body, idem, ts_ms]))
        .map_err(err)?;
        self.depth
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let q = Queued {
            id: conn.last_insert_rowid() as u64,
            channel: channel.to_owned(),
            sender: sender.to_owned(),
            body,
            idem: idem.to_owned(),
            ts_ms,
        };
        drop(conn);
        if let Some(m) = self.cache_pending(&q)? {
            let _ = self.fanout.send(Arc::new(m));
        }
        self.queued.notify_one();
        Ok((q, false))
    }

    /// Queued posts after `id`, oldest first.
    pub fn queued_after(&self, id: u64, limit: usize) -> io::Result<Vec<Queued>> {
        let conn = self.outbox();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, channel, sender, body, idem, ts_ms FROM outbox
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(err)?;
        stmt.query_map(
            params![id as i64, limit.min(i64::MAX as usize) as i64],
            queued_row,
        )
        .map_err(err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(err)
    }

    /// A sender's queued posts, as messages.
    pub fn pending_of(&self, sender: &str) -> io::Result<Vec<Message>> {
        let conn = self.outbox();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, channel, sender, body, idem, ts_ms FROM outbox
                 WHERE sender = ?1 ORDER BY id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![sender], queued_row)
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|q| Message {
                origin: self.node_id.clone(),
                seq: q.id,
                channel: q.channel,
                sender: q.sender,
                ts_ms: q.ts_ms,
                body: q.body,
                pos: 0,
            })
            .collect())
    }

    /// How many posts wait in the outbox.
    pub fn outbox_depth(&self) -> u64 {
        self.depth.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queued posts the cluster accepted: leave the outbox (one fsynced
    /// transaction), and their pending copies take their cluster ids.
    pub fn delivered(&self, done: &[(u64, Option<(String, u64)>)]) -> io::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        {
            let mut conn = self.outbox();
            let tx = conn.transaction().map_err(err)?;
            let mut removed = 0;
            for (id, _) in done {
                removed += tx
                    .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![*id as i64]))
                    .map_err(err)? as u64;
            }
            tx.commit().map_err(err)?;
            self.depth
                .fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
        }
        let mut conn = self.cache();
        let tx = conn.transaction().map_err(err)?;
        for (id, real) in done {
            let renamed = match real {
                Some((origin, seq)) => tx
                    .prepare_cached(
                        "UPDATE OR IGNORE messages SET origin = ?1, seq = ?2, pending = 0
                         WHERE origin = ?3 AND seq = ?4",
                    )
                    .and_then(|mut s| {
                        s.execute(params![origin, *seq as i64, self.node_id, *id as i64])
                    })
                    .map_err(err)?,
                None => 0,
            };
            if renamed == 0 {
                // The real message is cached already (it came back first), or
                // the post was refused: drop the pending copy.
                tx.prepare_cached("DELETE FROM messages WHERE origin = ?1 AND seq = ?2")
                    .and_then(|mut s| s.execute(params![self.node_id, *id as i64]))
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(())
    }
}

fn queued_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Queued> {
    Ok(Queued {
        id: r.get::<_, i64>(0)? as u64,
        channel: r.get(1)?,
        sender: r.get(2)?,
        body: r.get(3)?,
        idem: r.get(4)?,
        ts_ms: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_survives_reopen_and_delivery_renames_the_pending_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = EdgeStore::open(dir.path(), "edge-1").unwrap();
        let (a, dup) = s.enqueue("ops", "alice", b"one".to_vec(), "k1").unwrap();
        assert!(!dup);
        let (again, dup) = s.enqueue("ops", "alice", b"one".to_vec(), "k1").unwrap();
        assert!(dup && again.id == a.id);
        s.enqueue("ops", "alice", b"two".to_vec(), "k2").unwrap();
        drop(s);
        let s = EdgeStore::open(dir.path(), "edge-1").unwrap();
        assert_eq!(s.outbox_depth(), 2);
        assert_eq!(s.pending_of("alice").unwrap().len(), 2);
        let h = s.history("ops", 0, 10).unwrap();
        assert_eq!(h.len(), 2);
        // The first was accepted as node-1#7; the second's real copy came back first.
        s.cache_messages(&[Message {
            origin: "node-1".into(),
            seq: 8,
            channel: "ops".into(),
            sender: "alice".into(),
            ts_ms: 1,
            body: b"two".to_vec(),
            pos: 0,
        }])
        .unwrap();
        s.delivered(&[
            (a.id, Some(("node-1".into(), 7))),
            (a.id + 1, Some(("node-1".into(), 8))),
        ])
        .unwrap();
        assert_eq!(s.outbox_depth(), 0);
        let ids: Vec<_> = s
            .history("ops", 0, 10)
            .unwrap()
            .into_iter()
            .map(|m| (m.origin, m.seq))
            .collect();
        assert_eq!(ids, vec![("node-1".into(), 7), ("node-1".into(), 8)]);
    }
}
