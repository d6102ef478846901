//! A harness for clusters of real `core-node` processes on loopback.
//!
//! Certificates come from `lanmesh_shared::pki` (one CA per cluster), each node
//! gets its own temporary data directory and log file, addresses are port 0 or
//! free ports picked at run time (never fixed), every wait has a deadline, and
//! every child is killed on drop — with the tail of its log printed when the
//! test is failing, so a CI failure explains itself.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use core_node::http::HttpClient;
use hyper::{Method, StatusCode};
use lanmesh_shared::identity::Role;
use lanmesh_shared::pki::{Ca, Issued, KeyType, LeafRequest};
use serde_json::Value;

use crate::bin;

/// How long a cluster may take to elect a leader in tests (debug build, busy CI).
pub const ELECTION_DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 25 ms until it yields `Some`, or panics naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `n` distinct ports that were free a moment ago on 127.0.0.1, for both TCP
/// and UDP. Used only where an address must be known before the process
/// starts (`--peers`); everything else binds port 0. The probe sockets are
/// held until all `n` are picked, so the kernel cannot hand out one twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        assert!(tries < 1000, "no free ports");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("local addr").port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            ports.push(port);
            held.push((tcp, udp));
        }
    }
    ports
}

/// One port that was free a moment ago (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// A plain HTTP call; `None` when nothing answered.
pub async fn http(
    method: Method,
    api: &str,
    path: &str,
    body: impl Into<Vec<u8>>,
) -> Option<(StatusCode, Vec<u8>)> {
    HttpClient::new(None, Some(Duration::from_secs(10)))
        .request(method, api, path, body.into())
        .await
        .ok()
        .map(|(s, b)| (s, b.to_vec()))
}

/// GET returning JSON when the status is 200.
pub async fn get_json(api: &str, path: &str) -> Option<Value> {
    match http(Method::GET, api, path, Vec::new()).await? {
        (StatusCode::OK, body) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// The cluster CA and certificate minting for a test.
#[derive(Debug)]
pub struct Pki {
    /// Where ca.crt and the issued files are.
    pub dir: PathBuf,
    /// The CA.
    pub ca: Ca,
}

impl Pki {
    /// A new CA for `cluster` written into `dir`.
    pub fn new(dir: &Path, cluster: &str) -> Self {
        let ca = Ca::generate(cluster, 30, KeyType::EcdsaP256).expect("generate CA");
        ca.write(dir, false).expect("write CA");
        Pki {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// Issues `role`/`name` (with 127.0.0.1) and writes NAME.crt/NAME.key.
    pub fn issue(&self, role: Role, name: &str) -> Issued {
        let mut req = LeafRequest::new(&self.ca, role, name, 30).expect("request");
        req.ips = vec!["127.0.0.1".parse().expect("ip")];
        let issued = self.ca.issue(&req).expect("issue");
        issued.write(&self.dir, name, true).expect("write cert");
        issued
    }

    /// `--ca/--cert/--key` arguments for node `name` (issuing its certificate).
    pub fn node_args(&self, name: &str) -> Vec<String> {
        self.issue(Role::Core, name);
        vec![
            "--ca".into(),
            self.dir.join("ca.crt").display().to_string(),
            "--cert".into(),
            self.dir.join(format!("{name}.crt")).display().to_string(),
            "--key".into(),
            self.dir.join(format!("{name}.key")).display().to_string(),
        ]
    }
}

/// One `core-node` process.
#[derive(Debug)]
pub struct NodeProc {
    /// Node id.
    pub name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// `http://127.0.0.1:PORT` once started.
    pub api: String,
    /// Raft address once started.
    pub raft: Option<SocketAddr>,
    /// Client protocol address once started.
    pub client: Option<SocketAddr>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    netns: Option<String>,
    cwd: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    program: &'static str,
}

impl NodeProc {
    /// Describes a node; call [`NodeProc::start`] to run it.
    pub fn new(name: &str, data_dir: &Path, cwd: &Path, args: Vec<String>) -> Self {
        NodeProc {
            name: name.to_owned(),
            data_dir: data_dir.to_owned(),
            api: String::new(),
            raft: None,
            client: None,
            args,
            env: Vec::new(),
            netns: None,
            cwd: cwd.to_owned(),
            log: cwd.join(format!("{name}.log")),
            child: None,
            program: "core-node",
        }
    }

    /// Describes an `edge-node run` process (`api` is then its HTTP status URL).
    pub fn edge(name: &str, data_dir: &Path, cwd: &Path, args: Vec<String>) -> Self {
        let mut node = NodeProc::new(name, data_dir, cwd, args);
        node.program = "edge-node";
        node
    }

    /// Adds an environment variable for the process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Runs the process inside network namespace `ns` (see `netns`).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// Starts the process and waits until it reports its addresses.
    pub async fn start(&mut self) {
        let node_file = self.data_dir.join("node.json");
        let _ = std::fs::remove_file(&node_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the program, so the child's pid is the node's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(self.program));
                c
            }
            None => Command::new(bin(self.program)),
        };
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LANMESH_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn node"));
        let name = self.name.clone();
        let doc: Value = wait_for(&format!("{name} to start"), Duration::from_secs(30), || {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "{name} exited during start ({status}):\n{}",
                    self.log_tail(40)
                );
            }
            let doc = std::fs::read(&node_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            async move { doc }
        })
        .await;
        self.api = doc["api_url"]
            .as_str()
            .or(doc["http_url"].as_str())
            .expect("api_url or http_url")
            .to_owned();
        self.raft = doc["raft_addr"].as_str().and_then(|a| a.parse().ok());
        self.client = doc["client_addr"].as_str().and_then(|a| a.parse().ok());
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (the node hands leadership over first).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Restarts on the same addresses (its data is kept).
    pub async fn restart(&mut self) {
        self.kill9();
        if self.program == "edge-node" {
            self.start().await;
            return;
        }
        let api = self.api.trim_start_matches("http://").to_owned();
        let raft = self.raft.map(|r| r.to_string()).unwrap_or_default();
        set_arg(&mut self.args, "--api-addr", &api);
        set_arg(&mut self.args, "--raft-addr", &raft);
        // Clients and edges that knew the old client port find it again.
        if let Some(client) = self.client {
            set_arg(&mut self.args, "--client-addr", &client.to_string());
        }
        self.start().await;
    }

    /// This node's `/v1/status`, if it answers.
    pub async fn status(&self) -> Option<Value> {
        get_json(&self.api, "/v1/status").await
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn set_arg(args: &mut Vec<String>, flag: &str, value: &str) {
    if let Some(i) = args.iter().position(|a| a == flag) {
        args[i + 1] = value.to_owned();
    } else {
        args.extend([flag.to_owned(), value.to_owned()]);
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- last log lines of {} ---\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        self.kill9();
    }
}

/// A cluster of core nodes sharing one CA.
#[derive(Debug)]
pub struct Cluster {
    /// Nodes, in start order.
    pub nodes: Vec<NodeProc>,
    /// The CA.
    pub pki: Pki,
    /// Cluster id.
    pub cluster_id: String,
    config: PathBuf,
    // Last: dropped after the nodes, so their files outlive the processes.
    tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes with `--bootstrap-expect n` and waits for one leader.
    /// `raft_toml` is extra `[raft]` configuration (empty for defaults).
    pub async fn start(n: usize, raft_toml: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        // Unique per cluster: these nodes announce themselves on mDNS, and a
        // killed predecessor's announcement may still sit in caches.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n_cluster = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cluster_id = format!("t{}-{n_cluster}", std::process::id());
        let pki_dir = tmp.path().join("pki");
        std::fs::create_dir_all(&pki_dir).expect("pki dir");
        let pki = Pki::new(&pki_dir, &cluster_id);
        let config = tmp.path().join("node.toml");
        std::fs::write(&config, format!("[raft]\n{raft_toml}\n")).expect("config");
        let flat = free_ports(2 * n);
        let ports: Vec<(u16, u16)> = flat.chunks(2).map(|c| (c[0], c[1])).collect();
        let mut nodes = Vec::new();
        for (i, (api, raft)) in ports.iter().enumerate() {
            let name = format!("node-{}", i + 1);
            let peers: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (a, _))| format!("127.0.0.1:{a}"))
                .collect();
            let mut args = Self::base_args(tmp.path(), &config, &cluster_id, &name);
            args.extend(pki.node_args(&name));
            args.extend([
                "--api-addr".into(),
                format!("127.0.0.1:{api}"),
                "--raft-addr".into(),
                format!("127.0.0.1:{raft}"),
            ]);
            if n > 1 {
                args.extend([
                    "--bootstrap-expect".into(),
                    n.to_string(),
                    "--peers".into(),
                    peers.join(","),
                ]);
            }
            nodes.push(NodeProc::new(
                &name,
                &tmp.path().join(&name),
                tmp.path(),
                args,
            ));
        }
        for node in &mut nodes {
            node.start().await;
        }
        let cluster = Cluster {
            nodes,
            pki,
            cluster_id,
            config,
            tmp,
        };
        cluster.leader().await;
        cluster
    }

    fn base_args(tmp: &Path, config: &Path, cluster_id: &str, name: &str) -> Vec<String> {
        vec![
            "run".into(),
            "--config".into(),
            config.display().to_string(),
            "--node-id".into(),
            name.into(),
            "--cluster-id".into(),
            cluster_id.into(),
            "--data-dir".into(),
            tmp.join(name).display().to_string(),
            "--client-addr".into(),
            "127.0.0.1:0".into(),
        ]
    }

    /// Starts a new node that joins through node `via`'s API (port 0 everywhere).
    pub async fn join_new(&mut self, name: &str, via: usize) -> usize {
        let mut args = Self::base_args(self.tmp.path(), &self.config, &self.cluster_id, name);
        args.extend(self.pki.node_args(name));
        args.extend([
            "--api-addr".into(),
            "127.0.0.1:0".into(),
            "--raft-addr".into(),
            "127.0.0.1:0".into(),
            "--join".into(),
            self.nodes[via].api.clone(),
        ]);
        let mut node = NodeProc::new(name, &self.tmp.path().join(name), self.tmp.path(), args);
        node.start().await;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The leader every running node agrees on: (index, name).
    pub async fn leader(&self) -> (usize, String) {
        let nodes: Vec<(usize, String)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_running())
            .map(|(i, n)| (i, n.api.clone()))
            .collect();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        wait_for(
            "all running nodes to agree on one leader",
            ELECTION_DEADLINE,
            || {
                let nodes = nodes.clone();
                let names = names.clone();
                async move {
                    let mut leader: Option<String> = None;
                    for (_, api) in &nodes {
                        let s = get_json(api, "/v1/status?consistency=local").await?;
                        let l = s["leader_id"].as_str()?.to_owned();
                        if leader.as_ref().is_some_and(|x| *x != l) {
                            return None;
                        }
                        leader = Some(l);
                    }
                    let leader = leader?;
                    let i = names.iter().position(|n| *n == leader)?;
                    nodes.iter().any(|(j, _)| *j == i).then_some((i, leader))
                }
            },
        )
        .await
    }

    /// Temporary directory of the cluster.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

/// Waits until `api` lists `node` as a voter.
pub async fn wait_voter(api: &str, node: &str, timeout: Duration) {
    wait_for(&format!("{node} to become a voter"), timeout, || async {
        let m = get_json(api, "/v1/members").await?;
        m["members"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == node && m["suffrage"] == "voter")
            .then_some(())
    })
    .await
}

/// PUT a key through `api`; returns the revision.
pub async fn put(api: &str, key: &str, value: &str) -> u64 {
    let (status, body) = http(
        Method::PUT,
        api,
        &format!("/v1/kv/{key}"),
        value.as_bytes().to_vec(),
    )
    .await
    .unwrap_or_else(|| panic!("no answer from {api}"));
    assert_eq!(
        status,
        StatusCode::OK,
        "PUT {key}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).expect("json");
    v["revision"].as_u64().expect("revision")
}

/// GET a key through `api` (linearizable unless `local`); `None` on 404.
pub async fn get(api: &str, key: &str, local: bool) -> Option<String> {
    let q = if local { "?consistency=local" } else { "" };
    let (status, body) = http(Method::GET, api, &format!("/v1/kv/{key}{q}"), Vec::new())
        .await
        .unwrap_or_else(|| panic!("no answer from {api}"));
    match status {
        StatusCode::OK => Some(String::from_utf8_lossy(&body).into_owned()),
        StatusCode::NOT_FOUND => None,
        other => panic!(
            "GET {key} on {api}: {other}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}
