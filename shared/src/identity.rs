//! Who a certificate says its holder is.
//!
//! Every lanmesh leaf certificate carries one URI SAN of the form
//! `lanmesh://<cluster-id>/<role>/<name>`; the CA carries
//! `lanmesh://<cluster-id>/ca/ca`. This module owns that format, the [`Role`]
//! enum, name validation, and [`CertInfo`]: the parsed view of a certificate
//! that `pki list`/`inspect` print and the TLS verifiers check.
//!
//! It does not verify signatures or chains (that is `tls`), and it does not
//! mint anything (that is `pki`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI scheme of identity SANs.
pub const IDENTITY_SCHEME: &str = "lanmesh://";

/// What a certificate's holder is allowed to be in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A Raft voter on the main LAN.
    Core,
    /// A site proxy that connects upstream to cores (or a relay edge).
    Edge,
    /// A person or script administering the cluster (admin API, CLI).
    Operator,
    /// An application or device using the client protocol.
    Client,
}

impl Role {
    /// Every leaf role, in the order `pki` lists them.
    pub const ALL: [Role; 4] = [Role::Core, Role::Edge, Role::Operator, Role::Client];

    /// The lower-case name used in URIs, file listings and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Core => "core",
            Role::Edge => "edge",
            Role::Operator => "operator",
            Role::Client => "client",
        }
    }

    /// Whether a certificate of this role may act as a TLS server.
    ///
    /// Cores and edges accept connections (Raft, client port, edge link);
    /// operators and clients only ever dial out.
    pub fn serves(self) -> bool {
        matches!(self, Role::Core | Role::Edge)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_owned()))
    }
}

/// Why an identity could not be read or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The role is not one of core, edge, operator, client.
    #[error("unknown role {0:?} (expected core, edge, operator or client)")]
    UnknownRole(String),
    /// A cluster id or node name has characters that cannot go in a URI path segment.
    #[error(
        "invalid {what} {value:?}: use 1-63 characters from a-z, A-Z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    InvalidName {
        /// "cluster id" or "name".
        what: &'static str,
        /// The rejected value.
        value: String,
    },
    /// The bytes are not a DER X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    NotACertificate(String),
    /// The certificate has no `lanmesh://` URI SAN, so it is not one of ours.
    #[error("certificate has no lanmesh:// identity (URI SAN); it was not issued by `pki`")]
    NoIdentity,
    /// The certificate has a `lanmesh://` URI SAN that does not parse.
    #[error("malformed lanmesh identity {0:?}")]
    MalformedIdentity(String),
}

/// Checks a cluster id or node name: it becomes a path segment of the identity URI
/// and a file name, so it is kept to a conservative character set.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

/// The verified or claimed identity of a certificate holder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The cluster the certificate was issued for.
    pub cluster_id: String,
    /// What the holder may act as.
    pub role: Role,
    /// The holder's name (node id, operator name, client name).
    pub name: String,
}

impl Identity {
    /// Builds an identity after validating the cluster id and name.
    pub fn new(
        cluster_id: impl Into<String>,
        role: Role,
        name: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (cluster_id, name) = (cluster_id.into(), name.into());
        validate_name("cluster id", &cluster_id)?;
        validate_name("name", &name)?;
        Ok(Identity {
            cluster_id,
            role,
            name,
        })
    }

    /// The URI SAN that states this identity.
    pub fn uri(&self) -> String {
        format!(
            "{IDENTITY_SCHEME}{}/{}/{}",
            self.cluster_id, self.role, self.name
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.role, self.name, self.cluster_id)
    }
}

/// The URI SAN a cluster CA carries, so `pki issue` can read the cluster id back.
pub fn ca_uri(cluster_id: &str) -> String {
    format!("{IDENTITY_SCHEME}{cluster_id}/ca/ca")
}

/// What a `lanmesh://` URI names: a leaf identity or the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A leaf certificate's holder.
    Leaf(Identity),
    /// The CA of the named cluster.
    Ca {
        /// The cluster the CA was created for.
        cluster_id: String,
    },
}

/// Parses a `lanmesh://cluster/role/name` (or `lanmesh://cluster/ca/ca`) URI.
pub fn parse_identity_uri(uri: &str) -> Result<Subject, IdentityError> {
    let malformed = || IdentityError::MalformedIdentity(uri.to_owned());
    let rest = uri.strip_prefix(IDENTITY_SCHEME).ok_or_else(malformed)?;
    let mut parts = rest.split('/');
    let (Some(cluster), Some(role), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    validate_name("cluster id", cluster).map_err(|_| malformed())?;
    if role == "ca" && name == "ca" {
        return Ok(Subject::Ca {
            cluster_id: cluster.to_owned(),
        });
    }
    let role = Role::from_str(role).map_err(|_| malformed())?;
    Identity::new(cluster, role, name)
        .map(Subject::Leaf)
        .map_err(|_| malformed())
}

/// The parsed, human-relevant view of one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The subject distinguished name, as text.
    pub subject: String,
    /// The issuer distinguished name, as text.
    pub issuer: String,
    /// What the `lanmesh://` SAN says, if the certificate has one.
    pub lanmesh: Option<Subject>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addrs: Vec<IpAddr>,
    /// URI SANs (including the `lanmesh://` one).
    pub uris: Vec<String>,
    /// Serial number, lower-case hex without separators (see [`format_serial`]).
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether basic constraints say this is a CA.
    pub is_ca: bool,
    /// Extended key usages present ("serverAuth", "clientAuth").
    pub usages: Vec<&'static str>,
    /// The public key algorithm ("ECDSA P-256", "Ed25519", or the OID).
    pub key_algorithm: String,
    /// Authority key identifier, hex (which CA key signed it), when present.
    pub authority_key_id: Option<String>,
    /// Subject key identifier, hex, when present.
    pub subject_key_id: Option<String>,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::NotACertificate(e.to_string()))?;
        let mut info = CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            lanmesh: None,
            dns_names: Vec::new(),
            ip_addrs: Vec::new(),
            uris: Vec::new(),
            serial: format_serial(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            is_ca: cert.is_ca(),
            usages: Vec::new(),
            key_algorithm: key_algorithm(&cert),
            authority_key_id: None,
            subject_key_id: None,
        };
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => info.dns_names.push((*d).to_owned()),
                            GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                            GeneralName::IPAddress(bytes) => {
                                if let Some(ip) = ip_from_bytes(bytes) {
                                    info.ip_addrs.push(ip);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    info.authority_key_id = aki.key_identifier.as_ref().map(|k| hex(k.0));
                }
                ParsedExtension::SubjectKeyIdentifier(ski) => {
                    info.subject_key_id = Some(hex(ski.0));
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    if eku.server_auth {
                        info.usages.push("serverAuth");
                    }
                    if eku.client_auth {
                        info.usages.push("clientAuth");
                    }
                }
                _ => {}
            }
        }
        let mut ours = info.uris.iter().filter(|u| u.starts_with(IDENTITY_SCHEME));
        if let Some(uri) = ours.next() {
            // A second lanmesh URI would make the identity ambiguous: refuse it.
            if ours.next().is_some() {
                return Err(IdentityError::MalformedIdentity(
                    "more than one lanmesh:// URI SAN".into(),
                ));
            }
            info.lanmesh = Some(parse_identity_uri(uri)?);
        }
        Ok(info)
    }

    /// The leaf identity, or an error when this is a CA or not a lanmesh certificate.
    pub fn identity(&self) -> Result<&Identity, IdentityError> {
        match &self.lanmesh {
            Some(Subject::Leaf(id)) => Ok(id),
            Some(Subject::Ca { .. }) | None => Err(IdentityError::NoIdentity),
        }
    }

    /// The cluster id this certificate belongs to, whether CA or leaf.
    pub fn cluster_id(&self) -> Option<&str> {
        match &self.lanmesh {
            Some(Subject::Leaf(id)) => Some(&id.cluster_id),
            Some(Subject::Ca { cluster_id }) => Some(cluster_id),
            None => None,
        }
    }

    /// Where this certificate stands in time relative to `now`.
    pub fn expiry(&self, now: OffsetDateTime) -> Expiry {
        if now > self.not_after {
            Expiry::Expired
        } else if now < self.not_before {
            Expiry::NotYetValid
        } else {
            // Round up: a certificate issued for 10 days shows "10 days left".
            let days = ((self.not_after - now).whole_seconds() + 86_399) / 86_400;
            if days < EXPIRY_WARNING_DAYS {
                Expiry::Soon { days }
            } else {
                Expiry::Valid { days }
            }
        }
    }
}

/// Certificates expiring within this many days are flagged by `pki list`/`inspect`.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// A certificate's validity relative to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Valid for `days` more days (at least [`EXPIRY_WARNING_DAYS`]).
    Valid {
        /// Whole days left.
        days: i64,
    },
    /// Valid, but expires within [`EXPIRY_WARNING_DAYS`].
    Soon {
        /// Whole days left.
        days: i64,
    },
    /// Past its not-after date.
    Expired,
    /// Before its not-before date (clock skew, or issued for the future).
    NotYetValid,
}

/// Formats a serial number as lower-case hex with leading zero bytes removed,
/// the form `pki` prints and `pki revoke --serial` accepts.
pub fn format_serial(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|b| *b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a serial as printed by `pki` or by other tools: hex, case-insensitive,
/// optionally with `0x` and `:` separators. Returns it in [`format_serial`] form.
pub fn normalize_serial(input: &str) -> Option<String> {
    let s = input.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let bytes: Option<Vec<u8>> = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok())
        .collect();
    bytes.map(|b| format_serial(&b))
}

/// Turns a normalized serial back into bytes.
pub fn serial_bytes(serial: &str) -> Option<Vec<u8>> {
    let norm = normalize_serial(serial)?;
    (0..norm.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&norm[i..i + 2], 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    const ED25519: &str = "1.3.101.112";
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let param = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (alg.as_str(), param.as_deref()) {
        (ED25519, _) => "Ed25519".into(),
        (EC_PUBLIC_KEY, Some(P256)) => "ECDSA P-256".into(),
        (EC_PUBLIC_KEY, Some(curve)) => format!("ECDSA ({curve})"),
        (other, _) => other.to_owned(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uri_round_trips() {
        let id = Identity::new("site-a", Role::Edge, "edge-1").unwrap();
        assert_eq!(id.uri(), "lanmesh://site-a/edge/edge-1");
        assert_eq!(parse_identity_uri(&id.uri()).unwrap(), Subject::Leaf(id));
        assert_eq!(
            parse_identity_uri(&ca_uri("site-a")).unwrap(),
            Subject::Ca {
                cluster_id: "site-a".into()
            }
        );
    }

    #[test]
    fn malformed_identities_are_refused() {
        for bad in [
            "lanmesh://a/core",
            "lanmesh://a/core/n/extra",
            "lanmesh://a/king/n",
            "https://a/core/n",
            "lanmesh://a/core/",
            "lanmesh://a b/core/n",
        ] {
            assert!(parse_identity_uri(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("name", "node-1.site_a").is_ok());
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(64), "é"] {
            assert!(validate_name("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serials_normalize() {
        assert_eq!(format_serial(&[0, 0, 0x1a, 0x02]), "1a02");
        assert_eq!(format_serial(&[0]), "00");
        assert_eq!(normalize_serial("0x1A:02").as_deref(), Some("1a02"));
        assert_eq!(normalize_serial("001a02").as_deref(), Some("1a02"));
        assert_eq!(normalize_serial("a02").as_deref(), Some("0a02"));
        assert_eq!(normalize_serial("zz"), None);
        assert_eq!(normalize_serial(""), None);
        assert_eq!(serial_bytes("1a02"), Some(vec![0x1a, 0x02]));
    }
}
