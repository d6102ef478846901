//! The audit log (`audit.db`): append-only, hash-chained, per node, with the
//! leader keeping a copy of every node's chain.
//!
//! * Each node appends its records (logins, failed logins, token and
//!   certificate refusals, admin changes, joins and leaves, leader changes)
//!   to `local`. Record `n` carries the hash of record `n-1` and its own
//!   hash over (previous hash, origin, seq, time, kind, actor, detail), so
//!   changing, removing or reordering a record breaks the chain from there.
//! * A shipper sends new records to the current leader
//!   (`AppRequest::Audit`), which checks each link before it appends to
//!   `collected` (per origin) and answers how far it has that origin's
//!   chain; after a leader change the new leader is brought up to date the
//!   same way.
//! * [`verify_file`] (`core-node audit verify`) rechecks every chain in a
//!   file and names the first bad record of each.
//! * `GET /v1/audit` queries the leader's collection by time, actor, kind
//!   and origin.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::node::{AppReply, AppRequest, Node};

/// Audit database file name inside the data directory.
pub const AUDIT_DB: &str = "audit.db";
/// The previous hash of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records shipped (or answered) at once.
const BATCH: usize = 500;

/// One audit record (defined in `shared::proto`, since edges ship theirs).
pub use lanmesh_shared::proto::AuditRecord as Record;

/// A query of the collection (`GET /v1/audit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// From this time (Unix ms, inclusive).
    pub since_ms: Option<i64>,
    /// Before this time (Unix ms, exclusive).
    pub until_ms: Option<i64>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this origin node.
    pub origin: Option<String>,
    /// At most this many (default and cap 1000), oldest first.
    pub limit: Option<u32>,
}

/// This node's audit log.
pub struct AuditLog {
    origin: String,
    conn: Mutex<Connection>,
    appended: Notify,
    counter: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "origin, seq, ts_ms, kind, actor, detail, prev_hash, hash";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        origin: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        ts_ms: r.get(2)?,
        kind: r.get(3)?,
        actor: r.get(4)?,
        detail: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

fn schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS local (
             origin TEXT NOT NULL, seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,
             kind TEXT NOT NULL, actor TEXT NOT NULL, detail TEXT NOT NULL,
             prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS collected (
             origin TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
             kind TEXT NOT NULL, actor TEXT NOT NULL, detail TEXT NOT NULL,
             prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
             PRIMARY KEY (origin, seq));
         CREATE INDEX IF NOT EXISTS collected_by_time ON collected (ts_ms);",
    )
}

fn insert(conn: &Connection, table: &str, r: &Record) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO {table} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?
    .execute(params![
        r.origin,
        r.seq as i64,
        r.ts_ms,
        r.kind,
        r.actor,
        r.detail,
        r.prev_hash,
        r.hash
    ])?;
    Ok(())
}

fn last_of(
    conn: &Connection,
    table: &str,
    origin: &str,
) -> rusqlite::Result<Option<(u64, String)>> {
    conn.prepare_cached(&format!(
        "SELECT seq, hash FROM {table} WHERE origin = ?1 ORDER BY seq DESC LIMIT 1"
    ))?
    .query_row(params![origin], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
    })
    .optional()
}

impl AuditLog {
    /// Opens (creating) the log of node `origin`.
    pub fn open(path: &Path, origin: &str) -> io::Result<Self> {
        let conn = crate::raft::log_store::open_durable(path)?;
        // Appends are not fsynced one by one (WAL, synchronous=NORMAL): a
        // crash may lose the last instant's records but never corrupts a chain.
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(io::Error::other)?;
        schema(&conn).map_err(io::Error::other)?;
        Ok(AuditLog {
            origin: origin.to_owned(),
            conn: Mutex::new(conn),
            appended: Notify::new(),
            counter: std::sync::OnceLock::new(),
        })
    }

    /// Counts appended records in `counter` (the node's metrics).
    pub fn count_in(&self, counter: prometheus_client::metrics::counter::Counter) {
        let _ = self.counter.set(counter);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record. Never fails the caller: a disk error is logged.
    pub fn record(&self, kind: &str, actor: &str, detail: &str) {
        tracing::info!(target: "audit", kind, actor, detail, "audit");
        if let Err(e) = self.append(kind, actor, detail) {
            tracing::error!(error = %e, kind, actor, "could not append an audit record");
        }
    }

    fn append(&self, kind: &str, actor: &str, detail: &str) -> rusqlite::Result<Record> {
        let conn = self.lock();
        let (seq, prev_hash) = last_of(&conn, "local", &self.origin)?
            .map(|(s, h)| (s + 1, h))
            .unwrap_or((1, GENESIS.to_owned()));
        let mut r = Record {
            origin: self.origin.clone(),
            seq,
            ts_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            detail: detail.to_owned(),
            prev_hash,
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        insert(&conn, "local", &r)?;
        drop(conn);
        self.appended.notify_one();
        if let Some(c) = self.counter.get() {
            c.inc();
        }
        Ok(r)
    }

    /// This node's own records after `seq`, oldest first.
    pub fn local_after(&self, seq: u64, limit: usize) -> io::Result<Vec<Record>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM local WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))
            .map_err(io::Error::other)?;
        let rows = stmt
            .query_map(params![seq as i64, limit as i64], row)
            .map_err(io::Error::other)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(io::Error::other)
    }

    /// How far the collection holds `origin`'s chain.
    pub fn collected_upto(&self, origin: &str) -> io::Result<u64> {
        Ok(last_of(&self.lock(), "collected", origin)
            .map_err(io::Error::other)?
            .map(|(s, _)| s)
            .unwrap_or(0))
    }

    /// Appends `origin`'s records to the collection, checking each link;
    /// returns how far the collection now holds that chain.
    pub fn collect(&self, origin: &str, records: &[Record]) -> Result<u64, String> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        let (mut upto, mut prev) = last_of(&tx, "collected", origin)
            .map_err(|e| e.to_string())?
            .unwrap_or((0, GENESIS.to_owned()));
        for r in records {
            if r.origin != origin || r.seq <= upto {
                continue;
            }
            if r.seq != upto + 1 {
                break;
            }
            if r.prev_hash != prev || r.hash != r.compute_hash() {
                return Err(format!(
                    "audit record {origin}#{} does not chain onto #{upto}: refused",
                    r.seq
                ));
            }
            insert(&tx, "collected", r).map_err(|e| e.to_string())?;
            upto = r.seq;
            prev = r.hash.clone();
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(upto)
    }

    /// Queries the collection.
    pub fn query(&self, f: &Filter) -> io::Result<Vec<Record>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM collected
                 WHERE (?1 IS NULL OR ts_ms >= ?1) AND (?2 IS NULL OR ts_ms < ?2)
                   AND (?3 IS NULL OR actor = ?3) AND (?4 IS NULL OR kind = ?4)
                   AND (?5 IS NULL OR origin = ?5)
                 ORDER BY ts_ms, origin, seq LIMIT ?6"
            ))
            .map_err(io::Error::other)?;
        let limit = f.limit.unwrap_or(1000).min(1000);
        let rows = stmt
            .query_map(
                params![f.since_ms, f.until_ms, f.actor, f.kind, f.origin, limit],
                row,
            )
            .map_err(io::Error::other)?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(io::Error::other)
    }
}

/// One broken chain found by [`verify_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `local` (this node's own chain) or `collected`.
    pub table: &'static str,
    /// The chain's node.
    pub origin: String,
    /// The first bad record.
    pub seq: u64,
    /// What is wrong with it.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} chain of {}: record #{}: {}",
            self.table, self.origin, self.seq, self.what
        )
    }
}

/// What [`verify_file`] checked.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Records checked per (table, origin).
    pub chains: BTreeMap<(String, String), u64>,
    /// Broken chains (empty when all is well).
    pub problems: Vec<Problem>,
}

/// Rechecks every chain in an audit database.
pub fn verify_file(path: &Path) -> io::Result<Report> {
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        ));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(io::Error::other)?;
    let mut report = Report::default();
    for table in ["local", "collected"] {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM {table} ORDER BY origin, seq"
            ))
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        let rows = stmt.query_map([], row).map_err(io::Error::other)?;
        let mut last: Option<(String, u64, String)> = None;
        let mut broken: Option<String> = None;
        for r in rows {
            let r = r.map_err(io::Error::other)?;
            let (expect_seq, expect_prev) = match &last {
                Some((o, s, h)) if *o == r.origin => (s + 1, h.clone()),
                _ => (1, GENESIS.to_owned()),
            };
            if last.as_ref().is_none_or(|(o, _, _)| *o != r.origin) {
                broken = None;
            }
            *report
                .chains
                .entry((table.to_owned(), r.origin.clone()))
                .or_default() += 1;
            if broken.as_deref() != Some(r.origin.as_str()) {
                let what = if r.seq != expect_seq {
                    Some(format!(
                        "expected record #{expect_seq} here: records were removed or reordered"
                    ))
                } else if r.hash != r.compute_hash() {
                    Some(format!(
                        "contents changed ({} by {} at {} ms no longer match its hash)",
                        r.kind, r.actor, r.ts_ms
                    ))
                } else if r.prev_hash != expect_prev {
                    Some("does not chain onto the record before it".to_owned())
                } else {
                    None
                };
                if let Some(what) = what {
                    report.problems.push(Problem {
                        table,
                        origin: r.origin.clone(),
                        seq: r.seq,
                        what,
                    });
                    broken = Some(r.origin.clone());
                }
            }
            last = Some((r.origin.clone(), r.seq, r.hash.clone()));
        }
    }
    Ok(report)
}

/// How often the shipper looks for new records when nothing wakes it.
const SHIP_EVERY: Duration = Duration::from_secs(1);

/// Ships this node's records to the current leader until `shutdown`.
pub async fn ship(node: Arc<Node>, shutdown: CancellationToken) {
    let audit = node.audit().clone();
    // (leader, how far it holds our chain), once it told us.
    let mut known: Option<(String, u64)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = audit.appended.notified() => {}
            _ = tokio::time::sleep(SHIP_EVERY) => {}
        }
        let Some(leader) = node.raft_metrics().current_leader else {
            continue;
        };
        if leader.0 == node.id() {
            // We are the leader: collect our own chain directly.
            let upto = audit.collected_upto(node.id()).unwrap_or(0);
            if let Ok(batch) = audit.local_after(upto, BATCH)
                && let Err(e) = audit.collect(node.id(), &batch)
            {
                tracing::error!(error = %e, "collecting this node's own audit chain failed");
            }
            known = None;
            continue;
        }
        let Some(addr) = node
            .other_cores()
            .into_iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, a)| a)
        else {
            continue;
        };
        let records = match &known {
            Some((l, upto)) if *l == leader.0 => match audit.local_after(*upto, BATCH) {
                Ok(r) if r.is_empty() => continue,
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the audit log failed");
                    continue;
                }
            },
            // Ask first how far the (new) leader has our chain.
            _ => Vec::new(),
        };
        let more = records.len() == BATCH;
        let req = AppRequest::Audit {
            origin: node.id().to_owned(),
            records,
        };
        match node
            .call_core(&leader, &addr, req, Duration::from_secs(5))
            .await
        {
            Ok(AppReply::AuditUpto(upto)) => {
                known = Some((leader.0.clone(), upto));
                if more || audit.local_after(upto, 1).is_ok_and(|r| !r.is_empty()) {
                    audit.appended.notify_one();
                }
            }
            Ok(other) => {
                tracing::warn!(leader = %leader.0, answer = ?other, "the leader refused audit records");
                known = None;
            }
            Err(e) => {
                tracing::debug!(leader = %leader.0, error = %e, "shipping audit records failed");
                known = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_collect_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let a = AuditLog::open(&dir.path().join("a.db"), "a").unwrap();
        let leader = AuditLog::open(&dir.path().join("l.db"), "l").unwrap();
        for i in 0..5 {
            a.record("login", &format!("user{i}"), "from 10.0.0.1");
        }
        let recs = a.local_after(0, 100).unwrap();
        assert_eq!(recs.len(), 5);
        // Partial, repeated and out-of-order deliveries all converge.
        assert_eq!(leader.collect("a", &recs[..2]).unwrap(), 2);
        assert_eq!(leader.collect("a", &recs[4..]).unwrap(), 2);
        assert_eq!(leader.collect("a", &recs).unwrap(), 5);
        // A forged record is refused.
        let mut forged = a.local_after(0, 100).unwrap();
        a.record("login", "user5", "x");
        let mut next = a.local_after(5, 1).unwrap();
        next[0].actor = "mallory".into();
        forged.extend(next);
        assert!(leader.collect("a", &forged).is_err());

        let q = leader
            .query(&Filter {
                actor: Some("user3".into()),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(q.len(), 1);
        drop((a, leader));

        let ok = verify_file(&dir.path().join("l.db")).unwrap();
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!(ok.chains[&("collected".into(), "a".into())], 5);

        // Change a record, then remove one, in the file itself.
        let c = Connection::open(dir.path().join("a.db")).unwrap();
        c.execute("UPDATE local SET detail = 'edited' WHERE seq = 3", [])
            .unwrap();
        let r = verify_file(&dir.path().join("a.db")).unwrap();
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].seq, 3);
        assert!(r.problems[0].what.contains("contents changed"));
        let c = Connection::open(dir.path().join("l.db")).unwrap();
        c.execute("DELETE FROM collected WHERE seq = 2", [])
            .unwrap();
        let r = verify_file(&dir.path().join("l.db")).unwrap();
        assert_eq!((r.problems[0].seq, r.problems[0].origin.as_str()), (3, "a"));
        assert!(r.problems[0].what.contains("removed or reordered"));
    }
}
