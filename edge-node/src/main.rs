//! `edge-node`: the site proxy of a lanmesh cluster.
//!
//! The edge (QUIC proxy, offline cache, outbox) lands with issue #6; until then
//! this binary only says so.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "edge-node: not available yet in this build. The site proxy lands with issue #6.\n\
         Meanwhile `pki` works: see README.md."
    );
    ExitCode::from(2)
}
