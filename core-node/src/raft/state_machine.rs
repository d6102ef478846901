//! The replicated state machine in SQLite (`state.db`), and its snapshots.
//!
//! * `apply` runs each batch of entries in one transaction that also records
//!   the last applied log id and membership (`sm_meta`), so the state and the
//!   point it reflects are never out of step, even after `kill -9`.
//! * `state.db` commits without fsync (`synchronous=NORMAL`): the Raft log is
//!   the durable record of every acknowledged write. A crash can only roll the
//!   state back to an earlier consistent point, from which openraft re-applies
//!   the log; if that point is older than the last purge, openraft installs
//!   the current snapshot, which *is* fsynced. This takes one fsync off every
//!   write.
//! * A snapshot is a consistent copy of `state.db` made with SQLite's online
//!   backup API from a separate read connection, so applies and reads go on
//!   while it is copied; the applied position it covers is read from the copy
//!   itself. The current snapshot is kept as `snapshots/current.db` plus
//!   `current.meta` and survives restarts.
//! * Installing a snapshot writes the received file, checks it, then swaps it
//!   in for `state.db` by rename while the connection is closed.
//!
//! The API reads the same tables through [`StateMachine::query`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{Stream, TryStreamExt};
use lanmesh_shared::tls::RevokedSerials;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rusqlite::{Connection, OptionalExtension, params};

use super::log_store::open_durable;
use super::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, decode, encode};
use crate::metrics::Metrics;
use crate::store::{self, Applied, Command};

/// State database file name inside the data directory.
pub const STATE_DB: &str = "state.db";
const SNAPSHOT_DIR: &str = "snapshots";

/// The state machine handle. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct Shared {
    dir: PathBuf,
    conn: Mutex<Connection>,
    /// Serializes snapshot file operations (build vs install).
    snapshot_files: Mutex<()>,
    metrics: Option<Arc<Metrics>>,
    revoked: RevokedSerials,
    /// Channel name -> replication, loaded on demand; `None` after any
    /// channel change (or snapshot install) until the next lookup.
    channels: Mutex<Option<std::collections::HashMap<String, String>>>,
    /// How many revisions of change history to keep (`raft.changes_retained`).
    changes_retained: std::sync::atomic::AtomicU64,
    /// Where messages of Raft-replicated channels go once applied.
    publish:
        std::sync::OnceLock<tokio::sync::broadcast::Sender<Arc<lanmesh_shared::proto::Message>>>,
}

fn open_state(path: &Path) -> io::Result<Connection> {
    let conn = open_durable(path)?;
    // See the module docs for why the state may commit without fsync.
    conn.execute_batch("PRAGMA synchronous=NORMAL;")
        .map_err(io::Error::other)?;
    store::init_schema(&conn).map_err(io::Error::other)?;
    Ok(conn)
}

/// Copies the database at `src` to `dest` in one read transaction (a
/// consistent point in time) without blocking writers, and fsyncs the copy.
fn consistent_copy(src: &Path, dest: &Path) -> io::Result<()> {
    use rusqlite::backup::{Backup, StepResult};
    let _ = std::fs::remove_file(dest);
    {
        let from = Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(io::Error::other)?;
        from.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(io::Error::other)?;
        let mut to = Connection::open(dest).map_err(io::Error::other)?;
        let backup = Backup::new(&from, &mut to).map_err(io::Error::other)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            // -1: all pages in one step, so the copy is one point in time.
            match backup.step(-1).map_err(io::Error::other)? {
                StepResult::Done => break,
                _ if Instant::now() > deadline => {
                    return Err(io::Error::other(
                        "state copy kept being interrupted for 60 s",
                    ));
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
    std::fs::File::open(dest)?.sync_all()
}

fn meta_get(conn: &Connection, key: &str) -> io::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT value FROM sm_meta WHERE key = ?1",
        params![key],
        |r| r.get(0),
    )
    .optional()
    .map_err(io::Error::other)
}

fn meta_put(conn: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO sm_meta (key, value) VALUES (?1, ?2)")?
        .execute(params![key, value])?;
    Ok(())
}

fn applied_state(conn: &Connection) -> io::Result<(Option<LogId>, StoredMembership)> {
    let last = meta_get(conn, "last_applied")?
        .map(|b| decode(&b))
        .transpose()?;
    let membership = meta_get(conn, "last_membership")?
        .map(|b| decode(&b))
        .transpose()?
        .unwrap_or_default();
    Ok((last, membership))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl StateMachine {
    /// Opens (creating if needed) the state machine in `dir`. Revoked serials
    /// found in the state are loaded into `revoked`, and kept in step with it.
    pub fn open(
        dir: &Path,
        metrics: Option<Arc<Metrics>>,
        revoked: RevokedSerials,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir.join(SNAPSHOT_DIR))?;
        let conn = open_state(&dir.join(STATE_DB))?;
        revoked.replace(store::revoked(&conn).map_err(io::Error::other)?);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                conn: Mutex::new(conn),
                snapshot_files: Mutex::new(()),
                metrics,
                revoked,
                publish: std::sync::OnceLock::new(),
                channels: Mutex::new(None),
                changes_retained: std::sync::atomic::AtomicU64::new(store::CHANGES_RETAINED),
            }),
        })
    }

    /// Sends every newly applied message of a Raft-replicated channel to `tx`
    /// (this node's subscribers).
    pub fn publish_to(
        &self,
        tx: tokio::sync::broadcast::Sender<Arc<lanmesh_shared::proto::Message>>,
    ) {
        let _ = self.shared.publish.set(tx);
    }

    /// A channel's replication (`"raft"` or `"anti-entropy"`), or `None` if
    /// there is no such channel. Served from memory between channel changes:
    /// posts look this up on every message.
    pub fn channel_replication(&self, name: &str) -> io::Result<Option<String>> {
        let mut cache = self
            .shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.is_none() {
            let all = self.query(|c| store::registry_list(c, store::Registry::Channels))?;
            *cache = Some(
                all.into_iter()
                    .map(|e| {
                        let r = e.data["replication"]
                            .as_str()
                            .unwrap_or("anti-entropy")
                            .to_owned();
                        (e.name, r)
                    })
                    .collect(),
            );
        }
        Ok(cache.as_ref().and_then(|m| m.get(name).cloned()))
    }

    fn forget_channels(&self) {
        *self
            .shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sets how many revisions of change history to keep.
    pub fn set_changes_retained(&self, n: u64) {
        self.shared
            .changes_retained
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `f` and reads the applied log index under the same lock, so the
    /// result is exactly the state at that index.
    pub fn query_applied<T>(
        &self,
        f: impl FnOnce(&Connection, u64) -> rusqlite::Result<T>,
    ) -> io::Result<(T, u64)> {
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        let applied = applied_state(&conn)?.0.map(|l| l.index).unwrap_or(0);
        let v = f(&conn, applied).map_err(io::Error::other)?;
        Ok((v, applied))
    }

    /// Whether a certificate serial was revoked through the cluster.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.shared.revoked.contains(serial)
    }

    /// Runs a read-only query against the current state.
    pub fn query<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> io::Result<T> {
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(io::Error::other)
    }

    /// The last applied log id and membership as stored.
    pub fn stored_applied_state(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        applied_state(&conn)
    }

    /// A consistent copy of the state, as SQLite database bytes (for backups).
    pub fn copy_state(&self) -> io::Result<Vec<u8>> {
        let tmp = self
            .shared
            .dir
            .join(SNAPSHOT_DIR)
            .join(format!("backup-{}.db", std::process::id()));
        let copied = consistent_copy(&self.shared.dir.join(STATE_DB), &tmp)
            .and_then(|()| std::fs::read(&tmp));
        let _ = std::fs::remove_file(&tmp);
        copied
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

impl Shared {
    fn snapshot_paths(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.join(SNAPSHOT_DIR);
        (d.join("current.db"), d.join("current.meta"))
    }

    /// Makes the (synced) database file `file` the current snapshot: data
    /// first, then the meta file that makes it visible.
    fn save_current(&self, meta: &SnapshotMeta, file: &Path) -> io::Result<()> {
        let (db, meta_path) = self.snapshot_paths();
        let dir = self.dir.join(SNAPSHOT_DIR);
        let tmp_meta = dir.join("current.meta.tmp");
        std::fs::rename(file, &db)?;
        write_synced(&tmp_meta, &encode(meta)?)?;
        std::fs::rename(&tmp_meta, &meta_path)?;
        sync_dir(&dir);
        Ok(())
    }

    fn build(&self) -> io::Result<Snapshot> {
        let _files = self
            .snapshot_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let tmp = self.dir.join(SNAPSHOT_DIR).join("building.db");
        consistent_copy(&self.dir.join(STATE_DB), &tmp)?;
        let (last_log_id, last_membership) = {
            let copy = Connection::open(&tmp).map_err(io::Error::other)?;
            applied_state(&copy)?
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        self.save_current(&meta, &tmp)?;
        let bytes = std::fs::read(self.snapshot_paths().0)?;
        tracing::info!(
            last_log_id = ?meta.last_log_id.as_ref().map(|l| l.index),
            bytes = bytes.len(),
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: bytes,
        })
    }

    fn install(&self, meta: &SnapshotMeta, bytes: &[u8]) -> io::Result<()> {
        let _files = self
            .snapshot_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = self.dir.join(SNAPSHOT_DIR);
        let incoming = dir.join("incoming.db");
        let _ = std::fs::remove_file(&incoming);
        write_synced(&incoming, bytes)?;
        {
            // Check it is a usable state database and stamp the meta it stands for.
            let c = open_state(&incoming)?;
            let ok: String = c
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(io::Error::other)?;
            if ok != "ok" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received snapshot fails quick_check: {ok}"),
                ));
            }
            if let Some(l) = &meta.last_log_id {
                meta_put(&c, "last_applied", &encode(l)?).map_err(io::Error::other)?;
            }
            meta_put(&c, "last_membership", &encode(&meta.last_membership)?)
                .map_err(io::Error::other)?;
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(io::Error::other)?;
        }
        let state = self.dir.join(STATE_DB);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // Close the old database (its WAL is checkpointed and removed on close),
        // then swap the file in.
        *conn = Connection::open_in_memory().map_err(io::Error::other)?;
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
        }
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", incoming.display()));
        }
        std::fs::rename(&incoming, &state)?;
        sync_dir(&self.dir);
        *conn = open_state(&state)?;
        self.revoked
            .replace(store::revoked(&conn).map_err(io::Error::other)?);
        drop(conn);
        let copy = dir.join("installed.db.tmp");
        write_synced(&copy, bytes)?;
        self.save_current(meta, &copy)?;
        tracing::info!(
            last_log_id = ?meta.last_log_id.as_ref().map(|l| l.index),
            bytes = bytes.len(),
            "installed snapshot"
        );
        Ok(())
    }

    fn current(&self) -> io::Result<Option<Snapshot>> {
        let _files = self
            .snapshot_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (db, meta_path) = self.snapshot_paths();
        if !meta_path.exists() {
            return Ok(None);
        }
        let meta: SnapshotMeta = decode(&std::fs::read(&meta_path)?)?;
        let snapshot = std::fs::read(&db)?;
        Ok(Some(Snapshot { meta, snapshot }))
    }

    /// Applies a batch in one transaction; returns the response for each entry.
    fn apply_batch(
        &self,
        batch: &[(LogId, Option<&Command>, Option<StoredMembership>)],
    ) -> io::Result<Vec<Applied>> {
        let started = Instant::now();
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(io::Error::other)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut last = None;
        let mut membership = None;
        let mut revoked = Vec::new();
        let mut posted = Vec::new();
        let mut channels_changed = false;
        for (log_id, cmd, m) in batch {
            let applied = match cmd {
                Some(cmd) => {
                    if let Command::Revoke { serial } = cmd {
                        revoked.push(serial.clone());
                    }
                    if let Command::RegistryPut {
                        registry: store::Registry::Channels,
                        ..
                    }
                    | Command::RegistryDelete {
                        registry: store::Registry::Channels,
                        ..
                    } = cmd
                    {
                        channels_changed = true;
                    }
                    let applied = store::apply(&tx, log_id.index, cmd).map_err(io::Error::other)?;
                    if let (
                        Command::ChannelPost {
                            channel,
                            sender,
                            ts_ms,
                            body,
                            ..
                        },
                        true,
                    ) = (cmd, applied.changed)
                    {
                        posted.push(lanmesh_shared::proto::Message {
                            origin: store::RAFT_ORIGIN.to_owned(),
                            seq: log_id.index,
                            pos: log_id.index,
                            channel: channel.clone(),
                            sender: sender.clone(),
                            ts_ms: *ts_ms,
                            body: body.clone(),
                        });
                    }
                    applied
                }
                None => Applied {
                    revision: log_id.index,
                    changed: false,
                },
            };
            if m.is_some() {
                membership = m.clone();
            }
            last = Some(log_id);
            out.push(applied);
        }
        if let Some(l) = last {
            meta_put(&tx, "last_applied", &encode(l)?).map_err(io::Error::other)?;
            let first = batch.first().map(|(f, _, _)| f.index).unwrap_or(l.index);
            let retained = self
                .changes_retained
                .load(std::sync::atomic::Ordering::Relaxed);
            let every = store::TRIM_EVERY.min(retained.max(1));
            // Trim when this batch crosses a multiple of `every` (the first
            // entry of a batch is one past the previous applied index).
            if first.saturating_sub(1) / every != l.index / every {
                store::trim_changes(&tx, l.index, retained).map_err(io::Error::other)?;
            }
        }
        if let Some(m) = &membership {
            meta_put(&tx, "last_membership", &encode(m)?).map_err(io::Error::other)?;
        }
        tx.commit().map_err(io::Error::other)?;
        drop(conn);
        if channels_changed {
            *self.channels.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        for s in &revoked {
            self.revoked.insert(s);
        }
        if let Some(tx) = self.publish.get() {
            for m in posted {
                let _ = tx.send(Arc::new(m));
            }
        }
        if let Some(m) = &self.metrics {
            m.fsync_seconds.observe(started.elapsed().as_secs_f64());
            m.applied_entries.inc_by(batch.len() as u64);
        }
        Ok(out)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.blocking(|s| applied_state(&s.conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Drain the whole batch first: it is applied in one transaction.
        let mut batch = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push((entry, responder));
        }
        if batch.is_empty() {
            return Ok(());
        }
        let (rows, responders): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(entry, responder)| {
                let (cmd, membership) = match entry.payload {
                    EntryPayload::Blank => (None, None),
                    EntryPayload::Normal(cmd) => (Some(cmd), None),
                    EntryPayload::Membership(m) => (
                        None,
                        Some(StoredMembership::new(Some(entry.log_id.clone()), m)),
                    ),
                };
                ((entry.log_id, cmd, membership), responder)
            })
            .unzip();
        let results = self
            .blocking(move |s| {
                let view: Vec<_> = rows
                    .iter()
                    .map(|(l, c, m)| (l.clone(), c.as_ref(), m.clone()))
                    .collect();
                s.apply_batch(&view)
            })
            .await?;
        // Every responder is answered, or its writer would wait forever.
        for (responder, applied) in responders.into_iter().zip(results) {
            if let Some(r) = responder {
                r.send(applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let meta = meta.clone();
        let r = self.blocking(move |s| s.install(&meta, &snapshot)).await;
        self.forget_channels();
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.blocking(|s| s.current()).await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        self.blocking(|s| s.build()).await
    }
}
