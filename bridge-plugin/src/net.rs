//! The network modes: a file of networks (NAT, bridged, internal, host-only) and the flows
//! allowed between them; `up` builds bridges, addresses and one nftables table (default
//! deny between segments, counters on every rule), `down` removes exactly that.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::made::Made;
use crate::netlink::{Netlink, NetlinkError};
use crate::nft::{self, iifname, oifname, NftError, TABLE};

#[derive(Debug, Error)]
pub enum NetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("network '{network}': {message}")]
    Invalid { network: String, message: String },
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Nft(#[from] NftError),
    #[error("cannot record what up made (in /run/bridge-plugin): {0}")]
    State(std::io::Error),
    #[error(
        "network '{network}': making {uplink} a port of bridge {bridge} would cut this host off \
         from {}: move them to {bridge} first (or choose a NIC that carries none)",
        what.join(", ")
    )]
    WouldCutOff {
        network: String,
        uplink: String,
        bridge: String,
        what: Vec<String>,
    },
    #[error("cannot enable IPv4 forwarding: {0}")]
    Forwarding(std::io::Error),
    #[error("table name '{0}' must have 1 to 64 letters, digits or '_'")]
    BadTable(String),
    #[error(
        "nftables table inet {table} holds the rules of networks this file does not name ({}): \
         bring those down with their own file first (or, if that file is gone, `nft delete \
         table inet {table}`), or give this file a table of its own (table = \"NAME\" at its top)",
        others.join(", ")
    )]
    TableInUse { table: String, others: Vec<String> },
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A bridge with a host address, masqueraded out of `uplink`, with optional port forwards.
    Nat,
    /// An existing host NIC (`uplink`) enslaved to the bridge: guests sit on its LAN.
    Bridged,
    /// No host address, no uplink: VM to VM only.
    Internal,
    /// A host address and no forwarding anywhere else.
    HostOnly,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// Exposes one guest port on the host's uplink address (NAT networks).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub proto: Proto,
    pub host_port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    pub mode: Mode,
    pub bridge: String,
    /// Host address on the bridge, CIDR (nat, host-only).
    pub address: Option<String>,
    /// The host NIC: masquerade out of it (nat) or enslave it (bridged).
    pub uplink: Option<String>,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub forward: Vec<PortForward>,
}

/// A flow allowed from one network to another; everything else between them is dropped.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    pub from: String,
    pub to: String,
    pub proto: Proto,
    pub port: Option<u16>,
}

/// `allow web -> app tcp/8080`: how rules, counters and reports name an allowed flow.
impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "allow {} -> {} {}",
            self.from,
            self.to,
            self.proto.name()
        )?;
        match self.port {
            Some(p) => write!(f, "/{p}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetFile {
    #[serde(rename = "network")]
    pub networks: Vec<Network>,
    #[serde(default, rename = "allow")]
    pub allows: Vec<Allow>,
    /// The inet nftables table holding these networks' rules (`bridge_plugin`; another
    /// name lets several files' networks live side by side: `up` replaces the whole table).
    #[serde(default = "default_table")]
    pub table: String,
}

fn default_table() -> String {
    TABLE.to_string()
}

/// `10.0.0.1/24` as an address and a prefix length.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let p: u8 = p.parse().ok()?;
    (p <= 32).then_some(())?;
    Some((a.parse().ok()?, p))
}

/// The network address of `addr` with a `prefix`-bit mask.
pub fn subnet(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ipv4Addr::from(u32::from(addr) & mask)
}

impl NetFile {
    /// The file at `path`, every check passed: what `up` and `show` act on.
    pub fn load(path: &Path) -> Result<NetFile, NetError> {
        let file = Self::read(path)?;
        file.validate()?;
        Ok(file)
    }

    /// The file at `path` as `down` needs it: its table's name checked, nothing else.
    /// `down` removes what `up` recorded, so a file that a later check (or an edit since
    /// `up`) refuses still takes its networks down.
    pub fn load_for_down(path: &Path) -> Result<NetFile, NetError> {
        let file = Self::read(path)?;
        file.validate_table()?;
        Ok(file)
    }

    fn read(path: &Path) -> Result<NetFile, NetError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| NetError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// The table's name goes into nftables commands and the state file's name.
    fn validate_table(&self) -> Result<(), NetError> {
        if self.table.is_empty()
            || self.table.len() > 64
            || !self
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(NetError::BadTable(self.table.clone()));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), NetError> {
        self.validate_table()?;
        let mut names = HashSet::new();
        let mut bridges = HashSet::new();
        // Each network with an address: its subnet, for the overlap check.
        let mut subnets: Vec<(Ipv4Addr, u8, &str)> = Vec::new();
        for n in &self.networks {
            let bad = |message: String| NetError::Invalid {
                network: n.name.clone(),
                message,
            };
            if !names.insert(&n.name) {
                return Err(bad("two networks have this name".into()));
            }
            // Names end up in QEMU's helper command line and in nftables rules: plain ones.
            if n.bridge.is_empty()
                || n.bridge.len() > 15
                || !n
                    .bridge
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(format!(
                    "bridge name '{}' must have 1 to 15 letters, digits, '-', '_' or '.'",
                    n.bridge
                )));
            }
            if !bridges.insert(&n.bridge) {
                return Err(bad(format!("bridge {} is used by two networks", n.bridge)));
            }
            let cidr = n
                .address
                .as_deref()
                .map(|a| {
                    parse_cidr(a).ok_or_else(|| {
                        bad(format!(
                            "address '{a}' is not an IPv4 CIDR like 10.0.0.1/24"
                        ))
                    })
                })
                .transpose()?;
            if let Some((a, len)) = cidr {
                // Two networks on one subnet: the host routes it to one bridge only, and
                // the other's VMs are silently unreachable.
                if let Some((_, _, other)) = subnets
                    .iter()
                    .find(|(b, l, _)| subnet(a, (*l).min(len)) == subnet(*b, (*l).min(len)))
                {
                    return Err(bad(format!(
                        "subnet {} overlaps network '{other}'; give each network its own",
                        n.address.as_deref().unwrap_or_default()
                    )));
                }
                subnets.push((a, len, &n.name));
                for f in &n.forward {
                    if subnet(f.guest, len) != subnet(a, len) {
                        return Err(bad(format!(
                            "forward of host port {} goes to {}, outside the network's \
                             subnet {}/{len}",
                            f.host_port,
                            f.guest,
                            subnet(a, len)
                        )));
                    }
                }
            }
            let needs = |what: &str, present: bool| {
                if present {
                    Ok(())
                } else {
                    Err(bad(format!("mode {:?} needs {what}", n.mode)))
                }
            };
            let forbids = |what: &str, present: bool| {
                if present {
                    Err(bad(format!("mode {:?} takes no {what}", n.mode)))
                } else {
                    Ok(())
                }
            };
            match n.mode {
                Mode::Nat => {
                    needs("address = \"CIDR\"", n.address.is_some())?;
                    needs("uplink = \"NIC\"", n.uplink.is_some())?;
                }
                Mode::Bridged => {
                    needs("uplink = \"NIC\"", n.uplink.is_some())?;
                    forbids("address (the uplink keeps its LAN)", n.address.is_some())?;
                }
                Mode::Internal => {
                    forbids("address", n.address.is_some())?;
                    forbids("uplink", n.uplink.is_some())?;
                }
                Mode::HostOnly => {
                    needs("address = \"CIDR\"", n.address.is_some())?;
                    forbids("uplink", n.uplink.is_some())?;
                }
            }
            if n.mode != Mode::Nat && !n.forward.is_empty() {
                return Err(bad("port forwards need mode = \"nat\"".into()));
            }
        }
        for a in &self.allows {
            for end in [&a.from, &a.to] {
                if !names.contains(end) {
                    return Err(NetError::Invalid {
                        network: end.clone(),
                        message: format!(
                            "allow {} -> {} names a network that is not defined",
                            a.from, a.to
                        ),
                    });
                }
            }
            if a.port.is_some() && a.proto == Proto::Icmp {
                return Err(NetError::Invalid {
                    network: a.from.clone(),
                    message: "icmp has no port".into(),
                });
            }
        }
        Ok(())
    }

    fn network(&self, name: &str) -> &Network {
        self.networks
            .iter()
            .find(|n| n.name == name)
            .expect("validated")
    }

    /// The nftables batch that `up` applies: our table, rebuilt from scratch.
    pub fn ruleset(&self) -> Vec<Value> {
        let table = self.table.as_str();
        let t = |o: Value| o;
        let rule = |chain: &str, comment: String, expr: Vec<Value>| {
            json!({"add": {"rule": {"family": "inet", "table": table, "chain": chain,
                "comment": comment, "expr": expr}}})
        };
        let mut cmds = vec![
            // add + delete + add: the table is recreated whether or not it existed.
            t(json!({"add": {"table": {"family": "inet", "name": table}}})),
            t(json!({"delete": {"table": {"family": "inet", "name": table}}})),
            t(json!({"add": {"table": {"family": "inet", "name": table}}})),
            json!({"add": {"chain": {"family": "inet", "table": table, "name": "forward",
                "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": "inet", "table": table, "name": "prerouting",
                "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}}),
            json!({"add": {"chain": {"family": "inet", "table": table, "name": "postrouting",
                "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
        ];
        cmds.push(rule(
            "forward",
            "replies to allowed flows".into(),
            vec![
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}),
                json!({"accept": null}),
            ],
        ));
        // Within a segment everything passes. (With br_netfilter loaded, frames bridged
        // between two ports of one bridge show up here with the bridge as in and out.)
        for n in &self.networks {
            cmds.push(rule(
                "forward",
                format!("within {}", n.name),
                vec![
                    iifname(&n.bridge),
                    oifname(&n.bridge),
                    json!({"counter": null}),
                    json!({"accept": null}),
                ],
            ));
        }
        for n in self.networks.iter().filter(|n| n.mode == Mode::Nat) {
            let uplink = n.uplink.as_deref().expect("validated");
            let (addr, prefix) =
                parse_cidr(n.address.as_deref().expect("validated")).expect("validated");
            cmds.push(rule(
                "forward",
                format!("{} out through {uplink}", n.name),
                vec![
                    iifname(&n.bridge),
                    oifname(uplink),
                    json!({"counter": null}),
                    json!({"accept": null}),
                ],
            ));
            cmds.push(rule(
                "postrouting",
                format!("{} masquerade", n.name),
                vec![
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": subnet(addr, prefix).to_string(), "len": prefix}}}}),
                    oifname(uplink),
                    json!({"counter": null}),
                    json!({"masquerade": null}),
                ],
            ));
            for f in &n.forward {
                let p = f.proto.name();
                cmds.push(rule(
                    "prerouting",
                    format!("{} forward {p}/{} to {}:{}", n.name, f.host_port, f.guest, f.guest_port),
                    vec![
                        iifname(uplink),
                        // Only what is addressed to the host itself: traffic the host routes
                        // elsewhere on the same port is not taken over.
                        json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}),
                        json!({"match": {"op": "==", "left": {"payload": {"protocol": p, "field": "dport"}}, "right": f.host_port}}),
                        json!({"counter": null}),
                        json!({"dnat": {"family": "ip", "addr": f.guest.to_string(), "port": f.guest_port}}),
                    ],
                ));
                cmds.push(rule(
                    "forward",
                    format!("{} forwarded {p}/{}", n.name, f.guest_port),
                    vec![
                        oifname(&n.bridge),
                        json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": f.guest.to_string()}}),
                        json!({"match": {"op": "==", "left": {"payload": {"protocol": p, "field": "dport"}}, "right": f.guest_port}}),
                        json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
                        json!({"counter": null}),
                        json!({"accept": null}),
                    ],
                ));
            }
        }
        for a in &self.allows {
            let (from, to) = (self.network(&a.from), self.network(&a.to));
            let mut expr = vec![iifname(&from.bridge), oifname(&to.bridge)];
            let p = a.proto.name();
            match a.port {
                Some(port) => expr.push(json!({"match": {"op": "==",
                    "left": {"payload": {"protocol": p, "field": "dport"}}, "right": port}})),
                None => expr.push(json!({"match": {"op": "==",
                    "left": {"meta": {"key": "l4proto"}}, "right": p}})),
            }
            expr.push(json!({"counter": null}));
            expr.push(json!({"accept": null}));
            cmds.push(rule("forward", a.to_string(), expr));
        }
        let ours: Vec<&str> = self.networks.iter().map(|n| n.bridge.as_str()).collect();
        for (dir, key) in [("from", "iifname"), ("to", "oifname")] {
            cmds.push(rule(
                "forward",
                format!("deny {dir} segments"),
                vec![
                    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": {"set": ours}}}),
                    json!({"counter": null}),
                    json!({"drop": null}),
                ],
            ));
        }
        cmds
    }

    /// Networks whose rules are in this file's table but which this file does not name:
    /// another file's, which `up` (it rebuilds the whole table) or `down` would remove.
    pub fn others_in_table(&self) -> Result<Vec<String>, NetError> {
        if !nft::table_exists("inet", &self.table) {
            return Ok(Vec::new());
        }
        let mut others: Vec<String> = nft::list(&["table", "inet", &self.table])?
            .iter()
            .filter_map(|item| item["rule"]["comment"].as_str())
            .filter_map(|c| c.strip_prefix("within "))
            .filter(|name| !self.networks.iter().any(|n| n.name == *name))
            .map(str::to_string)
            .collect();
        others.sort();
        others.dedup();
        Ok(others)
    }

    fn check_table_is_ours(&self) -> Result<(), NetError> {
        let others = self.others_in_table()?;
        if others.is_empty() {
            Ok(())
        } else {
            Err(NetError::TableInUse {
                table: self.table.clone(),
                others,
            })
        }
    }

    /// Builds everything; running it again changes nothing. What it made is recorded
    /// (`Made`), even when it fails half way, so that `down` removes exactly that.
    pub fn up(&self) -> Result<(), NetError> {
        self.check_table_is_ours()?;
        let mut made = Made::load(&self.table).map_err(NetError::State)?;
        let built = self.build(&mut made);
        let saved = made.save(&self.table).map_err(NetError::State);
        built.and(saved)
    }

    fn build(&self, made: &mut Made) -> Result<(), NetError> {
        let mut nl = Netlink::open()?;
        // Before anything is made. A NAT uplink that does not exist would come up and
        // never match a packet.
        for n in &self.networks {
            if let Some(uplink) = n.uplink.as_deref() {
                if nl.link(uplink).is_err() {
                    let names: Vec<String> = nl.links()?.into_iter().map(|l| l.name).collect();
                    return Err(NetError::Invalid {
                        network: n.name.clone(),
                        message: format!(
                            "uplink {uplink} does not exist (interfaces here: {})",
                            names.join(", ")
                        ),
                    });
                }
            }
            if n.mode == Mode::Bridged {
                // A host NIC that becomes a bridge port stops using its own addresses and
                // routes: refuse rather than cut the host off.
                let uplink = n.uplink.as_deref().expect("validated");
                let already = match nl.link(&n.bridge) {
                    Ok(br) => nl.link(uplink)?.controller == Some(br.index),
                    Err(_) => false,
                };
                if !already {
                    let mut what: Vec<String> = nl
                        .addresses(uplink)?
                        .iter()
                        .map(|(a, p)| format!("address {a}/{p}"))
                        .collect();
                    what.extend(
                        nl.routes_via(uplink)?
                            .into_iter()
                            .map(|r| format!("route {r}")),
                    );
                    if !what.is_empty() {
                        return Err(NetError::WouldCutOff {
                            network: n.name.clone(),
                            uplink: uplink.to_string(),
                            bridge: n.bridge.clone(),
                            what,
                        });
                    }
                }
            }
        }
        for n in &self.networks {
            match nl.link(&n.bridge) {
                Ok(l) if l.kind.as_deref() == Some("bridge") => {}
                Ok(_) => {
                    return Err(NetError::Invalid {
                        network: n.name.clone(),
                        message: format!(
                            "{} exists and is not a bridge: choose another bridge name",
                            n.bridge
                        ),
                    })
                }
                Err(NetlinkError::NoSuchLink(_)) => {
                    nl.add_bridge(&n.bridge, false)?;
                    made.bridges.push(n.bridge.clone());
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(mtu) = n.mtu {
                nl.set_mtu(&n.bridge, mtu)?;
            }
            if let Some(a) = &n.address {
                let (addr, prefix) = parse_cidr(a).expect("validated");
                if nl.add_address(&n.bridge, IpAddr::V4(addr), prefix)? {
                    made.addresses
                        .push((n.bridge.clone(), IpAddr::V4(addr), prefix));
                }
            }
            if n.mode == Mode::Bridged {
                let uplink = n.uplink.as_deref().expect("validated");
                let bridge = nl.index(&n.bridge)?;
                if nl.link(uplink)?.controller != Some(bridge) {
                    nl.set_controller(uplink, &n.bridge)?;
                    made.ports.push((uplink.to_string(), n.bridge.clone()));
                }
                nl.set_up(uplink)?;
            }
            nl.set_up(&n.bridge)?;
        }
        if self.networks.iter().any(|n| n.mode == Mode::Nat) || !self.allows.is_empty() {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        }
        nft::apply(self.ruleset())?;
        Ok(())
    }

    /// What `up` would take over rather than create: bridges of this file that exist already,
    /// and our nftables table if another file's rules are in it. `up` itself reuses them
    /// (it is idempotent); a caller that will later `down` everything asks first.
    pub fn existing(&self) -> Result<Vec<String>, NetError> {
        let mut nl = Netlink::open()?;
        let mut found: Vec<String> = self
            .networks
            .iter()
            .filter(|n| nl.link(&n.bridge).is_ok())
            .map(|n| format!("bridge {}", n.bridge))
            .collect();
        if nft::table_exists("inet", &self.table) {
            found.push(format!("nftables table inet {}", self.table));
        }
        Ok(found)
    }

    /// Removes our table and what `up` made: the bridges it created, the addresses it
    /// added, the NICs it made bridge ports. A bridge that was there before `up` stays.
    pub fn down(&self) -> Result<(), NetError> {
        self.check_table_is_ours()?;
        if nft::table_exists("inet", &self.table) {
            nft::apply(vec![
                json!({"delete": {"table": {"family": "inet", "name": self.table}}}),
            ])?;
        }
        let made = Made::load(&self.table).map_err(NetError::State)?;
        let mut nl = Netlink::open()?;
        for (port, bridge) in &made.ports {
            let (Ok(p), Ok(b)) = (nl.link(port), nl.link(bridge)) else {
                continue;
            };
            if p.controller == Some(b.index) {
                nl.release(port)?;
            }
        }
        for (link, addr, prefix) in &made.addresses {
            if made.bridges.contains(link) || nl.link(link).is_err() {
                continue;
            }
            match nl.delete_address(link, *addr, *prefix) {
                Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
                r => r?,
            }
        }
        for bridge in &made.bridges {
            if let Ok(l) = nl.link(bridge) {
                if l.kind.as_deref() == Some("bridge") {
                    nl.delete_link(bridge)?;
                }
            }
        }
        for n in &self.networks {
            if !made.bridges.contains(&n.bridge) && nl.link(&n.bridge).is_ok() {
                log::info!(
                    "bridge {} stays: it was there before `up` (delete it yourself if it should go)",
                    n.bridge
                );
            }
        }
        Made::default().save(&self.table).map_err(NetError::State)
    }
}

/// One rule's counters, for `show`.
#[derive(Debug, Serialize)]
pub struct RuleCounter {
    pub chain: String,
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of the rules in `table` (empty when the networks are down).
pub fn counters(table: &str) -> Result<Vec<RuleCounter>, NetError> {
    if !nft::table_exists("inet", table) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in nft::list(&["table", "inet", table])? {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(counter) = rule["expr"]
            .as_array()
            .and_then(|e| e.iter().find_map(|x| x.get("counter")))
        else {
            continue;
        };
        out.push(RuleCounter {
            chain: rule["chain"].as_str().unwrap_or("").to_string(),
            rule: rule["comment"].as_str().unwrap_or("").to_string(),
            packets: counter["packets"].as_u64().unwrap_or(0),
            bytes: counter["bytes"].as_u64().unwrap_or(0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[network]]
name = "web"
mode = "nat"
bridge = "br-web"
address = "10.1.0.1/24"
uplink = "eth0"
[[network.forward]]
proto = "tcp"
host_port = 8080
guest = "10.1.0.10"
guest_port = 80

[[network]]
name = "app"
mode = "host-only"
bridge = "br-app"
address = "10.2.0.1/24"

[[allow]]
from = "web"
to = "app"
proto = "tcp"
port = 8080
"#;

    #[test]
    fn parses_validates_and_renders_rules() {
        let f: NetFile = toml::from_str(FILE).unwrap();
        f.validate().unwrap();
        let rules = serde_json::to_string(&f.ruleset()).unwrap();
        for needle in [
            "\"masquerade\":null",
            "\"addr\":\"10.1.0.0\",\"len\":24",
            "\"dnat\":{\"addr\":\"10.1.0.10\",\"family\":\"ip\",\"port\":80}",
            "allow web -> app tcp/8080",
            "deny from segments",
            "\"set\":[\"br-web\",\"br-app\"]",
        ] {
            assert!(rules.contains(needle), "{needle} missing in {rules}");
        }
    }

    #[test]
    fn refuses_bad_files_with_the_fix() {
        let cases = [
            (FILE.replace("uplink = \"eth0\"", ""), "needs uplink"),
            (
                FILE.replace("mode = \"host-only\"", "mode = \"internal\""),
                "takes no address",
            ),
            (FILE.replace("to = \"app\"", "to = \"db\""), "not defined"),
            (FILE.replace("br-app", "br-web"), "used by two networks"),
            (FILE.replace("10.2.0.1/24", "10.2.0.1"), "not an IPv4 CIDR"),
            (
                FILE.replace("10.2.0.1/24", "10.1.0.200/24"),
                "subnet 10.1.0.200/24 overlaps network 'web'",
            ),
            (
                FILE.replace("10.2.0.1/24", "10.0.0.1/8"),
                "overlaps network 'web'",
            ),
            (
                FILE.replace("guest = \"10.1.0.10\"", "guest = \"10.2.0.10\""),
                "goes to 10.2.0.10, outside the network's subnet 10.1.0.0/24",
            ),
        ];
        for (text, needle) in cases {
            let f: NetFile = toml::from_str(&text).unwrap();
            let e = f.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("net.toml");
        std::fs::write(
            &p,
            "[[network]]\nname = \"x\"\nmode = \"fancy\"\nbridge = \"b\"\n",
        )
        .unwrap();
        let e = NetFile::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("net.toml") && e.contains("fancy") && e.contains("line 3"),
            "{e}"
        );
    }
}
