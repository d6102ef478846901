//! Minting certificates: the cluster CA, leaf certificates, and the CRL.
//!
//! The `pki` binary is a command-line layer over this module, and `core-node`
//! uses [`ensure_local_pki`] for the zero-set-up single-node default. Files are
//! written all-or-nothing ([`write_files`]): every target is checked first,
//! written to a temporary file, synced, and only then renamed into place, so an
//! error never leaves half a certificate/key pair behind. Private keys get mode
//! 0600.
//!
//! Reading certificates for verification is `tls`'s job; what a certificate
//! says about its holder is `identity`'s.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::identity::{CertInfo, Identity, IdentityError, Role, Subject, ca_uri, validate_name};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the certificate revocation list inside a CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// Default CA lifetime: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default leaf lifetime: one year.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Leaf certificates are back-dated this much so a peer whose clock is a little
/// behind does not see a brand-new certificate as "not yet valid".
const BACKDATE: Duration = Duration::hours(1);

/// Why a PKI operation failed. Every variant names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The CA directory lacks `ca.crt` or `ca.key`.
    #[error(
        "no CA in {dir}: expected {CA_CERT_FILE} and {CA_KEY_FILE} there (create one with `pki init`)"
    )]
    CaMissing {
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An output file exists and overwriting was not asked for.
    #[error("refusing to overwrite {path} (use --force to replace it)")]
    Exists {
        /// The file that is in the way.
        path: PathBuf,
    },
    /// A file does not hold what it should (bad PEM, wrong kind of object).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A cluster id, name or identity is not acceptable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A validity period that cannot be used.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// rcgen refused to build the certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A serial number that is not hex.
    #[error("{0:?} is not a serial number (expected hex digits)")]
    BadSerial(String),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
}

/// The key algorithm of a new key pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: the default, understood by every TLS stack.
    #[default]
    EcdsaP256,
    /// Ed25519: smaller and faster, but not accepted by some older tools.
    Ed25519,
}

impl KeyType {
    fn generate(self) -> Result<KeyPair, PkiError> {
        let alg = match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        };
        Ok(KeyPair::generate_for(alg)?)
    }
}

/// A validity period `[not_before, not_after]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (back-dated an hour for clock skew) for `days` days.
    pub fn days_from_now(days: u32) -> Result<Self, PkiError> {
        if days == 0 {
            return Err(PkiError::Validity("--days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(days)),
        })
    }
}

/// A loaded cluster CA: certificate, key and the cluster id it states.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    info: CertInfo,
    cluster_id: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("cluster_id", &self.cluster_id)
            .field("serial", &self.info.serial)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new self-signed CA for `cluster_id`.
    pub fn generate(cluster_id: &str, days: u32, key_type: KeyType) -> Result<Self, PkiError> {
        validate_name("cluster id", cluster_id)?;
        let validity = Validity::days_from_now(days)?;
        let key = key_type.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("lanmesh CA {cluster_id}"), "ca");
        params.subject_alt_names = vec![SanType::URI(ca_uri(cluster_id).try_into()?)];
        // No intermediates: every leaf is signed by this CA directly.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let info = CertInfo::from_der(&cert_der)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der,
            key,
            info,
            cluster_id: cluster_id.to_owned(),
        })
    }

    /// Loads `ca.crt` and `ca.key` from a CA directory and checks they belong together.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !cert_path.is_file() || !key_path.is_file() {
            return Err(PkiError::CaMissing {
                dir: dir.to_owned(),
            });
        }
        let cert_pem = read_to_string(&cert_path)?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Invalid {
                path: cert_path.clone(),
                reason: format!("no PEM certificate in it ({e})"),
            })?;
        let info = CertInfo::from_der(&cert_der).map_err(|e| PkiError::Invalid {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let cluster_id = match (&info.lanmesh, info.is_ca) {
            (Some(Subject::Ca { cluster_id }), true) => cluster_id.clone(),
            _ => {
                return Err(PkiError::Invalid {
                    path: cert_path,
                    reason: "not a lanmesh CA certificate (made by `pki init`)".into(),
                });
            }
        };
        let key =
            KeyPair::from_pem(&read_to_string(&key_path)?).map_err(|e| PkiError::Invalid {
                path: key_path.clone(),
                reason: format!("not a usable PEM private key ({e})"),
            })?;
        if public_key_of(&cert_der).as_deref() != Some(key.public_key_raw()) {
            return Err(PkiError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        Ok(Ca {
            cert_pem,
            cert_der,
            key,
            info,
            cluster_id,
        })
    }

    /// The cluster id this CA was created for.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// What the CA certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<(), PkiError> {
        write_files(
            &[
                OutFile::public(dir.join(CA_CERT_FILE), self.cert_pem.as_bytes()),
                OutFile::secret(dir.join(CA_KEY_FILE), self.key_pem().into_bytes()),
            ],
            overwrite,
        )
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues a leaf certificate and a fresh key for `req`.
    ///
    /// The identity's cluster id is normally this CA's; it is taken from the
    /// request so tests can mint a certificate that claims another cluster.
    pub fn issue(&self, req: &LeafRequest) -> Result<Issued, PkiError> {
        if req.validity.not_after <= req.validity.not_before {
            return Err(PkiError::Validity(
                "not-after must be later than not-before".into(),
            ));
        }
        let key = req.key_type.generate()?;
        let role = req.identity.role;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&req.identity.name, role.as_str());
        let mut sans = vec![SanType::URI(req.identity.uri().try_into()?)];
        for dns in &req.dns {
            sans.push(SanType::DnsName(dns.as_str().try_into().map_err(|_| {
                PkiError::Validity(format!("{dns:?} is not a valid DNS name"))
            })?));
        }
        sans.extend(req.ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if role.serves() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = req.validity.not_before;
        params.not_after = req.validity.not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let info = CertInfo::from_der(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            info,
        })
    }

    /// Builds a CRL listing `revoked`, signed by this CA, valid until the CA expires.
    pub fn revocation_list(&self, number: u64, revoked: &[Revoked]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: self.info.not_after.max(now + Duration::days(1)),
            crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| {
                    let serial = crate::identity::serial_bytes(&r.serial)
                        .ok_or_else(|| PkiError::BadSerial(r.serial.clone()))?;
                    Ok(RevokedCertParams {
                        serial_number: SerialNumber::from(serial),
                        revocation_time: r.revoked_at,
                        reason_code: None,
                        invalidity_date: None,
                    })
                })
                .collect::<Result<_, PkiError>>()?,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer()?)?.pem()?)
    }
}

/// What to put in a new leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    /// Cluster, role and name (the URI SAN and the subject).
    pub identity: Identity,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Validity period.
    pub validity: Validity,
    /// Key algorithm of the new key.
    pub key_type: KeyType,
}

impl LeafRequest {
    /// A request for `role`/`name` in this CA's cluster, valid `days` from now.
    pub fn new(ca: &Ca, role: Role, name: &str, days: u32) -> Result<Self, PkiError> {
        Ok(LeafRequest {
            identity: Identity::new(ca.cluster_id(), role, name)?,
            ips: Vec::new(),
            dns: Vec::new(),
            validity: Validity::days_from_now(days)?,
            key_type: KeyType::default(),
        })
    }
}

/// A freshly issued leaf certificate and its key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8). Keep it secret.
    pub key_pem: String,
    /// What the certificate says.
    pub info: CertInfo,
}

impl Issued {
    /// Writes `NAME.crt` (0644) and `NAME.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str, overwrite: bool) -> Result<(), PkiError> {
        write_files(
            &[
                OutFile::public(dir.join(format!("{name}.crt")), self.cert_pem.as_bytes()),
                OutFile::secret(dir.join(format!("{name}.key")), self.key_pem.as_bytes()),
            ],
            overwrite,
        )
    }
}

/// One entry of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Serial in [`crate::identity::format_serial`] form.
    pub serial: String,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

/// The contents of an existing CRL file.
#[derive(Debug, Clone, Default)]
pub struct CrlContents {
    /// The CRL number (increases with each new CRL).
    pub number: u64,
    /// The revoked certificates.
    pub revoked: Vec<Revoked>,
}

/// Reads a PEM CRL. Its signature is not checked here (the TLS verifiers do that);
/// this is for extending our own CRL and for listing.
pub fn read_crl(path: &Path) -> Result<CrlContents, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| PkiError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let der = CertificateRevocationListDer::from_pem_slice(&bytes)
        .map_err(|e| invalid(format!("no PEM CRL in it ({e})")))?;
    let (_, crl) = CertificateRevocationList::from_der(&der)
        .map_err(|e| invalid(format!("not a CRL ({e})")))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: crate::identity::format_serial(r.raw_serial()),
            revoked_at: r.revocation_date.to_datetime(),
        })
        .collect();
    Ok(CrlContents { number, revoked })
}

/// A file to write: path, contents, and whether it is secret (mode 0600) or public (0644).
#[derive(Debug, Clone)]
pub struct OutFile {
    /// Target path.
    pub path: PathBuf,
    /// Bytes to write.
    pub contents: Vec<u8>,
    /// Unix permission bits.
    pub mode: u32,
}

impl OutFile {
    /// A world-readable file (certificates, CRLs): mode 0644.
    pub fn public(path: PathBuf, contents: impl Into<Vec<u8>>) -> Self {
        OutFile {
            path,
            contents: contents.into(),
            mode: 0o644,
        }
    }

    /// A private file (keys): mode 0600.
    pub fn secret(path: PathBuf, contents: impl Into<Vec<u8>>) -> Self {
        OutFile {
            path,
            contents: contents.into(),
            mode: 0o600,
        }
    }
}

/// Writes several files all-or-nothing.
///
/// Without `overwrite`, fails before writing anything if any target exists.
/// Each file is written to a temporary name in its directory, synced, then
/// renamed over the target; the directories are synced last.
pub fn write_files(files: &[OutFile], overwrite: bool) -> Result<(), PkiError> {
    if let Some(f) = files.iter().find(|f| !overwrite && f.path.exists()) {
        return Err(PkiError::Exists {
            path: f.path.clone(),
        });
    }
    let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let result = (|| {
        for f in files {
            let dir = parent_dir(&f.path);
            fs::create_dir_all(&dir).map_err(|source| PkiError::Write {
                path: dir.clone(),
                source,
            })?;
            let file_name = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
            let tmp = dir.join(format!(
                ".{}.tmp-{}",
                file_name.unwrap_or_default(),
                std::process::id()
            ));
            let write_err = |source| PkiError::Write {
                path: f.path.clone(),
                source,
            };
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .open(&tmp)
                .map_err(write_err)?;
            temps.push(tmp);
            out.write_all(&f.contents).map_err(write_err)?;
            out.sync_all().map_err(write_err)?;
        }
        for (f, tmp) in files.iter().zip(&temps) {
            fs::rename(tmp, &f.path).map_err(|source| PkiError::Write {
                path: f.path.clone(),
                source,
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        for tmp in &temps {
            let _ = fs::remove_file(tmp);
        }
        return result;
    }
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| parent_dir(&f.path)).collect();
    dirs.dedup();
    for dir in dirs {
        // Make the renames durable. Failing to sync a directory is not worth
        // failing the whole operation over once the files are in place.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Where the single-node default keeps its throw-away PKI, and whether it was just made.
#[derive(Debug, Clone)]
pub struct LocalPki {
    /// The CA certificate to trust.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's key.
    pub key: PathBuf,
    /// The CA's key (kept so the node can later mint certificates for a local CLI).
    pub ca_key: PathBuf,
    /// True when this call created the CA (the caller should say so in its log).
    pub created: bool,
}

/// File names of the node certificate inside a local PKI directory.
pub const LOCAL_NODE_CERT: &str = "node.crt";
/// File name of the node key inside a local PKI directory.
pub const LOCAL_NODE_KEY: &str = "node.key";

/// Makes sure `dir` holds a CA and a `core` certificate for `node_name`, creating
/// a throw-away CA on first use (the architecture's "single-node default").
///
/// The node certificate covers loopback and `localhost` plus any `ips` given. An
/// existing CA for another cluster id is an error rather than silently replaced.
pub fn ensure_local_pki(
    dir: &Path,
    cluster_id: &str,
    node_name: &str,
    ips: &[IpAddr],
) -> Result<LocalPki, PkiError> {
    let paths = LocalPki {
        ca: dir.join(CA_CERT_FILE),
        ca_key: dir.join(CA_KEY_FILE),
        cert: dir.join(LOCAL_NODE_CERT),
        key: dir.join(LOCAL_NODE_KEY),
        created: false,
    };
    let (ca, created) = if paths.ca.exists() {
        let ca = Ca::load(dir)?;
        if ca.cluster_id() != cluster_id {
            return Err(PkiError::Invalid {
                path: paths.ca.clone(),
                reason: format!(
                    "this CA is for cluster {:?}, but the node is configured for {cluster_id:?}",
                    ca.cluster_id()
                ),
            });
        }
        (ca, false)
    } else {
        let ca = Ca::generate(cluster_id, DEFAULT_CA_DAYS, KeyType::default())?;
        ca.write(dir, false)?;
        (ca, true)
    };
    // Reissue when missing, or when the node was renamed since it was made.
    let current_name = fs::read(&paths.cert).ok().and_then(|pem| {
        let der = CertificateDer::from_pem_slice(&pem).ok()?;
        Some(CertInfo::from_der(&der).ok()?.identity().ok()?.name.clone())
    });
    if created || !paths.key.exists() || current_name.as_deref() != Some(node_name) {
        let mut req = LeafRequest::new(&ca, Role::Core, node_name, DEFAULT_LEAF_DAYS)?;
        req.dns = vec!["localhost".into()];
        req.ips = vec![
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ];
        for ip in ips {
            if !req.ips.contains(ip) && !ip.is_unspecified() {
                req.ips.push(*ip);
            }
        }
        ca.issue(&req)?.write_named(&paths.cert, &paths.key)?;
    }
    Ok(LocalPki { created, ..paths })
}

impl Issued {
    /// Writes the certificate and key to explicit paths, replacing what is there.
    pub fn write_named(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        write_files(
            &[
                OutFile::public(cert.to_owned(), self.cert_pem.as_bytes()),
                OutFile::secret(key.to_owned(), self.key_pem.as_bytes()),
            ],
            true,
        )
    }
}

fn dn(common_name: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "lanmesh");
    dn.push(DnType::OrganizationalUnitName, unit);
    dn
}

/// A random positive 16-byte serial number (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Clear the top bit so the DER integer is positive, and make the first byte
    // non-zero so the encoding is always 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn public_key_of(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("site-a", 30, KeyType::EcdsaP256).unwrap();
        ca.write(dir.path(), false).unwrap();
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cluster_id(), "site-a");
        assert!(loaded.info().is_ca);
        // A second write without overwrite is refused and leaves the files as they were.
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let other = Ca::generate("site-a", 30, KeyType::Ed25519).unwrap();
        assert!(matches!(
            other.write(dir.path(), false),
            Err(PkiError::Exists { .. })
        ));
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);
    }

    #[test]
    fn leaf_carries_identity_and_usages() {
        let ca = Ca::generate("c1", 30, KeyType::Ed25519).unwrap();
        let mut req = LeafRequest::new(&ca, Role::Operator, "alice", 10).unwrap();
        req.dns = vec!["alice.example".into()];
        let issued = ca.issue(&req).unwrap();
        let id = issued.info.identity().unwrap();
        assert_eq!(
            (id.cluster_id.as_str(), id.role, id.name.as_str()),
            ("c1", Role::Operator, "alice")
        );
        assert_eq!(issued.info.usages, vec!["clientAuth"]);
        assert_eq!(issued.info.dns_names, vec!["alice.example"]);
        let core = ca
            .issue(&LeafRequest::new(&ca, Role::Core, "n1", 10).unwrap())
            .unwrap();
        assert_eq!(core.info.usages, vec!["serverAuth", "clientAuth"]);
        assert_ne!(core.info.serial, issued.info.serial);
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::generate("c1", 30, KeyType::EcdsaP256)
            .unwrap()
            .write(dir.path(), false)
            .unwrap();
        let other = Ca::generate("c1", 30, KeyType::EcdsaP256).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), other.key_pem()).unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(PkiError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn crl_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("c1", 30, KeyType::EcdsaP256).unwrap();
        let leaf = ca
            .issue(&LeafRequest::new(&ca, Role::Edge, "e1", 10).unwrap())
            .unwrap();
        let revoked = vec![Revoked {
            serial: leaf.info.serial.clone(),
            revoked_at: OffsetDateTime::now_utc(),
        }];
        let pem = ca.revocation_list(7, &revoked).unwrap();
        let path = dir.path().join(CRL_FILE);
        fs::write(&path, pem).unwrap();
        let read = read_crl(&path).unwrap();
        assert_eq!(read.number, 7);
        assert_eq!(read.revoked.len(), 1);
        assert_eq!(read.revoked[0].serial, leaf.info.serial);
    }

    #[test]
    fn local_pki_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_local_pki(dir.path(), "local", "node-1", &[]).unwrap();
        assert!(first.created);
        let ca_before = fs::read(&first.ca).unwrap();
        let second = ensure_local_pki(dir.path(), "local", "node-1", &[]).unwrap();
        assert!(!second.created);
        assert_eq!(fs::read(&second.ca).unwrap(), ca_before);
        let mode = fs::metadata(&second.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(matches!(
            ensure_local_pki(dir.path(), "other", "node-1", &[]),
            Err(PkiError::Invalid { .. })
        ));
        // A renamed node gets a certificate with its new name from the same CA.
        let renamed = ensure_local_pki(dir.path(), "local", "node-9", &[]).unwrap();
        assert!(!renamed.created);
        let der = CertificateDer::from_pem_slice(&fs::read(&renamed.cert).unwrap()).unwrap();
        assert_eq!(
            CertInfo::from_der(&der).unwrap().identity().unwrap().name,
            "node-9"
        );
        assert_eq!(fs::read(&renamed.ca).unwrap(), ca_before);
    }
}
