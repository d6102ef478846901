//! `edge-node run` configuration: built-in defaults, a TOML file
//! (`--config`), `LANMESH_*` variables and flags, in rising precedence.
//! Every key is documented in `deploy/edge-node.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

/// Certificates (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The cluster CA.
    pub ca: Option<PathBuf>,
    /// This edge's certificate (`pki issue edge --name NODE_ID`).
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
}

/// The whole edge configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This edge's id: the name in its certificate. Default `edge-1`.
    pub node_id: String,
    /// Cluster id; must match the certificates. Default `lanmesh`.
    pub cluster_id: String,
    /// Data directory (cache.db, outbox.db, audit.db). Default `./lanmesh-data/<node_id>`.
    pub data_dir: Option<PathBuf>,
    /// Client protocol (QUIC) for the site's clients and relayed edges. Default 127.0.0.1:10102.
    pub client_addr: SocketAddr,
    /// Status, health and metrics (HTTP). Default 127.0.0.1:10100.
    pub http_addr: SocketAddr,
    /// Client-port addresses of cores (or of a relay edge), in priority order.
    /// Empty: cores found by mDNS, lowest announced priority first.
    pub upstream: Vec<String>,
    /// Certificates (required).
    pub tls: TlsSection,
    /// A site client is present this long after its last heartbeat, ms. Default 15000.
    pub presence_ttl_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "edge-1".into(),
            cluster_id: "lanmesh".into(),
            data_dir: None,
            client_addr: SocketAddr::from(([127, 0, 0, 1], 10102)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 10100)),
            upstream: Vec::new(),
            tls: TlsSection::default(),
            presence_ttl_ms: 15_000,
        }
    }
}

/// Flags of `edge-node run` (each also a config key and a `LANMESH_*` variable).
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file (keys as in deploy/edge-node.example.toml).
    #[arg(long, env = "LANMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This edge's id (the name in its certificate) [default: edge-1].
    #[arg(long, env = "LANMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster id [default: lanmesh].
    #[arg(long, env = "LANMESH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Data directory [default: ./lanmesh-data/<node_id>].
    #[arg(long, env = "LANMESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client port (QUIC) [default: 127.0.0.1:10102].
    #[arg(long, env = "LANMESH_CLIENT_ADDR", value_name = "ADDR")]
    pub client_addr: Option<SocketAddr>,
    /// Status/health/metrics port (HTTP) [default: 127.0.0.1:10100].
    #[arg(long, env = "LANMESH_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Upstream client ports (cores or a relay edge), in priority order; empty: mDNS.
    #[arg(
        long,
        env = "LANMESH_UPSTREAM",
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    pub upstream: Option<Vec<String>>,
    /// Cluster CA certificate.
    #[arg(long, env = "LANMESH_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This edge's certificate (role edge).
    #[arg(long, env = "LANMESH_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This edge's key.
    #[arg(long, env = "LANMESH_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl Config {
    /// Defaults, then the file, then variables and flags; validated.
    pub fn load(args: &RunArgs) -> Result<Self> {
        let mut c = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &args.node_id {
            c.node_id = v.clone();
        }
        if let Some(v) = &args.cluster_id {
            c.cluster_id = v.clone();
        }
        if args.data_dir.is_some() {
            c.data_dir = args.data_dir.clone();
        }
        if let Some(v) = args.client_addr {
            c.client_addr = v;
        }
        if let Some(v) = args.http_addr {
            c.http_addr = v;
        }
        if let Some(v) = &args.upstream {
            c.upstream = v.iter().filter(|s| !s.is_empty()).cloned().collect();
        }
        for (slot, v) in [
            (&mut c.tls.ca, &args.ca),
            (&mut c.tls.cert, &args.cert),
            (&mut c.tls.key, &args.key),
        ] {
            if v.is_some() {
                *slot = v.clone();
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            )
        })
    }

    /// Checks what can be checked before starting.
    pub fn validate(&self) -> Result<()> {
        lanmesh_shared::identity::validate_name("name", &self.node_id)
            .map_err(|e| anyhow::anyhow!("node_id: {e}"))?;
        if self.tls.ca.is_none() || self.tls.cert.is_none() || self.tls.key.is_none() {
            bail!(
                "an edge needs the cluster CA and its own edge certificate: give --ca, --cert and --key \
                 (mint them with `pki issue edge --name {} --ca-dir CA_DIR --out DIR`)",
                self.node_id
            );
        }
        if self.presence_ttl_ms < 300 {
            bail!("presence_ttl_ms must be at least 300");
        }
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("lanmesh-data").join(&self.node_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example parses and states exactly the defaults.
    #[test]
    fn example_config_matches_defaults() {
        let example: Config =
            toml::from_str(include_str!("../../deploy/edge-node.example.toml")).unwrap();
        assert_eq!(example, Config::default());
    }
}
