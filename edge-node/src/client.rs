//! The client commands: `login`, `send`, `tail`, `who`.
//!
//! Each command opens one QUIC connection to `--server` (ALPN
//! `lanmesh-client/1`), checks the server's certificate against `--ca`, and
//! logs in with a client certificate (`--cert`/`--key`) or the token that
//! `login` stored in the token file.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::proto::{Client, ClientError, ErrorCode, Message, Request, Response};
use lanmesh_shared::tls::{self, ALPN_CLIENT, PeerPolicy, TlsFiles, TlsMaterial, Transport};
use serde::{Deserialize, Serialize};

/// The CA of the single-node default, relative to where it was started.
const DEFAULT_CA: &str = "lanmesh-data/node-1/tls/ca.crt";

/// Where and how to connect.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Client port of a core (or edge): HOST:PORT.
    #[arg(long, env = "LANMESH_SERVER", default_value = "127.0.0.1:10002")]
    pub server: String,
    /// CA certificate to trust (the cluster's `ca.crt`).
    #[arg(long, env = "LANMESH_CA", value_name = "FILE", default_value = DEFAULT_CA)]
    pub ca: PathBuf,
    /// Client certificate (`pki issue client NAME`): logs in without a password.
    #[arg(long, env = "LANMESH_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Key of --cert.
    #[arg(long, env = "LANMESH_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Where `login` keeps the token [default: ~/.config/lanmesh/token.json].
    #[arg(long, env = "LANMESH_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `tail` options.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// How many of the latest messages to print first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Keep printing new messages as they arrive (and count as present).
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// What `login` stores.
#[derive(Debug, Serialize, Deserialize)]
struct TokenFile {
    server: String,
    subject: String,
    token: String,
    expires_at: i64,
}

impl ConnArgs {
    fn token_path(&self) -> PathBuf {
        if let Some(p) = &self.token_file {
            return p.clone();
        }
        match std::env::var_os("HOME") {
            Some(home) => Path::new(&home).join(".config/lanmesh/token.json"),
            None => PathBuf::from("lanmesh-token.json"),
        }
    }

    async fn addr(&self) -> Result<SocketAddr> {
        tokio::net::lookup_host(&self.server)
            .await
            .with_context(|| format!("--server {:?} is not a reachable HOST:PORT", self.server))?
            .next()
            .with_context(|| format!("--server {:?} resolves to no address", self.server))
    }

    /// A negotiated connection (not logged in unless by certificate).
    async fn connect(&self) -> Result<Client> {
        if !self.ca.exists() {
            bail!(
                "CA file {} not found: give the cluster's CA with --ca (the default is the \
                 single-node default's, relative to where `core-node` was started)",
                self.ca.display()
            );
        }
        let material = TlsMaterial::load(&TlsFiles::new(
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
        ))
        .with_context(|| format!("loading TLS material (CA {})", self.ca.display()))?;
        let cluster = material
            .ca_cluster_id()
            .with_context(|| format!("{} is not a lanmesh CA", self.ca.display()))?
            .to_owned();
        let policy = PeerPolicy::only(cluster, &[Role::Core, Role::Edge]);
        let tls = tls::client_config(&material, policy, &[ALPN_CLIENT])?;
        let addr = self.addr().await?;
        let endpoint =
            link::client_endpoint(tls::quinn_client_config(tls, Transport::default())?, addr)
                .context("opening a UDP socket")?;
        Client::connect(&endpoint, addr, "edge-node cli")
            .await
            .with_context(|| format!("connecting to {addr}"))
    }

    /// A connection logged in by certificate or by the stored token.
    async fn logged_in(&self) -> Result<Client> {
        let c = self.connect().await?;
        if self.cert.is_some() {
            c.request(&Request::Whoami)
                .await
                .context("the server did not accept the client certificate as a login")?;
            return Ok(c);
        }
        let path = self.token_path();
        let stored: TokenFile = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a token file", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "not logged in: run `edge-node login --user NAME` first (or give --cert/--key)"
                )
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match c
            .request(&Request::Authenticate {
                token: stored.token,
            })
            .await
        {
            Ok(_) => Ok(c),
            Err(ClientError::Server(e)) if e.code == ErrorCode::InvalidToken => bail!(
                "the stored token was refused ({}): run `edge-node login` again",
                e.message
            ),
            Err(e) => Err(e).context("logging in with the stored token"),
        }
    }
}

fn random_key() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn server_error(e: ClientError, what: &str) -> anyhow::Error {
    match e {
        ClientError::Server(f) if f.code == ErrorCode::NotFound => {
            anyhow::anyhow!(
                "{what}: {} (create it with `core-node channel add`)",
                f.message
            )
        }
        ClientError::Server(f) if f.code == ErrorCode::Unavailable => {
            anyhow::anyhow!(
                "{what}: the cluster is unavailable right now, retry: {}",
                f.message
            )
        }
        other => anyhow::Error::new(other).context(what.to_owned()),
    }
}

/// `edge-node login`
pub async fn login(conn: &ConnArgs, user: &str) -> Result<()> {
    let password = lanmesh_shared::secret::password(&format!("password for {user}: "))?;
    let c = conn.connect().await?;
    let answer = c
        .request(&Request::Login {
            user: user.to_owned(),
            password,
        })
        .await;
    let (token, subject, expires_at) = match answer {
        Ok(Response::Token {
            token,
            subject,
            expires_at,
        }) => (token, subject, expires_at),
        Ok(other) => bail!("unexpected answer to Login: {other:?}"),
        Err(ClientError::Server(e)) if e.code == ErrorCode::BadCredentials => {
            bail!("login refused: unknown user or wrong password")
        }
        Err(e) => return Err(server_error(e, "login failed")),
    };
    let path = conn.token_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = TokenFile {
        server: conn.server.clone(),
        subject: subject.clone(),
        token,
        expires_at,
    };
    write_private(&path, &serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let until = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_default();
    if conn.json {
        println!(
            "{}",
            serde_json::json!({"subject": subject, "expires_at": expires_at, "token_file": path})
        );
    } else {
        println!(
            "logged in as {subject} on {} until {until} (token in {})",
            c.node_id,
            path.display()
        );
    }
    Ok(())
}

/// Writes a file only its owner can read (it holds a bearer token).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `edge-node send`
pub async fn send(conn: &ConnArgs, channel: &str, text: &str, key: Option<String>) -> Result<()> {
    let c = conn.logged_in().await?;
    let req = Request::Post {
        channel: channel.to_owned(),
        body: text.as_bytes().to_vec(),
        idempotency_key: key.unwrap_or_else(random_key),
    };
    match c.request(&req).await {
        Ok(Response::Posted {
            origin,
            seq,
            duplicate,
            pending,
        }) => {
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({"origin": origin, "seq": seq, "duplicate": duplicate, "pending": pending})
                );
            } else if pending {
                println!(
                    "queued on {origin} as #{seq}: its link upstream is down; delivered when it returns"
                );
            } else if duplicate {
                println!("already posted as {origin}#{seq} (same key)");
            } else {
                println!("posted {origin}#{seq}");
            }
            Ok(())
        }
        Ok(other) => bail!("unexpected answer to Post: {other:?}"),
        Err(e) => Err(server_error(e, &format!("posting to {channel:?}"))),
    }
}

fn print_message(m: &Message, json: bool) {
    let text = String::from_utf8_lossy(&m.body);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "origin": m.origin, "seq": m.seq, "channel": m.channel,
                "sender": m.sender, "ts_ms": m.ts_ms, "text": text,
            })
        );
        return;
    }
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(m.ts_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_default();
    println!("{when} {}: {text}", m.sender);
}

/// `edge-node tail`
pub async fn tail(conn: &ConnArgs, channel: &str, args: &TailArgs) -> Result<()> {
    let c = conn.logged_in().await?;
    // Subscribe before reading history, so nothing falls in between.
    let mut sub = if args.follow {
        Some(
            c.subscribe(channel)
                .await
                .map_err(|e| server_error(e, &format!("subscribing to {channel:?}")))?,
        )
    } else {
        None
    };
    let mut latest: VecDeque<Message> = VecDeque::new();
    let mut seen: VecDeque<(String, u64)> = VecDeque::new();
    let mut after = 0;
    loop {
        let page = match c
            .request(&Request::History {
                channel: channel.to_owned(),
                after,
                limit: 1000,
            })
            .await
        {
            Ok(Response::Messages(p)) => p,
            Ok(other) => bail!("unexpected answer to History: {other:?}"),
            Err(e) => return Err(server_error(e, &format!("reading {channel:?}"))),
        };
        let Some(last) = page.last() else { break };
        after = last.pos;
        for m in page {
            seen.push_back((m.origin.clone(), m.seq));
            if seen.len() > args.limit.max(4096) {
                seen.pop_front();
            }
            latest.push_back(m);
            if latest.len() > args.limit {
                latest.pop_front();
            }
        }
    }
    for m in &latest {
        print_message(m, conn.json);
    }
    let Some(sub) = sub.as_mut() else {
        return Ok(());
    };
    let seen: HashSet<(String, u64)> = seen.into_iter().collect();
    // A follower counts as present.
    let beat = c.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            let interval = match beat
                .request(&Request::Heartbeat {
                    status: "online".into(),
                })
                .await
            {
                Ok(Response::HeartbeatAck { interval_ms }) => interval_ms.max(100),
                _ => 5000,
            };
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
    });
    let result = loop {
        match sub.next().await {
            Ok(m) => {
                if !seen.contains(&(m.origin.clone(), m.seq)) {
                    print_message(&m, conn.json);
                }
            }
            Err(ClientError::Server(e)) if e.code == ErrorCode::Unavailable => {
                eprintln!("edge-node: warning: {}", e.message);
            }
            Err(e) => break Err(anyhow::Error::new(e).context("the subscription ended")),
        }
    };
    heartbeat.abort();
    result
}

/// `edge-node who`
pub async fn who(conn: &ConnArgs) -> Result<()> {
    let c = conn.logged_in().await?;
    let entries = match c.request(&Request::Who).await {
        Ok(Response::Presence(v)) => v,
        Ok(other) => bail!("unexpected answer to Who: {other:?}"),
        Err(e) => return Err(server_error(e, "asking who is present")),
    };
    for e in &entries {
        if conn.json {
            println!(
                "{}",
                serde_json::json!({"subject": e.subject, "node": e.node, "status": e.status})
            );
        } else {
            println!("{:<24} {:<16} {}", e.subject, e.node, e.status);
        }
    }
    if entries.is_empty() && !conn.json {
        eprintln!("(nobody is present)");
    }
    Ok(())
}
