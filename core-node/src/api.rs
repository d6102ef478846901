//! The HTTP admin API (hyper 1, HTTP/1.1 keep-alive): routing, body limits,
//! authorization and JSON errors. The handlers call [`Node`]; this module owns
//! only HTTP concerns.
//!
//! Errors are JSON `{"error": "...", "retryable": bool}` with a 4xx/5xx status;
//! a bad request never takes the node down. Over HTTPS every endpoint except
//! `/healthz`, `/readyz` and `/metrics` needs an `operator` or `core` client
//! certificate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lanmesh_shared::identity::{CertInfo, Identity, Role};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::{Consistency, JoinRequest, Node, NodeError};
use crate::store::{self, Command, Registry};

/// Longest accepted KV key, bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest page of a KV list.
pub const MAX_LIST: usize = 10_000;

type Body = Full<Bytes>;

/// An HTTP error with a status and a message for the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retryable: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retryable: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, what)
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let (status, retryable) = match &e {
            NodeError::NoLeader { .. } | NodeError::Timeout { .. } | NodeError::Forward(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, true)
            }
            NodeError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, true),
            NodeError::UnknownNode(_) => (StatusCode::NOT_FOUND, false),
            NodeError::Invalid(_) => (StatusCode::BAD_REQUEST, false),
            NodeError::Conflict(_) => (StatusCode::CONFLICT, false),
            NodeError::Storage(_) | NodeError::Raft(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, false)
            }
        };
        ApiError {
            status,
            message: e.to_string(),
            retryable,
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn ok_json(value: serde_json::Value) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, &value))
}

impl ApiError {
    fn into_response(self) -> Response<Body> {
        json_response(
            self.status,
            &json!({"error": self.message, "retryable": self.retryable}),
        )
    }
}

/// Who is calling, as far as TLS could tell.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Plain HTTP (loopback or `api_tls = off`): trusted by address.
    Plain,
    /// HTTPS with a verified client certificate.
    Verified(Identity),
    /// HTTPS without a client certificate: only health and metrics.
    Anonymous,
}

impl Caller {
    fn may_administer(&self) -> bool {
        match self {
            Caller::Plain => true,
            Caller::Verified(id) => matches!(id.role, Role::Operator | Role::Core),
            Caller::Anonymous => false,
        }
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    node: Arc<Node>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: log, back off, go on.
                    tracing::warn!(error = %e, "admin API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(TokioIo::new(stream), Caller::Plain, node, peer, shutdown).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => {
                        let caller = tls_stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| CertInfo::from_der(c).ok())
                            .and_then(|i| i.identity().ok().cloned())
                            .map(Caller::Verified)
                            .unwrap_or(Caller::Anonymous);
                        serve_conn(TokioIo::new(tls_stream), caller, node, peer, shutdown).await
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "admin API TLS handshake failed"),
                },
            }
        });
    }
}

async fn serve_conn<S>(
    io: TokioIo<S>,
    caller: Caller,
    node: Arc<Node>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let node = node.clone();
        let caller = caller.clone();
        async move { Ok::<_, Infallible>(handle(node, caller, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "admin API connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn handle(node: Arc<Node>, caller: Caller, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = route_label(&path);
    let result = route_request(&node, &caller, req).await;
    let response = result.unwrap_or_else(ApiError::into_response);
    audit_change(&node, &caller, &method, &path, route, response.status());
    node.metrics().observe_request(
        method.as_str(),
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `POST /v1/revoked {"serial": "..."}`: revokes a certificate on every
/// node: new handshakes with it fail, and sessions already logged in with it
/// end at their next request.
async fn revoke(node: &Node, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = read_body(node, req).await?;
    let data: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
    let raw = data
        .get("serial")
        .and_then(|s| s.as_str())
        .ok_or_else(|| ApiError::bad_request("missing \"serial\" (hex, as `pki list` shows it)"))?;
    let serial = lanmesh_shared::identity::normalize_serial(raw)
        .ok_or_else(|| ApiError::bad_request(format!("{raw:?} is not a certificate serial")))?;
    let applied = node
        .write(Command::Revoke {
            serial: serial.clone(),
        })
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"serial": serial, "revision": applied.revision, "changed": applied.changed}),
    ))
}

/// Audits a successful change made through the API.
fn audit_change(
    node: &Node,
    caller: &Caller,
    method: &Method,
    path: &str,
    route: &str,
    status: StatusCode,
) {
    if matches!(*method, Method::GET | Method::HEAD) || !status.is_success() {
        return;
    }
    let kind = match route {
        "kv" => "config_change",
        "registry" => "registry_change",
        "join" => "member_join",
        "leave" => "member_leave",
        "admin" => "admin_action",
        "revoked" => "cert_revoked",
        _ => return,
    };
    let actor = match caller {
        Caller::Plain => "local-admin".to_owned(),
        Caller::Verified(id) => id.name.clone(),
        Caller::Anonymous => "anonymous".to_owned(),
    };
    node.audit().record(
        kind,
        &actor,
        &format!("{method} {path} -> {}", status.as_u16()),
    );
}

/// `GET /v1/audit?since=MS&until=MS&actor=&kind=&origin=&limit=`: the
/// leader's collection of every node's audit chain, oldest first.
async fn audit(node: &Node, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(req);
    let ms = |name: &str| -> Result<Option<i64>, ApiError> {
        query_param(&pairs, name)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("{name} must be Unix milliseconds, not {v:?}"))
                })
            })
            .transpose()
    };
    let limit = query_param(&pairs, "limit")
        .map(|l| {
            l.parse::<u32>()
                .ok()
                .filter(|l| (1..=1000).contains(l))
                .ok_or_else(|| ApiError::bad_request("limit must be 1..=1000"))
        })
        .transpose()?;
    let filter = crate::audit::Filter {
        since_ms: ms("since")?,
        until_ms: ms("until")?,
        actor: query_param(&pairs, "actor"),
        kind: query_param(&pairs, "kind"),
        origin: query_param(&pairs, "origin"),
        limit,
    };
    match node.audit_query(filter).await? {
        crate::node::AppReply::AuditRecords(records) => ok_json(json!({"records": records})),
        other => Err(ApiError::from(NodeError::Forward(format!(
            "unexpected answer from the leader: {other:?}"
        )))),
    }
}

/// A low-cardinality label for metrics.
fn route_label(path: &str) -> &'static str {
    let seg = path.trim_start_matches('/').split('/').collect::<Vec<_>>();
    match seg.as_slice() {
        ["healthz"] => "healthz",
        ["readyz"] => "readyz",
        ["metrics"] => "metrics",
        ["join"] | ["v1", "join"] => "join",
        ["leave"] | ["v1", "leave"] => "leave",
        ["v1", "kv", ..] => "kv",
        ["v1", "status"] => "status",
        ["v1", "audit"] => "audit",
        ["v1", "revoked"] => "revoked",
        ["v1", "members"] => "members",
        ["v1", r, ..] if Registry::parse(r).is_some() => "registry",
        ["v1", ..] => "admin",
        _ => "other",
    }
}

fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn query_param(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn consistency(pairs: &[(String, String)]) -> Result<Consistency, ApiError> {
    match query_param(pairs, "consistency").as_deref() {
        None | Some("linearizable") => Ok(Consistency::Linearizable),
        Some("local") | Some("stale") => Ok(Consistency::Local),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown consistency {other:?} (use linearizable or local)"
        ))),
    }
}

async fn read_body(node: &Node, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = node.config().max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes (max_body_bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit) {
        drain(&mut body, limit).await;
        return Err(too_large());
    }
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if collected.len() + data.len() > limit {
                drain(&mut body, limit).await;
                return Err(too_large());
            }
            collected.extend_from_slice(data);
        }
    }
    Ok(Bytes::from(collected))
}

/// Reads and discards up to `DRAIN_FACTOR * limit` more bytes of a refused
/// body, so that an ordinary client that is still sending gets to read our 413
/// instead of a connection reset. Beyond that the connection is closed.
async fn drain(body: &mut Incoming, limit: usize) {
    const DRAIN_FACTOR: usize = 16;
    let mut left = limit.saturating_mul(DRAIN_FACTOR);
    while left > 0 {
        match body.frame().await {
            Some(Ok(frame)) => {
                left = left.saturating_sub(frame.data_ref().map(|d| d.len()).unwrap_or(0));
            }
            _ => return,
        }
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

fn decode_segment(raw: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::bad_request("path is not valid UTF-8 after percent-decoding"))
}

fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("empty key"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "key longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(ApiError::bad_request("key contains control characters"));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    lanmesh_shared::identity::validate_name("name", name)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn method_not_allowed(allowed: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here (allowed: {allowed})"),
    )
}

async fn route_request(
    node: &Node,
    caller: &Caller,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    let open = matches!(segs.as_slice(), ["healthz"] | ["readyz"] | ["metrics"]);
    if !open && !caller.may_administer() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this endpoint needs an operator or core client certificate",
        ));
    }
    let method = req.method().clone();
    match (segs.as_slice(), &method) {
        (["healthz"], &Method::GET) => ok_json(json!({"status": "ok", "node_id": node.id()})),
        (["readyz"], &Method::GET) => match node.readiness() {
            Ok(()) => ok_json(json!({"ready": true})),
            Err(reason) => Ok(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "error": reason, "retryable": true}),
            )),
        },
        (["metrics"], &Method::GET) => Ok(respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics().encode(),
        )),
        (["healthz"] | ["readyz"] | ["metrics"], _) => Err(method_not_allowed("GET")),
        (["v1", "status"], &Method::GET) => {
            ok_json(serde_json::to_value(node.status()).unwrap_or_default())
        }
        (["v1", "members"], &Method::GET) => {
            let pairs = query_pairs(&req);
            node.read_barrier(consistency(&pairs)?).await?;
            ok_json(json!({"members": node.members()?}))
        }
        (["join"] | ["v1", "join"], &Method::POST) => join(node, req).await,
        (["leave"] | ["v1", "leave"], &Method::POST) => {
            let id = query_param(&query_pairs(&req), "node_id")
                .ok_or_else(|| ApiError::bad_request("missing ?node_id="))?;
            node.leave(&id).await?;
            ok_json(json!({"left": id}))
        }
        (["v1", "transfer-leader"], &Method::POST) => {
            let id = query_param(&query_pairs(&req), "node_id")
                .ok_or_else(|| ApiError::bad_request("missing ?node_id="))?;
            node.transfer_leader(&id).await?;
            ok_json(json!({"transferred_to": id}))
        }
        (["v1", "snapshot"], &Method::POST) => {
            ok_json(serde_json::to_value(node.snapshot().await?).unwrap_or_default())
        }
        (["v1", "backup"], &Method::GET) => {
            let bytes = node.backup().await?;
            Ok(respond(StatusCode::OK, "application/vnd.sqlite3", bytes))
        }
        (["v1", "kv"], &Method::GET) => kv_list(node, &req).await,
        (["v1", "audit"], &Method::GET) => audit(node, &req).await,
        (["v1", "revoked"], &Method::GET) => {
            node.read_barrier(consistency(&query_pairs(&req))?).await?;
            ok_json(json!({"revoked": node.query(store::revoked)?}))
        }
        (["v1", "revoked"], &Method::POST) => revoke(node, req).await,
        (["v1", "kv", key], _) => kv(node, decode_segment(key)?, req).await,
        (["v1", reg], _) if Registry::parse(reg).is_some() => {
            registry(
                node,
                Registry::parse(reg).unwrap_or(Registry::Channels),
                None,
                req,
            )
            .await
        }
        (["v1", reg, name], _) if Registry::parse(reg).is_some() => {
            let name = decode_segment(name)?;
            registry(
                node,
                Registry::parse(reg).unwrap_or(Registry::Channels),
                Some(name),
                req,
            )
            .await
        }
        (
            ["v1", "status"]
            | ["v1", "members"]
            | ["v1", "kv"]
            | ["v1", "backup"]
            | ["v1", "audit"],
            _,
        ) => Err(method_not_allowed("GET")),
        (
            ["join"]
            | ["v1", "join"]
            | ["leave"]
            | ["v1", "leave"]
            | ["v1", "transfer-leader"]
            | ["v1", "snapshot"],
            _,
        ) => Err(method_not_allowed("POST")),
        _ => Err(ApiError::not_found(format!("no such endpoint: {path}"))),
    }
}

async fn join(node: &Node, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    let body = read_body(node, req).await?;
    let mut join: JoinRequest = if body.iter().all(u8::is_ascii_whitespace) {
        JoinRequest::default()
    } else {
        parse_json(&body)?
    };
    if let Some(id) = query_param(&pairs, "node_id") {
        join.node_id = id;
    }
    if let Some(addr) = query_param(&pairs, "addr") {
        join.raft_addr = addr;
    }
    validate_name(&join.node_id)?;
    for (field, value) in [
        ("addr", &join.raft_addr),
        ("api_addr", &join.api_addr),
        ("client_addr", &join.client_addr),
    ] {
        if field == "addr" || !value.is_empty() {
            value.parse::<SocketAddr>().map_err(|_| {
                ApiError::bad_request(format!("{field} {value:?} is not HOST:PORT"))
            })?;
        }
    }
    let outcome = node.join(join).await?;
    ok_json(serde_json::to_value(outcome).unwrap_or_default())
}

async fn kv_list(node: &Node, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(req);
    let prefix = query_param(&pairs, "prefix").unwrap_or_default();
    let limit = match query_param(&pairs, "limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIST).contains(l))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1..={MAX_LIST}")))?,
        None => MAX_LIST,
    };
    node.read_barrier(consistency(&pairs)?).await?;
    let entries = node.query(|c| store::kv_list(c, &prefix, limit))?;
    let items: Vec<_> = entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            match std::str::from_utf8(&e.value) {
                Ok(text) => v["value"] = json!(text),
                Err(_) => {
                    use base64::Engine;
                    v["value_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&e.value));
                }
            }
            v
        })
        .collect();
    ok_json(json!({"revision": node.applied_index(), "kvs": items}))
}

async fn kv(node: &Node, key: String, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    validate_key(&key)?;
    let pairs = query_pairs(&req);
    match *req.method() {
        Method::GET => {
            node.read_barrier(consistency(&pairs)?).await?;
            match node.query(|c| store::kv_get(c, &key))? {
                Some(entry) => {
                    let mut r = respond(StatusCode::OK, "application/octet-stream", entry.value);
                    for (name, value) in [
                        ("x-lanmesh-revision", entry.mod_revision),
                        ("x-lanmesh-create-revision", entry.create_revision),
                        ("x-lanmesh-version", entry.version),
                    ] {
                        r.headers_mut().insert(name, HeaderValue::from(value));
                    }
                    Ok(r)
                }
                None => Err(ApiError::not_found(format!("key {key:?} not found"))),
            }
        }
        Method::PUT => {
            let value = read_body(node, req).await?.to_vec();
            let applied = node.write(Command::KvPut { key, value }).await?;
            ok_json(json!({"revision": applied.revision}))
        }
        Method::DELETE => {
            let applied = node.write(Command::KvDelete { key: key.clone() }).await?;
            if applied.changed {
                ok_json(json!({"revision": applied.revision, "deleted": true}))
            } else {
                Err(ApiError::not_found(format!("key {key:?} not found")))
            }
        }
        _ => Err(method_not_allowed("GET, PUT, DELETE")),
    }
}

/// Body of `POST /v1/<registry>` and `PUT /v1/<registry>/<name>`: a JSON object.
/// `name` is required on POST; for users, `password` is hashed before it is
/// proposed and never stored or returned in clear.
async fn registry(
    node: &Node,
    reg: Registry,
    name: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let pairs = query_pairs(&req);
    match (req.method().clone(), name) {
        (Method::GET, None) => {
            node.read_barrier(consistency(&pairs)?).await?;
            let items = node.query(|c| store::registry_list(c, reg))?;
            ok_json(json!({ reg.as_str(): items.into_iter().map(redact).collect::<Vec<_>>() }))
        }
        (Method::GET, Some(name)) => {
            node.read_barrier(consistency(&pairs)?).await?;
            match node.query(|c| store::registry_get(c, reg, &name))? {
                Some(e) => ok_json(redact(e)),
                None => Err(ApiError::not_found(format!(
                    "{} {name:?} not found",
                    reg.as_str()
                ))),
            }
        }
        (method @ (Method::POST | Method::PUT), path_name) => {
            if method == Method::POST && path_name.is_some() {
                return Err(method_not_allowed("GET, PUT, DELETE"));
            }
            if method == Method::PUT && path_name.is_none() {
                return Err(method_not_allowed("GET, POST"));
            }
            let body = read_body(node, req).await?;
            let mut data: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
            let name = match (path_name, data.remove("name")) {
                (Some(n), _) => n,
                (None, Some(serde_json::Value::String(n))) => n,
                (None, _) => return Err(ApiError::bad_request("missing \"name\" (a string)")),
            };
            validate_name(&name)?;
            if reg == Registry::Users {
                hash_password(&mut data)?;
            }
            if reg == Registry::Channels {
                validate_channel(&data)?;
            }
            let applied = node
                .write(Command::RegistryPut {
                    registry: reg,
                    name: name.clone(),
                    data: serde_json::Value::Object(data).to_string(),
                })
                .await?;
            let status = if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(
                status,
                &json!({"name": name, "revision": applied.revision}),
            ))
        }
        (Method::DELETE, Some(name)) => {
            let applied = node
                .write(Command::RegistryDelete {
                    registry: reg,
                    name: name.clone(),
                })
                .await?;
            if applied.changed {
                ok_json(json!({"revision": applied.revision, "deleted": true}))
            } else {
                Err(ApiError::not_found(format!(
                    "{} {name:?} not found",
                    reg.as_str()
                )))
            }
        }
        (_, None) => Err(method_not_allowed("GET, POST")),
        (_, Some(_)) => Err(method_not_allowed("GET, PUT, DELETE")),
    }
}

/// Entries go out without secrets.
fn redact(mut e: store::RegistryEntry) -> serde_json::Value {
    if let Some(obj) = e.data.as_object_mut() {
        obj.remove("password_hash");
    }
    serde_json::to_value(e).unwrap_or_default()
}

/// A channel's `replication` is `"raft"` (one total order through the Raft
/// log) or absent / `"anti-entropy"` (each core stores what it receives and
/// the cores exchange it).
fn validate_channel(data: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    match data.get("replication") {
        None => Ok(()),
        Some(serde_json::Value::String(r)) if r == "raft" || r == "anti-entropy" => Ok(()),
        Some(other) => Err(ApiError::bad_request(format!(
            "\"replication\" must be \"raft\" or \"anti-entropy\", not {other}"
        ))),
    }
}

/// Replaces `password` with an Argon2id `password_hash` (memory-hard, salted).
fn hash_password(data: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    if data.contains_key("password_hash") {
        return Err(ApiError::bad_request(
            "set \"password\", not \"password_hash\"",
        ));
    }
    match data.remove("password") {
        None => Ok(()),
        Some(serde_json::Value::String(p)) if !p.is_empty() => {
            let salt = SaltString::generate(&mut OsRng);
            let hash = argon2::Argon2::default()
                .hash_password(p.as_bytes(), &salt)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot hash password: {e}"),
                    )
                })?;
            data.insert("password_hash".into(), json!(hash.to_string()));
            Ok(())
        }
        Some(_) => Err(ApiError::bad_request(
            "\"password\" must be a non-empty string",
        )),
    }
}
