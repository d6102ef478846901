//! The Raft control plane: openraft's type configuration and the three parts we
//! supply to it — durable SQLite storage (`log_store`, `state_machine`) and the
//! QUIC transport (`network`).

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::{Applied, Command};

/// A node id as operators write it (`node-1`). A newtype so the storage
/// conformance suite (which makes ids from integers) can run against our types.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName(pub String);

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<u64> for NodeName {
    fn from(n: u64) -> Self {
        NodeName(format!("n{n}"))
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> Self {
        NodeName(s.to_owned())
    }
}

/// What the Raft membership records about each node: how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CoreNode {
    /// Raft RPC (QUIC) address.
    pub raft_addr: String,
    /// Admin API address.
    pub api_addr: String,
    /// Client protocol address.
    #[serde(default)]
    pub client_addr: String,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::KvPut { key, value } => write!(f, "kv put {key:?} ({} bytes)", value.len()),
            Command::KvDelete { key } => write!(f, "kv delete {key:?}"),
            Command::RegistryPut { registry, name, .. } => {
                write!(f, "{} put {name:?}", registry.as_str())
            }
            Command::RegistryDelete { registry, name } => {
                write!(f, "{} delete {name:?}", registry.as_str())
            }
            Command::SetMember(m) => write!(f, "member set {:?}", m.id),
            Command::RemoveMember { id } => write!(f, "member remove {id:?}"),
            Command::Revoke { serial } => write!(f, "revoke {serial}"),
            Command::Bootstrap { cluster_id, .. } => write!(f, "bootstrap {cluster_id:?}"),
            Command::ChannelPost { channel, body, .. } => {
                write!(f, "post to {channel:?} ({} bytes)", body.len())
            }
        }
    }
}

openraft::declare_raft_types!(
    /// lanmesh's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeName,
        Node = CoreNode,
);

/// The Raft handle with our state machine.
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
/// A log id.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A stored membership.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot with its bytes (a SQLite database file).
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// Encodes a value for storage or the wire (MessagePack with field names, so
/// optional fields stay optional).
pub fn encode<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    rmp_serde::to_vec_named(v).map_err(std::io::Error::other)
}

/// Decodes what [`encode`] produced.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> std::io::Result<T> {
    rmp_serde::from_slice(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
