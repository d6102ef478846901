//! `core-node bench`: load and failover measurements through the HTTP API.
//!
//! It drives N concurrent keep-alive clients for T seconds against a cluster
//! and prints operations/s and latency percentiles; `--failover N` kills the
//! leader (SIGKILL) N times and reports the time from the kill to the next
//! acknowledged write. `--spawn 3` starts the cluster itself on loopback (real
//! processes, temporary directories), so a whole run is one command; with
//! `--target etcd` the same is done with etcd (Debian's `etcd-server`) for a
//! like-for-like comparison through etcd's JSON gateway.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, ValueEnum};
use hyper::Method;
use lanmesh_shared::identity::Role;
use lanmesh_shared::pki::{Ca, KeyType, LeafRequest};

use crate::http::{HttpClient, Target};

/// Which system to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum System {
    /// lanmesh core nodes (admin API).
    Lanmesh,
    /// etcd v3 through its JSON gateway (/v3/kv/put, /v3/kv/range).
    Etcd,
}

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// PUT only.
    Write,
    /// Linearizable GET only (keys written first).
    Read,
    /// Stale-allowed local GET only (etcd: serializable).
    ReadLocal,
    /// Messaging: `--clients` publishers and `--subscribers` subscribers
    /// on one core's client port (lanmesh with --spawn only).
    Messages,
    /// Messaging through an edge (spawned beside the cores), compared with
    /// the same load straight at node-1; `--convergence N` times the drain of
    /// N posts queued while the edge was cut off.
    Edge,
}

/// `core-node bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// System under test.
    #[arg(long, value_enum, default_value_t = System::Lanmesh)]
    pub target: System,
    /// Start a loopback cluster of this many nodes for the run (and stop it after).
    #[arg(long, value_name = "N")]
    pub spawn: Option<usize>,
    /// API URLs of a running cluster (comma-separated), instead of --spawn.
    #[arg(long, value_delimiter = ',', value_name = "URLS")]
    pub endpoints: Vec<String>,
    /// Concurrent clients; repeat or comma-separate for several runs (e.g. 1,16,64,256).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Workloads to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "write")]
    pub workload: Vec<Workload>,
    /// Value size, bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Kill the leader this many times and report the time to the next acknowledged write
    /// (needs --spawn, so the killed node can be restarted between rounds).
    #[arg(long, default_value_t = 0)]
    pub failover: usize,
    /// Per-attempt timeout while measuring failover, ms: a write stuck on a dead
    /// leader is abandoned and retried, as a client with a deadline would.
    #[arg(long, default_value_t = 250)]
    pub failover_attempt_ms: u64,
    /// Subscribers on the loaded core (messages workload).
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// Messages workload: also stop a core, post this many messages, restart
    /// it and time anti-entropy until it is level (0 = skip).
    #[arg(long, default_value_t = 0)]
    pub convergence: usize,
    /// Path of the etcd binary (for --target etcd).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Workload.
    pub workload: Workload,
    /// Clients.
    pub clients: usize,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Sorted latencies, microseconds.
    pub latencies_us: Vec<u32>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

impl RunResult {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// `n` distinct ports free for both TCP and UDP; the probe sockets are held
/// until all are picked so none is handed out twice.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == n {
            return Ok(ports);
        }
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            ports.push(port);
            held.push((tcp, udp));
        }
    }
    bail!("no free ports found")
}

/// `n` (API, Raft) port pairs.
fn port_pairs(n: usize) -> Result<Vec<(u16, u16)>> {
    Ok(free_ports(2 * n)?.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// A cluster started by the bench; killed when dropped.
struct Spawned {
    system: System,
    dir: tempfile::TempDir,
    nodes: Vec<SpawnedNode>,
}

struct SpawnedNode {
    name: String,
    api: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Spawned {
    fn program(&self, etcd: &Path) -> Result<PathBuf> {
        Ok(match self.system {
            System::Lanmesh => {
                std::env::current_exe().context("cannot find the core-node binary")?
            }
            System::Etcd => etcd.to_owned(),
        })
    }

    fn launch(&mut self, i: usize, etcd: &Path) -> Result<()> {
        let program = self.program(etcd)?;
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", self.nodes[i].name)))?;
        let child = Command::new(&program)
            .args(&self.nodes[i].args)
            .env("RUST_LOG", "warn")
            .env("ETCD_UNSUPPORTED_ARCH", "amd64")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_lanmesh(n: usize) -> Result<Spawned> {
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    let ca = Ca::generate("bench", 30, KeyType::EcdsaP256)?;
    ca.write(&tls, false)?;
    let ports = port_pairs(n)?;
    // Client ports are fixed too, so a restarted node is found again.
    let client_ports = free_ports(n)?;
    let mut nodes = Vec::new();
    for (i, (api, raft)) in ports.iter().enumerate() {
        let name = format!("node-{}", i + 1);
        let mut req = LeafRequest::new(&ca, Role::Core, &name, 30)?;
        req.ips = vec!["127.0.0.1".parse()?];
        ca.issue(&req)?.write(&tls, &name, false)?;
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (a, _))| format!("127.0.0.1:{a}"))
            .collect();
        let mut args = vec![
            "run".to_owned(),
            "--node-id".into(),
            name.clone(),
            "--cluster-id".into(),
            "bench".into(),
            "--data-dir".into(),
            dir.path().join(&name).to_string_lossy().into_owned(),
            "--api-addr".into(),
            format!("127.0.0.1:{api}"),
            "--raft-addr".into(),
            format!("127.0.0.1:{raft}"),
            "--client-addr".into(),
            format!("127.0.0.1:{}", client_ports[i]),
            "--ca".into(),
            tls.join("ca.crt").to_string_lossy().into_owned(),
            "--cert".into(),
            tls.join(format!("{name}.crt"))
                .to_string_lossy()
                .into_owned(),
            "--key".into(),
            tls.join(format!("{name}.key"))
                .to_string_lossy()
                .into_owned(),
        ];
        if n > 1 {
            args.extend([
                "--bootstrap-expect".into(),
                n.to_string(),
                "--peers".into(),
                peers.join(","),
            ]);
        }
        nodes.push(SpawnedNode {
            name,
            api: format!("http://127.0.0.1:{api}"),
            args,
            child: None,
        });
    }
    Ok(Spawned {
        system: System::Lanmesh,
        dir,
        nodes,
    })
}

fn spawn_etcd(n: usize) -> Result<Spawned> {
    let dir = tempfile::tempdir()?;
    let ports = port_pairs(n)?;
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("e{}=http://127.0.0.1:{p}", i + 1))
        .collect();
    let nodes = ports
        .iter()
        .enumerate()
        .map(|(i, (c, p))| {
            let name = format!("e{}", i + 1);
            SpawnedNode {
                api: format!("http://127.0.0.1:{c}"),
                args: vec![
                    "--name".into(),
                    name.clone(),
                    "--data-dir".into(),
                    dir.path().join(&name).to_string_lossy().into_owned(),
                    "--listen-client-urls".into(),
                    format!("http://127.0.0.1:{c}"),
                    "--advertise-client-urls".into(),
                    format!("http://127.0.0.1:{c}"),
                    "--listen-peer-urls".into(),
                    format!("http://127.0.0.1:{p}"),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://127.0.0.1:{p}"),
                    "--initial-cluster".into(),
                    initial.join(","),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--log-level".into(),
                    "error".into(),
                ],
                name,
                child: None,
            }
        })
        .collect();
    Ok(Spawned {
        system: System::Etcd,
        dir,
        nodes,
    })
}

/// The driver: knows how to talk to one system.
struct Driver {
    system: System,
    http: HttpClient,
    value: Vec<u8>,
}

impl Driver {
    fn request(&self, workload: Workload, key: usize) -> (Method, String, Vec<u8>) {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let key = format!("bench/{key:08}");
        match (self.system, workload) {
            // Messages never reach the HTTP driver (see msgbench).
            (System::Lanmesh, Workload::Write | Workload::Messages | Workload::Edge) => {
                (Method::PUT, format!("/v1/kv/{key}"), self.value.clone())
            }
            (System::Lanmesh, Workload::Read) => (Method::GET, format!("/v1/kv/{key}"), Vec::new()),
            (System::Lanmesh, Workload::ReadLocal) => (
                Method::GET,
                format!("/v1/kv/{key}?consistency=local"),
                Vec::new(),
            ),
            (System::Etcd, Workload::Write | Workload::Messages | Workload::Edge) => (
                Method::POST,
                "/v3/kv/put".into(),
                serde_json::json!({"key": b64(key.as_bytes()), "value": b64(&self.value)})
                    .to_string()
                    .into_bytes(),
            ),
            (System::Etcd, Workload::Read) => (
                Method::POST,
                "/v3/kv/range".into(),
                serde_json::json!({"key": b64(key.as_bytes())})
                    .to_string()
                    .into_bytes(),
            ),
            (System::Etcd, Workload::ReadLocal) => (
                Method::POST,
                "/v3/kv/range".into(),
                serde_json::json!({"key": b64(key.as_bytes()), "serializable": true})
                    .to_string()
                    .into_bytes(),
            ),
        }
    }

    /// Node id of the leader, as the system reports it through `url`.
    async fn leader(&self, url: &str) -> Result<String> {
        match self.system {
            System::Lanmesh => {
                let (status, body) = self
                    .http
                    .request(Method::GET, url, "/v1/status", Vec::new())
                    .await?;
                if !status.is_success() {
                    bail!("status {status}");
                }
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                v["leader_id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("no leader yet")
            }
            System::Etcd => {
                let (_, body) = self
                    .http
                    .request(Method::POST, url, "/v3/maintenance/status", b"{}".to_vec())
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                let leader = v["leader"].as_str().context("no leader yet")?.to_owned();
                let (_, body) = self
                    .http
                    .request(Method::POST, url, "/v3/cluster/member/list", b"{}".to_vec())
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                v["members"]
                    .as_array()
                    .and_then(|ms| ms.iter().find(|m| m["ID"].as_str() == Some(&leader)))
                    .and_then(|m| m["name"].as_str())
                    .map(str::to_owned)
                    .context("leader not in member list")
            }
        }
    }

    /// One acknowledged write through `url` (used for readiness and failover).
    async fn write_once(&self, url: &str, key: usize) -> bool {
        self.write_with(&self.http, url, key).await
    }

    async fn write_with(&self, http: &HttpClient, url: &str, key: usize) -> bool {
        let (method, path, body) = self.request(Workload::Write, key);
        matches!(http.request(method, url, &path, body).await, Ok((s, _)) if s.is_success())
    }
}

async fn wait_ready(driver: &Driver, spawned: &Spawned, want_all: bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut leader = None;
        let mut agree = 0;
        for n in spawned.nodes.iter().filter(|n| n.child.is_some()) {
            if let Ok(l) = driver.leader(&n.api).await {
                agree += usize::from(leader.as_ref().is_none_or(|x| *x == l));
                leader = Some(l);
            }
        }
        let alive = spawned.nodes.iter().filter(|n| n.child.is_some()).count();
        if let Some(l) = leader
            && (!want_all || agree == alive)
            && let Some(n) = spawned.nodes.iter().find(|n| n.name == l)
            && driver.write_once(&n.api, 0).await
        {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!(
                "cluster not ready within 60 s (logs in {})",
                spawned.dir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn load(
    driver: &std::sync::Arc<Driver>,
    url: &str,
    workload: Workload,
    clients: usize,
    duration: Duration,
    keys: usize,
) -> Result<RunResult> {
    let target = Target::parse(url)?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let driver = driver.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error: Option<String> = None;
            let mut conn = None;
            let mut i = c;
            while Instant::now() < deadline {
                if conn.is_none() {
                    match driver.http.connect(&target).await {
                        Ok(cn) => conn = Some(cn),
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let (method, path, body) = driver.request(workload, i % keys);
                i += clients;
                let t = Instant::now();
                let Some(cn) = conn.as_mut() else {
                    continue;
                };
                let outcome = cn.send(method, &path, body).await;
                match outcome {
                    Ok((s, _)) if s.is_success() => {
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
                    }
                    Ok((s, body)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| {
                            format!("{s}: {}", String::from_utf8_lossy(&body).trim())
                        });
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        conn = None;
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await?;
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(RunResult {
        workload,
        clients,
        ok: latencies.len() as u64,
        errors,
        elapsed,
        latencies_us: latencies,
        first_error,
    })
}

/// Writes every key once, so reads never miss.
async fn prefill(driver: &std::sync::Arc<Driver>, url: &str, keys: usize) -> Result<()> {
    const WRITERS: usize = 32;
    let target = Target::parse(url)?;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let driver = driver.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = driver.http.connect(&target).await?;
            for k in (w..keys).step_by(WRITERS) {
                let (method, path, body) = driver.request(Workload::Write, k);
                let (status, answer) = conn.send(method, &path, body).await?;
                if !status.is_success() {
                    bail!(
                        "prefill write failed: {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn print_result(system: System, r: &RunResult) {
    println!(
        "{:<8} {:<10} clients {:>4}  {:>9.0} ops/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  errors {}",
        format!("{system:?}").to_lowercase(),
        format!("{:?}", r.workload).to_lowercase(),
        r.clients,
        r.rate(),
        r.pct(0.5),
        r.pct(0.9),
        r.pct(0.99),
        r.latencies_us
            .last()
            .map(|v| f64::from(*v) / 1000.0)
            .unwrap_or(0.0),
        r.errors
    );
    if let Some(e) = &r.first_error {
        println!("#   first error: {e}");
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs the benchmark and prints the figures. Ctrl-C or SIGTERM stops it and
/// the cluster it spawned (the spawned nodes are killed when it unwinds).
pub async fn run(args: BenchArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run_inner(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; spawned nodes stopped"),
        _ = term.recv() => bail!("terminated; spawned nodes stopped"),
    }
}

async fn run_inner(args: BenchArgs) -> Result<()> {
    let driver = std::sync::Arc::new(Driver {
        system: args.target,
        http: HttpClient::new(None, Some(Duration::from_secs(10))),
        value: vec![b'x'; args.value_size],
    });
    let mut spawned = match (args.spawn, args.target) {
        (Some(n), System::Lanmesh) => Some(spawn_lanmesh(n)?),
        (Some(n), System::Etcd) => Some(spawn_etcd(n)?),
        (None, _) => None,
    };
    let endpoints: Vec<String> = match &mut spawned {
        Some(s) => {
            for i in 0..s.nodes.len() {
                s.launch(i, &args.etcd_bin)?;
            }
            let leader = wait_ready(&driver, s, true).await?;
            println!("# {} nodes up on loopback, leader {leader}", s.nodes.len());
            if args.target == System::Lanmesh {
                // Idle memory of each node before load.
                for n in &s.nodes {
                    if let Some(pid) = n.child.as_ref().map(Child::id) {
                        println!("# idle RSS {}: {} KiB", n.name, rss_kib(pid).unwrap_or(0));
                    }
                }
            }
            s.nodes.iter().map(|n| n.api.clone()).collect()
        }
        None => args.endpoints.clone(),
    };
    if endpoints.is_empty() {
        bail!("give --spawn N or --endpoints URL[,URL...]");
    }
    // Send the load to the leader (followers would forward; this measures the
    // cluster, not the extra hop).
    let leader = driver.leader(&endpoints[0]).await?;
    let url = match &spawned {
        Some(s) => s
            .nodes
            .iter()
            .find(|n| n.name == leader)
            .map(|n| n.api.clone())
            .unwrap_or(endpoints[0].clone()),
        None => endpoints[0].clone(),
    };
    let duration = Duration::from_secs(args.duration);
    for workload in &args.workload {
        if matches!(*workload, Workload::Messages | Workload::Edge) {
            let Some(s) = spawned.as_mut() else {
                bail!(
                    "--workload messages needs --spawn N (the bench creates its user and channel)"
                );
            };
            if args.target != System::Lanmesh {
                bail!("--workload messages is lanmesh only");
            }
            let tls_dir = s.dir.path().join("tls");
            let nodes = s
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.api.clone(), s.dir.path().join(&n.name)))
                .collect();
            let cluster = crate::msgbench::Cluster {
                tls_dir: &tls_dir,
                nodes,
            };
            let settings = crate::msgbench::Settings {
                publishers: args.clients.clone(),
                subscribers: args.subscribers,
                duration,
                body_size: args.value_size,
                convergence: args.convergence,
            };
            let etcd = args.etcd_bin.clone();
            let mut control = |i: usize, start: bool| -> Result<()> {
                if start {
                    s.launch(i, &etcd)
                } else {
                    s.kill(i);
                    Ok(())
                }
            };
            if *workload == Workload::Edge {
                crate::msgbench::run_edge(&cluster, &settings, &driver.http, &mut control).await?;
            } else {
                crate::msgbench::run(&cluster, &settings, &driver.http, &mut control).await?;
            }
            continue;
        }
        if *workload != Workload::Write {
            prefill(&driver, &url, args.keys).await?;
        }
        for clients in &args.clients {
            let r = load(&driver, &url, *workload, *clients, duration, args.keys).await?;
            print_result(args.target, &r);
        }
    }
    if args.failover > 0 {
        let Some(s) = spawned.as_mut() else {
            bail!("--failover needs --spawn (the bench restarts the killed node between rounds)");
        };
        let mut times = Vec::new();
        let impatient =
            HttpClient::new(None, Some(Duration::from_millis(args.failover_attempt_ms)));
        for round in 0..args.failover {
            let leader = wait_ready(&driver, s, true).await?;
            let i = s
                .nodes
                .iter()
                .position(|n| n.name == leader)
                .context("leader not among spawned nodes")?;
            let others: Vec<String> = s
                .nodes
                .iter()
                .filter(|n| n.name != leader)
                .map(|n| n.api.clone())
                .collect();
            s.kill(i);
            let killed = Instant::now();
            let mut k = 0;
            let took = loop {
                let url = &others[k % others.len()];
                k += 1;
                if driver.write_with(&impatient, url, k).await {
                    break killed.elapsed();
                }
                if killed.elapsed() > Duration::from_secs(30) {
                    bail!("no write acknowledged within 30 s of killing the leader");
                }
            };
            println!(
                "# failover round {}: killed {leader}, next acknowledged write after {:.0} ms",
                round + 1,
                took.as_secs_f64() * 1000.0
            );
            times.push(took);
            s.launch(i, &args.etcd_bin)?;
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<8} failover   rounds {:>3}  median {:.0} ms  min {:.0} ms  max {:.0} ms",
            format!("{:?}", args.target).to_lowercase(),
            times.len(),
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1])
        );
    }
    Ok(())
}
