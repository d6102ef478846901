//! Opening and accepting lanmesh QUIC links, with refusals as typed errors.
//!
//! In TLS 1.3 the client finishes its handshake before the server has looked
//! at the client's certificate, so a refused client would otherwise see
//! `connect()` succeed and only fail later, on some stream operation. To make
//! the outcome of the handshake visible at once, every link starts with a
//! welcome: the server, once it has accepted the connection (and so the
//! client's certificate), opens a unidirectional stream and sends
//! [`WELCOME`]. [`connect`] returns only after reading it; if the server
//! refused us instead, the TLS alert it sent is decoded into a
//! [`LinkError::RefusedByPeer`] with the reason.
//!
//! This module owns that exchange and the mapping from quinn's errors. What is
//! spoken over the link afterwards belongs to the protocol modules.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::Identity;
use crate::tls::peer_identity;

/// The bytes a server sends on the welcome stream.
pub const WELCOME: &[u8] = b"lanmesh-welcome/1";
/// Application close code: the peer's identity is not the one that was expected.
pub const CLOSE_UNEXPECTED_PEER: u32 = 0x4c01;
/// Application close code: the server's admission check refused the peer
/// (a certificate valid for the cluster, but not for this protocol).
pub const CLOSE_NOT_PERMITTED: u32 = 0x4c02;
/// How long a handshake plus welcome may take by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS alert reason, as seen by the side that receives the alert (or sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertReason {
    /// The certificate is not from a CA the verifier trusts (`unknown_ca`).
    UnknownCa,
    /// Outside its validity period (`certificate_expired`).
    Expired,
    /// Revoked (`certificate_revoked`).
    Revoked,
    /// No certificate was presented where one is required (`certificate_required`).
    CertificateRequired,
    /// Genuine, but not permitted here: another cluster or a role not allowed on
    /// this link (`access_denied`).
    NotPermitted,
    /// The certificate could not be used (`bad_certificate` and friends).
    BadCertificate,
    /// The peer did not speak a lanmesh protocol we offered (`no_application_protocol`).
    NoCommonProtocol,
    /// Any other alert, by number.
    Other(u8),
}

impl AlertReason {
    /// Decodes a TLS alert number (RFC 8446 §6).
    pub fn from_alert(alert: u8) -> Self {
        match alert {
            48 => AlertReason::UnknownCa,
            45 => AlertReason::Expired,
            44 => AlertReason::Revoked,
            116 => AlertReason::CertificateRequired,
            49 => AlertReason::NotPermitted,
            42 | 43 | 46 | 51 => AlertReason::BadCertificate,
            120 => AlertReason::NoCommonProtocol,
            other => AlertReason::Other(other),
        }
    }
}

impl fmt::Display for AlertReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlertReason::UnknownCa => f.write_str("certificate not issued by the cluster CA"),
            AlertReason::Expired => f.write_str("certificate expired or not yet valid"),
            AlertReason::Revoked => f.write_str("certificate revoked"),
            AlertReason::CertificateRequired => f.write_str("a client certificate is required"),
            AlertReason::NotPermitted => {
                f.write_str("certificate not permitted on this link (other cluster or role)")
            }
            AlertReason::BadCertificate => f.write_str("certificate unusable"),
            AlertReason::NoCommonProtocol => f.write_str("no common protocol (ALPN)"),
            AlertReason::Other(n) => write!(f, "TLS alert {n}"),
        }
    }
}

/// Why a link could not be opened or accepted.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// quinn refused to start the connection (bad address, endpoint closed).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where we tried to go.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The peer refused the handshake, usually our certificate.
    #[error("{addr} refused the connection: {reason}")]
    RefusedByPeer {
        /// The peer.
        addr: SocketAddr,
        /// What its alert said.
        reason: AlertReason,
    },
    /// We refused the peer's certificate (our verifier logged the precise reason).
    #[error("refused the certificate of {addr}: {reason}")]
    RefusedPeer {
        /// The peer.
        addr: SocketAddr,
        /// The alert we sent.
        reason: AlertReason,
    },
    /// The peer is a legitimate member, but not the one we asked for.
    #[error("expected {expected} at {addr}, but the certificate there is {found}")]
    UnexpectedPeer {
        /// The peer address.
        addr: SocketAddr,
        /// The name we wanted.
        expected: String,
        /// What its certificate says.
        found: String,
    },
    /// No answer in time.
    #[error("{addr} did not complete the handshake within {after:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
    /// The connection failed for a reason other than a refusal.
    #[error("connection with {addr} failed: {source}")]
    Connection {
        /// The peer.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The peer completed TLS but did not speak the link protocol.
    #[error("{addr} is not a lanmesh peer: {detail}")]
    Protocol {
        /// The peer.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
}

impl LinkError {
    /// Classifies a quinn connection error seen while talking to `addr`.
    pub fn from_connection(addr: SocketAddr, e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match &e {
            E::ConnectionClosed(close) => {
                if let Some(alert) = crypto_alert(close.error_code) {
                    return LinkError::RefusedByPeer {
                        addr,
                        reason: AlertReason::from_alert(alert),
                    };
                }
            }
            E::TransportError(t) => {
                if let Some(alert) = crypto_alert(t.code) {
                    return LinkError::RefusedPeer {
                        addr,
                        reason: AlertReason::from_alert(alert),
                    };
                }
            }
            E::ApplicationClosed(close)
                if close.error_code == CLOSE_UNEXPECTED_PEER.into()
                    || close.error_code == CLOSE_NOT_PERMITTED.into() =>
            {
                return LinkError::RefusedByPeer {
                    addr,
                    reason: AlertReason::NotPermitted,
                };
            }
            _ => {}
        }
        LinkError::Connection { addr, source: e }
    }

    /// Whether trying again later (or another peer) may succeed. Refusals are
    /// permanent until someone changes certificates or configuration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LinkError::Timeout { .. } | LinkError::Connection { .. }
        )
    }
}

fn crypto_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..0x200)
        .contains(&code)
        .then_some((code & 0xff) as u8)
}

/// An established link: the connection and the identity its certificate proved.
#[derive(Debug, Clone)]
pub struct Link {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Who the peer is (`None`: an anonymous client on an optional-auth port).
    pub peer: Option<Identity>,
}

/// Opens a link to `addr` and waits for the server's welcome.
///
/// `server_name` is sent as SNI only (host names are not verified, see `tls`).
/// With `expect_name`, the peer's certificate must also carry that name.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    expect_name: Option<&str>,
    timeout: Duration,
) -> Result<Link, LinkError> {
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|source| LinkError::Connect { addr, source })?;
    let handshake = async {
        let conn = connecting
            .await
            .map_err(|e| LinkError::from_connection(addr, e))?;
        let peer = peer_identity(&conn);
        let mut welcome = conn
            .accept_uni()
            .await
            .map_err(|e| LinkError::from_connection(addr, e))?;
        let got = welcome
            .read_to_end(WELCOME.len())
            .await
            .map_err(|e| match e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => {
                    LinkError::from_connection(addr, c)
                }
                other => LinkError::Protocol {
                    addr,
                    detail: format!("bad welcome: {other}"),
                },
            })?;
        if got != WELCOME {
            conn.close(0u32.into(), b"bad welcome");
            return Err(LinkError::Protocol {
                addr,
                detail: "bad welcome".into(),
            });
        }
        if let Some(expected) = expect_name {
            let found = peer.as_ref().map(|p| p.name.as_str()).unwrap_or("");
            if found != expected {
                conn.close(CLOSE_UNEXPECTED_PEER.into(), b"unexpected peer");
                return Err(LinkError::UnexpectedPeer {
                    addr,
                    expected: expected.to_owned(),
                    found: peer
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "anonymous".into()),
                });
            }
        }
        Ok(Link { conn, peer })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or(Err(LinkError::Timeout {
            addr,
            after: timeout,
        }))
}

/// Accepts an incoming connection: completes the handshake (our verifier checks
/// the client's certificate) and sends the welcome.
pub async fn accept(incoming: quinn::Incoming, timeout: Duration) -> Result<Link, LinkError> {
    accept_admitting(incoming, timeout, None).await
}

/// An admission check run after the TLS handshake and before the welcome:
/// `Err(reason)` closes the connection with [`CLOSE_NOT_PERMITTED`], which
/// the connecting side sees as `RefusedByPeer { reason: NotPermitted }`.
/// Used where the decision needs more than the certificate (the ALPN).
pub type Admit = std::sync::Arc<
    dyn Fn(&quinn::Connection, Option<&Identity>) -> Result<(), String> + Send + Sync,
>;

/// The ALPN protocol a connection negotiated.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The serial of the certificate the peer presented, if any.
pub fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::identity::CertInfo::from_der(chain.first()?)
        .ok()
        .map(|i| i.serial)
}

/// [`accept`] with an admission check.
pub async fn accept_admitting(
    incoming: quinn::Incoming,
    timeout: Duration,
    admit: Option<&Admit>,
) -> Result<Link, LinkError> {
    let addr = incoming.remote_address();
    let handshake = async {
        let conn = incoming
            .await
            .map_err(|e| LinkError::from_connection(addr, e))?;
        let peer = peer_identity(&conn);
        if let Some(check) = admit
            && let Err(reason) = check(&conn, peer.as_ref())
        {
            tracing::warn!(%addr, peer = ?peer.as_ref().map(|p| p.to_string()), %reason, "refused a link");
            conn.close(CLOSE_NOT_PERMITTED.into(), reason.as_bytes());
            return Err(LinkError::RefusedPeer {
                addr,
                reason: AlertReason::NotPermitted,
            });
        }
        let send = async {
            let mut s = conn.open_uni().await?;
            s.write_all(WELCOME).await?;
            s.finish()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        send.await.map_err(|e| LinkError::Protocol {
            addr,
            detail: format!("cannot send welcome: {e}"),
        })?;
        Ok(Link { conn, peer })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or(Err(LinkError::Timeout {
            addr,
            after: timeout,
        }))
}

/// Largest UDP datagram a lanmesh endpoint accepts. quinn's default (65527)
/// sizes every endpoint's receive buffer for jumbo datagrams — megabytes of
/// memory per process — while lanmesh links run over ordinary LAN MTUs.
pub const MAX_UDP_PAYLOAD: u16 = 1500;

fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    // 1500 is within quinn's accepted range (1200..=65527), so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    config
}

fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC (needs tokio)"))?;
    quinn::Endpoint::new(endpoint_config(), server, socket, runtime)
}

/// A server endpoint on `bind` (port 0 allowed) that can also dial out.
pub fn server_endpoint(
    config: quinn::ServerConfig,
    bind: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    endpoint(bind, Some(config))
}

/// Accepts connections on `endpoint` until `shutdown` fires: each handshake
/// (see [`accept`]) runs in its own task, and each established link is handed
/// to `on_link` (in that task). Refused handshakes are logged as `what`.
pub async fn accept_loop<F, Fut>(
    endpoint: quinn::Endpoint,
    shutdown: tokio_util::sync::CancellationToken,
    what: &'static str,
    on_link: F,
) where
    F: Fn(Link) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept_loop_admitting(endpoint, shutdown, what, None, on_link).await;
}

/// [`accept_loop`] with an admission check for every link.
pub async fn accept_loop_admitting<F, Fut>(
    endpoint: quinn::Endpoint,
    shutdown: tokio_util::sync::CancellationToken,
    what: &'static str,
    admit: Option<Admit>,
    on_link: F,
) where
    F: Fn(Link) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let on_link = on_link.clone();
        let admit = admit.clone();
        tokio::spawn(async move {
            match accept_admitting(incoming, DEFAULT_HANDSHAKE_TIMEOUT, admit.as_ref()).await {
                Ok(link) => on_link(link).await,
                Err(e) => tracing::warn!(error = %e, "refused a {what} connection"),
            }
        });
    }
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(
    config: quinn::ClientConfig,
    for_addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if for_addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = endpoint(bind, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
