//! The rules as the policy runs them: compiled once from the config (groups to bits, CIDRs
//! to prefixes, protocols to numbers), walked in order for a flow's first packet only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::policy::{OneOrMany, PortItem};
use crate::config::{Action, ConfigError, SwitchConfig};
use crate::packet::l3::{FlowKey, Ip, Prefix, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::types::{MacAddr, PortId};

use super::rate::RateLimiter;

/// At most this many groups: a port's groups are one word.
pub const MAX_GROUPS: usize = 64;

/// One side of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Any,
    /// The uplink: the host and everything beyond it.
    Outside,
    /// Ports in any of these groups (bits).
    Groups(u64),
    /// Addresses in a prefix (IPv4 as mapped: its length counts 96 more bits).
    Cidr(Prefix),
}

impl Peer {
    #[inline]
    fn matches(&self, port: &PortPolicy, addr: &Ip) -> bool {
        match *self {
            Peer::Any => true,
            Peer::Outside => port.uplink,
            Peer::Groups(bits) => port.groups & bits != 0,
            Peer::Cidr(net) => net.contains(*addr),
        }
    }
}

/// Hits and the traffic of the flows a rule decided, for `ctl rules`.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Flows (allow) or packets (deny) the rule decided.
    pub hits: AtomicU64,
    /// Packets and bytes of its flows that ended (the live ones are added when asked).
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug)]
pub struct AclRule {
    pub name: String,
    pub action: Action,
    pub from: Vec<Peer>,
    pub to: Vec<Peer>,
    /// IP protocol numbers; empty: any.
    pub proto: Vec<u8>,
    /// Destination port ranges; empty: any.
    pub ports: Vec<(u16, u16)>,
    pub counters: RuleCounters,
    /// A rate all its flows share.
    pub rate: Option<RateLimiter>,
    /// The rule as written, for `ctl rules`.
    pub text: String,
}

impl AclRule {
    #[inline]
    fn matches(&self, src: &PortPolicy, dst: &PortPolicy, key: &FlowKey) -> bool {
        (self.proto.is_empty() || self.proto.contains(&key.proto))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&key.dport)))
            && self.from.iter().any(|p| p.matches(src, &key.src))
            && self.to.iter().any(|p| p.matches(dst, &key.dst))
    }
}

/// What the policy knows of a port.
#[derive(Debug, Default)]
pub struct PortPolicy {
    /// Its name, for logs ("" for a free place in the port table).
    pub name: String,
    pub groups: u64,
    pub uplink: bool,
    pub mac: Option<MacAddr>,
    /// Addresses it owns, by family; a family with none is not checked.
    pub v4: Vec<Ip>,
    pub v6: Vec<Ip>,
    /// Rate limits on what it sends and what it receives.
    pub rate_tx: Option<RateLimiter>,
    pub rate_rx: Option<RateLimiter>,
}

/// Everything the policy decides by, replaced as a whole on reload.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// Rules filter (a policy is configured).
    pub enabled: bool,
    /// The stage runs: rules filter, or some rate is set.
    pub active: bool,
    /// Some port has a rate of its own: without, a frame reads no port's entry for it.
    pub port_rates: bool,
    pub default: Action,
    pub rules: Vec<AclRule>,
    /// By port id; the uplink last.
    pub ports: Vec<PortPolicy>,
    /// Group names, by bit.
    pub groups: Vec<String>,
}

/// A rule's decision: its index, or None for the default.
pub type Decider = Option<u32>;

impl RuleSet {
    /// Compiles `config`'s rules and ports' groups and addresses (the uplink, if any, is
    /// the port after the VM ports).
    pub fn compile(config: &SwitchConfig) -> Result<RuleSet, ConfigError> {
        let mut groups: Vec<String> = Vec::new();
        for p in &config.ports {
            for g in &p.groups {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
        if groups.len() > MAX_GROUPS {
            return Err(ConfigError::Policy(format!(
                "{} groups are named; at most {MAX_GROUPS} are supported",
                groups.len()
            )));
        }
        for g in &groups {
            if g.is_empty() || ["any", "outside"].contains(&g.as_str()) || g.contains('/') {
                return Err(ConfigError::Policy(format!(
                    "'{g}' cannot be a group name (empty, 'any', 'outside' or with a '/')"
                )));
            }
        }
        let bit_of: HashMap<&str, u64> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), 1u64 << i))
            .collect();
        let mut ports: Vec<PortPolicy> = config
            .ports
            .iter()
            .map(|p| {
                let (v4, v6) = p.addresses.iter().partition(|a| a.is_ipv4());
                let ips = |v: Vec<&IpAddr>| v.into_iter().map(|a| Ip::from(*a)).collect();
                PortPolicy {
                    name: p.name.clone(),
                    groups: p.groups.iter().map(|g| bit_of[g.as_str()]).sum(),
                    uplink: false,
                    mac: p.mac,
                    v4: ips(v4),
                    v6: ips(v6),
                    rate_tx: p.rate_tx.as_ref().map(RateLimiter::new),
                    rate_rx: p.rate_rx.as_ref().map(RateLimiter::new),
                }
            })
            .collect();
        if config.uplink.is_some() {
            ports.push(PortPolicy {
                name: "uplink".into(),
                uplink: true,
                ..Default::default()
            });
        }
        let mut rules = Vec::with_capacity(config.rules.len());
        for (i, r) in config.rules.iter().enumerate() {
            let err = |message: String| ConfigError::Rule {
                at: config.rule_at(i),
                message,
            };
            let peers = |side: &str, v: &OneOrMany<String>| -> Result<Vec<Peer>, ConfigError> {
                v.as_slice()
                    .iter()
                    .map(|s| peer(s, &bit_of).map_err(|m| err(format!("{side} {m}"))))
                    .collect()
            };
            let mut proto = Vec::new();
            for name in r.proto.as_ref().map_or(&[][..], |p| p.as_slice()) {
                proto.push(match name.as_str() {
                    "any" => {
                        proto.clear();
                        break;
                    }
                    "tcp" => PROTO_TCP,
                    "udp" => PROTO_UDP,
                    "icmp" => PROTO_ICMP,
                    "icmpv6" => PROTO_ICMPV6,
                    other => {
                        return Err(err(format!(
                            "proto '{other}' is not one of tcp, udp, icmp, icmpv6, any"
                        )))
                    }
                });
            }
            let ports = match &r.ports {
                None => Vec::new(),
                Some(list) => {
                    if proto.is_empty() || proto.iter().any(|p| ![PROTO_TCP, PROTO_UDP].contains(p))
                    {
                        return Err(err(
                            "ports need proto = \"tcp\" or \"udp\" (other protocols have none)"
                                .into(),
                        ));
                    }
                    list.as_slice()
                        .iter()
                        .map(|p| port_range(p).map_err(&err))
                        .collect::<Result<_, _>>()?
                }
            };
            if let Some(rate) = &r.rate {
                rate.check().map_err(|m| err(format!("rate: {m}")))?;
                if r.action == Action::Deny {
                    return Err(err("rate is for allow rules (deny passes nothing)".into()));
                }
            }
            let from = peers("from", &r.from)?;
            let to = peers("to", &r.to)?;
            rules.push(AclRule {
                name: r.shown_name(i),
                action: r.action,
                text: describe(r),
                from,
                to,
                proto,
                ports,
                counters: RuleCounters::default(),
                rate: r.rate.as_ref().map(RateLimiter::new),
            });
        }
        let rated = ports
            .iter()
            .any(|p| p.rate_tx.is_some() || p.rate_rx.is_some());
        Ok(RuleSet {
            enabled: config.has_policy(),
            active: config.has_policy() || rated,
            port_rates: rated,
            default: config.policy.as_ref().map_or(Action::Deny, |p| p.default),
            rules,
            ports,
            groups,
        })
    }

    /// The first rule matching a flow from port `src` to port `dst`.
    pub fn decide(&self, src: PortId, dst: PortId, key: &FlowKey) -> (Action, Decider) {
        let none = PortPolicy::default();
        let s = self.ports.get(usize::from(src)).unwrap_or(&none);
        let d = self.ports.get(usize::from(dst)).unwrap_or(&none);
        for (i, r) in self.rules.iter().enumerate() {
            if r.matches(s, d, key) {
                return (r.action, Some(i as u32));
            }
        }
        (self.default, None)
    }

    pub fn decider_name(&self, d: Decider) -> &str {
        d.and_then(|i| self.rules.get(i as usize))
            .map_or("default", |r| r.name.as_str())
    }

    /// The name of port `port`, for logs ("?" for none).
    pub fn port_name(&self, port: PortId) -> &str {
        self.ports
            .get(usize::from(port))
            .map(|p| p.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("?")
    }

    /// The names of the groups in `bits`.
    pub fn group_names(&self, bits: u64) -> Vec<&str> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, g)| g.as_str())
            .collect()
    }
}

fn peer(s: &str, groups: &HashMap<&str, u64>) -> Result<Peer, String> {
    match s {
        "any" => return Ok(Peer::Any),
        "outside" => return Ok(Peer::Outside),
        _ => {}
    }
    if let Some(bit) = groups.get(s) {
        return Ok(Peer::Groups(*bit));
    }
    let is_addr = s
        .split('/')
        .next()
        .is_some_and(|a| a.parse::<IpAddr>().is_ok());
    if !is_addr {
        return Err(format!(
            "'{s}' is not a group of any port, a CIDR, 'outside' or 'any' (groups: set \
             groups = [\"...\"] on the ports)"
        ));
    }
    s.parse().map(Peer::Cidr)
}

fn port_range(p: &PortItem) -> Result<(u16, u16), String> {
    let bad = |s: &str| format!("ports '{s}' is not a port (1-65535) or a range LOW-HIGH");
    match p {
        PortItem::Number(n) => Ok((*n, *n)),
        PortItem::Text(s) => {
            let (lo, hi) = s.split_once('-').unwrap_or((s, s));
            let lo: u16 = lo.trim().parse().map_err(|_| bad(s))?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad(s))?;
            if lo > hi {
                return Err(bad(s));
            }
            Ok((lo, hi))
        }
    }
}

fn describe(r: &crate::config::RuleConfig) -> String {
    let list = |v: &OneOrMany<String>| v.as_slice().join(",");
    let mut s = format!(
        "{} {} -> {} {}",
        r.action.name(),
        list(&r.from),
        list(&r.to),
        r.proto.as_ref().map_or("any".to_string(), list)
    );
    if let Some(ports) = &r.ports {
        let items: Vec<String> = ports
            .as_slice()
            .iter()
            .map(|p| match p {
                PortItem::Number(n) => n.to_string(),
                PortItem::Text(t) => t.clone(),
            })
            .collect();
        s.push_str(&format!(" {}", items.join(",")));
    }
    s
}

/// Counts `n` rule decisions of rule `d` of `rules`.
pub fn count_hit(rules: &RuleSet, d: Decider) {
    if let Some(r) = d.and_then(|i| rules.rules.get(i as usize)) {
        r.counters.hits.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortConfig;

    fn key(src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16) -> FlowKey {
        FlowKey {
            src: Ip::v4(src),
            dst: Ip::v4(dst),
            sport: 40000,
            dport,
            proto,
            zone: 0,
        }
    }

    fn config(rules: &str) -> SwitchConfig {
        let mut c = SwitchConfig::from_toml(rules).unwrap();
        for (name, group) in [("web1", "web"), ("app1", "app"), ("db1", "db")] {
            c.ports.push(PortConfig {
                name: name.into(),
                socket: format!("/{name}").into(),
                groups: vec![group.into()],
                ..Default::default()
            });
        }
        c
    }

    #[test]
    fn first_matching_rule_decides_and_the_rest_is_denied() {
        let c = config(
            r#"
[[rule]]
name = "web-app"
action = "allow"
from = "web"
to = "app"
proto = "tcp"
ports = [8080, "9000-9010"]

[[rule]]
action = "deny"
from = "10.0.0.0/8"
to = "any"
proto = "udp"

[[rule]]
action = "allow"
from = "any"
to = ["db", "fd00::/64"]
proto = "udp"
"#,
        );
        let r = RuleSet::compile(&c).unwrap();
        assert!(r.enabled);
        let (web, app, db) = (0, 1, 2);
        let k = |proto, dport| key([10, 0, 1, 1], [10, 0, 2, 1], proto, dport);
        assert_eq!(r.decide(web, app, &k(6, 8080)), (Action::Allow, Some(0)));
        assert_eq!(r.decide(web, app, &k(6, 9005)), (Action::Allow, Some(0)));
        assert_eq!(r.decide(web, app, &k(6, 9011)), (Action::Deny, None));
        assert_eq!(r.decide(app, web, &k(6, 8080)), (Action::Deny, None));
        assert_eq!(r.decide(web, db, &k(17, 53)), (Action::Deny, Some(1)));
        let outside_net = key([192, 168, 0, 1], [10, 0, 3, 1], 17, 53);
        assert_eq!(r.decide(web, db, &outside_net), (Action::Allow, Some(2)));
        assert_eq!(r.decider_name(Some(0)), "web-app");
        assert_eq!(r.decider_name(None), "default");
        assert_eq!(r.group_names(r.ports[2].groups), vec!["db"]);
        assert!(r.rules[0].text.contains("8080,9000-9010"));
    }

    #[test]
    fn bad_rules_are_refused_with_where_and_why() {
        for (text, needle) in [
            (
                "[[rule]]\naction = \"allow\"\nfrom = \"wbe\"\n",
                "rule 1 (line 1, column 1): from 'wbe' is not a group",
            ),
            (
                "\n[[rule]]\nname = \"x\"\naction = \"allow\"\nproto = \"sctp\"\n",
                "rule 1 'x' (line 2, column 1): proto 'sctp'",
            ),
            (
                "[[rule]]\naction = \"allow\"\nports = 80\n",
                "ports need proto",
            ),
            (
                "[[rule]]\naction = \"allow\"\nproto = \"tcp\"\nports = \"90-80\"\n",
                "ports '90-80'",
            ),
            (
                "[[rule]]\naction = \"allow\"\nto = \"10.0.0.0/33\"\n",
                "prefix length must be 0..=32",
            ),
        ] {
            let e = RuleSet::compile(&config(text)).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = SwitchConfig::from_toml("[[rule]]\naction = \"maybe\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("maybe"), "{e}");
    }

    #[test]
    fn no_policy_means_disabled() {
        let r = RuleSet::compile(&config("")).unwrap();
        assert!(!r.enabled);
        let r = RuleSet::compile(&config("[policy]\ndefault = \"allow\"\n")).unwrap();
        assert!(r.enabled);
        assert_eq!(r.default, Action::Allow);
    }
}
