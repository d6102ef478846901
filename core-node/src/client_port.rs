//! The client port (QUIC, ALPN `lanmesh-client/1`): the server side of
//! `lanmesh_shared::proto`.
//!
//! Per connection: the first bidirectional stream must carry `Hello` and gets
//! the negotiated version (or `UnsupportedVersion` / `HelloRequired`, after
//! which the connection is closed); every later stream is one request, one
//! response. A malformed or oversized frame gets a typed error frame on its
//! own stream and the connection, and every other client, carry on.
//!
//! Login today is by client certificate (`client` or `operator` role of this
//! cluster, checked in the TLS handshake); password login and tokens, and
//! the messaging, presence and audit requests, come with the rest of #5.

use std::sync::Arc;

use lanmesh_shared::identity::Identity;
use lanmesh_shared::link;
use lanmesh_shared::proto::{
    ErrorCode, ErrorFrame, FrameError, Request, Response, VERSIONS, read_frame, write_frame,
};
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// Application close code: the client failed version negotiation.
const CLOSE_NEGOTIATION: u32 = 0x4c10;

/// Serves the client port until `shutdown` fires.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match link::accept(incoming, link::DEFAULT_HANDSHAKE_TIMEOUT).await {
                Ok(l) => connection(l.conn, l.peer, node, shutdown).await,
                Err(e) => tracing::info!(error = %e, "refused a client connection"),
            }
        });
    }
}

async fn connection(
    conn: quinn::Connection,
    peer: Option<Identity>,
    node: Arc<Node>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    // Version negotiation on the first stream.
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let answer = match read_frame::<Request>(&mut recv).await {
        Ok(Request::Hello { versions, client }) => {
            match versions.iter().filter(|v| VERSIONS.contains(v)).max() {
                Some(v) => {
                    tracing::debug!(%remote, client = %client, version = v, "client connected");
                    Ok(Response::Hello {
                        version: *v,
                        node_id: node.id().to_owned(),
                        cluster_id: node.config().cluster_id.clone(),
                    })
                }
                None => Err(ErrorFrame::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "this node speaks versions {VERSIONS:?}, the client offered {versions:?}"
                    ),
                )),
            }
        }
        Ok(_) => Err(ErrorFrame::new(
            ErrorCode::HelloRequired,
            "the first request of a connection must be Hello",
        )),
        Err(e) => Err(e.to_error_frame()),
    };
    let ok = answer.is_ok();
    let _ = write_frame(&mut send, &answer.unwrap_or_else(Response::Error)).await;
    if !ok {
        // Let the error frame reach the client before closing.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
        conn.close(CLOSE_NEGOTIATION.into(), b"version negotiation failed");
        return;
    }
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let peer = peer.clone();
        tokio::spawn(async move {
            let response = match read_frame::<Request>(&mut recv).await {
                Ok(req) => handle(req, peer.as_ref()),
                Err(FrameError::Closed) => return,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "bad frame from client");
                    Response::Error(e.to_error_frame())
                }
            };
            let _ = write_frame(&mut send, &response).await;
        });
    }
}

fn handle(req: Request, peer: Option<&Identity>) -> Response {
    match req {
        Request::Ping => Response::Pong,
        Request::Hello { .. } => Response::Error(ErrorFrame::new(
            ErrorCode::Malformed,
            "Hello was already negotiated",
        )),
        Request::Whoami => match peer {
            Some(id) => Response::Identity {
                subject: id.name.clone(),
                role: id.role.to_string(),
            },
            None => Response::Error(ErrorFrame::new(
                ErrorCode::NotLoggedIn,
                "log in first (a client certificate; password login comes with tokens)",
            )),
        },
    }
}
