//! The node's own message store (`messages.db`): what the messaging router
//! keeps per node, not through Raft.
//!
//! A message's id is (origin node, origin sequence). A post is one
//! transaction, fsynced before it is acknowledged; `(sender, idempotency key)`
//! is unique, so a retried post is stored once and answered with the first
//! post's id. `pos` is the local receive order, which history pages by. New
//! messages are also broadcast in memory to this node's subscribers.
//!
//! Exchanging messages between cores (anti-entropy per origin) and channels
//! replicated through Raft are not here yet (rest of issue #5).

use std::io;
use std::path::Path;
use std::sync::Mutex;

use lanmesh_shared::proto::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::broadcast;

/// Largest history page.
pub const MAX_PAGE: u32 = 1000;
/// How many messages a slow subscriber may fall behind before it is told so.
const FANOUT_BUFFER: usize = 4096;

/// This node's messages.
pub struct MessageStore {
    conn: Mutex<(Connection, u64)>,
    origin: String,
    fanout: broadcast::Sender<Message>,
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStore")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        pos: r.get::<_, i64>(0)? as u64,
        origin: r.get(1)?,
        seq: r.get::<_, i64>(2)? as u64,
        channel: r.get(3)?,
        sender: r.get(4)?,
        ts_ms: r.get(5)?,
        body: r.get(6)?,
    })
}

const COLUMNS: &str = "pos, origin, seq, channel, sender, ts_ms, body";

impl MessageStore {
    /// Opens (creating) the store; `origin` is this node's id.
    pub fn open(path: &Path, origin: &str) -> io::Result<Self> {
        let conn = crate::raft::log_store::open_durable(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                 pos INTEGER PRIMARY KEY AUTOINCREMENT,
                 origin TEXT NOT NULL, seq INTEGER NOT NULL,
                 channel TEXT NOT NULL, sender TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                 body BLOB NOT NULL, idem TEXT NOT NULL,
                 UNIQUE (origin, seq), UNIQUE (sender, idem));
             CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, pos);",
        )
        .map_err(io::Error::other)?;
        let next: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE origin = ?1",
                params![origin],
                |r| r.get(0),
            )
            .map_err(io::Error::other)?;
        let (fanout, _) = broadcast::channel(FANOUT_BUFFER);
        Ok(MessageStore {
            conn: Mutex::new((conn, next as u64)),
            origin: origin.to_owned(),
            fanout,
        })
    }

    /// Stores a post (durably) unless `(sender, idem)` was seen; returns the
    /// message and whether it was a duplicate. Blocking: call off the async workers.
    pub fn post(
        &self,
        channel: &str,
        sender: &str,
        body: &[u8],
        idem: &str,
    ) -> io::Result<(Message, bool)> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let (conn, next) = &mut *guard;
        let existing = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE sender = ?1 AND idem = ?2"
            ))
            .and_then(|mut s| s.query_row(params![sender, idem], row).optional())
            .map_err(io::Error::other)?;
        if let Some(m) = existing {
            return Ok((m, true));
        }
        let ts_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let seq = *next;
        conn.prepare_cached(
            "INSERT INTO messages (origin, seq, channel, sender, ts_ms, body, idem)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                self.origin,
                seq as i64,
                channel,
                sender,
                ts_ms,
                body,
                idem
            ])
        })
        .map_err(io::Error::other)?;
        *next += 1;
        let message = Message {
            pos: conn.last_insert_rowid() as u64,
            origin: self.origin.clone(),
            seq,
            channel: channel.to_owned(),
            sender: sender.to_owned(),
            ts_ms,
            body: body.to_vec(),
        };
        drop(guard);
        // No subscribers is not an error.
        let _ = self.fanout.send(message.clone());
        Ok((message, false))
    }

    /// Messages of `channel` received after position `after`, oldest first.
    pub fn history(&self, channel: &str, after: u64, limit: u32) -> io::Result<Vec<Message>> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = guard
            .0
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE channel = ?1 AND pos > ?2 ORDER BY pos LIMIT ?3"
            ))
            .map_err(io::Error::other)?;
        let rows = stmt
            .query_map(params![channel, after as i64, limit.min(MAX_PAGE)], row)
            .map_err(io::Error::other)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(io::Error::other)
    }

    /// New messages of every channel, as they are stored.
    pub fn subscribe(&self) -> broadcast::Receiver<Message> {
        self.fanout.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_posts_and_paged_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = MessageStore::open(&dir.path().join("m.db"), "node-1").unwrap();
        let mut live = store.subscribe();
        let (a, dup) = store.post("ops", "alice", b"one", "k1").unwrap();
        assert!(!dup);
        let (again, dup) = store.post("ops", "alice", b"one", "k1").unwrap();
        assert!(dup);
        assert_eq!((again.origin.as_str(), again.seq), ("node-1", a.seq));
        store.post("ops", "bob", b"two", "k1").unwrap(); // same key, other sender
        store.post("other", "alice", b"x", "k2").unwrap();
        assert_eq!(live.try_recv().unwrap().body, b"one");
        let page = store.history("ops", 0, 1).unwrap();
        assert_eq!(page.len(), 1);
        let rest = store.history("ops", page[0].pos, 10).unwrap();
        assert_eq!(
            rest.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>(),
            vec![&b"two"[..]]
        );
        drop(store);
        // Sequence numbers continue after a restart.
        let store = MessageStore::open(&dir.path().join("m.db"), "node-1").unwrap();
        let (m, _) = store.post("ops", "carol", b"three", "k3").unwrap();
        assert_eq!(
            m.seq, 4,
            "three stored before the restart (the retry stored nothing)"
        );
    }
}
