//! The replicated data model: the commands that go through the Raft log and
//! the SQLite tables they change.
//!
//! This module is plain SQL over a `rusqlite::Connection`, with no Raft in it:
//! `raft::state_machine` calls [`apply`] inside the transaction that also
//! records the applied log id, and the API reads through the query functions.
//! Every change records its revision (the Raft log index of the command) in
//! the row and in the `changes` table, so a change feed can resume from a
//! revision (the edge issue builds on that).

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

/// The registries kept in the state machine besides KV and members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    /// Messaging channels.
    Channels,
    /// Devices.
    Devices,
    /// Users / identities (password hashes, never returned by the API).
    Users,
    /// Edge sites.
    Edges,
}

impl Registry {
    /// Every registry, in URL order.
    pub const ALL: [Registry; 4] = [
        Registry::Channels,
        Registry::Devices,
        Registry::Users,
        Registry::Edges,
    ];

    /// The name used in URLs (`/v1/<name>`) and in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Registry::Channels => "channels",
            Registry::Devices => "devices",
            Registry::Users => "users",
            Registry::Edges => "edges",
        }
    }

    /// Parses a URL segment.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A cluster member's metadata (the Raft membership holds the voting set; this
/// table holds what operators want to see about each node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node id (`node-1`).
    pub id: String,
    /// `core` (edges register in the edges registry, not here).
    pub role: String,
    /// Raft (QUIC) address.
    pub raft_addr: String,
    /// Admin API address.
    pub api_addr: String,
    /// Client protocol address.
    pub client_addr: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A change to the replicated state. Serialized into the Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Set a config key.
    KvPut {
        /// Key.
        key: String,
        /// Raw value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Delete a config key.
    KvDelete {
        /// Key.
        key: String,
    },
    /// Create or replace a registry entry.
    RegistryPut {
        /// Which registry.
        registry: Registry,
        /// Entry name.
        name: String,
        /// Entry data (JSON text; validated by the API before proposing).
        data: String,
    },
    /// Delete a registry entry.
    RegistryDelete {
        /// Which registry.
        registry: Registry,
        /// Entry name.
        name: String,
    },
    /// Record or update a member's metadata.
    SetMember(Member),
    /// Forget a member's metadata (after it left the Raft membership).
    RemoveMember {
        /// Node id.
        id: String,
    },
    /// Add a revoked certificate serial.
    Revoke {
        /// Serial, normalized hex.
        serial: String,
    },
    /// A message to a channel with `replication = "raft"`: its id is the
    /// log index, so every node has one total order. A repeated
    /// `(sender, idem)` stores nothing and answers the first one's index.
    ChannelPost {
        /// Channel.
        channel: String,
        /// Logged-in sender.
        sender: String,
        /// Timestamp chosen by the accepting node (Unix ms).
        ts_ms: i64,
        /// Body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// The client's idempotency key.
        idem: String,
    },
    /// Set once at bootstrap: the cluster id and the token-signing key.
    Bootstrap {
        /// Cluster id.
        cluster_id: String,
        /// Ed25519 private key, PKCS#8 DER.
        #[serde(with = "serde_bytes")]
        token_key: Vec<u8>,
    },
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Applied {
    /// The revision (log index) of the change.
    pub revision: u64,
    /// False when the command changed nothing (delete of an absent key, a
    /// second bootstrap).
    pub changed: bool,
}

/// How many revisions of history the `changes` table keeps. A change feed
/// resuming from an older revision gets a full copy instead.
pub const CHANGES_RETAINED: u64 = 100_000;
/// Trimming runs when the applied index crosses a multiple of this.
pub const TRIM_EVERY: u64 = 4096;

/// Drops change records more than `retained` revisions old and remembers
/// the horizon (changes at or below it may be gone). It depends only on
/// `applied` and the configured retention (`raft.changes_retained`, the same
/// on every core), so replicas trim alike.
pub fn trim_changes(tx: &Transaction<'_>, applied: u64, retained: u64) -> rusqlite::Result<()> {
    if let Some(horizon) = applied.checked_sub(retained) {
        tx.prepare_cached("DELETE FROM changes WHERE revision <= ?1")?
            .execute(params![horizon as i64])?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO sm_meta (key, value) VALUES ('changes_horizon', ?1)",
        )?
        .execute(params![horizon.to_string().into_bytes()])?;
    }
    Ok(())
}

/// Changes at or below this revision may have been trimmed.
pub fn changes_horizon(conn: &Connection) -> rusqlite::Result<u64> {
    let v: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM sm_meta WHERE key = 'changes_horizon'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|b| String::from_utf8(b).ok()?.parse().ok())
        .unwrap_or(0))
}

/// A registry entry's data as an edge may cache it (no password hash).
fn public_data(kind: &str, data: String) -> String {
    if kind != Registry::Users.as_str() {
        return data;
    }
    match serde_json::from_str::<serde_json::Value>(&data) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("password_hash");
            }
            v.to_string()
        }
        Err(_) => "{}".into(),
    }
}

/// What an edge at revision `from` needs to reach `applied`: the changed
/// registry entries and revocations, or everything when `from` is 0 or older
/// than the retained change history.
pub fn change_set(
    conn: &Connection,
    from: u64,
    applied: u64,
    token_public_key: Vec<u8>,
) -> rusqlite::Result<lanmesh_shared::proto::ChangeSet> {
    let full = from == 0 || from < changes_horizon(conn)?;
    let mut entries = Vec::new();
    let revoked: Vec<String> = if full {
        let mut stmt =
            conn.prepare_cached("SELECT kind, name, data FROM registry ORDER BY kind, name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (kind, name, data) = row?;
            let data = public_data(&kind, data);
            entries.push((kind, name, Some(data)));
        }
        self::revoked(conn)?
    } else {
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT c.kind, c.key, r.data FROM changes c
             LEFT JOIN registry r ON r.kind = c.kind AND r.name = c.key
             WHERE c.revision > ?1 AND c.kind IN ('channels', 'devices', 'users', 'edges')",
        )?;
        let rows = stmt.query_map(params![from as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        for row in rows {
            let (kind, name, data) = row?;
            let data = data.map(|d| public_data(&kind, d));
            entries.push((kind, name, data));
        }
        let mut stmt = conn.prepare_cached("SELECT serial FROM revoked WHERE revision > ?1")?;
        stmt.query_map(params![from as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    Ok(lanmesh_shared::proto::ChangeSet {
        revision: applied,
        full,
        entries,
        revoked,
        token_public_key,
    })
}

/// Creates the state-machine tables if missing.
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS sm_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS kv (
             key TEXT PRIMARY KEY, value BLOB NOT NULL,
             create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,
             version INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS registry (
             kind TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,
             create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,
             PRIMARY KEY (kind, name));
         CREATE TABLE IF NOT EXISTS members (
             id TEXT PRIMARY KEY, data TEXT NOT NULL, mod_revision INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS revoked (serial TEXT PRIMARY KEY, revision INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS changes (
             revision INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS changes_by_revision ON changes (revision);
         CREATE TABLE IF NOT EXISTS channel_log (
             revision INTEGER PRIMARY KEY, channel TEXT NOT NULL, sender TEXT NOT NULL,
             ts_ms INTEGER NOT NULL, body BLOB NOT NULL, idem TEXT NOT NULL,
             UNIQUE (sender, idem));
         CREATE INDEX IF NOT EXISTS channel_log_by_channel ON channel_log (channel, revision);",
    )
}

fn record(
    tx: &Transaction<'_>,
    revision: u64,
    kind: &str,
    key: &str,
    op: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO changes (revision, kind, key, op) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![revision as i64, kind, key, op])?;
    Ok(())
}

/// Applies one command at `revision` inside `tx`.
pub fn apply(tx: &Transaction<'_>, revision: u64, cmd: &Command) -> rusqlite::Result<Applied> {
    let rev = revision as i64;
    let changed = match cmd {
        Command::ChannelPost {
            channel,
            sender,
            ts_ms,
            body,
            idem,
        } => {
            let first: Option<i64> = tx
                .prepare_cached("SELECT revision FROM channel_log WHERE sender = ?1 AND idem = ?2")?
                .query_row(params![sender, idem], |r| r.get(0))
                .optional()?;
            if let Some(first) = first {
                return Ok(Applied {
                    revision: first as u64,
                    changed: false,
                });
            }
            tx.prepare_cached(
                "INSERT INTO channel_log (revision, channel, sender, ts_ms, body, idem)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![rev, channel, sender, ts_ms, body, idem])?;
            true
        }
        Command::KvPut { key, value } => {
            tx.prepare_cached(
                "INSERT INTO kv (key, value, create_revision, mod_revision, version)
                 VALUES (?1, ?2, ?3, ?3, 1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                     mod_revision = excluded.mod_revision, version = version + 1",
            )?
            .execute(params![key, value, rev])?;
            record(tx, revision, "kv", key, "put")?;
            true
        }
        Command::KvDelete { key } => {
            let n = tx
                .prepare_cached("DELETE FROM kv WHERE key = ?1")?
                .execute(params![key])?;
            if n > 0 {
                record(tx, revision, "kv", key, "delete")?;
            }
            n > 0
        }
        Command::RegistryPut {
            registry,
            name,
            data,
        } => {
            tx.prepare_cached(
                "INSERT INTO registry (kind, name, data, create_revision, mod_revision)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(kind, name) DO UPDATE SET data = excluded.data,
                     mod_revision = excluded.mod_revision",
            )?
            .execute(params![registry.as_str(), name, data, rev])?;
            record(tx, revision, registry.as_str(), name, "put")?;
            true
        }
        Command::RegistryDelete { registry, name } => {
            let n = tx
                .prepare_cached("DELETE FROM registry WHERE kind = ?1 AND name = ?2")?
                .execute(params![registry.as_str(), name])?;
            if n > 0 {
                record(tx, revision, registry.as_str(), name, "delete")?;
            }
            n > 0
        }
        Command::SetMember(m) => {
            let data = serde_json::to_string(m).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO members (id, data, mod_revision) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET data = excluded.data, mod_revision = excluded.mod_revision",
            )?
            .execute(params![m.id, data, rev])?;
            record(tx, revision, "members", &m.id, "put")?;
            true
        }
        Command::RemoveMember { id } => {
            let n = tx
                .prepare_cached("DELETE FROM members WHERE id = ?1")?
                .execute(params![id])?;
            if n > 0 {
                record(tx, revision, "members", id, "delete")?;
            }
            n > 0
        }
        Command::Revoke { serial } => {
            let n = tx
                .prepare_cached("INSERT OR IGNORE INTO revoked (serial, revision) VALUES (?1, ?2)")?
                .execute(params![serial, rev])?;
            if n > 0 {
                record(tx, revision, "revoked", serial, "put")?;
            }
            n > 0
        }
        Command::Bootstrap {
            cluster_id,
            token_key,
        } => {
            // The first bootstrap wins; a repeated one (e.g. a retried
            // proposal) changes nothing.
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO sm_meta (key, value) VALUES ('cluster_id', ?1)",
                )?
                .execute(params![cluster_id.as_bytes()])?;
            if n > 0 {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO sm_meta (key, value) VALUES ('token_key', ?1)",
                )?
                .execute(params![token_key])?;
                record(tx, revision, "cluster", "bootstrap", "put")?;
            }
            n > 0
        }
    };
    Ok(Applied { revision, changed })
}

/// A KV entry as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvEntry {
    /// Key.
    pub key: String,
    /// Raw value (the list endpoint returns it as UTF-8 text when it is, else base64).
    #[serde(skip)]
    pub value: Vec<u8>,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Revision of the last change.
    pub mod_revision: u64,
    /// Number of puts since creation.
    pub version: u64,
}

fn kv_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KvEntry> {
    Ok(KvEntry {
        key: row.get(0)?,
        value: row.get(1)?,
        create_revision: row.get::<_, i64>(2)? as u64,
        mod_revision: row.get::<_, i64>(3)? as u64,
        version: row.get::<_, i64>(4)? as u64,
    })
}

/// Reads one key.
pub fn kv_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<KvEntry>> {
    conn.prepare_cached(
        "SELECT key, value, create_revision, mod_revision, version FROM kv WHERE key = ?1",
    )?
    .query_row(params![key], kv_row)
    .optional()
}

/// Lists keys starting with `prefix`, in key order, at most `limit`.
pub fn kv_list(conn: &Connection, prefix: &str, limit: usize) -> rusqlite::Result<Vec<KvEntry>> {
    // Range scan [prefix, prefix + U+10FFFF) uses the primary key index.
    let upper = format!("{prefix}\u{10FFFF}");
    let mut stmt = conn.prepare_cached(
        "SELECT key, value, create_revision, mod_revision, version FROM kv
         WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![prefix, upper, limit as i64], kv_row)?;
    rows.collect()
}

/// A registry entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryEntry {
    /// Name.
    pub name: String,
    /// Data (JSON).
    pub data: serde_json::Value,
    /// Revision that created it.
    pub create_revision: u64,
    /// Revision of the last change.
    pub mod_revision: u64,
}

fn registry_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RegistryEntry> {
    let data: String = row.get(1)?;
    Ok(RegistryEntry {
        name: row.get(0)?,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
        create_revision: row.get::<_, i64>(2)? as u64,
        mod_revision: row.get::<_, i64>(3)? as u64,
    })
}

/// The origin name of messages of Raft-replicated channels.
pub const RAFT_ORIGIN: &str = "raft";

/// A page of a Raft-replicated channel: messages after log index `after`.
pub fn channel_history(
    conn: &Connection,
    channel: &str,
    after: u64,
    limit: u32,
) -> rusqlite::Result<Vec<lanmesh_shared::proto::Message>> {
    let mut stmt = conn.prepare_cached(
        "SELECT revision, channel, sender, ts_ms, body FROM channel_log
         WHERE channel = ?1 AND revision > ?2 ORDER BY revision LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![channel, after as i64, limit], |r| {
        let revision = r.get::<_, i64>(0)? as u64;
        Ok(lanmesh_shared::proto::Message {
            origin: RAFT_ORIGIN.to_owned(),
            seq: revision,
            pos: revision,
            channel: r.get(1)?,
            sender: r.get(2)?,
            ts_ms: r.get(3)?,
            body: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Reads one registry entry.
pub fn registry_get(
    conn: &Connection,
    registry: Registry,
    name: &str,
) -> rusqlite::Result<Option<RegistryEntry>> {
    conn.prepare_cached(
        "SELECT name, data, create_revision, mod_revision FROM registry WHERE kind = ?1 AND name = ?2",
    )?
    .query_row(params![registry.as_str(), name], registry_row)
    .optional()
}

/// Lists a registry in name order.
pub fn registry_list(
    conn: &Connection,
    registry: Registry,
) -> rusqlite::Result<Vec<RegistryEntry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, data, create_revision, mod_revision FROM registry WHERE kind = ?1 ORDER BY name",
    )?;
    let rows = stmt.query_map(params![registry.as_str()], registry_row)?;
    rows.collect()
}

/// All members' metadata, by id.
pub fn members(conn: &Connection) -> rusqlite::Result<Vec<Member>> {
    let mut stmt = conn.prepare_cached("SELECT data FROM members ORDER BY id")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for data in rows {
        if let Ok(m) = serde_json::from_str(&data?) {
            out.push(m);
        }
    }
    Ok(out)
}

/// All revoked serials.
pub fn revoked(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT serial FROM revoked ORDER BY serial")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// The cluster id recorded at bootstrap, if any.
pub fn cluster_id(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let v: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM sm_meta WHERE key = 'cluster_id'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// The token-signing key (PKCS#8 Ed25519), created at bootstrap. It never
/// leaves the cores.
pub fn token_key(conn: &Connection) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT value FROM sm_meta WHERE key = 'token_key'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// Whether a token-signing key exists (the key itself never leaves the cores).
pub fn has_token_key(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM sm_meta WHERE key = 'token_key'", [], |_| {
            Ok(())
        })
        .optional()?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        init_schema(&c).unwrap();
        c
    }

    fn run(c: &mut Connection, rev: u64, cmd: Command) -> Applied {
        let tx = c.transaction().unwrap();
        let a = apply(&tx, rev, &cmd).unwrap();
        tx.commit().unwrap();
        a
    }

    #[test]
    fn kv_revisions_and_versions() {
        let mut c = db();
        run(
            &mut c,
            3,
            Command::KvPut {
                key: "a/x".into(),
                value: b"1".to_vec(),
            },
        );
        run(
            &mut c,
            5,
            Command::KvPut {
                key: "a/x".into(),
                value: b"2".to_vec(),
            },
        );
        run(
            &mut c,
            6,
            Command::KvPut {
                key: "b".into(),
                value: b"3".to_vec(),
            },
        );
        let e = kv_get(&c, "a/x").unwrap().unwrap();
        assert_eq!(
            (
                e.value.as_slice(),
                e.create_revision,
                e.mod_revision,
                e.version
            ),
            (&b"2"[..], 3, 5, 2)
        );
        assert_eq!(kv_list(&c, "a/", 100).unwrap().len(), 1);
        assert_eq!(kv_list(&c, "", 100).unwrap().len(), 2);
        assert!(run(&mut c, 7, Command::KvDelete { key: "a/x".into() }).changed);
        assert!(!run(&mut c, 8, Command::KvDelete { key: "a/x".into() }).changed);
        assert!(kv_get(&c, "a/x").unwrap().is_none());
        let changes: i64 = c
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(changes, 4);
    }

    #[test]
    fn change_history_is_trimmed_by_revision() {
        let mut c = db();
        for rev in [1, 2, CHANGES_RETAINED + 5] {
            run(
                &mut c,
                rev,
                Command::KvPut {
                    key: format!("k{rev}"),
                    value: vec![],
                },
            );
        }
        let tx = c.transaction().unwrap();
        trim_changes(&tx, CHANGES_RETAINED + 5, CHANGES_RETAINED).unwrap();
        tx.commit().unwrap();
        let left: Vec<i64> = c
            .prepare("SELECT revision FROM changes ORDER BY revision")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, vec![CHANGES_RETAINED as i64 + 5]);
    }

    #[test]
    fn registries_members_revocations_bootstrap() {
        let mut c = db();
        run(
            &mut c,
            2,
            Command::RegistryPut {
                registry: Registry::Channels,
                name: "ops".into(),
                data: r#"{"replication":"async"}"#.into(),
            },
        );
        assert_eq!(registry_list(&c, Registry::Channels).unwrap().len(), 1);
        assert!(registry_list(&c, Registry::Devices).unwrap().is_empty());
        run(
            &mut c,
            3,
            Command::Revoke {
                serial: "ab".into(),
            },
        );
        assert!(
            !run(
                &mut c,
                4,
                Command::Revoke {
                    serial: "ab".into()
                }
            )
            .changed
        );
        assert_eq!(revoked(&c).unwrap(), vec!["ab".to_string()]);
        let b = |id: &str| Command::Bootstrap {
            cluster_id: id.into(),
            token_key: vec![1, 2],
        };
        assert!(run(&mut c, 1, b("c1")).changed);
        assert!(!run(&mut c, 9, b("c2")).changed);
        assert_eq!(cluster_id(&c).unwrap().as_deref(), Some("c1"));
        assert!(has_token_key(&c).unwrap());
    }

    #[test]
    fn raft_channel_posts_are_ordered_and_idempotent() {
        let mut c = db();
        let p = |idem: &str, body: &str| Command::ChannelPost {
            channel: "orders".into(),
            sender: "alice".into(),
            ts_ms: 1,
            body: body.as_bytes().to_vec(),
            idem: idem.into(),
        };
        assert_eq!(
            run(&mut c, 10, p("a", "one")),
            Applied {
                revision: 10,
                changed: true
            }
        );
        assert_eq!(
            run(&mut c, 11, p("b", "two")),
            Applied {
                revision: 11,
                changed: true
            }
        );
        // A retried proposal answers the first one's index and stores nothing.
        assert_eq!(
            run(&mut c, 12, p("a", "one")),
            Applied {
                revision: 10,
                changed: false
            }
        );
        let h = channel_history(&c, "orders", 0, 10).unwrap();
        assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(
            channel_history(&c, "orders", 10, 10).unwrap()[0].body,
            b"two"
        );
        assert!(channel_history(&c, "other", 0, 10).unwrap().is_empty());
    }

    #[test]
    fn change_sets_are_incremental_until_trimmed_then_full() {
        let mut c = db();
        let put = |name: &str, data: &str| Command::RegistryPut {
            registry: Registry::Users,
            name: name.into(),
            data: data.into(),
        };
        run(
            &mut c,
            1,
            put("alice", r#"{"password_hash":"x","roles":["user"]}"#),
        );
        run(&mut c, 2, put("bob", "{}"));
        run(
            &mut c,
            3,
            Command::RegistryDelete {
                registry: Registry::Users,
                name: "bob".into(),
            },
        );
        run(
            &mut c,
            4,
            Command::Revoke {
                serial: "0a".into(),
            },
        );
        let all = change_set(&c, 0, 4, vec![1]).unwrap();
        assert!(all.full);
        assert_eq!(all.entries.len(), 1, "bob is gone");
        assert!(
            !all.entries[0]
                .2
                .as_deref()
                .unwrap()
                .contains("password_hash")
        );
        assert_eq!(all.revoked, vec!["0a".to_owned()]);
        let since2 = change_set(&c, 2, 4, vec![1]).unwrap();
        assert!(!since2.full);
        assert_eq!(since2.entries, vec![("users".into(), "bob".into(), None)]);
        assert_eq!(since2.revoked, vec!["0a".to_owned()]);
        // After a trim, an edge older than the horizon gets everything.
        let tx = c.transaction().unwrap();
        trim_changes(&tx, 4, 1).unwrap();
        tx.commit().unwrap();
        assert!(change_set(&c, 2, 4, vec![1]).unwrap().full);
        assert!(!change_set(&c, 3, 4, vec![1]).unwrap().full);
    }
}
