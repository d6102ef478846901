//! `core-node` configuration: one struct, every field documented with its
//! default, loaded from TOML, overridden by `LANMESH_*` environment variables
//! and then by flags (clap applies flag-over-env; the file is the base), and
//! checked by [`Config::validate`] before anything starts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

/// Default admin API address.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:10000";
/// Default Raft RPC (QUIC) address.
pub const DEFAULT_RAFT_ADDR: &str = "127.0.0.1:10001";
/// Default client protocol (QUIC) address.
pub const DEFAULT_CLIENT_ADDR: &str = "127.0.0.1:10002";

/// Why the configuration cannot be used. Each variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this struct.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the field and line).
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("config: {field}: {message}")]
    Invalid {
        /// The field (config key).
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// TLS material (`[tls]` in the file; `--ca/--cert/--key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate to trust. Default: none, in which case the node creates a
    /// throw-away CA under `<data_dir>/tls/` on first start.
    pub ca: Option<PathBuf>,
    /// This node's certificate (role `core`).
    pub cert: Option<PathBuf>,
    /// This node's private key.
    pub key: Option<PathBuf>,
}

/// Whether the admin API speaks HTTPS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApiTls {
    /// HTTPS when TLS material is configured and the API address is not loopback.
    #[default]
    Auto,
    /// Always HTTPS (with the configured or throw-away certificates).
    On,
    /// Always plain HTTP.
    Off,
}

/// Raft timings and log/snapshot policy (`[raft]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    /// Leader heartbeat interval, ms. Default 40 (LAN).
    pub heartbeat_ms: u64,
    /// Election timeout lower bound, ms. Default 120 (LAN; raise for WAN-ish links).
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound, ms. Default 240. Also the leader lease.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log) every this many applied entries.
    /// Default 20000 (a snapshot copies the whole state; etcd's default is 100000).
    pub snapshot_every: u64,
    /// Keep this many log entries after a snapshot, for followers that lag a little. Default 5000.
    pub keep_logs: u64,
    /// Time allowed for sending a whole snapshot to a follower, ms. Default 30000.
    pub snapshot_timeout_ms: u64,
    /// Revisions of change history kept for edges' change feeds; an edge
    /// further behind gets a full copy. Default 100000. Set alike on every core.
    pub changes_retained: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_ms: 40,
            election_timeout_min_ms: 120,
            election_timeout_max_ms: 240,
            snapshot_every: 20_000,
            keep_logs: 5_000,
            snapshot_timeout_ms: 30_000,
            changes_retained: 100_000,
        }
    }
}

/// Presence timings (`[presence]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSection {
    /// A client is offline this long after its last heartbeat, ms. Clients
    /// are told to heartbeat every third of it. Default 15000.
    pub ttl_ms: u64,
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection { ttl_ms: 15_000 }
    }
}

/// Deployment mode (architecture: "Deployment modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One node, single-voter Raft (ready to grow), no discovery.
    Single,
    /// 3-5 cores on one LAN, mDNS discovery, automatic clustering.
    LocalCluster,
    /// Cores on the main LAN (as local-cluster); edges at other sites use static upstreams.
    MultiLan,
    /// No multicast, static peers, mutual TLS everywhere; refuses to start without its certificates.
    AirGapped,
}

impl Mode {
    /// Whether nodes find each other by mDNS.
    pub fn discovery(self) -> bool {
        matches!(self, Mode::LocalCluster | Mode::MultiLan)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole `core-node` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id, unique in the cluster; never reuse a removed node's id
    /// for an empty node. Default `node-1`.
    pub node_id: String,
    /// Cluster id; must match the certificates' cluster. Default `lanmesh`.
    pub cluster_id: String,
    /// Data directory. Default `./lanmesh-data/<node_id>`.
    pub data_dir: Option<PathBuf>,
    /// Admin API (HTTP) bind address. Default 127.0.0.1:10000. Port 0 picks a free port.
    pub api_addr: SocketAddr,
    /// Raft RPC (QUIC) bind address. Default 127.0.0.1:10001.
    pub raft_addr: SocketAddr,
    /// Client protocol (QUIC) bind address. Default 127.0.0.1:10002.
    pub client_addr: SocketAddr,
    /// Address other nodes reach this one at, when binding to 0.0.0.0/[::].
    /// Default: none (a wildcard bind then requires it).
    pub advertise_ip: Option<IpAddr>,
    /// API addresses (HOST:PORT) of the other cores, for `bootstrap_expect`. Default empty.
    pub peers: Vec<String>,
    /// Form a new cluster once this many cores (this one and `peers`) are
    /// reachable; the one with the smallest id initializes it. 0 = off (default).
    pub bootstrap_expect: usize,
    /// API address (or URL) of any member of an existing cluster to join. Default none.
    pub join: Option<String>,
    /// TLS material.
    pub tls: TlsSection,
    /// Admin API TLS. Default `auto`.
    pub api_tls: ApiTls,
    /// Largest accepted request body, bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Raft timings and snapshot policy.
    pub raft: RaftSection,
    /// Presence timings.
    pub presence: PresenceSection,
    /// Log format. Default `text`. The level comes from `RUST_LOG` (default `info`).
    pub log_format: LogFormat,
    /// Deployment mode. Default: `single` when neither `peers` nor
    /// `bootstrap_expect` nor `join` is set, else `local-cluster`.
    pub mode: Option<Mode>,
    /// mDNS priority announced for this node (lower is preferred). Default 100.
    pub priority: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            cluster_id: "lanmesh".into(),
            data_dir: None,
            api_addr: parse_default(DEFAULT_API_ADDR),
            raft_addr: parse_default(DEFAULT_RAFT_ADDR),
            client_addr: parse_default(DEFAULT_CLIENT_ADDR),
            advertise_ip: None,
            peers: Vec::new(),
            bootstrap_expect: 0,
            join: None,
            tls: TlsSection::default(),
            api_tls: ApiTls::Auto,
            max_body_bytes: 1 << 20,
            raft: RaftSection::default(),
            presence: PresenceSection::default(),
            log_format: LogFormat::Text,
            mode: None,
            priority: 100,
        }
    }
}

fn parse_default(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Flags of `core-node run` (each also a config key and a `LANMESH_*` variable).
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file (keys as in the documented example; flags and env win over it).
    #[arg(long, env = "LANMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id [default: node-1].
    #[arg(long, env = "LANMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster id [default: lanmesh].
    #[arg(long, env = "LANMESH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Data directory [default: ./lanmesh-data/<node-id>].
    #[arg(long, env = "LANMESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin API bind address [default: 127.0.0.1:10000].
    #[arg(long, env = "LANMESH_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Raft RPC (QUIC) bind address [default: 127.0.0.1:10001].
    #[arg(long, env = "LANMESH_RAFT_ADDR", value_name = "ADDR")]
    pub raft_addr: Option<SocketAddr>,
    /// Client protocol (QUIC) bind address [default: 127.0.0.1:10002].
    #[arg(long, env = "LANMESH_CLIENT_ADDR", value_name = "ADDR")]
    pub client_addr: Option<SocketAddr>,
    /// Address to advertise when binding to a wildcard address.
    #[arg(long, env = "LANMESH_ADVERTISE_IP", value_name = "IP")]
    pub advertise_ip: Option<IpAddr>,
    /// Comma-separated API addresses of the other cores (with --bootstrap-expect).
    #[arg(
        long,
        env = "LANMESH_PEERS",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub peers: Option<Vec<String>>,
    /// Form a new cluster of N cores (this one plus --peers), exactly once.
    #[arg(long, env = "LANMESH_BOOTSTRAP_EXPECT", value_name = "N")]
    pub bootstrap_expect: Option<usize>,
    /// Join the existing cluster that has a member at this API address.
    #[arg(long, env = "LANMESH_JOIN", value_name = "ADDR")]
    pub join: Option<String>,
    /// CA certificate to trust [default: a throw-away CA in <data-dir>/tls].
    #[arg(long, env = "LANMESH_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (role core).
    #[arg(long, env = "LANMESH_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This node's key.
    #[arg(long, env = "LANMESH_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Admin API TLS [default: auto: HTTPS when certificates are configured and the address is not loopback].
    #[arg(long, env = "LANMESH_API_TLS", value_enum)]
    pub api_tls: Option<ApiTls>,
    /// Log format [default: text].
    #[arg(long, env = "LANMESH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Deployment mode [default: single without peers/bootstrap/join, else local-cluster].
    #[arg(long, env = "LANMESH_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// mDNS priority of this node (lower is preferred) [default: 100].
    #[arg(long, env = "LANMESH_PRIORITY")]
    pub priority: Option<u32>,
}

impl Config {
    /// Loads the file (if any), applies env/flag overrides, and validates.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    fn apply(&mut self, a: &RunArgs) {
        macro_rules! set {
            ($($field:ident),*) => {$(if let Some(v) = &a.$field { self.$field = v.clone(); })*};
        }
        set!(
            node_id,
            cluster_id,
            api_addr,
            raft_addr,
            client_addr,
            peers,
            bootstrap_expect,
            api_tls,
            log_format
        );
        if a.data_dir.is_some() {
            self.data_dir = a.data_dir.clone();
        }
        if a.advertise_ip.is_some() {
            self.advertise_ip = a.advertise_ip;
        }
        if a.join.is_some() {
            self.join = a.join.clone();
        }
        if a.mode.is_some() {
            self.mode = a.mode;
        }
        if let Some(p) = a.priority {
            self.priority = p;
        }
        for (slot, v) in [
            (&mut self.tls.ca, &a.ca),
            (&mut self.tls.cert, &a.cert),
            (&mut self.tls.key, &a.key),
        ] {
            if v.is_some() {
                *slot = v.clone();
            }
        }
        self.peers.retain(|p| !p.trim().is_empty());
    }

    /// Checks every field; the error names the field and what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        lanmesh_shared::identity::validate_name("name", &self.node_id)
            .map_err(|e| invalid("node_id", e.to_string()))?;
        lanmesh_shared::identity::validate_name("cluster id", &self.cluster_id)
            .map_err(|e| invalid("cluster_id", e.to_string()))?;
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be at least 1"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must be larger than raft.heartbeat_ms",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be larger than raft.election_timeout_min_ms",
            ));
        }
        if r.snapshot_every == 0 {
            return Err(invalid("raft.snapshot_every", "must be at least 1"));
        }
        if self.presence.ttl_ms < 300 {
            return Err(invalid("presence.ttl_ms", "must be at least 300"));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        match (&self.tls.ca, &self.tls.cert, &self.tls.key) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => {
                return Err(invalid(
                    "tls",
                    "give all of ca, cert and key (--ca/--cert/--key), or none for the throw-away CA",
                ));
            }
        }
        if self.bootstrap_expect > 0 && self.join.is_some() {
            return Err(invalid(
                "join",
                "join an existing cluster or bootstrap a new one (bootstrap_expect), not both",
            ));
        }
        // Without mDNS every other core must be listed; with it they are found.
        if self.bootstrap_expect > 1
            && !self.mode().discovery()
            && self.peers.len() + 1 < self.bootstrap_expect
        {
            return Err(invalid(
                "peers",
                format!(
                    "bootstrap_expect is {} but only {} peer(s) are listed besides this node",
                    self.bootstrap_expect,
                    self.peers.len()
                ),
            ));
        }
        match self.mode() {
            Mode::Single
                if !self.peers.is_empty() || self.bootstrap_expect > 1 || self.join.is_some() =>
            {
                return Err(invalid(
                    "mode",
                    "single takes no peers, bootstrap_expect or join (use local-cluster or air-gapped)",
                ));
            }
            Mode::AirGapped => {
                if self.tls.ca.is_none() {
                    return Err(invalid(
                        "tls",
                        "air-gapped mode needs this node's CA and certificate (--ca/--cert/--key from `pki`)",
                    ));
                }
                if self.join_auto() {
                    return Err(invalid(
                        "join",
                        "air-gapped mode has no multicast: join a member by address",
                    ));
                }
                if self.peers.is_empty() && self.join.is_none() && self.bootstrap_expect > 1 {
                    return Err(invalid(
                        "peers",
                        "air-gapped mode needs a static peer list (--peers)",
                    ));
                }
                if self.api_tls == ApiTls::Off {
                    return Err(invalid(
                        "api_tls",
                        "air-gapped mode requires TLS everywhere",
                    ));
                }
            }
            _ => {}
        }
        if self.join_auto() && !self.mode().discovery() {
            return Err(invalid(
                "join",
                "--join auto needs mDNS discovery (mode local-cluster or multi-lan)",
            ));
        }
        for (field, addr) in [
            ("raft_addr", self.raft_addr),
            ("client_addr", self.client_addr),
        ] {
            if addr.ip().is_unspecified() && self.advertise_ip.is_none() {
                return Err(invalid(
                    field,
                    format!(
                        "{addr} is a wildcard address: set advertise_ip (--advertise-ip) to the address peers should use"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The deployment mode, defaulted as documented on [`Config::mode`].
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(
            if self.peers.is_empty() && self.bootstrap_expect == 0 && self.join.is_none() {
                Mode::Single
            } else {
                Mode::LocalCluster
            },
        )
    }

    /// Whether `join` asks for a member found by mDNS.
    pub fn join_auto(&self) -> bool {
        self.join.as_deref() == Some("auto")
    }

    /// The data directory, defaulted.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("lanmesh-data").join(&self.node_id))
    }

    /// The address peers should use for a bound socket.
    pub fn advertise(&self, bound: SocketAddr) -> SocketAddr {
        match self.advertise_ip {
            Some(ip) if bound.ip().is_unspecified() => SocketAddr::new(ip, bound.port()),
            _ => bound,
        }
    }

    /// The openraft configuration from `[raft]`.
    pub fn raft_config(&self) -> openraft::Config {
        let r = &self.raft;
        openraft::Config {
            cluster_name: self.cluster_id.clone(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: r.snapshot_timeout_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every),
            max_in_snapshot_log_to_keep: r.keep_logs,
            replication_lag_threshold: r.snapshot_every,
            enable_pre_vote: Some(true),
            // Our log store returns from `append` before its fsync (group
            // commit), so publishing on return overlaps replication with it.
            broadcast_submitted_on_append: Some(false),
            ..Default::default()
        }
    }

    /// How long to wait for a write before answering 503.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis((self.raft.election_timeout_max_ms * 6).max(2000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.api_addr.to_string(), DEFAULT_API_ADDR);
        assert_eq!(c.data_dir(), PathBuf::from("lanmesh-data/node-1"));
        c.raft_config().validate().unwrap();
    }

    /// The documented example is valid and states exactly the defaults.
    #[test]
    fn example_config_matches_defaults() {
        let example: Config =
            toml::from_str(include_str!("../../deploy/core-node.example.toml")).unwrap();
        assert_eq!(example, Config::default());
    }

    /// Every per-mode example in deploy/modes parses, validates, and is the mode it says.
    #[test]
    fn mode_examples_are_valid() {
        for (file, text, mode) in [
            (
                "single",
                include_str!("../../deploy/modes/single.toml"),
                Mode::Single,
            ),
            (
                "local-cluster",
                include_str!("../../deploy/modes/local-cluster.toml"),
                Mode::LocalCluster,
            ),
            (
                "multi-lan",
                include_str!("../../deploy/modes/multi-lan.toml"),
                Mode::MultiLan,
            ),
            (
                "air-gapped",
                include_str!("../../deploy/modes/air-gapped.toml"),
                Mode::AirGapped,
            ),
        ] {
            let c: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(c.mode(), mode, "{file}");
        }
    }

    #[test]
    fn modes_default_and_validate() {
        assert_eq!(Config::default().mode(), Mode::Single);
        let clustered = Config {
            peers: vec!["10.0.0.2:10000".into(), "10.0.0.3:10000".into()],
            bootstrap_expect: 3,
            ..Default::default()
        };
        assert_eq!(clustered.mode(), Mode::LocalCluster);
        clustered.validate().unwrap();
        let single_with_peers = Config {
            mode: Some(Mode::Single),
            ..clustered.clone()
        };
        assert!(
            single_with_peers
                .validate()
                .unwrap_err()
                .to_string()
                .contains("mode")
        );
        let air = Config {
            mode: Some(Mode::AirGapped),
            ..clustered.clone()
        };
        assert!(air.validate().unwrap_err().to_string().contains("--ca"));
        let auto = Config {
            join: Some("auto".into()),
            mode: Some(Mode::AirGapped),
            tls: TlsSection {
                ca: Some("ca".into()),
                cert: Some("c".into()),
                key: Some("k".into()),
            },
            ..Default::default()
        };
        assert!(
            auto.validate()
                .unwrap_err()
                .to_string()
                .contains("multicast")
        );
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "node_id = \"n2\"\napi_addr = \"127.0.0.1:0\"\n[raft]\nheartbeat_ms = 20\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path),
            cluster_id: Some("site".into()),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!((c.node_id.as_str(), c.cluster_id.as_str()), ("n2", "site"));
        assert_eq!(c.raft.heartbeat_ms, 20);
        assert_eq!(c.raft.election_timeout_max_ms, 240);
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "node_idd = \"x\"\n").unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("node_idd"), "{e}");
        let mut c = Config::default();
        c.raft.election_timeout_min_ms = 10;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("raft.election_timeout_min_ms")
        );
        let mut c = Config::default();
        c.tls.ca = Some("x".into());
        assert!(c.validate().unwrap_err().to_string().contains("tls"));
        let c = Config {
            raft_addr: "0.0.0.0:1".parse().unwrap(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("advertise_ip")
        );
    }
}
