//! Raft log storage in SQLite (`raft.db`): the log, the vote and the id of the
//! last purged entry.
//!
//! Durability with group commit: each batch openraft hands to
//! [`append`](RaftLogStorage::append) is one SQLite transaction committed to
//! the WAL *without* fsync (so the entries are readable when `append`
//! returns and replication can start at once), and its flush callback goes to
//! a flusher thread. The flusher fsyncs the WAL file once for every callback
//! queued behind it and only then completes those callbacks, in order. The WAL
//! is sequential, so one fsync makes every earlier commit durable — including
//! truncations and purges, which need no fsync of their own (an unflushed
//! truncation can only be lost together with the appends after it). The vote
//! is committed and fsynced before `save_vote` returns. SQLite work runs on
//! the blocking pool so it never stalls the async runtime.
//!
//! The state machine lives in a separate file (`state.db`, see
//! `state_machine`) so that a snapshot can be a plain copy of it.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Entry, LogId, TypeConfig, Vote, decode, encode};

/// The log store. Cheap to clone; clones share the database connection, so a
/// reader handed out before an append sees the appended entries.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// How many of the newest entries are kept in memory: replication reads the
/// tail of the log, and serving it from memory saves a blocking-pool hop, a
/// query and a decode per batch.
const TAIL_CACHE_ENTRIES: usize = 8192;

/// The newest entries, always a suffix of the log (trimmed only at the front,
/// cut back on truncation), so a read starting inside it is complete.
#[derive(Default)]
struct TailCache {
    entries: std::collections::BTreeMap<u64, Entry>,
}

impl TailCache {
    fn append(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            // Entries at or after the first new index are being replaced.
            self.entries.split_off(&first.log_id.index);
        }
        for e in entries {
            self.entries.insert(e.log_id.index, e.clone());
        }
        while self.entries.len() > TAIL_CACHE_ENTRIES {
            self.entries.pop_first();
        }
    }

    fn truncate_after(&mut self, after: Option<u64>) {
        match after {
            Some(i) => {
                self.entries.split_off(&(i + 1));
            }
            None => self.entries.clear(),
        }
    }

    fn purge(&mut self, upto: u64) {
        self.entries = self.entries.split_off(&(upto + 1));
    }

    /// The entries in `[start, end)` if the cache holds that whole range.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = *self.entries.keys().next()?;
        (start >= first).then(|| {
            self.entries
                .range(start..end)
                .map(|(_, e)| e.clone())
                .collect()
        })
    }
}

struct Inner {
    cache: Mutex<TailCache>,
    conn: Mutex<Connection>,
    fsync: Option<Histogram>,
    wal: PathBuf,
    flusher: Mutex<std::sync::mpsc::Sender<IOFlushed<TypeConfig>>>,
}

/// fsyncs the WAL file (durably recording every commit made so far).
fn sync_wal(wal: &Path, fsync: Option<&Histogram>) -> io::Result<()> {
    let started = Instant::now();
    match std::fs::File::open(wal) {
        Ok(f) => f.sync_data()?,
        // No WAL yet means nothing was written yet.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(h) = fsync {
        h.observe(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The group-commit loop: wait for one callback, take every other one that is
/// already queued, fsync once, complete them all in arrival order.
fn flusher(
    wal: PathBuf,
    fsync: Option<Histogram>,
    rx: std::sync::mpsc::Receiver<IOFlushed<TypeConfig>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = sync_wal(&wal, fsync.as_ref());
        if let Err(e) = &result {
            tracing::error!(error = %e, wal = %wal.display(), "cannot fsync the Raft log; stopping Raft");
        }
        for cb in batch {
            cb.io_completed(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// Opens a SQLite file for durable Raft state: WAL, `synchronous=FULL`,
/// checked by reading the journal mode back.
pub fn open_durable(path: &Path) -> io::Result<Connection> {
    let conn = Connection::open(path).map_err(io::Error::other)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(io::Error::other)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(io::Error::other(format!(
            "{}: cannot switch to WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
        .map_err(io::Error::other)?;
    Ok(conn)
}

impl LogStore {
    /// Opens (creating if needed) the log database at `path`. `fsync` observes
    /// the duration of every durable commit.
    pub fn open(path: &Path, fsync: Option<Histogram>) -> io::Result<Self> {
        let conn = open_durable(path)?;
        // Commits go to the WAL without fsync; the flusher (appends) and
        // save_vote (inline) make them durable. See the module docs.
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS raft_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )
        .map_err(io::Error::other)?;
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (flush_wal, flush_hist) = (wal.clone(), fsync.clone());
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(flush_wal, flush_hist, rx))?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                cache: Mutex::new(TailCache::default()),
                conn: Mutex::new(conn),
                fsync,
                wal,
                flusher: Mutex::new(tx),
            }),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, Option<&Histogram>) -> io::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, inner.fsync.as_ref())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Writes the state a restored backup starts from: everything up to
    /// `last` counts as purged (it lives in the restored state machine).
    pub fn seed_purged(path: &Path, last: &LogId) -> io::Result<()> {
        let store = Self::open(path, None)?;
        let conn = store.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
        put_meta(&conn, "purged", &encode(last)?).map_err(io::Error::other)
    }
}

fn get_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM raft_meta WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()
}

fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO raft_meta (key, value) VALUES (?1, ?2)")?
        .execute(params![key, value])?;
    Ok(())
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let start = match range.start_bound() {
        Bound::Included(s) => clamp(*s),
        Bound::Excluded(s) => clamp(s.saturating_add(1)),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => clamp(e.saturating_add(1)),
        Bound::Excluded(e) => clamp(*e),
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

fn timed<T>(fsync: Option<&Histogram>, f: impl FnOnce() -> rusqlite::Result<T>) -> io::Result<T> {
    let started = Instant::now();
    let out = f().map_err(io::Error::other)?;
    if let Some(h) = fsync {
        h.observe(started.elapsed().as_secs_f64());
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        if let Some(hit) = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(start as u64, end as u64)
        {
            return Ok(hit);
        }
        self.with_conn(move |conn, _| {
            let mut stmt = conn
                .prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")
                .map_err(io::Error::other)?;
            let rows = stmt
                .query_map(params![start, end], |r| r.get::<_, Vec<u8>>(0))
                .map_err(io::Error::other)?;
            let mut out = Vec::new();
            for blob in rows {
                out.push(decode(&blob.map_err(io::Error::other)?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.with_conn(|conn, _| {
            get_meta(conn, "vote")
                .map_err(io::Error::other)?
                .map(|b| decode(&b))
                .transpose()
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        self.with_conn(|conn, _| {
            let purged: Option<LogId> = get_meta(conn, "purged")
                .map_err(io::Error::other)?
                .map(|b| decode(&b))
                .transpose()?;
            let last: Option<Entry> = conn
                .prepare_cached("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")
                .map_err(io::Error::other)?
                .query_row([], |r| r.get::<_, Vec<u8>>(0))
                .optional()
                .map_err(io::Error::other)?
                .map(|b| decode(&b))
                .transpose()?;
            let last_log_id = last.map(|e| e.log_id).or_else(|| purged.clone());
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode(vote)?;
        let wal = self.inner.wal.clone();
        self.with_conn(move |conn, fsync| {
            put_meta(conn, "vote", &bytes).map_err(io::Error::other)?;
            // Durable before returning (and after every earlier commit).
            sync_wal(&wal, fsync)
        })
        .await
    }

    /// The committed log id, so a restarted node re-applies everything it
    /// knew to be committed before it serves reads. Written without its own
    /// fsync: it rides along with the next flush, and a stale value after a
    /// crash only means re-applying a little less at start.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let Some(committed) = committed else {
            return Ok(());
        };
        let bytes = encode(&committed)?;
        self.with_conn(move |conn, _| put_meta(conn, "committed", &bytes).map_err(io::Error::other))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.with_conn(|conn, _| {
            get_meta(conn, "committed")
                .map_err(io::Error::other)?
                .map(|b| decode(&b))
                .transpose()
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let rows = entries
            .iter()
            .map(|e| Ok((e.log_id.index, encode(e)?)))
            .collect::<io::Result<Vec<_>>>()?;
        let result = self
            .with_conn(move |conn, _| {
                let tx = conn.transaction().map_err(io::Error::other)?;
                {
                    let mut stmt = tx
                        .prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")
                        .map_err(io::Error::other)?;
                    for (idx, blob) in &rows {
                        stmt.execute(params![*idx as i64, blob])
                            .map_err(io::Error::other)?;
                    }
                }
                tx.commit().map_err(io::Error::other)
            })
            .await;
        match result {
            Ok(()) => {
                self.inner
                    .cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&entries);
                // Readable now; durable once the flusher has fsynced.
                let queued = self
                    .inner
                    .flusher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(callback);
                if let Err(std::sync::mpsc::SendError(callback)) = queued {
                    callback.io_completed(Err(io::Error::other("log flusher stopped")));
                }
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .truncate_after(last_log_id.as_ref().map(|l| l.index));
        let after = last_log_id.map(|l| l.index as i64).unwrap_or(-1);
        self.with_conn(move |conn, fsync| {
            timed(fsync, || {
                conn.execute("DELETE FROM log WHERE idx > ?1", params![after])
                    .map(|_| ())
            })
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .purge(log_id.index);
        let bytes = encode(&log_id)?;
        let upto = log_id.index as i64;
        self.with_conn(move |conn, _| {
            let purge = |conn: &mut Connection| -> rusqlite::Result<()> {
                let tx = conn.transaction()?;
                put_meta(&tx, "purged", &bytes)?;
                tx.execute("DELETE FROM log WHERE idx <= ?1", params![upto])?;
                tx.commit()
            };
            purge(conn).map_err(io::Error::other)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::blank_ent;

    use crate::raft::NodeName;

    fn idx(v: &[Entry]) -> Vec<u64> {
        v.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn tail_cache_stays_a_suffix_of_the_log() {
        let mut c = TailCache::default();
        assert!(c.get(0, 10).is_none(), "empty cache answers nothing");
        let ents: Vec<Entry> = (5..10)
            .map(|i| blank_ent::<TypeConfig>(1, NodeName::from(1u64), i))
            .collect();
        c.append(&ents);
        assert!(
            c.get(4, 8).is_none(),
            "a range starting before the cache goes to disk"
        );
        assert_eq!(idx(&c.get(6, 20).unwrap()), vec![6, 7, 8, 9]);
        // Re-appending from 8 replaces 8.. and drops 9.
        c.append(&[blank_ent::<TypeConfig>(2, NodeName::from(1u64), 8)]);
        assert_eq!(idx(&c.get(5, 20).unwrap()), vec![5, 6, 7, 8]);
        c.truncate_after(Some(6));
        assert_eq!(idx(&c.get(5, 20).unwrap()), vec![5, 6]);
        c.purge(5);
        assert!(c.get(5, 20).is_none());
        assert_eq!(idx(&c.get(6, 20).unwrap()), vec![6]);
        c.truncate_after(None);
        assert!(c.get(0, 100).is_none());
        let many: Vec<Entry> = (0..(TAIL_CACHE_ENTRIES as u64 + 10))
            .map(|i| blank_ent::<TypeConfig>(1, NodeName::from(1u64), i))
            .collect();
        c.append(&many);
        assert!(c.get(0, 5).is_none(), "oldest entries were evicted");
        assert_eq!(c.get(10, 12).map(|v| idx(&v)), Some(vec![10, 11]));
    }
}
