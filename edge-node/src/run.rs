//! `edge-node run`: starts an edge (client port, link upstream, HTTP status)
//! and `edge-node status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lanmesh_shared::identity::Role;
use lanmesh_shared::link;
use lanmesh_shared::tls::{
    self, ClientAuth, PeerPolicy, RevokedSerials, TlsFiles, TlsMaterial, Transport,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::edge::{Edge, run_upstream};
use crate::store::EdgeStore;

/// Starts the edge and runs until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let files = TlsFiles::new(
        config.tls.ca.clone().unwrap_or_default(),
        config.tls.cert.clone(),
        config.tls.key.clone(),
    );
    let material = TlsMaterial::load(&files).context("loading the edge's certificates")?;
    let id = material
        .identity()
        .context("the --cert file has no lanmesh identity (issue it with `pki issue edge`)")?;
    if id.role != Role::Edge {
        bail!(
            "the --cert file is a {} certificate; an edge needs role edge",
            id.role
        );
    }
    if id.cluster_id != config.cluster_id || id.name != config.node_id {
        bail!(
            "the --cert file is for {}/{}, but this edge is configured as {}/{} (--cluster-id, --node-id)",
            id.cluster_id,
            id.name,
            config.cluster_id,
            config.node_id
        );
    }
    let store = Arc::new(EdgeStore::open(&data_dir, &config.node_id).context("opening the cache")?);
    let audit = Arc::new(
        core_node::audit::AuditLog::open(&data_dir.join("audit.db"), &config.node_id)
            .context("opening the audit log")?,
    );
    let revoked = RevokedSerials::default();
    if let Ok(set) = store.full_set() {
        revoked.replace(set.revoked);
    }

    let policy = PeerPolicy::only(
        config.cluster_id.clone(),
        &[Role::Client, Role::Operator, Role::Edge],
    )
    .with_revoked(revoked.clone());
    let server_tls = tls::server_config(
        &material,
        policy,
        ClientAuth::Optional,
        &[tls::ALPN_CLIENT, tls::ALPN_EDGE],
    )?;
    let endpoint = link::server_endpoint(
        tls::quinn_server_config(server_tls, Transport::default())?,
        config.client_addr,
    )
    .with_context(|| format!("cannot bind the client port {}", config.client_addr))?;
    let client_addr = endpoint.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot bind the HTTP port {}", config.http_addr))?;
    let http_addr = listener.local_addr()?;

    let discovery = if config.upstream.is_empty() {
        let me = lanmesh_shared::discovery::Announcement {
            cluster_id: config.cluster_id.clone(),
            node_id: config.node_id.clone(),
            role: Role::Edge,
            raft_addr: None,
            api_addr: Some(http_addr),
            client_addr: Some(client_addr),
            priority: 100,
        };
        match lanmesh_shared::discovery::Discovery::start(me, client_addr.ip()) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "mDNS unavailable and no --upstream given: this edge has no way to find the cores");
                None
            }
        }
    } else {
        None
    };

    let edge = Arc::new(Edge::new(
        config.clone(),
        store,
        audit,
        &material,
        revoked,
        discovery.as_ref().map(|d| d.peers()),
    )?);
    write_node_file(&data_dir, &config, client_addr, http_addr);
    tracing::info!(
        node_id = %config.node_id,
        client = %client_addr,
        http = %format!("http://{http_addr}"),
        upstream = ?config.upstream,
        data_dir = %data_dir.display(),
        outbox = edge.store.outbox_depth(),
        "edge started"
    );
    let tasks = vec![
        tokio::spawn(crate::server::serve(
            endpoint.clone(),
            edge.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(run_upstream(edge.clone(), shutdown.clone())),
        tokio::spawn(crate::edge::run_forwarder(edge.clone(), shutdown.clone())),
        tokio::spawn(serve_http(listener, edge.clone(), shutdown.clone())),
        tokio::spawn(expire_presence(edge.clone(), shutdown.clone())),
    ];
    shutdown.cancelled().await;
    for t in tasks {
        t.abort();
    }
    endpoint.close(0u32.into(), b"edge stopping");
    drop(discovery);
    Ok(())
}

async fn expire_presence(edge: Arc<Edge>, shutdown: CancellationToken) {
    let tick = (edge.presence.interval() / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => edge.presence.expire(),
        }
    }
}

fn write_node_file(dir: &std::path::Path, config: &Config, client: SocketAddr, http: SocketAddr) {
    let doc = serde_json::json!({
        "node_id": config.node_id,
        "client_addr": client,
        "http_url": format!("http://{http}"),
        "pid": std::process::id(),
    });
    let tmp = dir.join("node.json.tmp");
    if std::fs::write(&tmp, doc.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("node.json"));
    }
}

/// What `/v1/status` answers.
pub fn status(edge: &Edge) -> serde_json::Value {
    let up = edge.up();
    serde_json::json!({
        "node_id": edge.config.node_id,
        "cluster_id": edge.config.cluster_id,
        "upstream": {
            "connected": up.is_some(),
            "node_id": up.as_ref().map(|u| u.node_id().to_owned()),
            "addr": up.as_ref().map(|u| u.addr.to_string()),
            "configured": edge.config.upstream,
        },
        "revision": edge.store.revision(),
        "last_sync_ms": edge.stats.last_sync_ms.load(Ordering::Relaxed),
        "outbox_depth": edge.store.outbox_depth(),
        "follows": edge.store.follows().unwrap_or_default(),
        "registry": edge.store.registry_counts().unwrap_or_default(),
        "posts": edge.stats.posts.load(Ordering::Relaxed),
        "drained": edge.stats.drained.load(Ordering::Relaxed),
        "received": edge.stats.received.load(Ordering::Relaxed),
        "upstream_connects": edge.stats.connects.load(Ordering::Relaxed),
        "full_syncs": edge.stats.full_syncs.load(Ordering::Relaxed),
    })
}

fn metrics(edge: &Edge) -> String {
    let up = u8::from(edge.up().is_some());
    let mut out = String::new();
    for (name, help, kind, v) in [
        (
            "lanmesh_edge_upstream_connected",
            "1 while the link upstream is up",
            "gauge",
            u64::from(up),
        ),
        (
            "lanmesh_edge_outbox_depth",
            "Posts waiting in the outbox",
            "gauge",
            edge.store.outbox_depth(),
        ),
        (
            "lanmesh_edge_registry_revision",
            "Registry revision of the cache",
            "gauge",
            edge.store.revision(),
        ),
        (
            "lanmesh_edge_posts_total",
            "Posts accepted from clients",
            "counter",
            edge.stats.posts.load(Ordering::Relaxed),
        ),
        (
            "lanmesh_edge_outbox_drained_total",
            "Outbox entries delivered upstream",
            "counter",
            edge.stats.drained.load(Ordering::Relaxed),
        ),
        (
            "lanmesh_edge_messages_received_total",
            "Messages received from upstream",
            "counter",
            edge.stats.received.load(Ordering::Relaxed),
        ),
        (
            "lanmesh_edge_upstream_connects_total",
            "Times the link upstream was established",
            "counter",
            edge.stats.connects.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    out.push_str("# EOF\n");
    out
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let edge = edge.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let edge = edge.clone();
                async move { Ok::<_, Infallible>(route(&edge, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(edge: &Edge, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let json = |status: StatusCode, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{v}\n"))));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    };
    if req.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "only GET here"}),
        );
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let reason = if edge.store.revision() == 0 {
                Some("never synced the registries")
            } else if edge.up().is_none() {
                Some("link upstream down (serving from the cache)")
            } else {
                None
            };
            match reason {
                None => json(StatusCode::OK, serde_json::json!({"ready": true})),
                Some(r) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"ready": false, "reason": r}),
                ),
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics(edge))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/v1/status" => json(StatusCode::OK, status(edge)),
        other => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no such endpoint: {other}")}),
        ),
    }
}

/// `edge-node status`: an edge's `/v1/status`, summarized.
pub async fn print_status(http: &str, json: bool) -> Result<()> {
    let client = core_node::http::HttpClient::new(None, Some(Duration::from_secs(10)));
    let (status, body) = client
        .request(Method::GET, http, "/v1/status", Vec::new())
        .await
        .with_context(|| format!("asking {http} (is the edge running? --http)"))?;
    if !status.is_success() {
        bail!("{http} answered {status}");
    }
    if json {
        println!("{}", String::from_utf8_lossy(&body).trim());
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let up = &v["upstream"];
    println!("edge        {}", v["node_id"].as_str().unwrap_or(""));
    if up["connected"] == true {
        println!(
            "upstream    {} at {}",
            up["node_id"].as_str().unwrap_or(""),
            up["addr"].as_str().unwrap_or("")
        );
    } else {
        println!("upstream    DOWN (serving from the cache; posts are queued)");
    }
    let last = v["last_sync_ms"].as_i64().unwrap_or(0);
    let ago = if last > 0 {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        format!("{:.1} s ago", (now - last) as f64 / 1000.0)
    } else {
        "never".into()
    };
    println!("revision    {} (last sync {ago})", v["revision"]);
    println!("outbox      {} queued", v["outbox_depth"]);
    println!(
        "follows     {}",
        v["follows"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    Ok(())
}
