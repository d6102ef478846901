//! Raft log storage in SQLite (`raft.db`): the log, the vote and the id of the
//! last purged entry.
//!
//! Durability: WAL mode with `synchronous=FULL`, one transaction (so one
//! fsync) per batch openraft hands to [`append`](RaftLogStorage::append), and
//! the flush callback is called only after that commit. The vote is committed
//! the same way before `save_vote` returns. SQLite work runs on the blocking
//! pool so an fsync never stalls the async runtime.
//!
//! The state machine lives in a separate file (`state.db`, see
//! `state_machine`) so that a snapshot can be a plain copy of it.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
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

struct Inner {
    conn: Mutex<Connection>,
    fsync: Option<Histogram>,
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS raft_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )
        .map_err(io::Error::other)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                fsync,
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
                .query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                    r.get::<_, Vec<u8>>(0)
                })
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
        self.with_conn(move |conn, fsync| timed(fsync, || put_meta(conn, "vote", &bytes)))
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
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e)?)))
            .collect::<io::Result<Vec<_>>>()?;
        let result = self
            .with_conn(move |conn, fsync| {
                timed(fsync, || {
                    let tx = conn.transaction()?;
                    {
                        let mut stmt = tx.prepare_cached(
                            "INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)",
                        )?;
                        for (idx, blob) in &rows {
                            stmt.execute(params![*idx as i64, blob])?;
                        }
                    }
                    tx.commit()
                })
            })
            .await;
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
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
        let bytes = encode(&log_id)?;
        let upto = log_id.index as i64;
        self.with_conn(move |conn, fsync| {
            timed(fsync, || {
                let tx = conn.transaction()?;
                put_meta(&tx, "purged", &bytes)?;
                tx.execute("DELETE FROM log WHERE idx <= ?1", params![upto])?;
                tx.commit()
            })
        })
        .await
    }
}
