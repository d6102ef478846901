//! TLS configuration for every lanmesh QUIC link, and the verifiers that decide
//! who may talk to whom.
//!
//! A link is described by a [`PeerPolicy`]: the cluster id the peer must
//! belong to, which roles are allowed on the link (a function the caller
//! passes — Raft accepts only `core`, the edge link `edge`/`core`), and a live
//! set of revoked serials. Both directions enforce it:
//!
//! * the server's client-certificate verifier and the client's server-certificate
//!   verifier first run rustls' WebPKI checks (chain to the cluster CA, validity
//!   period, key usage, the CA's CRL), then read the `lanmesh://` identity from
//!   the certificate and check cluster, role and revocation;
//! * host names are **not** checked: a lanmesh peer is identified by the
//!   identity in its certificate, not by the address it was reached at (nodes
//!   move between addresses found by mDNS). A caller that knows which node it
//!   wants checks the name after the handshake (see `link::connect`).
//!
//! Every refusal is logged with its precise reason and reported to an optional
//! [`RefusalHook`] (the audit log uses it). The peer sees a TLS alert, which
//! `link` turns back into a typed error.
//!
//! Every config is built with an explicit ring provider, so it never depends on
//! a process-wide default provider being installed.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};

use crate::identity::{CertInfo, Identity, IdentityError, Role, Subject};

/// ALPN of the Raft RPC link between cores.
pub const ALPN_RAFT: &[u8] = b"lanmesh-raft/1";
/// ALPN of the client protocol (apps, CLI).
pub const ALPN_CLIENT: &[u8] = b"lanmesh-client/1";
/// ALPN of the edge upstream link (edge to core, or edge to relay edge).
pub const ALPN_EDGE: &[u8] = b"lanmesh-edge/1";

/// Why TLS material could not be loaded or a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file does not contain what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file (or a description of in-memory material).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate was given without its key, or the reverse.
    #[error("a certificate needs its key and a key its certificate (got only one of --cert/--key)")]
    HalfPair,
    /// Our own certificate does not pass the checks a peer would make.
    #[error("our own certificate {path} would be refused by peers: {reason}")]
    OwnCertificate {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A server config needs a certificate.
    #[error("serving TLS needs a certificate and key (--cert/--key)")]
    NoServerCertificate,
    /// rustls refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built (e.g. an unusable CRL).
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The rustls config cannot be used for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

/// Paths of the TLS material of one program (`--ca`, `--cert`, `--key`, and a CRL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate to trust.
    pub ca: PathBuf,
    /// This program's certificate (absent for an anonymous client).
    pub cert: Option<PathBuf>,
    /// This program's private key.
    pub key: Option<PathBuf>,
    /// A CRL (`crl.pem` from `pki revoke`), if any.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// `--ca`, `--cert`, `--key`, plus the CRL `crl.pem` beside the CA file when
    /// one is there (where `pki revoke` writes it and operators copy it).
    pub fn new(ca: impl Into<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Self {
        let ca = ca.into();
        let crl = ca
            .parent()
            .map(|d| d.join(crate::pki::CRL_FILE))
            .filter(|p| p.is_file());
        TlsFiles { ca, cert, key, crl }
    }
}

/// Parsed TLS material: trust anchors, CRLs, and our own certificate and key.
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    own: Option<OwnCert>,
    ca_cluster_id: Option<String>,
}

/// PEM bytes and the file they came from (for error messages).
struct Pem<'a> {
    bytes: &'a [u8],
    path: &'a Path,
}

impl<'a> Pem<'a> {
    fn new(bytes: &'a [u8], path: &'a Path) -> Self {
        Pem { bytes, path }
    }
}

struct OwnCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Option<Identity>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads the files and checks that our own certificate chains to the CA, is
    /// within its validity period, and is not on the CRL — the checks a peer would
    /// make — so a misconfigured node fails at start with a clear message instead
    /// of being refused by every peer later.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = read(&files.ca)?;
        let own = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => Some(((read(c)?, c), (read(k)?, k))),
            (None, None) => None,
            _ => return Err(TlsError::HalfPair),
        };
        let crl = match &files.crl {
            Some(p) => Some((read(p)?, p)),
            None => None,
        };
        let material = Self::from_pem_named(
            Pem::new(&ca, &files.ca),
            own.as_ref()
                .map(|((c, cp), (k, kp))| (Pem::new(c, cp), Pem::new(k, kp))),
            crl.as_ref().map(|(c, p)| Pem::new(c, p)),
        )?;
        if let (Some(own), Some(path)) = (&material.own, &files.cert) {
            let verifier = material.webpki_client_verifier(true)?;
            let (leaf, rest) = own.chain.split_first().ok_or_else(|| TlsError::Invalid {
                path: path.clone(),
                reason: "no certificate in it".into(),
            })?;
            verifier
                .verify_client_cert(leaf, rest, UnixTime::now())
                .map_err(|e| TlsError::OwnCertificate {
                    path: path.clone(),
                    reason: describe_rustls_error(&e),
                })?;
        }
        Ok(material)
    }

    /// Builds material from PEM text without the self-check of [`TlsMaterial::load`].
    /// Tests use it to act as a misconfigured peer (expired, revoked, wrong cluster).
    pub fn from_pem(
        ca: &[u8],
        own: Option<(&[u8], &[u8])>,
        crl: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        Self::from_pem_named(
            Pem::new(ca, mem),
            own.map(|(c, k)| (Pem::new(c, mem), Pem::new(k, mem))),
            crl.map(|c| Pem::new(c, mem)),
        )
    }

    fn from_pem_named(
        Pem {
            bytes: ca,
            path: ca_path,
        }: Pem<'_>,
        own: Option<(Pem<'_>, Pem<'_>)>,
        crl: Option<Pem<'_>>,
    ) -> Result<Self, TlsError> {
        let invalid = |path: &Path, reason: String| TlsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        let mut ca_cluster_id = None;
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| invalid(ca_path, format!("bad PEM ({e})")))?;
            if let Ok(CertInfo {
                lanmesh: Some(Subject::Ca { cluster_id }),
                ..
            }) = CertInfo::from_der(&cert)
            {
                ca_cluster_id.get_or_insert(cluster_id);
            }
            roots
                .add(cert)
                .map_err(|e| invalid(ca_path, format!("unusable CA certificate ({e})")))?;
        }
        if roots.is_empty() {
            return Err(invalid(ca_path, "no CA certificate in it".into()));
        }
        let own = match own {
            None => None,
            Some((
                Pem {
                    bytes: cert,
                    path: cert_path,
                },
                Pem {
                    bytes: key,
                    path: key_path,
                },
            )) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid(cert_path, format!("bad PEM ({e})")))?;
                let leaf = chain
                    .first()
                    .ok_or_else(|| invalid(cert_path, "no certificate in it".into()))?;
                let identity = CertInfo::from_der(leaf)
                    .map_err(|e| invalid(cert_path, e.to_string()))?
                    .identity()
                    .ok()
                    .cloned();
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| invalid(key_path, format!("no PEM private key in it ({e})")))?;
                Some(OwnCert {
                    chain,
                    key,
                    identity,
                })
            }
        };
        let crls = match crl {
            None => Vec::new(),
            Some(Pem {
                bytes: crl,
                path: crl_path,
            }) => CertificateRevocationListDer::pem_slice_iter(crl)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(crl_path, format!("bad PEM CRL ({e})")))?,
        };
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            crls,
            own,
            ca_cluster_id,
        })
    }

    /// The identity our own certificate states, if we have one.
    pub fn identity(&self) -> Option<&Identity> {
        self.own.as_ref().and_then(|o| o.identity.as_ref())
    }

    /// The cluster id the (first) trusted CA was created for.
    pub fn ca_cluster_id(&self) -> Option<&str> {
        self.ca_cluster_id.as_deref()
    }

    fn webpki_client_verifier(
        &self,
        mandatory: bool,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            builder = builder
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        if !mandatory {
            builder = builder.allow_unauthenticated();
        }
        Ok(builder.build()?)
    }

    fn webpki_server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        let mut builder =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            builder = builder
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        Ok(builder.build()?)
    }
}

/// A set of revoked certificate serials that can change while links are up
/// (the Raft state machine's revocation registry feeds it). Cheap to clone;
/// every clone sees the same set.
#[derive(Clone, Default)]
pub struct RevokedSerials(Arc<RwLock<HashSet<String>>>);

impl fmt::Debug for RevokedSerials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RevokedSerials").field(&self.len()).finish()
    }
}

impl RevokedSerials {
    /// Adds a serial (any form `identity::normalize_serial` accepts; junk is ignored).
    pub fn insert(&self, serial: &str) {
        if let Some(s) = crate::identity::normalize_serial(serial) {
            self.write().insert(s);
        }
    }

    /// Replaces the whole set.
    pub fn replace(&self, serials: impl IntoIterator<Item = String>) {
        let set = serials
            .into_iter()
            .filter_map(|s| crate::identity::normalize_serial(&s))
            .collect();
        *self.write() = set;
    }

    /// Whether a serial (in `format_serial` form) is revoked.
    pub fn contains(&self, serial: &str) -> bool {
        self.read().contains(serial)
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no serial is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means a writer panicked mid-insert of a string; the
    // set itself is still a valid set, so both sides keep using it.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashSet<String>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<String>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decides which roles are allowed on a link.
pub type RoleCheck = Arc<dyn Fn(Role) -> bool + Send + Sync>;

/// Called with every certificate a verifier refuses (for audit).
pub type RefusalHook = Arc<dyn Fn(&Refusal) + Send + Sync>;

/// Who may be the peer on one kind of link.
#[derive(Clone)]
pub struct PeerPolicy {
    cluster_id: String,
    roles: RoleCheck,
    revoked: RevokedSerials,
    on_refusal: Option<RefusalHook>,
}

impl fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerPolicy")
            .field("cluster_id", &self.cluster_id)
            .field("allowed", &self.allowed_roles())
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

impl PeerPolicy {
    /// Peers of `cluster_id` whose role passes `roles`.
    pub fn new(
        cluster_id: impl Into<String>,
        roles: impl Fn(Role) -> bool + Send + Sync + 'static,
    ) -> Self {
        PeerPolicy {
            cluster_id: cluster_id.into(),
            roles: Arc::new(roles),
            revoked: RevokedSerials::default(),
            on_refusal: None,
        }
    }

    /// Peers of `cluster_id` with one of `roles`.
    pub fn only(cluster_id: impl Into<String>, roles: &[Role]) -> Self {
        let roles = roles.to_vec();
        Self::new(cluster_id, move |r| roles.contains(&r))
    }

    /// Also refuses every serial in `revoked` (checked at each handshake).
    pub fn with_revoked(mut self, revoked: RevokedSerials) -> Self {
        self.revoked = revoked;
        self
    }

    /// Reports every certificate the verifier refuses to `hook` as well as to the log.
    ///
    /// A peer that presents *no* certificate where one is required is refused by
    /// rustls before any verifier runs; that case surfaces only as the accepting
    /// side's `LinkError::RefusedPeer { reason: CertificateRequired }`.
    pub fn on_refusal(mut self, hook: impl Fn(&Refusal) + Send + Sync + 'static) -> Self {
        self.on_refusal = Some(Arc::new(hook));
        self
    }

    /// The cluster id peers must belong to.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The roles this policy lets through.
    pub fn allowed_roles(&self) -> Vec<Role> {
        Role::ALL.into_iter().filter(|r| (self.roles)(*r)).collect()
    }

    /// Checks the identity part of a peer certificate (after WebPKI checks passed).
    pub fn check(&self, end_entity: &CertificateDer<'_>) -> Result<Identity, Refusal> {
        let info = CertInfo::from_der(end_entity).map_err(Refusal::NotLanmesh)?;
        let identity = info
            .identity()
            .map_err(|e| Refusal::NotLanmesh(e.clone()))?;
        if identity.cluster_id != self.cluster_id {
            return Err(Refusal::WrongCluster {
                expected: self.cluster_id.clone(),
                found: identity.clone(),
            });
        }
        if !(self.roles)(identity.role) {
            return Err(Refusal::RoleNotAllowed {
                found: identity.clone(),
                allowed: self.allowed_roles(),
            });
        }
        if self.revoked.contains(&info.serial) {
            return Err(Refusal::Revoked {
                serial: info.serial.clone(),
                subject: Some(identity.clone()),
            });
        }
        Ok(identity.clone())
    }

    fn refuse(&self, refusal: Refusal) -> rustls::Error {
        tracing::warn!(reason = %refusal, "refused peer certificate");
        if let Some(hook) = &self.on_refusal {
            hook(&refusal);
        }
        refusal.to_rustls()
    }

    /// Runs the identity check on a certificate WebPKI accepted, or reports a WebPKI refusal.
    fn finish(
        &self,
        end_entity: &CertificateDer<'_>,
        webpki: Result<(), rustls::Error>,
    ) -> Result<Identity, rustls::Error> {
        match webpki {
            Ok(()) => self.check(end_entity).map_err(|r| self.refuse(r)),
            Err(e) => {
                let subject = CertInfo::from_der(end_entity)
                    .ok()
                    .and_then(|i| i.identity().ok().cloned());
                Err(self.refuse(Refusal::from_rustls(&e, subject)))
            }
        }
    }
}

/// Why a verifier refused a peer's certificate (the precise, local view).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer presented no certificate where one is required.
    #[error("no certificate presented")]
    NoCertificate,
    /// The certificate does not chain to our cluster CA.
    #[error("certificate not issued by this cluster's CA{}", for_subject(.subject))]
    UnknownCa {
        /// Who the certificate claims to be, when readable.
        subject: Option<Identity>,
    },
    /// Outside its validity period.
    #[error("certificate expired or not yet valid{}", for_subject(.subject))]
    Expired {
        /// Who the certificate claims to be.
        subject: Option<Identity>,
    },
    /// On the CRL or the live revocation set.
    #[error("certificate {serial} is revoked{}", for_subject(.subject))]
    Revoked {
        /// Its serial (empty when only the CRL said so).
        serial: String,
        /// Who the certificate claims to be.
        subject: Option<Identity>,
    },
    /// Issued for another cluster id.
    #[error("certificate of {found} belongs to another cluster (expected {expected:?})")]
    WrongCluster {
        /// Our cluster id.
        expected: String,
        /// What the certificate says.
        found: Identity,
    },
    /// The role is not allowed on this link.
    #[error("role {} of {found} is not allowed on this link (allowed: {})", .found.role, join_roles(.allowed))]
    RoleNotAllowed {
        /// What the certificate says.
        found: Identity,
        /// What the link accepts.
        allowed: Vec<Role>,
    },
    /// The certificate carries no lanmesh identity.
    #[error("not a lanmesh certificate: {0}")]
    NotLanmesh(IdentityError),
    /// Any other WebPKI failure (bad signature, wrong key usage, bad encoding).
    #[error("certificate refused: {0}")]
    Invalid(String),
}

fn for_subject(s: &Option<Identity>) -> String {
    s.as_ref().map(|i| format!(" ({i})")).unwrap_or_default()
}

fn join_roles(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Refusal {
    fn from_rustls(e: &rustls::Error, subject: Option<Identity>) -> Self {
        use CertificateError as C;
        match e {
            rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => Refusal::UnknownCa { subject },
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Refusal::Expired { subject },
                C::Revoked => Refusal::Revoked {
                    serial: String::new(),
                    subject,
                },
                other => Refusal::Invalid(format!("{other:?}")),
            },
            other => Refusal::Invalid(other.to_string()),
        }
    }

    /// The rustls error whose alert tells the peer (coarsely) what happened.
    fn to_rustls(&self) -> rustls::Error {
        let c = match self {
            Refusal::NoCertificate => return rustls::Error::NoCertificatesPresented,
            Refusal::UnknownCa { .. } => CertificateError::UnknownIssuer,
            Refusal::Expired { .. } => CertificateError::Expired,
            Refusal::Revoked { .. } => CertificateError::Revoked,
            // access_denied: the certificate is genuine but not welcome here.
            Refusal::WrongCluster { .. }
            | Refusal::RoleNotAllowed { .. }
            | Refusal::NotLanmesh(_) => CertificateError::ApplicationVerificationFailure,
            Refusal::Invalid(_) => CertificateError::BadEncoding,
        };
        rustls::Error::InvalidCertificate(c)
    }
}

/// Server side: verifies client certificates with WebPKI, then the policy.
struct ClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    policy: PeerPolicy,
    mandatory: bool,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let webpki = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        self.policy.finish(end_entity, webpki)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Client side: verifies the server certificate with WebPKI (except the host
/// name, see the module docs), then the policy.
struct ServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    policy: PeerPolicy,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let webpki = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // WebPKI checks the name last, so everything else has passed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(()),
            other => other.map(|_| ()),
        };
        self.policy.finish(end_entity, webpki)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Whether a server requires clients to present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Mutual TLS: no certificate, no connection (Raft, edge link, air-gapped mode).
    Required,
    /// A certificate is checked if presented; clients may also come without one
    /// and log in with a password (the client port).
    Optional,
}

/// The crypto provider every lanmesh config uses: ring, explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config for a link: our certificate, client certificates
/// checked against `policy`, TLS 1.3 only, the given ALPN protocols.
pub fn server_config(
    material: &TlsMaterial,
    policy: PeerPolicy,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let own = material.own.as_ref().ok_or(TlsError::NoServerCertificate)?;
    let mandatory = client_auth == ClientAuth::Required;
    let verifier = Arc::new(ClientVerifier {
        webpki: material.webpki_client_verifier(mandatory)?,
        policy,
        mandatory,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(own.chain.clone(), own.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A rustls client config for a link: server certificates checked against
/// `policy`, our certificate offered when we have one, TLS 1.3 only.
pub fn client_config(
    material: &TlsMaterial,
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(ServerVerifier {
        webpki: material.webpki_server_verifier()?,
        policy,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &material.own {
        Some(own) => builder.with_client_auth_cert(own.chain.clone(), own.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// QUIC transport settings shared by every lanmesh link.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive pings are sent this often so an idle link stays open and a
    /// dead peer is noticed within `idle_timeout`.
    pub keep_alive: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
        }
    }
}

impl Transport {
    fn quinn(self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.keep_alive_interval(Some(self.keep_alive));
        Arc::new(t)
    }
}

/// A quinn server config from a rustls one.
pub fn quinn_server_config(
    tls: rustls::ServerConfig,
    transport: Transport,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport.quinn());
    Ok(config)
}

/// A quinn client config from a rustls one.
pub fn quinn_client_config(
    tls: rustls::ClientConfig,
    transport: Transport,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport.quinn());
    Ok(config)
}

/// The identity of the peer of an established connection, read from the
/// certificate our verifier accepted. `None` when the peer sent no certificate
/// (an anonymous client on a [`ClientAuth::Optional`] port).
pub fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    CertInfo::from_der(certs.first()?)
        .ok()?
        .identity()
        .ok()
        .cloned()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn describe_rustls_error(e: &rustls::Error) -> String {
    match Refusal::from_rustls(e, None) {
        Refusal::Invalid(s) => s,
        r => r.to_string(),
    }
}
