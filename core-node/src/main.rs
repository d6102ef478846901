//! `core-node`: the Raft voter of a lanmesh cluster.
//!
//! The Raft quorum, admin API and operator CLI are being built (issue #3); until
//! then this binary only says so, so that nobody mistakes it for a working node.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "core-node: not available yet in this build. The Raft quorum, admin API and CLI land with issue #3.\n\
         Meanwhile `pki` works: see README.md."
    );
    ExitCode::from(2)
}
