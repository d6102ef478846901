//! `edge-node`: the binary installed at sites.
//!
//! Today it is the command-line client of the client protocol: `login`,
//! `send`, `tail` and `who` against any core (or, later, an edge). The site
//! proxy itself (`edge-node run`: QUIC proxy, offline cache, outbox) lands
//! with issue #6.

mod client;

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
    /// Run the edge proxy (not in this build: issue #6).
    Run,
}

fn main() -> ExitCode {
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
            Command::Run => {
                eprintln!(
                    "edge-node: the edge proxy is not available yet in this build (issue #6).\n\
                     The client commands work: see `edge-node --help`."
                );
                return Ok(ExitCode::from(2));
            }
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
