//! LAN discovery over mDNS (`mdns-sd`): announce this node, browse for the
//! others, keep a live peer table.
//!
//! Every node announces `_lanmesh._udp.local.` with TXT records carrying the
//! cluster id, node id, role, its Raft/API/client addresses, a priority and the
//! protocol version. Addresses travel in TXT records rather than being taken
//! from resolved A records, because mDNS advertises every interface address
//! (loopback and link-local included) while a peer needs the one the node
//! actually listens on. Browsing ignores other cluster ids, other protocol
//! versions and ourselves, and keeps a table of the rest, updated on appear,
//! change of address and disappear, readable through a `watch` channel.
//!
//! Discovery only finds peers; whether to trust one is the TLS layer's
//! business (a certificate of the right cluster and role).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::watch;

use crate::identity::{Role, validate_name};

/// The mDNS service type lanmesh nodes announce.
pub const SERVICE_TYPE: &str = "_lanmesh._udp.local.";
/// Discovery protocol version carried in TXT; other versions are ignored.
pub const PROTOCOL_VERSION: &str = "1";

/// Why discovery could not start or an announcement could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon failed (no usable interface, socket error).
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// A TXT record is missing or malformed.
    #[error("announcement without a valid {0}")]
    BadRecord(&'static str),
}

/// What a node announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Cluster id.
    pub cluster_id: String,
    /// Node id.
    pub node_id: String,
    /// `core` or `edge`.
    pub role: Role,
    /// Raft address (cores).
    pub raft_addr: Option<SocketAddr>,
    /// Admin API address (cores) or status address (edges).
    pub api_addr: Option<SocketAddr>,
    /// Client protocol address.
    pub client_addr: Option<SocketAddr>,
    /// Lower is preferred when choosing among peers (e.g. which core an edge dials).
    pub priority: u32,
}

impl Announcement {
    fn txt(&self) -> Vec<(String, String)> {
        let mut txt = vec![
            ("cluster".to_owned(), self.cluster_id.clone()),
            ("node".to_owned(), self.node_id.clone()),
            ("role".to_owned(), self.role.to_string()),
            ("prio".to_owned(), self.priority.to_string()),
            ("ver".to_owned(), PROTOCOL_VERSION.to_owned()),
        ];
        for (k, v) in [
            ("raft", self.raft_addr),
            ("api", self.api_addr),
            ("client", self.client_addr),
        ] {
            if let Some(a) = v {
                txt.push((k.to_owned(), a.to_string()));
            }
        }
        txt
    }

    /// Reads an announcement back from TXT properties (`None` if it is not a
    /// lanmesh announcement of our protocol version).
    fn from_txt(get: impl Fn(&str) -> Option<String>) -> Result<Self, DiscoveryError> {
        if get("ver").as_deref() != Some(PROTOCOL_VERSION) {
            return Err(DiscoveryError::BadRecord("protocol version"));
        }
        let cluster_id = get("cluster").ok_or(DiscoveryError::BadRecord("cluster id"))?;
        let node_id = get("node").ok_or(DiscoveryError::BadRecord("node id"))?;
        validate_name("cluster id", &cluster_id)
            .map_err(|_| DiscoveryError::BadRecord("cluster id"))?;
        validate_name("name", &node_id).map_err(|_| DiscoveryError::BadRecord("node id"))?;
        let role = get("role")
            .and_then(|r| r.parse().ok())
            .ok_or(DiscoveryError::BadRecord("role"))?;
        let addr = |k: &str| get(k).and_then(|v| v.parse().ok());
        Ok(Announcement {
            cluster_id,
            node_id,
            role,
            raft_addr: addr("raft"),
            api_addr: addr("api"),
            client_addr: addr("client"),
            priority: get("prio").and_then(|p| p.parse().ok()).unwrap_or(100),
        })
    }
}

/// A peer seen on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// What it announced.
    pub announcement: Announcement,
    /// When it was last (re)announced.
    pub seen: Instant,
}

/// The peer table: node id → peer.
pub type Peers = BTreeMap<String, Peer>;

/// A running announcer and browser. Stops (and withdraws the announcement)
/// when dropped or shut down.
pub struct Discovery {
    daemon: ServiceDaemon,
    fullname: String,
    peers: watch::Receiver<Peers>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Announces `me` on `ip` (the address peers should use) and starts
    /// browsing for nodes of the same cluster.
    pub fn start(me: Announcement, ip: IpAddr) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let instance = format!("{}-{}", me.cluster_id, me.node_id);
        let host = format!("{instance}.local.");
        let port = me.raft_addr.or(me.api_addr).map(|a| a.port()).unwrap_or(0);
        let txt = me.txt();
        let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, ip, port, &props[..])?;
        let fullname = info.get_fullname().to_owned();
        daemon.register(info)?;
        let events = daemon.browse(SERVICE_TYPE)?;
        let (tx, peers) = watch::channel(Peers::new());
        let task = tokio::spawn(async move {
            // fullname -> node id, to handle removals.
            let mut names: BTreeMap<String, String> = BTreeMap::new();
            while let Ok(event) = events.recv_async().await {
                match event {
                    ServiceEvent::ServiceResolved(svc) => {
                        let parsed = Announcement::from_txt(|k| {
                            svc.txt_properties
                                .get_property_val_str(k)
                                .map(str::to_owned)
                        });
                        let a = match parsed {
                            Ok(a) => a,
                            Err(e) => {
                                tracing::debug!(service = %svc.fullname, error = %e, "ignoring mDNS announcement");
                                continue;
                            }
                        };
                        if a.cluster_id != me.cluster_id || a.node_id == me.node_id {
                            continue;
                        }
                        names.insert(svc.fullname.clone(), a.node_id.clone());
                        tx.send_modify(|t| {
                            let changed = t.get(&a.node_id).is_none_or(|p| p.announcement != a);
                            if changed {
                                tracing::info!(node = %a.node_id, role = %a.role, raft = ?a.raft_addr, api = ?a.api_addr, "discovered peer");
                            }
                            t.insert(
                                a.node_id.clone(),
                                Peer {
                                    announcement: a,
                                    seen: Instant::now(),
                                },
                            );
                        });
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        if let Some(node) = names.remove(&fullname) {
                            tracing::info!(node = %node, "peer withdrew its announcement");
                            tx.send_modify(|t| {
                                t.remove(&node);
                            });
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Discovery {
            daemon,
            fullname,
            peers,
            task,
        })
    }

    /// The live peer table.
    pub fn peers(&self) -> watch::Receiver<Peers> {
        self.peers.clone()
    }

    /// Withdraws the announcement and stops browsing.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_round_trips_and_rejects_junk() {
        let a = Announcement {
            cluster_id: "c1".into(),
            node_id: "node-1".into(),
            role: Role::Core,
            raft_addr: Some("10.0.0.1:10001".parse().unwrap()),
            api_addr: Some("10.0.0.1:10000".parse().unwrap()),
            client_addr: None,
            priority: 5,
        };
        let txt: BTreeMap<String, String> = a.txt().into_iter().collect();
        let back = Announcement::from_txt(|k| txt.get(k).cloned()).unwrap();
        assert_eq!(back, a);
        let mut wrong_version = txt.clone();
        wrong_version.insert("ver".into(), "9".into());
        assert!(Announcement::from_txt(|k| wrong_version.get(k).cloned()).is_err());
        let mut bad_name = txt;
        bad_name.insert("node".into(), "x/y".into());
        assert!(Announcement::from_txt(|k| bad_name.get(k).cloned()).is_err());
    }
}
