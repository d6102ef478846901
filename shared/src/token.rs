//! Login tokens: claims signed with the cluster's Ed25519 key.
//!
//! A token is `base64url(claims JSON) "." base64url(signature)`. Cores hold the
//! signing key (in the Raft state, so any core can issue after a failover);
//! anything holding the public key — a core, an edge offline — can check a
//! token. Checking covers the signature, the cluster id and expiry; whether the
//! subject still exists or was revoked is the caller's question, against its
//! registries.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Cluster the token is valid in.
    pub cluster: String,
    /// Subject: a user name, device name or certificate name.
    pub sub: String,
    /// `user`, `device` or `cert`.
    pub kind: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

/// Why a token is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the `claims.signature` form, or undecodable.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify: forged or altered.
    #[error("token signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired at {exp}")]
    Expired {
        /// When it expired.
        exp: i64,
    },
    /// Issued by another cluster.
    #[error("token is for cluster {0:?}")]
    WrongCluster(String),
    /// The signing key is unusable.
    #[error("signing key unusable")]
    BadKey,
}

/// Signs `claims` with a PKCS#8 Ed25519 key.
pub fn sign(key_pkcs8: &[u8], claims: &Claims) -> Result<String, TokenError> {
    let key = Ed25519KeyPair::from_pkcs8(key_pkcs8).map_err(|_| TokenError::BadKey)?;
    let body =
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|_| TokenError::Malformed)?);
    let sig = key.sign(body.as_bytes());
    Ok(format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
}

/// The public key of a PKCS#8 Ed25519 key (what verifiers need).
pub fn public_key(key_pkcs8: &[u8]) -> Result<Vec<u8>, TokenError> {
    Ok(Ed25519KeyPair::from_pkcs8(key_pkcs8)
        .map_err(|_| TokenError::BadKey)?
        .public_key()
        .as_ref()
        .to_vec())
}

/// The subject a token *claims*, without checking anything: for audit
/// records of refused tokens only, never for a decision.
pub fn unverified_subject(token: &str) -> Option<String> {
    let (body, _) = token.split_once('.')?;
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    // Keep audit records readable whatever a forger wrote.
    Some(claims.sub.chars().take(100).collect())
}

/// Checks a token's signature, cluster and expiry (`now` in Unix seconds).
pub fn verify(
    public_key: &[u8],
    token: &str,
    cluster: &str,
    now: i64,
) -> Result<Claims, TokenError> {
    let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(body.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims: Claims = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?,
    )
    .map_err(|_| TokenError::Malformed)?;
    if claims.cluster != cluster {
        return Err(TokenError::WrongCluster(claims.cluster));
    }
    if now >= claims.exp {
        return Err(TokenError::Expired { exp: claims.exp });
    }
    Ok(claims)
}

/// Unix seconds now.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn key() -> Vec<u8> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            cluster: "c1".into(),
            sub: "alice".into(),
            kind: "user".into(),
            roles: vec!["user".into()],
            iat: 0,
            exp,
        }
    }

    #[test]
    fn sign_verify_and_every_refusal() {
        let k = key();
        let pk = public_key(&k).unwrap();
        let t = sign(&k, &claims(1000)).unwrap();
        assert_eq!(verify(&pk, &t, "c1", 999).unwrap().sub, "alice");
        assert_eq!(
            verify(&pk, &t, "c1", 1000),
            Err(TokenError::Expired { exp: 1000 })
        );
        assert_eq!(
            verify(&pk, &t, "c2", 1),
            Err(TokenError::WrongCluster("c1".into()))
        );
        // A token signed by another key, and one whose claims were edited.
        let forged = sign(&key(), &claims(1000)).unwrap();
        assert_eq!(verify(&pk, &forged, "c1", 1), Err(TokenError::BadSignature));
        let (_, sig) = t.split_once('.').unwrap();
        let mut edited = claims(1000);
        edited.roles = vec!["admin".into()];
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&edited).unwrap());
        assert_eq!(
            verify(&pk, &format!("{body}.{sig}"), "c1", 1),
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(&pk, "junk", "c1", 1), Err(TokenError::Malformed));
        assert_eq!(verify(&pk, "a.b!", "c1", 1), Err(TokenError::Malformed));
    }
}
