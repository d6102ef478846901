//! Anti-entropy between cores for the messaging router.
//!
//! Every core runs one pull loop per other core (the Raft membership says who
//! they are). A pull sends our per-origin high-water marks over the Raft link
//! (`AppRequest::Pull`); the peer answers with what it holds beyond them, in
//! per-origin order, or — when it has nothing new — waits up to
//! [`PULL_WAIT`] for something to arrive before answering (a long poll). So
//! the same loop does both jobs: real-time delivery of new posts to the
//! other cores' subscribers, and catch-up of a core that was down or cut off
//! (it asks with old marks and gets everything it lacks, from every origin,
//! from whichever peer has it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::messages::{MAX_SYNC_BATCH, MessageStore, Replica};
use crate::node::{AppReply, AppRequest, Node};
use crate::raft::NodeName;

/// How long a peer holds a pull that has nothing to answer yet.
pub const PULL_WAIT: Duration = Duration::from_secs(5);
/// How often the set of peers is compared with the membership.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Answers a peer's pull: what we hold beyond `theirs`, waiting up to `wait`
/// for something new when there is nothing yet.
pub async fn answer_pull(
    store: &MessageStore,
    theirs: HashMap<String, u64>,
    wait: Duration,
) -> std::io::Result<Vec<Replica>> {
    let deadline = tokio::time::Instant::now() + wait.min(PULL_WAIT * 2);
    // Watch before looking, so a commit between the look and the wait is seen.
    let mut changes = store.changes();
    loop {
        changes.borrow_and_update();
        let batch = store.missing(&theirs, MAX_SYNC_BATCH)?;
        if !batch.is_empty() {
            return Ok(batch);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Vec::new()),
        }
    }
}

/// Keeps one pull loop running per other core until `shutdown`.
pub async fn run(node: Arc<Node>, shutdown: CancellationToken) {
    let mut loops: HashMap<NodeName, (String, CancellationToken)> = HashMap::new();
    loop {
        let peers = node.other_cores();
        loops.retain(|id, (addr, stop)| {
            let keep = peers.iter().any(|(p, a)| p == id && a == addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (id, addr) in peers {
            if loops.contains_key(&id) {
                continue;
            }
            let stop = shutdown.child_token();
            loops.insert(id.clone(), (addr.clone(), stop.clone()));
            tokio::spawn(pull_loop(node.clone(), id, addr, stop));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

async fn pull_loop(node: Arc<Node>, peer: NodeName, addr: String, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let hw = node.messages().high_water();
        let req = AppRequest::Pull {
            hw,
            wait_ms: PULL_WAIT.as_millis() as u64,
        };
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            a = node.call_core(&peer, &addr, req, PULL_WAIT + Duration::from_secs(5)) => a,
        };
        let outcome = match answer {
            Ok(AppReply::Replicas(batch)) => {
                let got = batch.len();
                match node.messages().ingest(batch).await {
                    Ok(new) => {
                        if new > 0 {
                            node.metrics().messages_synced.inc_by(new as u64);
                            tracing::debug!(peer = %peer.0, got, new, "messages from peer");
                        }
                        Ok(())
                    }
                    Err(e) => Err(format!("storing messages from {}: {e}", peer.0)),
                }
            }
            Ok(AppReply::Error(e)) => Err(format!("{} refused the pull: {e:?}", peer.0)),
            Ok(other) => Err(format!("{} answered a pull with {other:?}", peer.0)),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                if failing {
                    tracing::info!(peer = %peer.0, "message sync with peer resumed");
                }
                failing = false;
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                if !failing {
                    tracing::info!(peer = %peer.0, error = %e, "message sync with peer failing; retrying");
                }
                failing = true;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
