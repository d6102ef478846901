//! The node's own message store (`messages.db`): what the messaging router
//! keeps per node, outside Raft.
//!
//! * A message's id is (origin node, origin sequence). `pos` is the local
//!   receive order, which history pages by.
//! * Writes go through one writer thread that commits everything waiting in
//!   one fsynced transaction (group commit), so a post is durable when it is
//!   acknowledged and many concurrent posts share an fsync.
//! * `(sender, idempotency key)`: a post whose pair was already seen here is
//!   answered with the first message's id and stores nothing.
//! * Anti-entropy: every node keeps, per origin, a high-water mark `hw` such
//!   that it holds every message `1..=hw` of that origin (it only ever accepts
//!   an origin's messages in order, and serves only that contiguous prefix).
//!   A peer asks "what do you have beyond these marks" ([`MessageStore::missing`])
//!   and feeds the answer to [`MessageStore::ingest`]; `crate::msgsync` runs
//!   that loop against every other core.
//! * The same `(sender, idempotency key)` accepted by two cores (a client
//!   retrying on another core) gives two ids. Every node keeps both rows so
//!   the sets converge, and hides the one with the larger (origin, seq): the
//!   same one everywhere, so every node shows the same messages.
//! * New visible messages are broadcast in memory to this node's subscribers.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use lanmesh_shared::proto::Message;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch};

/// Largest history page.
pub const MAX_PAGE: u32 = 1000;
/// Most messages handed to a peer in one anti-entropy answer.
pub const MAX_SYNC_BATCH: usize = 2000;
/// How many messages a slow subscriber may fall behind before it is told so.
const FANOUT_BUFFER: usize = 16384;
/// Most requests committed in one transaction.
const MAX_GROUP: usize = 4096;

/// A message as it travels between cores: the stored message plus the
/// idempotency key that makes retries converge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The message (`pos` is meaningless across nodes and ignored).
    pub message: Message,
    /// The client's idempotency key.
    pub idem: String,
}

enum Job {
    Post {
        channel: String,
        sender: String,
        body: Vec<u8>,
        idem: String,
        reply: oneshot::Sender<io::Result<(Message, bool)>>,
    },
    Ingest {
        replicas: Vec<Replica>,
        reply: oneshot::Sender<io::Result<usize>>,
    },
}

/// This node's messages.
pub struct MessageStore {
    origin: String,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    read: Mutex<Connection>,
    fanout: broadcast::Sender<Arc<Message>>,
    /// Per-origin contiguous high-water marks.
    hw: Arc<Mutex<HashMap<String, u64>>>,
    /// Bumped after every commit that stored something.
    changed: watch::Sender<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStore")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A [`Message`] from a row selected with [`COLUMNS`] (first).
pub fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
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

/// The message columns [`row`] reads, in order.
pub const COLUMNS: &str = "pos, origin, seq, channel, sender, ts_ms, body";

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn closed() -> io::Error {
    io::Error::other(
        "the message store is unavailable (shutting down, or a disk error: see the node log)",
    )
}

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
                 hidden INTEGER NOT NULL DEFAULT 0,
                 UNIQUE (origin, seq));
             CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, pos);
             CREATE UNIQUE INDEX IF NOT EXISTS messages_visible_idem
                 ON messages (sender, idem) WHERE hidden = 0;",
        )
        .map_err(io::Error::other)?;
        let hw: HashMap<String, u64> = {
            let mut stmt = conn
                .prepare("SELECT origin, MAX(seq) FROM messages GROUP BY origin")
                .map_err(io::Error::other)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(io::Error::other)?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(io::Error::other)?
        };
        let read = Connection::open(path).map_err(io::Error::other)?;
        read.execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(io::Error::other)?;
        let (fanout, _) = broadcast::channel(FANOUT_BUFFER);
        let (changed, _) = watch::channel(0);
        let hw = Arc::new(Mutex::new(hw));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            origin: origin.to_owned(),
            fanout: fanout.clone(),
            hw: hw.clone(),
            changed: changed.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("messages-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(MessageStore {
            origin: origin.to_owned(),
            jobs: Mutex::new(Some(tx)),
            read: Mutex::new(read),
            fanout,
            hw,
            changed,
            writer: Mutex::new(Some(handle)),
        })
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref()
            .ok_or_else(closed)?
            .send(job)
            .map_err(|_| closed())
    }

    /// Stores a post durably unless `(sender, idem)` was seen; returns the
    /// message and whether it was a duplicate.
    pub async fn post(
        &self,
        channel: &str,
        sender: &str,
        body: Vec<u8>,
        idem: &str,
    ) -> io::Result<(Message, bool)> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Post {
            channel: channel.to_owned(),
            sender: sender.to_owned(),
            body,
            idem: idem.to_owned(),
            reply,
        })?;
        rx.await.map_err(|_| closed())?
    }

    /// Stores messages received from a peer (in per-origin order); returns
    /// how many were new.
    pub async fn ingest(&self, replicas: Vec<Replica>) -> io::Result<usize> {
        if replicas.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Ingest { replicas, reply })?;
        rx.await.map_err(|_| closed())?
    }

    /// Messages of `channel` received after position `after`, oldest first.
    pub fn history(&self, channel: &str, after: u64, limit: u32) -> io::Result<Vec<Message>> {
        let conn = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE channel = ?1 AND pos > ?2 AND hidden = 0
                 ORDER BY pos LIMIT ?3"
            ))
            .map_err(io::Error::other)?;
        let rows = stmt
            .query_map(params![channel, after as i64, limit.min(MAX_PAGE)], row)
            .map_err(io::Error::other)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(io::Error::other)
    }

    /// The per-origin high-water marks: every message `1..=hw` of each origin is here.
    pub fn high_water(&self) -> HashMap<String, u64> {
        self.hw.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Total number of stored messages (hidden duplicates included).
    pub fn count(&self) -> u64 {
        self.high_water().values().sum()
    }

    /// What this node holds beyond a peer's marks `theirs`, per origin in
    /// sequence order, at most `limit` messages.
    pub fn missing(&self, theirs: &HashMap<String, u64>, limit: usize) -> io::Result<Vec<Replica>> {
        let ours = self.high_water();
        let conn = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (origin, &hw) in &ours {
            let from = theirs.get(origin).copied().unwrap_or(0);
            if hw <= from || out.len() >= limit {
                continue;
            }
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS}, idem FROM messages
                     WHERE origin = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4"
                ))
                .map_err(io::Error::other)?;
            let rows = stmt
                .query_map(
                    params![origin, from as i64, hw as i64, (limit - out.len()) as i64],
                    |r| {
                        Ok(Replica {
                            message: row(r)?,
                            idem: r.get(7)?,
                        })
                    },
                )
                .map_err(io::Error::other)?;
            for r in rows {
                out.push(r.map_err(io::Error::other)?);
            }
        }
        Ok(out)
    }

    /// New visible messages of every channel, as they are stored (posted here,
    /// received from a peer, or committed through Raft).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Message>> {
        self.fanout.subscribe()
    }

    /// Hands a message stored elsewhere (a Raft-replicated channel) to this
    /// node's subscribers.
    pub fn publish(&self, m: Message) {
        let _ = self.fanout.send(Arc::new(m));
    }

    /// A sender for [`MessageStore::publish`] that outlives borrows.
    pub fn fanout(&self) -> broadcast::Sender<Arc<Message>> {
        self.fanout.clone()
    }

    /// Changes (its value is meaningless) after every commit that stored something.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stops the writer after it has committed what it was given.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for MessageStore {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    conn: Connection,
    origin: String,
    fanout: broadcast::Sender<Arc<Message>>,
    hw: Arc<Mutex<HashMap<String, u64>>>,
    changed: watch::Sender<u64>,
}

enum Answer {
    Post(
        oneshot::Sender<io::Result<(Message, bool)>>,
        (Message, bool),
    ),
    Ingest(oneshot::Sender<io::Result<usize>>, usize),
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.commit(jobs);
        }
    }

    /// Runs every job in one transaction, then answers them all.
    fn commit(&mut self, jobs: Vec<Job>) {
        let mut hw = self.hw.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut visible = Vec::new();
        let result = (|| -> rusqlite::Result<Vec<Answer>> {
            let tx = self.conn.transaction()?;
            let mut answers = Vec::with_capacity(jobs.len());
            for job in jobs {
                match job {
                    Job::Post {
                        channel,
                        sender,
                        body,
                        idem,
                        reply,
                    } => {
                        let r = post(&tx, &self.origin, &mut hw, &channel, &sender, body, &idem)?;
                        if !r.1 {
                            visible.push(r.0.clone());
                        }
                        answers.push(Answer::Post(reply, r));
                    }
                    Job::Ingest { replicas, reply } => {
                        let mut new = 0;
                        for r in replicas {
                            if let Some(m) = ingest(&tx, &mut hw, r)? {
                                visible.extend(m);
                                new += 1;
                            }
                        }
                        answers.push(Answer::Ingest(reply, new));
                    }
                }
            }
            tx.commit()?;
            Ok(answers)
        })();
        match result {
            Ok(answers) => {
                *self.hw.lock().unwrap_or_else(|p| p.into_inner()) = hw;
                let stored = answers.iter().any(|a| match a {
                    Answer::Post(_, (_, dup)) => !dup,
                    Answer::Ingest(_, n) => *n > 0,
                });
                for a in answers {
                    match a {
                        Answer::Post(reply, r) => {
                            let _ = reply.send(Ok(r));
                        }
                        Answer::Ingest(reply, n) => {
                            let _ = reply.send(Ok(n));
                        }
                    }
                }
                for m in visible {
                    // No subscribers is not an error.
                    let _ = self.fanout.send(Arc::new(m));
                }
                if stored {
                    self.changed.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "message store commit failed");
                // The transaction rolled back: every job in it failed. The
                // jobs' reply channels were moved into the closure; dropping
                // them tells each waiter the store failed.
            }
        }
    }
}

/// One post inside the writer's transaction.
fn post(
    tx: &rusqlite::Transaction<'_>,
    origin: &str,
    hw: &mut HashMap<String, u64>,
    channel: &str,
    sender: &str,
    body: Vec<u8>,
    idem: &str,
) -> rusqlite::Result<(Message, bool)> {
    let seq = hw.get(origin).copied().unwrap_or(0) + 1;
    let ts_ms = now_ms();
    // The partial unique index on visible (sender, idem) turns a retry into
    // a no-op insert; only then is the first message looked up.
    let inserted = tx
        .prepare_cached(
            "INSERT INTO messages (origin, seq, channel, sender, ts_ms, body, idem)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            origin, seq as i64, channel, sender, ts_ms, body, idem
        ])?;
    if inserted == 0 {
        let first = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE sender = ?1 AND idem = ?2 AND hidden = 0"
            ))?
            .query_row(params![sender, idem], row)?;
        return Ok((first, true));
    }
    hw.insert(origin.to_owned(), seq);
    Ok((
        Message {
            pos: tx.last_insert_rowid() as u64,
            origin: origin.to_owned(),
            seq,
            channel: channel.to_owned(),
            sender: sender.to_owned(),
            ts_ms,
            body,
        },
        false,
    ))
}

/// One received message inside the writer's transaction. `None`: not stored
/// (already here, or out of order); `Some(None)`: stored hidden (a duplicate
/// idempotency key that loses); `Some(Some(m))`: stored and visible.
fn ingest(
    tx: &rusqlite::Transaction<'_>,
    hw: &mut HashMap<String, u64>,
    r: Replica,
) -> rusqlite::Result<Option<Option<Message>>> {
    let m = r.message;
    let have = hw.get(&m.origin).copied().unwrap_or(0);
    if m.seq != have + 1 || m.origin.is_empty() {
        return Ok(None);
    }
    // Another accepted the same (sender, key)? The smaller (origin, seq) wins.
    let rival: Option<(i64, String, i64)> = tx
        .prepare_cached(
            "SELECT pos, origin, seq FROM messages
             WHERE sender = ?1 AND idem = ?2 AND hidden = 0 LIMIT 1",
        )?
        .query_row(params![m.sender, r.idem], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let loses = match &rival {
        Some((_, o, s)) => (o.as_str(), *s as u64) < (m.origin.as_str(), m.seq),
        None => false,
    };
    if let (Some((pos, _, _)), false) = (&rival, loses) {
        tx.prepare_cached("UPDATE messages SET hidden = 1 WHERE pos = ?1")?
            .execute(params![pos])?;
    }
    tx.prepare_cached(
        "INSERT INTO messages (origin, seq, channel, sender, ts_ms, body, idem, hidden)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        m.origin,
        m.seq as i64,
        m.channel,
        m.sender,
        m.ts_ms,
        m.body,
        r.idem,
        i64::from(loses)
    ])?;
    hw.insert(m.origin.clone(), m.seq);
    if loses {
        return Ok(Some(None));
    }
    Ok(Some(Some(Message {
        pos: tx.last_insert_rowid() as u64,
        ..m
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, name: &str) -> MessageStore {
        MessageStore::open(&dir.join(format!("{name}.db")), name).unwrap()
    }

    #[tokio::test]
    async fn idempotent_posts_and_paged_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), "node-1");
        let mut live = store.subscribe();
        let (a, dup) = store
            .post("ops", "alice", b"one".to_vec(), "k1")
            .await
            .unwrap();
        assert!(!dup);
        let (again, dup) = store
            .post("ops", "alice", b"one".to_vec(), "k1")
            .await
            .unwrap();
        assert!(dup);
        assert_eq!((again.origin.as_str(), again.seq), ("node-1", a.seq));
        // Same key, other sender: a different message.
        store
            .post("ops", "bob", b"two".to_vec(), "k1")
            .await
            .unwrap();
        store
            .post("other", "alice", b"x".to_vec(), "k2")
            .await
            .unwrap();
        assert_eq!(live.try_recv().unwrap().body, b"one".to_vec());
        let page = store.history("ops", 0, 1).unwrap();
        assert_eq!(page.len(), 1);
        let rest = store.history("ops", page[0].pos, 10).unwrap();
        assert_eq!(
            rest.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>(),
            vec![&b"two"[..]]
        );
        drop(store);
        // Sequence numbers continue after a restart.
        let store = open(dir.path(), "node-1");
        let (m, _) = store
            .post("ops", "carol", b"three".to_vec(), "k3")
            .await
            .unwrap();
        assert_eq!(
            m.seq, 4,
            "three stored before the restart (the retry stored nothing)"
        );
    }

    #[tokio::test]
    async fn anti_entropy_converges_and_hides_the_same_duplicate_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path(), "a");
        let b = open(dir.path(), "b");
        for i in 0..5 {
            a.post("ops", "alice", vec![i], &format!("a{i}"))
                .await
                .unwrap();
        }
        b.post("ops", "bob", b"hi".to_vec(), "b0").await.unwrap();
        // The same retried post accepted by both cores.
        a.post("ops", "carol", b"retry".to_vec(), "same")
            .await
            .unwrap();
        b.post("ops", "carol", b"retry".to_vec(), "same")
            .await
            .unwrap();

        // Limits page the exchange; messages arrive in order.
        loop {
            let batch = a.missing(&b.high_water(), 2).unwrap();
            if batch.is_empty() {
                break;
            }
            b.ingest(batch).await.unwrap();
        }
        let batch = b.missing(&a.high_water(), 100).unwrap();
        assert_eq!(a.ingest(batch.clone()).await.unwrap(), 2);
        // Feeding the same batch again stores nothing.
        assert_eq!(a.ingest(batch).await.unwrap(), 0);
        assert_eq!(a.high_water(), b.high_water());

        let bodies = |s: &MessageStore| {
            let mut v: Vec<_> = s
                .history("ops", 0, 100)
                .unwrap()
                .into_iter()
                .map(|m| (m.origin, m.seq))
                .collect();
            v.sort();
            v
        };
        assert_eq!(bodies(&a), bodies(&b));
        assert_eq!(bodies(&a).len(), 7, "5 + 1 + one of the two duplicates");
        assert!(bodies(&a).contains(&("a".into(), 6)), "the smaller id wins");
        // Out-of-order input is refused rather than leaving a gap.
        let mut late = a.missing(&HashMap::new(), 100).unwrap();
        late.retain(|r| r.message.origin == "a");
        let c = open(dir.path(), "c");
        assert_eq!(c.ingest(late[1..].to_vec()).await.unwrap(), 0);
        assert!(c.high_water().is_empty());
    }
}
