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
