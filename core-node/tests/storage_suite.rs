//! openraft's storage conformance suite run against the SQLite log store and
//! state machine: proves vote/log/purge/truncate/snapshot semantics match what
//! openraft requires, on real files in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core_node::raft::TypeConfig;
use core_node::raft::log_store::LogStore;
use core_node::raft::state_machine::StateMachine;
use lanmesh_shared::tls::RevokedSerials;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft.db"), None).expect("open log");
        let sm =
            StateMachine::open(dir.path(), None, RevokedSerials::default()).expect("open state");
        Ok((dir, log, sm))
    }
}

/// The whole openraft storage suite passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::<TypeConfig, LogStore, StateMachine, Builder, tempfile::TempDir>::test_all(Builder)
        .await
        .expect("storage suite");
}
