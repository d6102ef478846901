//! `edge-node`: the binary installed at sites.
//!
//! Today it is the command-line client of the client protocol: `login`,
//! `send`, `tail` and `who` against any core (or, later, an edge). The site
//! proxy itself (`edge-node run`: QUIC proxy, offline cache, outbox) lands
//! with issue #6.

mod client;
mod config;
mod edge;
mod run;
mod server;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use client::{ConnArgs, TailArgs};

const AFTER_HELP: &str = "\
Against the single-node default (`cargo run -p core-node` in this directory):
  core-node user add alice                  # password from LANMESH_PASSWORD or a prompt
  core-node channel add ops
  edge-node login --user alice              # the token is kept for the next commands
  edge-node send ops 'hello'
  edge-node tail ops --follow
  edge-node who

Every command takes --server HOST:PORT (a core's client port, default
127.0.0.1:10002) and --ca FILE (default: the single-node default's
lanmesh-data/node-1/tls/ca.crt). With --cert/--key (a `pki issue client`
certificate) no password or token is needed.";

const NEEDS: &str = "\
edge-node: the lanmesh site binary.

To run an edge it needs the cluster CA, its own edge certificate, and where
the cores are:
  pki issue edge --name edge-1 --ca-dir CA_DIR --out certs/edge-1
  edge-node run --node-id edge-1 --cluster-id CLUSTER \\
      --ca certs/edge-1/ca.crt --cert certs/edge-1/edge-1.crt --key certs/edge-1/edge-1.key \\
      --upstream CORE1:10002,CORE2:10002      # or none: cores found by mDNS

As a client (against a core or an edge): edge-node login / send / tail / who.
See `edge-node --help` and README.md.";

/// The lanmesh site binary: a client for people and scripts (the edge proxy
/// follows with issue #6).
#[derive(Debug, Parser)]
#[command(name = "edge-node", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in with a user name and password; keeps the token for later commands.
    Login {
        /// User name.
        #[arg(long, env = "LANMESH_USER")]
        user: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Post TEXT to CHANNEL.
    Send {
        /// Channel.
        channel: String,
        /// Message text.
        text: String,
        /// Idempotency key: the same key posted again is stored once
        /// [default: random].
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a channel's history, then (with --follow) new messages as they come.
    Tail {
        /// Channel.
        channel: String,
        #[command(flatten)]
        tail: TailArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Who is present, on every core.
    Who {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Run the edge: serve the site's clients, keep the link upstream, queue
    /// posts while it is down.
    Run(config::RunArgs),
    /// Show an edge's link, registry revision, outbox depth and last sync.
    Status {
        /// The edge's HTTP address.
        #[arg(long, env = "LANMESH_HTTP", default_value = "http://127.0.0.1:10100")]
        http: String,
        /// Print raw JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn wait_for_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    if std::env::args_os().len() == 1 {
        eprintln!("{NEEDS}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-node: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Login { user, conn } => client::login(&conn, &user).await,
            Command::Send {
                channel,
                text,
                idempotency_key,
                conn,
            } => client::send(&conn, &channel, &text, idempotency_key).await,
            Command::Tail {
                channel,
                tail,
                conn,
            } => client::tail(&conn, &channel, &tail).await,
            Command::Who { conn } => client::who(&conn).await,
            Command::Run(args) => {
                let config = config::Config::load(&args)?;
                init_logging();
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stopping (signal received)");
                    stop.cancel();
                });
                run::run(config, shutdown).await
            }
            Command::Status { http, json } => run::print_status(&http, json).await,
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edge-node: error: {e:#}");
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
