//! `core-node bench --workload messages`: the messaging router under load.
//!
//! On a cluster the bench spawned, it creates a user and a channel, then for
//! each `--clients` value runs P publishers (each posting one message at a
//! time and waiting for the durable acknowledgement) and M subscribers on the
//! same core for `--duration` seconds, plus one subscriber on another core.
//! It prints posts/s, the post round trip, and the post-to-delivery latency
//! (each body carries its send time). With `--convergence N` it then stops a
//! core, posts N messages elsewhere, restarts it, and reports how long
//! anti-entropy takes to bring it level.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper::Method;
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::proto::{Client, ClientError, Request, Response};
use lanmesh_shared::tls::{self, ALPN_CLIENT, PeerPolicy, TlsFiles, TlsMaterial, Transport};

use crate::http::HttpClient;

/// What the messaging bench needs from the spawned cluster.
#[derive(Debug)]
pub struct Cluster<'a> {
    /// The spawned CA (`ca.crt` inside).
    pub tls_dir: &'a Path,
    /// Per node: (name, API URL, data directory).
    pub nodes: Vec<(String, String, std::path::PathBuf)>,
}

/// Settings of one messaging run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Publishers per run (one run per value).
    pub publishers: Vec<usize>,
    /// Subscribers on the loaded core.
    pub subscribers: usize,
    /// Seconds per run.
    pub duration: Duration,
    /// Body size, bytes (at least 8: the send time).
    pub body_size: usize,
    /// Messages posted while a core is down, for the convergence measurement (0 = skip).
    pub convergence: usize,
}

fn client_addr(data_dir: &Path) -> Result<SocketAddr> {
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data_dir.join("node.json")).context("reading node.json")?,
    )?;
    doc["client_addr"]
        .as_str()
        .context("node.json has no client_addr")?
        .parse()
        .context("bad client_addr")
}

struct Connector {
    endpoint: quinn::Endpoint,
    token: String,
}

impl Connector {
    async fn new(tls_dir: &Path, first: SocketAddr) -> Result<Self> {
        let material = TlsMaterial::load(&TlsFiles::new(tls_dir.join("ca.crt"), None, None))?;
        let cluster = material
            .ca_cluster_id()
            .context("not a lanmesh CA")?
            .to_owned();
        let tls = tls::client_config(
            &material,
            PeerPolicy::only(cluster, &[Role::Core, Role::Edge]),
            &[ALPN_CLIENT],
        )?;
        let endpoint =
            link::client_endpoint(tls::quinn_client_config(tls, Transport::default())?, first)?;
        let c = Client::connect(&endpoint, first, "bench").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let token = loop {
            match c
                .request(&Request::Login {
                    user: "bench".into(),
                    password: "bench".into(),
                })
                .await
            {
                Ok(Response::Token { token, .. }) => break token,
                other if Instant::now() > deadline => bail!("bench login failed: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Ok(Connector { endpoint, token })
    }

    async fn client(&self, addr: SocketAddr) -> Result<Client> {
        let c = Client::connect(&self.endpoint, addr, "bench").await?;
        c.request(&Request::Authenticate {
            token: self.token.clone(),
        })
        .await?;
        Ok(c)
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]) / 1000.0
}

async fn setup(http: &HttpClient, api: &str) -> Result<()> {
    for (path, body) in [
        ("/v1/users", r#"{"name":"bench","password":"bench"}"#),
        ("/v1/channels", r#"{"name":"bench"}"#),
    ] {
        let (s, b) = http
            .request(Method::POST, api, path, body.as_bytes().to_vec())
            .await?;
        if !s.is_success() {
            bail!("POST {path}: {s}: {}", String::from_utf8_lossy(&b));
        }
    }
    Ok(())
}

/// One run: P publishers and M subscribers against `addr`, one subscriber on `other`.
async fn run_once(
    label: &str,
    conn: &Arc<Connector>,
    addr: SocketAddr,
    other: Option<SocketAddr>,
    publishers: usize,
    s: &Settings,
) -> Result<()> {
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    let n_subs = s.subscribers + usize::from(other.is_some());
    for i in 0..n_subs {
        let target = match other {
            Some(o) if i == s.subscribers => o,
            _ => addr,
        };
        let c = conn.client(target).await?;
        let mut sub = c.subscribe("bench").await?;
        let stop = stop.clone();
        subs.push(tokio::spawn(async move {
            let _keep = c;
            let mut lat = Vec::new();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
                match next {
                    Ok(Ok(m)) if m.body.len() >= 8 => {
                        let mut t = [0u8; 8];
                        t.copy_from_slice(&m.body[..8]);
                        let sent = u64::from_be_bytes(t);
                        let now = origin.elapsed().as_micros() as u64;
                        lat.push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(ClientError::Server(e))) => {
                        eprintln!("# subscriber {i}: {}", e.message);
                    }
                    Ok(Err(_)) => break,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            lat
        }));
    }
    let posted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + s.duration;
    let started = Instant::now();
    let mut pubs = Vec::new();
    let label_owned = label.to_owned();
    for p in 0..publishers {
        let label = label_owned.clone();
        let c = conn.client(addr).await?;
        let posted = posted.clone();
        let body_size = s.body_size.max(8);
        pubs.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut body = vec![b'x'; body_size];
                let t = Instant::now();
                body[..8].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_be_bytes());
                n += 1;
                let req = Request::Post {
                    channel: "bench".into(),
                    body,
                    idempotency_key: format!("{label}-r{publishers}-p{p}-{n}"),
                };
                match c.request(&req).await {
                    Ok(Response::Posted { .. }) => {
                        posted.fetch_add(1, Ordering::Relaxed);
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut post_lat = Vec::new();
    let mut errors = 0;
    for p in pubs {
        let (l, e) = p.await?;
        post_lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut delivered = Vec::new();
    let mut cross = Vec::new();
    for (i, t) in subs.into_iter().enumerate() {
        let l = t.await?;
        if i == s.subscribers {
            cross = l;
        } else {
            delivered.extend(l);
        }
    }
    post_lat.sort_unstable();
    delivered.sort_unstable();
    cross.sort_unstable();
    let ok = posted.load(Ordering::Relaxed);
    println!(
        "lanmesh  {label:<10} publishers {publishers:>4} subscribers {:>3}  {:>9.0} msgs/s  post p50 {:>6.2} ms p99 {:>6.2} ms  delivery p50 {:>6.2} ms p99 {:>6.2} ms  other-node delivery p50 {:>6.2} ms p99 {:>6.2} ms  errors {errors}",
        s.subscribers,
        ok as f64 / elapsed.as_secs_f64(),
        pct(&post_lat, 0.5),
        pct(&post_lat, 0.99),
        pct(&delivered, 0.5),
        pct(&delivered, 0.99),
        pct(&cross, 0.5),
        pct(&cross, 0.99),
    );
    if s.subscribers > 0 && (delivered.len() as u64) < ok * s.subscribers as u64 {
        println!(
            "#   subscribers received {} of {} deliveries (a lagging subscriber is told and skips)",
            delivered.len(),
            ok * s.subscribers as u64
        );
    }
    Ok(())
}

async fn synced(http: &HttpClient, api: &str) -> Option<u64> {
    let (_, body) = http
        .request(Method::GET, api, "/metrics", Vec::new())
        .await
        .ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("lanmesh_messages_synced_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the messaging bench. `node(i, false)` kills node `i`, `node(i, true)`
/// starts it again.
pub async fn run(
    cluster: &Cluster<'_>,
    settings: &Settings,
    http: &HttpClient,
    node: &mut dyn FnMut(usize, bool) -> Result<()>,
) -> Result<()> {
    setup(http, &cluster.nodes[0].1).await?;
    let addr = client_addr(&cluster.nodes[0].2)?;
    let other = match cluster.nodes.get(1) {
        Some(n) => Some(client_addr(&n.2)?),
        None => None,
    };
    let conn = Arc::new(Connector::new(cluster.tls_dir, addr).await?);
    for &p in &settings.publishers {
        run_once("messages", &conn, addr, other, p, settings).await?;
    }
    if settings.convergence == 0 {
        return Ok(());
    }
    if cluster.nodes.len() < 2 {
        bail!("--convergence needs --spawn 2 or more");
    }
    let last = cluster.nodes.len() - 1;
    node(last, false)?;
    let c = conn.client(addr).await?;
    let mut posted = 0;
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let c = c.clone();
            let n = settings.convergence;
            let size = settings.body_size;
            tokio::spawn(async move {
                let mut ok = 0usize;
                for i in (w..n).step_by(32) {
                    let req = Request::Post {
                        channel: "bench".into(),
                        body: vec![b'y'; size],
                        idempotency_key: format!("conv-{i}"),
                    };
                    if matches!(c.request(&req).await, Ok(Response::Posted { .. })) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    for w in workers {
        posted += w.await?;
    }
    let launched = Instant::now();
    node(last, true)?;
    let api = &cluster.nodes[last].1;
    let deadline = launched + Duration::from_secs(120);
    let mut ready = None;
    loop {
        match synced(http, api).await {
            Some(n) if n >= posted as u64 => break,
            Some(_) if ready.is_none() => ready = Some(launched.elapsed()),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("{} did not catch up within 120 s", cluster.nodes[last].0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = launched.elapsed();
    let ready = ready.unwrap_or(took);
    println!(
        "lanmesh  convergence {posted} messages missed by {}: level {:.0} ms after restart ({:.0} ms after its API answered; {:.0} msgs/s)",
        cluster.nodes[last].0,
        took.as_secs_f64() * 1000.0,
        (took - ready).as_secs_f64() * 1000.0,
        posted as f64 / (took - ready).as_secs_f64().max(0.001)
    );
    Ok(())
}

/// An edge process started by the bench; killed when dropped.
struct EdgeProc(std::process::Child);

impl Drop for EdgeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn edge_status(http: &HttpClient, url: &str) -> Option<serde_json::Value> {
    let (s, body) = http
        .request(Method::GET, url, "/v1/status", Vec::new())
        .await
        .ok()?;
    if !s.is_success() {
        return None;
    }
    serde_json::from_slice(&body).ok()
}

async fn wait_edge(
    http: &HttpClient,
    url: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(v) = edge_status(http, url).await
            && ok(&v)
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("the edge never got to: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--workload edge`: the same publishers and subscribers through an edge
/// (its only upstream is node-1; one subscriber on node-1 measures
/// edge-to-core delivery), the same runs straight at node-1 for comparison,
/// and with `--convergence N` the outbox: node-1 is killed, N posts are
/// queued at the edge, node-1 returns, and the drain is timed.
pub async fn run_edge(
    cluster: &Cluster<'_>,
    settings: &Settings,
    http: &HttpClient,
    node: &mut dyn FnMut(usize, bool) -> Result<()>,
) -> Result<()> {
    use lanmesh_shared::pki::{Ca, LeafRequest};
    setup(http, &cluster.nodes[0].1).await?;
    let core = client_addr(&cluster.nodes[0].2)?;
    let ca = Ca::load(cluster.tls_dir)?;
    let mut req = LeafRequest::new(&ca, Role::Edge, "edge-1", 30)?;
    req.ips = vec!["127.0.0.1".parse()?];
    ca.issue(&req)?.write(cluster.tls_dir, "edge-1", true)?;
    let dir = cluster
        .nodes
        .first()
        .and_then(|n| n.2.parent())
        .context("no data directory")?
        .join("edge-1");
    let program = std::env::current_exe()?
        .parent()
        .context("no binary directory")?
        .join("edge-node");
    let log = std::fs::File::create(dir.with_extension("log"))?;
    let cluster_id = material_cluster(cluster.tls_dir)?;
    let tls = |f: &str| cluster.tls_dir.join(f).to_string_lossy().into_owned();
    let child = std::process::Command::new(&program)
        .args([
            "run",
            "--node-id",
            "edge-1",
            "--cluster-id",
            &cluster_id,
            "--data-dir",
            &dir.to_string_lossy(),
            "--client-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--upstream",
            &core.to_string(),
            "--ca",
            &tls("ca.crt"),
            "--cert",
            &tls("edge-1.crt"),
            "--key",
            &tls("edge-1.key"),
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let _edge = EdgeProc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc: serde_json::Value = loop {
        if let Ok(b) = std::fs::read(dir.join("node.json"))
            && let Ok(v) = serde_json::from_slice(&b)
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "the edge did not start (log: {})",
                dir.with_extension("log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let url = doc["http_url"].as_str().context("no http_url")?.to_owned();
    let edge_addr: SocketAddr = doc["client_addr"]
        .as_str()
        .context("no client_addr")?
        .parse()?;
    wait_edge(http, &url, "linked and synced", |v| {
        v["upstream"]["connected"] == true && v["revision"].as_u64().unwrap_or(0) > 0
    })
    .await?;
    println!("# edge-1 up, linked to node-1");
    let conn = Arc::new(Connector::new(cluster.tls_dir, edge_addr).await?);
    for &p in &settings.publishers {
        run_once("direct", &conn, core, None, p, settings).await?;
        run_once("via-edge", &conn, edge_addr, Some(core), p, settings).await?;
    }
    if settings.convergence == 0 {
        return Ok(());
    }
    node(0, false)?;
    wait_edge(http, &url, "link down", |v| {
        v["upstream"]["connected"] == false
    })
    .await?;
    let c = conn.client(edge_addr).await?;
    let n = settings.convergence;
    let filled = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let c = c.clone();
            let size = settings.body_size;
            tokio::spawn(async move {
                let mut ok = 0usize;
                for i in (w..n).step_by(64) {
                    let req = Request::Post {
                        channel: "bench".into(),
                        body: vec![b'q'; size],
                        idempotency_key: format!("outbox-{i}"),
                    };
                    if matches!(
                        c.request(&req).await,
                        Ok(Response::Posted { pending: true, .. })
                    ) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut queued = 0;
    for w in workers {
        queued += w.await?;
    }
    let fill = filled.elapsed();
    println!(
        "# queued {queued} posts at the edge while offline in {:.1} s ({:.0} posts/s, each fsynced)",
        fill.as_secs_f64(),
        queued as f64 / fill.as_secs_f64()
    );
    node(0, true)?;
    wait_edge(http, &url, "link back", |v| {
        v["upstream"]["connected"] == true
    })
    .await?;
    let drain = Instant::now();
    wait_edge(http, &url, "empty outbox", |v| v["outbox_depth"] == 0).await?;
    let took = drain.elapsed();
    println!(
        "lanmesh  outbox     drained {queued} queued posts in {:.2} s after the link returned: {:.0} msgs/s",
        took.as_secs_f64(),
        queued as f64 / took.as_secs_f64().max(0.001)
    );
    Ok(())
}

fn material_cluster(tls_dir: &Path) -> Result<String> {
    let material = TlsMaterial::load(&TlsFiles::new(tls_dir.join("ca.crt"), None, None))?;
    Ok(material
        .ca_cluster_id()
        .context("not a lanmesh CA")?
        .to_owned())
}
