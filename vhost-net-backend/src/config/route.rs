//! The routing part of the switch configuration: `[[segment]]` (a VLAN segment as IP
//! subnets with a gateway the switch owns) and `[[route]]` (static routes), as written and
//! checked; `route` builds the router from them.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::{ConfigError, SwitchConfig};
use crate::packet::l3::{Ip, Prefix};
use crate::types::MacAddr;

/// The gateway MAC when `router_mac` is not set: locally administered, and the same on
/// every start, so that guests' ARP caches stay right across a restart.
pub const DEFAULT_ROUTER_MAC: MacAddr = MacAddr([0x02, 0x76, 0x6e, 0x00, 0x00, 0x01]);

/// `[[segment]]`: a VLAN segment the switch routes to and from.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Its VLAN; absent: the untagged segment.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// A name for `ctl` and logs.
    #[serde(default)]
    pub name: Option<String>,
    /// The gateway's addresses with their subnets, at most one IPv4 and one IPv6:
    /// `["10.0.1.1/24", "fd00:1::1/64"]`.
    pub gateway: Vec<String>,
    /// The switch's DHCPv4 server for the segment: absent, DHCP requests are switched like
    /// any broadcast (to a server in the segment, if there is one).
    #[serde(default)]
    pub dhcp: Option<DhcpConfig>,
    /// With an IPv6 gateway, the switch advertises itself as the segment's router (the
    /// prefix, SLAAC for a /64, `dhcp.mtu`): every `ra_interval_secs` (RFC 4861's
    /// MaxRtrAdvInterval, 4 to 1800) to every VM of the segment, and at once to a router
    /// solicitation. Not in the uplink's segment: the host routes for itself.
    #[serde(default = "default_ra_interval")]
    pub ra_interval_secs: u32,
}

fn default_ra_interval() -> u32 {
    SegmentConfig::default_ra_interval()
}

/// `dhcp = { ... }` of a segment. Every port of the segment with an IPv4 address gets
/// that address (a static binding); other ports get one from `pool`, if given.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    /// Leases for ports without an address: `"10.0.1.100-10.0.1.199"`.
    #[serde(default)]
    pub pool: Option<String>,
    /// DNS servers offered (option 6).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Lease time offered (option 51).
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
    /// The interface MTU offered (option 26), so a jumbo segment configures its guests.
    #[serde(default)]
    pub mtu: Option<u16>,
}

fn default_lease_secs() -> u32 {
    3600
}

impl DhcpConfig {
    /// The pool's first and last address.
    pub fn pool_range(&self) -> Result<Option<(Ipv4Addr, Ipv4Addr)>, String> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let bad = || format!("pool '{pool}' is not FIRST-LAST, as in 10.0.1.100-10.0.1.199");
        let (a, b) = pool.split_once('-').ok_or_else(bad)?;
        let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if a > b {
            return Err(format!(
                "pool '{pool}': the first address is after the last"
            ));
        }
        Ok(Some((a, b)))
    }
}

impl SegmentConfig {
    /// Seconds between router advertisements unless the file says (radvd's 200 is
    /// within RFC 4861's default of 600 and its 4 s minimum).
    pub const fn default_ra_interval() -> u32 {
        200
    }

    pub fn segment(&self) -> u16 {
        self.vlan.unwrap_or(0)
    }

    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("segment '{n}'"),
            None => format!("segment vlan {}", self.segment()),
        }
    }

    /// The gateway prefixes (address of the gateway, length of the subnet).
    pub fn gateways(&self) -> Result<Vec<Prefix>, String> {
        self.gateway.iter().map(|g| g.parse()).collect()
    }

    /// The IPv4 gateway with its subnet, if the segment has one (and it parses: `check`
    /// names the error).
    pub fn gateway_v4(&self) -> Option<Prefix> {
        self.gateways().ok()?.into_iter().find(|g| g.addr.is_v4())
    }
}

/// `[[route]]`: traffic to `to` goes to the router at `via`, in a segment's subnet.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A prefix: `"0.0.0.0/0"`, `"192.168.50.0/24"`, `"::/0"`.
    pub to: String,
    pub via: IpAddr,
}

/// Checks the segments and routes of `c` against each other and against the ports.
pub fn check(c: &SwitchConfig) -> Result<(), ConfigError> {
    let err = |m: String| ConfigError::Routing(m);
    let mut vlans = HashSet::new();
    let mut subnets: Vec<(Prefix, String)> = Vec::new();
    for s in &c.segments {
        let label = s.label();
        if s.vlan.is_some_and(|v| !(1..=4094).contains(&v)) {
            return Err(err(format!("{label}: vlan is out of range: use 1..=4094")));
        }
        if !vlans.insert(s.segment()) {
            return Err(err(format!(
                "{label}: a second [[segment]] for the same vlan; give each vlan one, with \
                 all its gateway addresses"
            )));
        }
        if !(4..=1800).contains(&s.ra_interval_secs) {
            return Err(err(format!(
                "{label}: ra_interval_secs = {} is outside 4..=1800 (RFC 4861)",
                s.ra_interval_secs
            )));
        }
        let gws = s
            .gateways()
            .map_err(|m| err(format!("{label}: gateway {m}")))?;
        if gws.is_empty() {
            return Err(err(format!(
                "{label}: no gateway; give gateway = [\"10.0.1.1/24\"] (an address of the \
                 switch, with its subnet)"
            )));
        }
        for family in [true, false] {
            if gws.iter().filter(|g| g.addr.is_v4() == family).count() > 1 {
                return Err(err(format!(
                    "{label}: more than one IPv{} gateway; give one per family",
                    if family { 4 } else { 6 }
                )));
            }
        }
        for g in gws {
            let host_bits = if g.addr.is_v4() { 128 - 2 } else { 128 - 1 };
            if g.len > host_bits {
                return Err(err(format!(
                    "{label}: gateway {g}: the subnet has room for no other host; give its \
                     real length, as in 10.0.1.1/24"
                )));
            }
            if let Some((other, who)) = subnets.iter().find(|(o, _)| o.overlaps(&g)) {
                return Err(err(format!(
                    "{label}: subnet {g} overlaps {other} of {who}; routed segments need \
                     subnets of their own"
                )));
            }
            subnets.push((g, label.clone()));
        }
    }
    // A port in a routed segment must have its addresses in that segment's subnets.
    for p in &c.ports {
        let Some(seg) = c.segments.iter().find(|s| s.segment() == p.segment()) else {
            continue;
        };
        let gws = seg.gateways().unwrap_or_default();
        for a in &p.addresses {
            let ip = Ip::from(*a);
            if ip.is_link_local() {
                continue;
            }
            let fam: Vec<&Prefix> = gws
                .iter()
                .filter(|g| g.addr.is_v4() == ip.is_v4())
                .collect();
            if !fam.is_empty() && !fam.iter().any(|g| g.contains(ip)) {
                return Err(err(format!(
                    "port '{}': address {a} is outside {} ({}); give it an address there \
                     or put the port in the segment of its subnet",
                    p.name,
                    seg.label(),
                    fam.iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if gws.iter().any(|g| g.addr == ip) {
                return Err(err(format!(
                    "port '{}': address {a} is the gateway of {}; give the port another",
                    p.name,
                    seg.label()
                )));
            }
        }
    }
    for r in &c.routes {
        let to: Prefix =
            r.to.parse()
                .map_err(|m| err(format!("route to {}: {m}", r.to)))?;
        let via = Ip::from(r.via);
        if to.addr.is_v4() != via.is_v4() {
            return Err(err(format!(
                "route to {}: via {} is of the other address family",
                r.to, r.via
            )));
        }
        if !subnets.iter().any(|(s, _)| s.contains(via)) {
            return Err(err(format!(
                "route to {}: via {} is in no segment's subnet; the next hop must be \
                 reachable directly (add a [[segment]] whose gateway covers it)",
                r.to, r.via
            )));
        }
    }
    for s in &c.segments {
        if let Some(d) = &s.dhcp {
            check_dhcp(c, s, d).map_err(|m| err(format!("{} dhcp: {m}", s.label())))?;
        }
    }
    let mut owners: Vec<(Ip, &str)> = Vec::new();
    for p in c
        .ports
        .iter()
        .filter(|p| c.segments.iter().any(|s| s.segment() == p.segment()))
    {
        for a in &p.addresses {
            let ip = Ip::from(*a);
            if let Some((_, other)) = owners.iter().find(|(o, _)| *o == ip) {
                return Err(err(format!(
                    "ports '{other}' and '{}' both claim {a}; an address belongs to one port",
                    p.name
                )));
            }
            owners.push((ip, &p.name));
        }
    }
    if !c.routes.is_empty() && c.segments.is_empty() {
        return Err(err("[[route]] needs at least one [[segment]]".into()));
    }
    Ok(())
}

/// A segment's DHCP settings against its subnet, its ports and the switch's MTU.
fn check_dhcp(c: &SwitchConfig, s: &SegmentConfig, d: &DhcpConfig) -> Result<(), String> {
    let Some(subnet) = s.gateway_v4() else {
        return Err("the segment has no IPv4 gateway; DHCPv4 needs one".into());
    };
    if d.lease_secs < 60 {
        return Err(format!(
            "lease_secs = {} is too short; give 60 or more",
            d.lease_secs
        ));
    }
    if let Some(mtu) = d.mtu {
        let max = c.forward_mtu();
        if !(68..=max).contains(&mtu) {
            return Err(format!(
                "mtu = {mtu} is out of range: use 68..={max} (the switch's --mtu)"
            ));
        }
    }
    let Some((first, last)) = d.pool_range()? else {
        return Ok(());
    };
    let (first_ip, last_ip) = (Ip::v4(first.octets()), Ip::v4(last.octets()));
    if !subnet.contains(first_ip) || !subnet.contains(last_ip) {
        return Err(format!(
            "pool {first}-{last} is not inside the subnet {subnet}; give addresses of it"
        ));
    }
    let within = |ip: Ip| (first_ip..=last_ip).contains(&ip);
    if within(subnet.addr) {
        return Err(format!(
            "pool {first}-{last} holds the gateway {}; leave it out",
            subnet.addr
        ));
    }
    for p in c.ports.iter().filter(|p| p.segment() == s.segment()) {
        if let Some(a) = p.addresses.iter().find(|a| within(Ip::from(**a))) {
            return Err(format!(
                "pool {first}-{last} holds {a}, the static address of port '{}'; \
                 shrink the pool or move the port's address out of it",
                p.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::SwitchConfig;

    fn check(text: &str) -> Result<(), String> {
        let c = SwitchConfig::from_toml(text)?;
        c.validate().map_err(|e| e.to_string())
    }

    const PORTS: &str = r#"
[[port]]
name = "web1"
socket = "/w"
vlan = 10
addresses = ["10.0.1.5"]
[[port]]
name = "app1"
socket = "/a"
vlan = 20
"#;

    #[test]
    fn segments_and_routes_are_checked_with_the_fix_named() {
        let good = format!(
            "{PORTS}[[segment]]\nvlan = 10\ngateway = [\"10.0.1.1/24\", \"fd00:1::1/64\"]\n\
             [[segment]]\nvlan = 20\ngateway = [\"10.0.2.1/24\"]\n\
             [[route]]\nto = \"0.0.0.0/0\"\nvia = \"10.0.2.254\"\n"
        );
        check(&good).unwrap();
        let dhcp = good.replace(
            "gateway = [\"10.0.2.1/24\"]\n",
            "gateway = [\"10.0.2.1/24\"]\ndhcp = { pool = \"10.0.2.100-10.0.2.199\", mtu = 1500 }\n",
        );
        check(&dhcp).unwrap();
        for (bad, needle) in [
            (
                dhcp.replace("10.0.2.100-10.0.2.199", "10.0.2.100-10.0.3.199"),
                "not inside the subnet",
            ),
            (
                dhcp.replace("10.0.2.100-", "10.0.2.1-"),
                "holds the gateway",
            ),
            (
                dhcp.replace(
                    "\"/a\"\nvlan = 20\n",
                    "\"/a\"\nvlan = 20\naddresses = [\"10.0.2.150\"]\n",
                ),
                "static address of port 'app1'",
            ),
            (dhcp.replace("mtu = 1500", "mtu = 9500"), "use 68..=9000"),
            (
                dhcp.replace("10.0.2.100-", "10.0.2.200-"),
                "first address is after",
            ),
            (
                dhcp.replace("10.0.2.1/24\"]\ndhcp", "fd00:2::1/64\"]\ndhcp")
                    .replace("10.0.2.254", "10.0.1.254"),
                "no IPv4 gateway",
            ),
            (
                good.replace(
                    "\"/a\"\nvlan = 20\n",
                    "\"/a\"\nvlan = 10\naddresses = [\"10.0.1.5\"]\n",
                ),
                "both claim 10.0.1.5",
            ),
            (
                good.replace("10.0.2.1/24", "10.0.1.129/25"),
                "overlaps 10.0.1.1/24",
            ),
            (
                good.replace("10.0.2.254", "10.9.9.9"),
                "in no segment's subnet",
            ),
            (
                good.replace("\"10.0.1.5\"", "\"10.0.2.5\""),
                "outside segment vlan 10",
            ),
            (
                good.replace("\"10.0.1.5\"", "\"10.0.1.1\""),
                "is the gateway",
            ),
            (
                good.replace("10.0.2.1/24", "10.0.2.1/32"),
                "room for no other host",
            ),
            (
                good.replace("10.0.2.1/24", "10.0.2.1/33"),
                "prefix length must be 0..=32",
            ),
            (
                good.replace("vlan = 20\ngateway", "vlan = 10\ngateway"),
                "same vlan",
            ),
            (
                good.replace(
                    "gateway = [\"10.0.2.1/24\"]\n",
                    "gateway = [\"10.0.2.1/24\"]\nra_interval_secs = 3\n",
                ),
                "ra_interval_secs = 3 is outside 4..=1800",
            ),
            (
                good.replace("\"fd00:1::1/64\"", "\"10.0.7.1/24\""),
                "more than one IPv4 gateway",
            ),
            (
                good.replace("via = \"10.0.2.254\"", "via = \"fd00:1::9\""),
                "other address family",
            ),
        ] {
            let e = check(&bad).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
