//! `pki`: mints the local CA and the certificates of a lanmesh cluster.
//!
//! This file is the doorway: flags and help text. The work is in `commands`,
//! which is a thin layer over `lanmesh_shared::pki`.

mod commands;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use lanmesh_shared::identity::Role;
use lanmesh_shared::pki::{DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, KeyType};

const AFTER_HELP: &str = "\
A typical site, run once on a trusted machine:
  pki init --cluster-id site-a --out ./ca
  pki issue core --name node-1 --ip 10.0.1.11 --ca-dir ./ca --out ./certs/node-1
  pki issue edge --name edge-b --ip 10.2.0.5 --ca-dir ./ca --out ./certs/edge-b
  pki issue operator --name alice --ca-dir ./ca --out ./certs/alice
  pki list ./certs/node-1
Copy each ./certs/NAME directory to its machine and start it with
  --ca ca.crt --cert NAME.crt --key NAME.key
Keep ./ca/ca.key offline: it is needed only to issue, renew and revoke.";

/// Mint and inspect the certificates of a lanmesh cluster: the cluster CA, and
/// certificates for core nodes, edges, operators and clients. Works offline;
/// no server, no network.
#[derive(Debug, Parser)]
#[command(name = "pki", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    #[command(after_help = "Example:\n  pki init --cluster-id site-a --out ./ca")]
    Init {
        /// Cluster id every certificate of this CA will carry (nodes refuse peers of
        /// another cluster id). 1-63 characters: letters, digits, '.', '_', '-'.
        #[arg(long, env = "LANMESH_CLUSTER_ID")]
        cluster_id: String,
        /// Directory to write ca.crt and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime of the CA certificate, in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_name = "N")]
        days: u32,
        /// Key algorithm.
        #[arg(long, value_enum, default_value_t = KeyArg::EcdsaP256)]
        key_type: KeyArg,
        /// Replace an existing CA in DIR. Every certificate it issued stops being trusted.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate and key for a core node, edge, operator or client:
    /// DIR/NAME.crt and DIR/NAME.key (mode 0600), plus a copy of ca.crt.
    #[command(after_help = "\
Roles:
  core      Raft voter; serves and dials (server + client auth)
  edge      site proxy; serves clients and dials upstream (server + client auth)
  operator  a person or script using the admin API and CLI (client auth)
  client    an application or device on the client protocol (client auth)

Every certificate carries the URI SAN lanmesh://<cluster-id>/<role>/<name>;
that, not the IP or DNS name, is what lanmesh peers check. Add --ip/--dns for
other tools (curl, browsers) that check host names.

Example:
  pki issue core --name node-1 --ip 10.0.1.11 --dns node-1.lan --ca-dir ./ca --out ./certs/node-1")]
    Issue {
        /// What the holder is.
        #[arg(value_enum)]
        role: RoleArg,
        /// The holder's name (node id, edge id, user name). Letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: String,
        /// An IP address SAN (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// A DNS name SAN (repeatable).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// Lifetime in days.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_name = "N")]
        days: u32,
        /// Directory holding ca.crt and ca.key (from `pki init`).
        #[arg(long, env = "LANMESH_CA_DIR", value_name = "DIR")]
        ca_dir: PathBuf,
        /// Directory to write NAME.crt and NAME.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Key algorithm.
        #[arg(long, value_enum, default_value_t = KeyArg::EcdsaP256)]
        key_type: KeyArg,
        /// Replace existing NAME.crt and NAME.key.
        #[arg(long)]
        force: bool,
    },
    /// List the certificates in a directory: role, name, cluster, serial, expiry.
    /// Certificates that have expired or expire within 30 days are flagged.
    List {
        /// Directory to list (every *.crt and *.pem except crl.pem).
        dir: PathBuf,
        /// Exit with status 3 if any certificate is expired, expiring within 30
        /// days, or revoked (for cron jobs and monitoring).
        #[arg(long)]
        check: bool,
    },
    /// Show one certificate (or a CRL) in detail.
    Inspect {
        /// A certificate (.crt/.pem) or a CRL (crl.pem).
        file: PathBuf,
    },
    /// Revoke a certificate: adds its serial to DIR/crl.pem (created if missing).
    #[command(after_help = "\
Copy the new crl.pem next to ca.crt on every node; nodes load it from there.

Example:
  pki revoke --serial 4f1c09e2aa3b... --ca-dir ./ca
  pki revoke --cert ./certs/edge-b/edge-b.crt --ca-dir ./ca")]
    Revoke {
        /// Serial number to revoke, as `pki list`/`inspect` print it (hex; ':' and 0x allowed).
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        serial: Option<String>,
        /// Revoke this certificate file's serial instead.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Directory holding ca.crt and ca.key; crl.pem is written there.
        #[arg(long, env = "LANMESH_CA_DIR", value_name = "DIR")]
        ca_dir: PathBuf,
    },
    /// Re-issue a certificate with the same identity and SANs, a new key and a
    /// new validity period. Without --out, FILE and its key (same name, .key) are
    /// replaced in place.
    #[command(after_help = "\
The old certificate stays valid until it expires; revoke its serial if it must
stop working now.

Example:
  pki renew ./certs/node-1/node-1.crt --ca-dir ./ca")]
    Renew {
        /// The certificate to renew.
        file: PathBuf,
        /// Directory holding ca.crt and ca.key.
        #[arg(long, env = "LANMESH_CA_DIR", value_name = "DIR")]
        ca_dir: PathBuf,
        /// Lifetime in days (default: the same lifetime the old certificate had).
        #[arg(long, value_name = "N")]
        days: Option<u32>,
        /// Write NAME.crt and NAME.key into this directory instead of replacing FILE.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// With --out: replace existing files there.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Core,
    Edge,
    Operator,
    Client,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Core => Role::Core,
            RoleArg::Edge => Role::Edge,
            RoleArg::Operator => Role::Operator,
            RoleArg::Client => Role::Client,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyArg {
    /// ECDSA on P-256 (widely supported).
    EcdsaP256,
    /// Ed25519 (smaller, faster; some older tools lack it).
    Ed25519,
}

impl From<KeyArg> for KeyType {
    fn from(k: KeyArg) -> Self {
        match k {
            KeyArg::EcdsaP256 => KeyType::EcdsaP256,
            KeyArg::Ed25519 => KeyType::Ed25519,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pki: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
