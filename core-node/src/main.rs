//! `core-node`: flags, logging, and the call into the library. With no
//! arguments it runs a single-node cluster with embedded defaults.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use core_node::cli::{self, ApiArgs, AuditCommand, ChannelCommand, KvCommand, UserCommand};
use core_node::config::{Config, LogFormat, RunArgs};
use tokio_util::sync::CancellationToken;

const AFTER_HELP: &str = "\
With no command, runs a node (same as `core-node run`): a single-node cluster
with data in ./lanmesh-data/node-1, the admin API on http://127.0.0.1:10000 and
a throw-away CA created on first start.

A three-node cluster (certificates from `pki`, see README.md):
  core-node run --node-id node-1 --ca ca.crt --cert node-1.crt --key node-1.key \\
      --api-addr 10.0.1.11:10000 --raft-addr 10.0.1.11:10001 \\
      --peers 10.0.1.12:10000,10.0.1.13:10000 --bootstrap-expect 3
  (the same on node-2 and node-3 with their own ids, addresses and peers)

Every flag is also a config key (--config FILE, TOML) and a LANMESH_* variable.";

/// The Raft voter of a lanmesh cluster: replicated metadata and registries,
/// the admin API, and the operator commands that talk to it.
#[derive(Debug, Parser)]
#[command(name = "core-node", version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (the default).
    Run(RunArgs),
    /// Show a node's view of the cluster: role, leader, term, log positions, members.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the members.
    Members {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Read and write the replicated config KV store.
    Kv {
        #[command(subcommand)]
        command: KvCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage users (people and scripts that log in with a password).
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage messaging channels.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check or query the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a certificate on every node (new handshakes fail, open sessions
    /// end). `pki revoke` updates the CA's CRL file; this spreads the
    /// revocation through the cluster at once.
    Revoke {
        /// Serial (hex, as `pki list` shows it).
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        serial: Option<String>,
        /// Or the certificate file itself.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a member from the cluster (a leader hands over first).
    Leave {
        /// Node id to remove.
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        /// Node id of the new leader.
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Build a snapshot now on the contacted node (the log is purged up to it).
    Snapshot {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write a consistent copy of the replicated state to FILE (a SQLite database).
    Backup {
        /// Output file.
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Prepare a new data directory from a backup; a node started on it boots a
    /// new single-node cluster with the backup's state.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// New (empty) data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Node id of the node that will run on it.
        #[arg(long, default_value = "node-1")]
        node_id: String,
    },
    /// Load-test a running cluster through the admin API (see docs/performance.md).
    Bench(core_node::bench::BenchArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

async fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    let shutdown = CancellationToken::new();
    let node = core_node::node::start(config, shutdown.clone()).await?;
    wait_for_signal().await;
    tracing::info!("stopping (signal received)");
    node.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(cli.run));
    if let Command::Restore {
        file,
        data_dir,
        node_id,
    } = &command
    {
        return report(cli::restore(file, data_dir, node_id));
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("core-node: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match command {
            Command::Run(args) => {
                init_logging(
                    Config::load(&args)
                        .map(|c| c.log_format)
                        .unwrap_or_default(),
                );
                run_node(args).await
            }
            Command::Status { api } => cli::status(&api).await,
            Command::Members { api } => cli::members(&api).await,
            Command::Kv { command, api } => cli::kv(&api, command).await,
            Command::User { command, api } => cli::user(&api, command).await,
            Command::Channel { command, api } => cli::channel(&api, command).await,
            Command::Audit { command, api } => cli::audit(&api, command).await,
            Command::Revoke { serial, cert, api } => cli::revoke(&api, serial, cert).await,
            Command::Leave { node, api } => {
                cli::admin_post(&api, &format!("/leave?node_id={node}")).await
            }
            Command::TransferLeader { node, api } => {
                cli::admin_post(&api, &format!("/v1/transfer-leader?node_id={node}")).await
            }
            Command::Snapshot { api } => cli::admin_post(&api, "/v1/snapshot").await,
            Command::Backup { file, api } => cli::backup(&api, &file).await,
            Command::Bench(args) => core_node::bench::run(args).await,
            Command::Restore { .. } => Ok(()),
        }
    });
    report(result)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("core-node: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
