//! The host's side of the uplink, when `[uplink] host` is set: the host's address on the
//! tap, a route to every routed subnet through the uplink segment's gateway, and one
//! nftables table of the host kernel: source NAT for the guests (masquerade), the forwards
//! (destination NAT from a host port to a guest, or to a balancer's slot table), and a guard
//! that lets no new connection from outside into the guests unless a forward translated it
//! (the host's own connections included: it is outside too).
//! Everything is removed again by `down`.

use std::net::{IpAddr, Ipv4Addr};

use hostnet::netlink::{Netlink, NetlinkError};
use hostnet::nft::{self, oifname, NftError};
use log::{info, warn};
use serde_json::{json, Value};
use thiserror::Error;

use crate::config::north_south::host_prefix;
use crate::config::{BalancerConfig, OnDown, Proto, SwitchConfig};
use crate::packet::l3::Prefix;

#[derive(Debug, Error)]
pub enum HostSideError {
    #[error("uplink host side: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("uplink host side: {0}")]
    Nft(#[from] NftError),
    #[error("uplink host side: cannot enable IPv4 forwarding: {0}")]
    Forwarding(std::io::Error),
}

/// A route the host side added: destination, length, via.
type HostRoute = (Ipv4Addr, u8, Ipv4Addr);

pub struct HostSide {
    tap: String,
    table: String,
    address: (Ipv4Addr, u8),
    /// The address was added by us (and is removed by `down`).
    added_address: bool,
    routes: Vec<HostRoute>,
}

/// The network address of `p` (its address with the host bits cleared).
fn network(p: &Prefix) -> (Ipv4Addr, u8) {
    (Ipv4Addr::from(p.network().0 as u32), p.family_len())
}

fn v4(p: &Prefix) -> Ipv4Addr {
    Ipv4Addr::from(p.addr.0 as u32)
}

/// The firewall mark of the balancers' health checks ("vnhc").
pub const CHECK_MARK: u32 = 0x766e_6863;

/// The nftables table of the uplink on tap `tap`: one per switch, named after the tap.
pub fn table_name(tap: &str) -> String {
    let clean: String = tap
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("vnet_{clean}")
}

fn chain_of(balancer: &str) -> String {
    format!("lb_{balancer}")
}

fn l4(proto: Proto, field: &str) -> Value {
    json!({"payload": {"protocol": proto.name(), "field": field}})
}

fn down_set_of(balancer: &str) -> String {
    format!("down_{balancer}")
}

/// The rule of a balancer's chain: destination NAT to the backend of the connection's slot
/// (a hash of its source address and port); no rule while no backend is healthy. With
/// `on_down = "reset"`, also the set of its down backends (those holding no slot), whose
/// translated connections the guard resets.
pub fn balancer_rules(table: &str, b: &BalancerConfig, slots: &[Option<Ipv4Addr>]) -> Vec<Value> {
    let map: Vec<Value> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, a)| Some(json!([i, a.as_ref()?.to_string()])))
        .collect();
    let chain = chain_of(&b.name);
    let mut cmds =
        vec![json!({"flush": {"chain": {"family": "ip", "table": table, "name": chain}}})];
    if map.len() == slots.len() {
        let key = json!({"jhash": {"mod": slots.len(), "expr": {"concat": [
            {"payload": {"protocol": "ip", "field": "saddr"}},
            {"payload": {"protocol": "tcp", "field": "sport"}}]}}});
        cmds.push(
            json!({"add": {"rule": {"family": "ip", "table": table, "chain": chain,
            "expr": [{"counter": null},
                     {"dnat": {"family": "ip", "addr": {"map": {"key": key, "data": {"set": map}}},
                               "port": b.port}}]}}}),
        );
    }
    if b.on_down == OnDown::Reset {
        let set = json!({"family": "ip", "table": table, "name": down_set_of(&b.name)});
        cmds.push(json!({"flush": {"set": set}}));
        let down: Vec<String> = b
            .backends
            .iter()
            .filter(|a| !slots.contains(&Some(**a)))
            .map(|a| a.to_string())
            .collect();
        if !down.is_empty() {
            let mut element = set;
            element["elem"] = json!(down);
            cmds.push(json!({"add": {"element": element}}));
        }
    }
    cmds
}

/// The guard's rules that reset the host-translated connections of `b`'s down backends:
/// a packet towards one (`to_backend`, from a client outside or on the host) or from one
/// is refused with a TCP reset to its sender, so each end learns at its next packet.
fn reset_rules(b: &BalancerConfig, tap: &str, to_backend: bool) -> Vec<Value> {
    let (iface, addr, port) = if to_backend {
        ("oifname", "daddr", "dport")
    } else {
        ("iifname", "saddr", "sport")
    };
    vec![
        json!({"match": {"op": "==", "left": {"meta": {"key": iface}}, "right": tap}}),
        json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
        json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": addr}},
            "right": format!("@{}", down_set_of(&b.name))}}),
        json!({"match": {"op": "==", "left": l4(Proto::Tcp, port), "right": b.port}}),
        // Not a reset: one is a close, and the host's own reset, sent out through the
        // output hook, would meet this rule there.
        json!({"match": {"op": "==", "left": {"&": [l4(Proto::Tcp, "flags"), "rst"]}, "right": 0}}),
        json!({"counter": null}),
        json!({"reject": {"type": "tcp reset"}}),
    ]
}

/// The whole table for `config` (checked, with `host` set), balancers at `slots` (name,
/// slot addresses).
pub fn ruleset(config: &SwitchConfig, slots: &[(String, Vec<Option<Ipv4Addr>>)]) -> Vec<Value> {
    let Some(up) = &config.uplink else {
        return Vec::new();
    };
    let table = table_name(&up.tap);
    let t = table.as_str();
    let chain = |name: &str, kind: &str, hook: &str, prio: i32| {
        json!({"add": {"chain": {"family": "ip", "table": t, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}})
    };
    let rule = |chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "ip", "table": t, "chain": chain, "expr": expr}}});
    let mut cmds = vec![
        json!({"add": {"table": {"family": "ip", "name": t}}}),
        json!({"delete": {"table": {"family": "ip", "name": t}}}),
        json!({"add": {"table": {"family": "ip", "name": t}}}),
        chain("forward_in", "nat", "prerouting", -100),
        chain("forward_local", "nat", "output", -100),
        chain("masquerade", "nat", "postrouting", 100),
        chain("guard", "filter", "forward", 0),
        chain("guard_local", "filter", "output", 0),
    ];
    for b in &config.balancers {
        cmds.push(
            json!({"add": {"chain": {"family": "ip", "table": t, "name": chain_of(&b.name)}}}),
        );
        if b.on_down == OnDown::Reset {
            cmds.push(json!({"add": {"set": {"family": "ip", "table": t,
                "name": down_set_of(&b.name), "type": "ipv4_addr"}}}));
            // Before the guard's accept of translated connections.
            cmds.push(rule("guard", reset_rules(b, &up.tap, true)));
            cmds.push(rule("guard", reset_rules(b, &up.tap, false)));
            cmds.push(rule("guard_local", reset_rules(b, &up.tap, true)));
        }
    }
    // Forwards: to the host's own addresses, from anywhere but the guests' side.
    let local = json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
        "right": "local"}});
    for f in &up.forwards {
        let matches = vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": f.proto.name()}}),
            json!({"match": {"op": "==", "left": l4(f.proto, "dport"), "right": f.host_port}}),
            local.clone(),
        ];
        let action = match (f.target().ok().flatten(), &f.balancer) {
            (Some((a, p)), _) => {
                json!({"dnat": {"family": "ip", "addr": a.to_string(), "port": p}})
            }
            (None, Some(b)) => json!({"jump": {"target": chain_of(b)}}),
            (None, None) => continue,
        };
        let not_tap =
            json!({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": up.tap}});
        let mut e = vec![not_tap];
        e.extend(matches.clone());
        e.push(json!({"counter": null}));
        e.push(action.clone());
        cmds.push(rule("forward_in", e));
        let mut e = matches;
        e.push(action);
        cmds.push(rule("forward_local", e));
    }
    if up.masquerade {
        let subnets: Vec<Value> = config
            .segments
            .iter()
            .filter_map(|s| s.gateway_v4())
            .map(|g| {
                let (a, len) = network(&g);
                json!({"prefix": {"addr": a.to_string(), "len": len}})
            })
            .collect();
        if !subnets.is_empty() {
            cmds.push(rule(
                "masquerade",
                vec![
                    json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"set": subnets}}}),
                    json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": up.tap}}),
                    json!({"counter": null}),
                    json!({"masquerade": null}),
                ],
            ));
        }
    }
    // Into the guests: what a forward translated, and replies; no other new connection,
    // from elsewhere (forward) or from the host itself (output): the host is outside too.
    // The balancers' health checks are the host's own connections: marked, let through.
    cmds.push(rule(
        "guard_local",
        vec![
            oifname(&up.tap),
            json!({"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": CHECK_MARK}}),
            json!({"accept": null}),
        ],
    ));
    for guard in ["guard", "guard_local"] {
        cmds.push(rule(
            guard,
            vec![
                oifname(&up.tap),
                json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
                json!({"accept": null}),
            ],
        ));
        cmds.push(rule(
            guard,
            vec![
                oifname(&up.tap),
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ));
    }
    for b in &config.balancers {
        let s = slots
            .iter()
            .find(|(n, _)| *n == b.name)
            .map(|(_, s)| s.as_slice())
            .unwrap_or(&[]);
        cmds.extend(balancer_rules(t, b, s));
    }
    cmds
}

impl HostSide {
    /// Sets the host side of `config`'s uplink up (the tap exists already).
    pub fn up(
        config: &SwitchConfig,
        slots: &[(String, Vec<Option<Ipv4Addr>>)],
    ) -> Result<Option<HostSide>, HostSideError> {
        let (Some(up), Some(host)) = (&config.uplink, host_prefix(config)) else {
            return Ok(None);
        };
        let mut nl = Netlink::open()?;
        nl.set_up(&up.tap)?;
        let address = (v4(&host), host.family_len());
        let added_address = nl.add_address(&up.tap, IpAddr::V4(address.0), address.1)?;
        let mut side = HostSide {
            tap: up.tap.clone(),
            table: table_name(&up.tap),
            address,
            added_address,
            routes: Vec::new(),
        };
        // From here on, a failure removes what was done.
        if let Err(e) = side.build(config, slots, &mut nl) {
            side.down();
            return Err(e);
        }
        info!(
            "uplink host side: {}/{} on {}, routes to {} subnets, table ip {}",
            address.0,
            address.1,
            side.tap,
            side.routes.len(),
            side.table
        );
        Ok(Some(side))
    }

    fn build(
        &mut self,
        config: &SwitchConfig,
        slots: &[(String, Vec<Option<Ipv4Addr>>)],
        nl: &mut Netlink,
    ) -> Result<(), HostSideError> {
        let Some(up) = &config.uplink else {
            return Ok(());
        };
        let vlan = up.vlan.unwrap_or(0);
        let via = config
            .segments
            .iter()
            .find(|s| s.segment() == vlan)
            .and_then(|s| s.gateway_v4())
            .map(|g| v4(&g));
        if let Some(via) = via {
            for s in config.segments.iter().filter(|s| s.segment() != vlan) {
                let Some(g) = s.gateway_v4() else {
                    continue;
                };
                let (dst, len) = network(&g);
                nl.replace_route(IpAddr::V4(dst), len, IpAddr::V4(via), &self.tap)?;
                self.routes.push((dst, len, via));
            }
        }
        if up.masquerade || !up.forwards.is_empty() {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(HostSideError::Forwarding)?;
        }
        nft::apply(ruleset(config, slots))?;
        Ok(())
    }

    /// Puts a balancer's new slot table in force, atomically.
    pub fn set_balancer(
        &self,
        b: &BalancerConfig,
        slots: &[Option<Ipv4Addr>],
    ) -> Result<(), NftError> {
        nft::apply(balancer_rules(&self.table, b, slots))
    }

    /// Removes the table, the routes and the address (if it was ours).
    pub fn down(&self) {
        if nft::table_exists("ip", &self.table) {
            if let Err(e) = nft::apply(vec![
                json!({"delete": {"table": {"family": "ip", "name": self.table}}}),
            ]) {
                warn!(
                    "uplink host side: cannot remove table ip {}: {e}",
                    self.table
                );
            }
        }
        // The tap may be gone already (and its routes and address with it).
        let Ok(mut nl) = Netlink::open() else {
            return;
        };
        for (dst, len, via) in &self.routes {
            let _ = nl.delete_route(IpAddr::V4(*dst), *len, IpAddr::V4(*via), &self.tap);
        }
        if self.added_address {
            let _ = nl.delete_address(&self.tap, IpAddr::V4(self.address.0), self.address.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[port]]
name = "web1"
socket = "/w1"
vlan = 10
addresses = ["10.10.1.10"]
[[port]]
name = "web2"
socket = "/w2"
vlan = 10
addresses = ["10.10.1.11"]
[[segment]]
vlan = 10
gateway = ["10.10.1.1/24"]
[[segment]]
vlan = 100
gateway = ["10.10.0.1/24"]
[uplink]
tap = "up0"
vlan = 100
host = "10.10.0.2/24"
[[uplink.forward]]
host_port = 8080
balancer = "web"
[[balancer]]
name = "web"
port = 80
backends = ["10.10.1.10", "10.10.1.11"]
"#;

    /// The last expression (the verdict) of each of the guard chain's rules, in order.
    fn guard(cmds: &[Value]) -> Vec<String> {
        cmds.iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == "guard")
            .map(|r| r["expr"].as_array().unwrap().last().unwrap().to_string())
            .collect()
    }

    #[test]
    fn only_a_resetting_balancer_gets_reset_rules_and_its_down_backends_in_a_set() {
        let keep = SwitchConfig::from_toml(CONFIG).unwrap();
        keep.validate().unwrap();
        let cmds = ruleset(&keep, &[]);
        assert!(!serde_json::to_string(&cmds).unwrap().contains("reject"));
        assert!(!serde_json::to_string(&cmds).unwrap().contains("down_web"));

        let reset = SwitchConfig::from_toml(
            &CONFIG.replace("port = 80\n", "port = 80\non_down = \"reset\"\n"),
        )
        .unwrap();
        reset.validate().unwrap();
        let cmds = ruleset(&reset, &[]);
        // Both resets come before the accept of translated connections.
        let verdicts = guard(&cmds);
        assert_eq!(verdicts.len(), 4, "{verdicts:?}");
        assert!(verdicts[0].contains("tcp reset") && verdicts[1].contains("tcp reset"));
        assert!(verdicts[2].contains("accept"), "{verdicts:?}");

        // web2 down: it alone is in the set; all up again: the set is emptied.
        let b = &reset.balancers[0];
        let a = Ipv4Addr::new(10, 10, 1, 10);
        let cmds = balancer_rules("t", b, &[Some(a); 256]);
        let elements: Vec<_> = cmds
            .iter()
            .filter_map(|c| c["add"]["element"]["elem"].as_array())
            .collect();
        assert_eq!(elements, vec![&vec![json!("10.10.1.11")]]);
        let both: Vec<_> = (0..256).map(|i| Some(b.backends[i % 2])).collect();
        let cmds = balancer_rules("t", b, &both);
        assert!(cmds.iter().any(|c| c["flush"]["set"]["name"] == "down_web"));
        assert!(!cmds.iter().any(|c| c["add"]["element"].is_object()));
    }
}
