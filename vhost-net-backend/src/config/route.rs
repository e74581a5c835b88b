//! The routing part of the switch configuration: `[[segment]]` (a VLAN segment as IP
//! subnets with a gateway the switch owns) and `[[route]]` (static routes), as written and
//! checked; `route` builds the router from them.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::Deserialize;

use super::{ConfigError, SwitchConfig};
use crate::packet::l3::{Ip, Prefix};
use crate::types::MacAddr;

/// The gateway MAC when `router_mac` is not set: locally administered, and the same on
/// every start, so that guests' ARP caches stay right across a restart.
pub const DEFAULT_ROUTER_MAC: MacAddr = MacAddr([0x02, 0x76, 0x6e, 0x00, 0x00, 0x01]);

/// `[[segment]]`: a VLAN segment the switch routes to and from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
}

impl SegmentConfig {
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
}

/// `[[route]]`: traffic to `to` goes to the router at `via`, in a segment's subnet.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
    if !c.routes.is_empty() && c.segments.is_empty() {
        return Err(err("[[route]] needs at least one [[segment]]".into()));
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
        for (bad, needle) in [
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
