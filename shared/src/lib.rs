//! The library every lanmesh program shares.
//!
//! It depends on no crate of ours; `core-node`, `edge-node` and `pki` depend on
//! it and never on each other. What lives here:
//!
//! * [`identity`]: what a certificate says about its holder (cluster, role, name);
//! * [`pki`]: minting the CA, leaf certificates and the CRL (the `pki` tool and the
//!   single-node default both use it);
//! * [`tls`]: rustls/quinn configurations and the verifiers that enforce who may
//!   talk on which link;
//! * [`link`]: opening and accepting QUIC links, with refusals as typed errors;
//! * [`discovery`]: mDNS announcements and the live peer table;
//! * [`proto`]: the client protocol (framing, messages, version negotiation) and `Client`;
//! * [`token`]: login tokens signed with the cluster's Ed25519 key.
//!
//! The wire protocol, config loading, discovery and the client library join
//! this crate as the issues that need them land.

pub mod discovery;
pub mod identity;
pub mod link;
pub mod pki;
pub mod proto;
pub mod secret;
pub mod tls;
pub mod token;
