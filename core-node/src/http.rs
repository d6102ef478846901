//! A small HTTP/1.1 client for the admin API (hyper), used by joining nodes,
//! the operator CLI and the benchmark. Plain HTTP, or HTTPS verified against
//! the cluster CA with our certificate offered (see `lanmesh_shared::tls`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an HTTP call failed before a status came back.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL cannot be used.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// TCP/TLS connection failed.
    #[error("cannot connect to {target}: {detail}")]
    Connect {
        /// host:port.
        target: String,
        /// What happened.
        detail: String,
    },
    /// The exchange failed mid-way.
    #[error("request to {target} failed: {detail}")]
    Exchange {
        /// host:port.
        target: String,
        /// What happened.
        detail: String,
    },
    /// No answer in time.
    #[error("no answer from {target} within {after:?}")]
    Timeout {
        /// host:port.
        target: String,
        /// How long we waited.
        after: Duration,
    },
    /// An https URL but no TLS configuration.
    #[error("{url} is HTTPS: give --ca (and an operator certificate with --cert/--key)")]
    NoTls {
        /// The URL.
        url: String,
    },
}

/// A parsed `http[s]://host:port` base plus path.
#[derive(Debug, Clone)]
pub struct Target {
    https: bool,
    authority: String,
}

impl Target {
    /// Parses `http://h:p`, `https://h:p` or a bare `h:p` (plain HTTP).
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if url.contains("://") {
            return Err(bad("only http:// and https:// are supported"));
        } else {
            (false, url)
        };
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(bad("expected http[s]://HOST:PORT"));
        }
        Ok(Target { https, authority })
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

/// A client: holds the TLS settings for HTTPS targets.
#[derive(Clone, Default)]
pub struct HttpClient {
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One kept-alive connection.
#[derive(Debug)]
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    target: Target,
}

impl HttpClient {
    /// A client; `tls` is used for https targets.
    pub fn new(tls: Option<rustls::ClientConfig>, timeout: Option<Duration>) -> Self {
        HttpClient {
            tls: tls.map(Arc::new),
            timeout,
        }
    }

    /// Opens a keep-alive connection.
    pub async fn connect(&self, target: &Target) -> Result<Conn, HttpError> {
        let connect_err = |detail: String| HttpError::Connect {
            target: target.authority.clone(),
            detail,
        };
        let tcp = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let sender = if target.https {
            let tls = self.tls.clone().ok_or_else(|| HttpError::NoTls {
                url: format!("https://{}", target.authority),
            })?;
            let host = target
                .authority
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
                .unwrap_or("lanmesh");
            let name =
                rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
                    rustls::pki_types::ServerName::try_from("lanmesh").expect("static name")
                });
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| connect_err(format!("TLS: {e}")))?;
            handshake(TokioIo::new(stream), target).await?
        } else {
            handshake(TokioIo::new(tcp), target).await?
        };
        Ok(Conn {
            sender,
            target: target.clone(),
        })
    }

    /// One request on a fresh connection.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let target = Target::parse(url)?;
        let work = async {
            let mut conn = self.connect(&target).await?;
            conn.send(method, path_and_query, body).await
        };
        match self.timeout {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or(Err(HttpError::Timeout {
                    target: target.authority.clone(),
                    after: t,
                })),
            None => work.await,
        }
    }
}

async fn handshake<S>(
    io: TokioIo<S>,
    target: &Target,
) -> Result<SendRequest<Full<Bytes>>, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| HttpError::Connect {
            target: target.authority.clone(),
            detail: e.to_string(),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

impl Conn {
    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let exchange = |detail: String| HttpError::Exchange {
            target: self.target.authority.clone(),
            detail,
        };
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &self.target.authority)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| exchange(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| exchange(e.to_string()))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| exchange(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| exchange(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}
