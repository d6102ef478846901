//! Operator commands (`core-node status`, `kv put`, `leave`, `backup`, ...):
//! thin HTTP calls to a node's admin API, plus `restore`, which prepares a
//! data directory offline.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use lanmesh_shared::identity::Role;
use lanmesh_shared::tls::{self, PeerPolicy, TlsFiles, TlsMaterial};

use crate::config::DEFAULT_API_ADDR;
use crate::http::HttpClient;
use crate::node::Status;
use crate::raft::log_store::LogStore;
use crate::raft::state_machine::STATE_DB;
use crate::raft::{CoreNode, LogId, NodeName, StoredMembership, decode, encode};

/// Where the API is and how to authenticate (for HTTPS).
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Admin API of any node (followers forward to the leader).
    #[arg(long, env = "LANMESH_API", default_value_t = format!("http://{DEFAULT_API_ADDR}"), global = true)]
    pub api: String,
    /// CA to verify an HTTPS API with.
    #[arg(
        long = "api-ca",
        env = "LANMESH_API_CA",
        value_name = "FILE",
        global = true
    )]
    pub api_ca: Option<PathBuf>,
    /// Operator certificate for an HTTPS API.
    #[arg(
        long = "api-cert",
        env = "LANMESH_API_CERT",
        value_name = "FILE",
        global = true
    )]
    pub api_cert: Option<PathBuf>,
    /// Operator key for an HTTPS API.
    #[arg(
        long = "api-key",
        env = "LANMESH_API_KEY",
        value_name = "FILE",
        global = true
    )]
    pub api_key: Option<PathBuf>,
    /// Print raw JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    /// An HTTP client configured for `--api`.
    pub fn client(&self) -> Result<HttpClient> {
        let tls = match &self.api_ca {
            None => None,
            Some(ca) => {
                let material = TlsMaterial::load(&TlsFiles::new(
                    ca.clone(),
                    self.api_cert.clone(),
                    self.api_key.clone(),
                ))?;
                let cluster = material
                    .ca_cluster_id()
                    .context("the --api-ca file is not a lanmesh CA")?
                    .to_owned();
                let policy = PeerPolicy::only(cluster, &[Role::Core]);
                Some(tls::client_config(&material, policy, &[b"http/1.1"])?)
            }
        };
        Ok(HttpClient::new(
            tls,
            Some(std::time::Duration::from_secs(30)),
        ))
    }

    async fn call(&self, method: Method, path: &str, body: Vec<u8>) -> Result<bytes::Bytes> {
        let (status, answer) = self
            .client()?
            .request(method, &self.api, path, body)
            .await?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).trim().to_owned());
            if status == StatusCode::NOT_FOUND {
                bail!("not found: {detail}");
            }
            bail!("{} answered {status}: {detail}", self.api);
        }
        Ok(answer)
    }
}

/// `core-node kv ...`
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value.
    Get {
        /// The key.
        key: String,
        /// Allow a stale read from the contacted node.
        #[arg(long)]
        local: bool,
    },
    /// Set a key (value from the argument, or stdin with -).
    Put {
        /// The key.
        key: String,
        /// The value; `-` reads stdin.
        value: String,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
    },
    /// List keys with a prefix.
    List {
        /// Key prefix (default: all).
        #[arg(default_value = "")]
        prefix: String,
    },
}

fn encode_path(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn print_json(bytes: &[u8]) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).context("the API answered with something other than JSON")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `core-node status`
pub async fn status(api: &ApiArgs) -> Result<()> {
    let body = api.call(Method::GET, "/v1/status", Vec::new()).await?;
    if api.json {
        return print_json(&body);
    }
    let s: Status = serde_json::from_slice(&body).context("unexpected status document")?;
    println!(
        "node       {} ({}) in cluster {}",
        s.node_id, s.role, s.cluster_id
    );
    println!(
        "leader     {} (term {})",
        s.leader_id.as_deref().unwrap_or("none"),
        s.term
    );
    println!(
        "log        last {}  committed {}  applied {}  snapshot {}",
        s.last_log_index,
        s.commit_index,
        s.applied_index,
        s.snapshot_index
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("members");
    for m in &s.members {
        println!(
            "  {:<16} {:<8} raft {:<22} api {}",
            m.id, m.suffrage, m.raft_addr, m.api_addr
        );
    }
    Ok(())
}

/// `core-node members`
pub async fn members(api: &ApiArgs) -> Result<()> {
    let body = api.call(Method::GET, "/v1/members", Vec::new()).await?;
    if api.json {
        return print_json(&body);
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    for m in v["members"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<16} {:<8} raft {:<22} api {}",
            m["id"].as_str().unwrap_or(""),
            m["suffrage"].as_str().unwrap_or(""),
            m["raft_addr"].as_str().unwrap_or(""),
            m["api_addr"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `core-node user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user, or set a user's password (from LANMESH_PASSWORD or a prompt).
    Add {
        /// User name.
        name: String,
        /// Roles written into the user's tokens (repeatable).
        #[arg(long = "role", default_value = "user")]
        roles: Vec<String>,
    },
    /// List users.
    List,
    /// Delete a user: their tokens stop working on every node.
    Del {
        /// User name.
        name: String,
    },
}

/// `core-node channel ...`
#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Create a channel.
    Add {
        /// Channel name.
        name: String,
        /// `anti-entropy` (each core stores what it receives and the cores
        /// exchange it: fast, no single order) or `raft` (every post goes
        /// through the Raft log: one total order, leader-bound).
        #[arg(long, default_value = "anti-entropy", value_parser = ["anti-entropy", "raft"])]
        replication: String,
    },
    /// List channels.
    List,
    /// Delete a channel.
    Del {
        /// Channel name.
        name: String,
    },
}

/// `core-node audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recheck every hash chain in an audit database (offline; the node may
    /// be running). Exits non-zero and names the first bad record of each
    /// broken chain.
    Verify {
        /// The node's data directory (its audit.db is checked).
        #[arg(long, value_name = "DIR", default_value = "lanmesh-data/node-1")]
        data_dir: PathBuf,
        /// Check this file instead.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Query the leader's collection of every node's records, oldest first.
    List {
        /// Only this kind (login, login_failed, token_refused, cert_refused,
        /// registry_change, config_change, member_join, member_leave,
        /// admin_action, leader_change).
        #[arg(long)]
        kind: Option<String>,
        /// Only this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only records written by this node.
        #[arg(long)]
        origin: Option<String>,
        /// Only records from the last this many seconds.
        #[arg(long, value_name = "SECS")]
        since_secs: Option<u64>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `core-node revoke`
pub async fn revoke(api: &ApiArgs, serial: Option<String>, cert: Option<PathBuf>) -> Result<()> {
    let serial = match (serial, cert) {
        (Some(s), _) => s,
        (None, Some(path)) => {
            let pem =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
                .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
            lanmesh_shared::identity::CertInfo::from_der(&der)?.serial
        }
        (None, None) => bail!("give --serial or --cert"),
    };
    let body = serde_json::to_vec(&serde_json::json!({"serial": serial}))?;
    let answer = api.call(Method::POST, "/v1/revoked", body).await?;
    if api.json {
        return print_json(&answer);
    }
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    if v["changed"] == true {
        println!(
            "revoked {} on every node (revision {})",
            v["serial"].as_str().unwrap_or(""),
            v["revision"]
        );
    } else {
        println!("{} was already revoked", v["serial"].as_str().unwrap_or(""));
    }
    Ok(())
}

/// `core-node user ...`
pub async fn user(api: &ApiArgs, cmd: UserCommand) -> Result<()> {
    match cmd {
        UserCommand::Add { name, roles } => {
            let password = lanmesh_shared::secret::password(&format!("password for {name}: "))?;
            if password.is_empty() {
                bail!("the password is empty");
            }
            let body = serde_json::json!({"name": name, "password": password, "roles": roles});
            let answer = api
                .call(Method::POST, "/v1/users", serde_json::to_vec(&body)?)
                .await?;
            print_revision(api, &answer)
        }
        UserCommand::List => list_registry(api, "users").await,
        UserCommand::Del { name } => {
            let answer = api
                .call(
                    Method::DELETE,
                    &format!("/v1/users/{}", encode_path(&name)),
                    Vec::new(),
                )
                .await?;
            print_revision(api, &answer)
        }
    }
}

/// `core-node channel ...`
pub async fn channel(api: &ApiArgs, cmd: ChannelCommand) -> Result<()> {
    match cmd {
        ChannelCommand::Add { name, replication } => {
            let body = serde_json::json!({"name": name, "replication": replication});
            let answer = api
                .call(Method::POST, "/v1/channels", serde_json::to_vec(&body)?)
                .await?;
            print_revision(api, &answer)
        }
        ChannelCommand::List => list_registry(api, "channels").await,
        ChannelCommand::Del { name } => {
            let answer = api
                .call(
                    Method::DELETE,
                    &format!("/v1/channels/{}", encode_path(&name)),
                    Vec::new(),
                )
                .await?;
            print_revision(api, &answer)
        }
    }
}

async fn list_registry(api: &ApiArgs, registry: &str) -> Result<()> {
    let body = api
        .call(Method::GET, &format!("/v1/{registry}"), Vec::new())
        .await?;
    if api.json {
        return print_json(&body);
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let entries = v
        .get(registry)
        .or_else(|| v.get("entries"))
        .and_then(|e| e.as_array())
        .cloned()
        .unwrap_or_default();
    for e in entries {
        let mut data = e.get("data").cloned().unwrap_or_default();
        if let Some(obj) = data.as_object_mut() {
            obj.remove("password_hash");
        }
        println!("{}\t{}", e["name"].as_str().unwrap_or(""), data);
    }
    Ok(())
}

/// `core-node audit ...`
pub async fn audit(api: &ApiArgs, cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Verify { data_dir, file } => {
            let path = file.unwrap_or_else(|| data_dir.join(crate::audit::AUDIT_DB));
            let report = crate::audit::verify_file(&path)
                .with_context(|| format!("cannot check {}", path.display()))?;
            for ((table, origin), n) in &report.chains {
                println!("{table:<9} {origin:<16} {n} record(s)");
            }
            if report.problems.is_empty() {
                println!("ok: every chain in {} is intact", path.display());
                return Ok(());
            }
            for p in &report.problems {
                println!("BROKEN: {p}");
            }
            bail!(
                "{} broken chain(s) in {}",
                report.problems.len(),
                path.display()
            );
        }
        AuditCommand::List {
            kind,
            actor,
            origin,
            since_secs,
            limit,
        } => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("limit", &limit.to_string());
            for (k, v) in [("kind", kind), ("actor", actor), ("origin", origin)] {
                if let Some(v) = v {
                    q.append_pair(k, &v);
                }
            }
            if let Some(s) = since_secs {
                let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
                q.append_pair("since", &(now - (s as i64) * 1000).to_string());
            }
            let body = api
                .call(
                    Method::GET,
                    &format!("/v1/audit?{}", q.finish()),
                    Vec::new(),
                )
                .await?;
            if api.json {
                return print_json(&body);
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            for r in v["records"].as_array().cloned().unwrap_or_default() {
                let ts = r["ts_ms"].as_i64().unwrap_or(0);
                let when = time::OffsetDateTime::from_unix_timestamp_nanos(ts as i128 * 1_000_000)
                    .ok()
                    .and_then(|t| {
                        t.format(time::macros::format_description!(
                            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                        ))
                        .ok()
                    })
                    .unwrap_or_default();
                println!(
                    "{when}  {:<10} #{:<5} {:<16} {:<14} {}",
                    r["origin"].as_str().unwrap_or(""),
                    r["seq"],
                    r["kind"].as_str().unwrap_or(""),
                    r["actor"].as_str().unwrap_or(""),
                    r["detail"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

/// `core-node kv ...`
pub async fn kv(api: &ApiArgs, cmd: KvCommand) -> Result<()> {
    match cmd {
        KvCommand::Get { key, local } => {
            let q = if local { "?consistency=local" } else { "" };
            let body = api
                .call(
                    Method::GET,
                    &format!("/v1/kv/{}{q}", encode_path(&key)),
                    Vec::new(),
                )
                .await?;
            std::io::stdout().write_all(&body)?;
            if !body.ends_with(b"\n") && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                println!();
            }
        }
        KvCommand::Put { key, value } => {
            let value = if value == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            } else {
                value.into_bytes()
            };
            let body = api
                .call(Method::PUT, &format!("/v1/kv/{}", encode_path(&key)), value)
                .await?;
            print_revision(api, &body)?;
        }
        KvCommand::Del { key } => {
            let body = api
                .call(
                    Method::DELETE,
                    &format!("/v1/kv/{}", encode_path(&key)),
                    Vec::new(),
                )
                .await?;
            print_revision(api, &body)?;
        }
        KvCommand::List { prefix } => {
            let body = api
                .call(
                    Method::GET,
                    &format!("/v1/kv?prefix={}", encode_path(&prefix)),
                    Vec::new(),
                )
                .await?;
            if api.json {
                return print_json(&body);
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
                let value = kv["value"].as_str().map(str::to_owned).unwrap_or_else(|| {
                    format!("(base64) {}", kv["value_base64"].as_str().unwrap_or(""))
                });
                println!("{}\t{}", kv["key"].as_str().unwrap_or(""), value);
            }
        }
    }
    Ok(())
}

fn print_revision(api: &ApiArgs, body: &[u8]) -> Result<()> {
    if api.json {
        return print_json(body);
    }
    let v: serde_json::Value = serde_json::from_slice(body)?;
    println!("revision {}", v["revision"]);
    Ok(())
}

/// `core-node leave NODE`, `transfer-leader NODE`, `snapshot`.
pub async fn admin_post(api: &ApiArgs, path: &str) -> Result<()> {
    let body = api.call(Method::POST, path, Vec::new()).await?;
    print_json(&body)
}

/// `core-node backup FILE`
pub async fn backup(api: &ApiArgs, file: &Path) -> Result<()> {
    let body = api.call(Method::GET, "/v1/backup", Vec::new()).await?;
    let tmp = file.with_extension("partial");
    std::fs::write(&tmp, &body).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot write {}", file.display()))?;
    println!(
        "wrote a consistent backup ({} bytes) to {}",
        body.len(),
        file.display()
    );
    println!(
        "restore it with: core-node restore {} --data-dir <new dir> --node-id <id>",
        file.display()
    );
    Ok(())
}

/// `core-node restore FILE --data-dir DIR --node-id ID`: a data directory from
/// which a node boots a new single-node cluster holding the backup's state.
pub fn restore(file: &Path, data_dir: &Path, node_id: &str) -> Result<()> {
    lanmesh_shared::identity::validate_name("name", node_id)?;
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} is not empty: restore into a new directory",
            data_dir.display()
        );
    }
    std::fs::create_dir_all(data_dir)?;
    let state = data_dir.join(STATE_DB);
    std::fs::copy(file, &state)
        .with_context(|| format!("cannot copy {} into {}", file.display(), state.display()))?;
    let conn = rusqlite::Connection::open(&state)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .with_context(|| format!("{} is not a SQLite database", file.display()))?;
    if check != "ok" {
        bail!("{} is damaged: {check}", file.display());
    }
    let last: Vec<u8> = conn
        .query_row(
            "SELECT value FROM sm_meta WHERE key = 'last_applied'",
            [],
            |r| r.get(0),
        )
        .with_context(|| {
            format!(
                "{} is not a lanmesh backup (no applied position)",
                file.display()
            )
        })?;
    let last: LogId = decode(&last)?;
    let node = CoreNode::default();
    let membership = openraft::Membership::from(std::collections::BTreeMap::from([(
        NodeName(node_id.to_owned()),
        node,
    )]));
    let stored = StoredMembership::new(Some(last.clone()), membership);
    conn.execute(
        "INSERT OR REPLACE INTO sm_meta (key, value) VALUES ('last_membership', ?1)",
        [encode(&stored)?],
    )?;
    drop(conn);
    LogStore::seed_purged(&data_dir.join("raft.db"), &last)?;
    println!(
        "restored state up to revision {} into {}; start it with: core-node run --data-dir {} --node-id {node_id}",
        last.index,
        data_dir.display(),
        data_dir.display()
    );
    println!("it boots as a single-node cluster; add nodes with --join as usual");
    Ok(())
}
