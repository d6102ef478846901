//! `core-node`: the Raft voter of a lanmesh cluster.
//!
//! * [`store`]: the replicated data model (commands and SQLite tables);
//! * [`raft`]: openraft types, SQLite log store and state machine, QUIC transport;
//! * [`node`]: a running node — write/read paths, join/leave, bootstrap;
//! * [`api`]: the HTTP admin API; [`http`]: the HTTP client the CLI uses;
//! * [`client_port`]: the client protocol server (QUIC, `lanmesh-client/1`);
//! * [`config`], [`metrics`], [`cli`] (operator commands), [`bench`].

pub mod api;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod client_port;
pub mod config;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod msgbench;
pub mod msgsync;
pub mod node;
pub mod presence;
pub mod raft;
pub mod store;
