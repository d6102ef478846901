//! Multi-host tests on one machine: network namespaces joined by veth pairs
//! on a bridge (`ip netns`, iproute2; needs root, as CI has).
//!
//! The bridge lives in the test's own namespace with address `.254`, so the
//! test process reaches every host directly; each host is a namespace with
//! `eth0` at `10.231.<subnet>.<n>/24`, loopback up and a default route through
//! the bridge (which mDNS multicast needs). [`Net::cut`] takes the host's
//! bridge-side veth down — the host keeps its address but reaches nobody —
//! and [`Net::heal`] brings it back. Everything is removed on drop, also when
//! the test fails. This harness never skips: without root or iproute2 it fails
//! with a message saying so.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (these tests need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name (for `ip netns exec`).
    pub ns: String,
    /// Its address on the segment.
    pub ip: IpAddr,
    veth: String,
}

/// A LAN segment: a bridge and the hosts attached to it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    subnet: u8,
    bridge: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
}

impl Net {
    /// A new segment `10.231.<subnet>.0/24`. Names carry the process id so
    /// leftovers of a crashed run never collide with a new one.
    pub fn new(subnet: u8) -> Self {
        let tag = format!("lm{:x}{subnet:x}", std::process::id() % 0xffff);
        let bridge = format!("{tag}br");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let net = Net {
            tag,
            subnet,
            bridge,
            hosts: Vec::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("10.231.{subnet}.254/24"),
            "dev",
            &net.bridge,
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        net
    }

    /// Adds a host and returns it.
    pub fn add_host(&mut self) -> Host {
        let n = self.hosts.len() as u8 + 1;
        let ns = format!("{}-h{n}", self.tag);
        let veth = format!("{}v{n}", self.tag);
        let addr = Ipv4Addr::new(10, 231, self.subnet, n);
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.231.{}.254", self.subnet),
        ]);
        let host = Host {
            ns,
            ip: IpAddr::V4(addr),
            veth,
        };
        self.hosts.push(host.clone());
        host
    }

    /// Cuts `host` off the segment (as if its cable were pulled).
    pub fn cut(&self, host: &Host) {
        ip(&["link", "set", &host.veth, "down"]);
    }

    /// Plugs `host` back in.
    pub fn heal(&self, host: &Host) {
        ip(&["link", "set", &host.veth, "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it
        // the bridge-side end.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
