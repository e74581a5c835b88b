//! The north-south part of the configuration: the host's side of the uplink (`host`,
//! `masquerade`, `[[uplink.forward]]`) and `[[balancer]]`, as written and checked.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, SwitchConfig};
use crate::balancer::slots::SLOTS;
use crate::packet::l3::{Ip, Prefix};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// `[[uplink.forward]]`: a port of the host's addresses forwarded to one guest
/// (`to = "10.10.1.10:80"`) or to a balancer (`balancer = "web"`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    #[serde(default = "default_proto")]
    pub proto: Proto,
    pub host_port: u16,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub balancer: Option<String>,
}

fn default_proto() -> Proto {
    Proto::Tcp
}

impl ForwardConfig {
    /// The guest address and port of a forward to one guest.
    pub fn target(&self) -> Result<Option<(Ipv4Addr, u16)>, String> {
        let Some(to) = &self.to else {
            return Ok(None);
        };
        let bad = || format!("to = '{to}' is not ADDRESS:PORT, as in 10.10.1.10:80");
        let (a, p) = to.rsplit_once(':').ok_or_else(bad)?;
        let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let p: u16 = p.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        Ok(Some((a, p)))
    }
}

/// `[[balancer]]`: new connections to it spread over the healthy `backends` by a
/// consistent hash; active TCP checks from the switch decide which are healthy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    pub name: String,
    /// The backends' port (the service's).
    pub port: u16,
    /// The backends' addresses: each a guest's, in a routed segment.
    pub backends: Vec<Ipv4Addr>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Checks passed in a row before a down backend gets connections again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Checks failed in a row before a backend gets no more new connections.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// What becomes of a down backend's open connections. Left out of a written file
    /// when it is the default, so that a switch from before the key reads the file.
    #[serde(default, skip_serializing_if = "OnDown::is_keep")]
    pub on_down: OnDown,
}

/// `on_down`: a down backend's open connections are left to finish or time out (`keep`),
/// or reset at their next packet (`reset`), as IPVS's `expire_nodest_conn` and HAProxy's
/// `on-marked-down shutdown-sessions` do.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    #[default]
    Keep,
    Reset,
}

impl OnDown {
    fn is_keep(&self) -> bool {
        *self == OnDown::Keep
    }
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}

/// The uplink's host address with its subnet, if set.
pub fn host_prefix(c: &SwitchConfig) -> Option<Prefix> {
    c.uplink.as_ref()?.host.as_ref()?.parse().ok()
}

/// Checks the host side, the forwards and the balancers against the segments and ports.
pub fn check(c: &SwitchConfig) -> Result<(), ConfigError> {
    let err = |m: String| ConfigError::NorthSouth(m);
    let owned = |a: Ipv4Addr| {
        let ip = Ip::v4(a.octets());
        c.ports.iter().any(|p| {
            p.addresses.iter().any(|x| Ip::from(*x) == ip)
                && c.segments.iter().any(|s| s.segment() == p.segment())
        })
    };
    let mut names = Vec::new();
    for b in &c.balancers {
        let at = format!("balancer '{}'", b.name);
        if names.contains(&&b.name) {
            return Err(err(format!("{at}: the name is used twice")));
        }
        names.push(&b.name);
        if b.backends.is_empty() {
            return Err(err(format!(
                "{at}: no backends; give backends = [\"10.10.1.10\", ...]"
            )));
        }
        if let Some((_, a)) = b
            .backends
            .iter()
            .enumerate()
            .find(|(i, a)| b.backends[..*i].contains(a))
        {
            return Err(err(format!("{at}: backend {a} is listed twice")));
        }
        if b.backends.len() > SLOTS {
            return Err(err(format!(
                "{at}: {} backends; a balancer has at most {SLOTS}",
                b.backends.len()
            )));
        }
        if let Some(a) = b.backends.iter().find(|a| !owned(**a)) {
            return Err(err(format!(
                "{at}: backend {a} is no port's address in a routed segment; give the \
                 port addresses = [\"{a}\"] and its vlan a [[segment]]"
            )));
        }
        if b.port == 0 || b.rise == 0 || b.fall == 0 || b.interval_ms == 0 {
            return Err(err(format!(
                "{at}: port, rise, fall and interval_ms must be above 0"
            )));
        }
        if b.timeout_ms == 0 || b.timeout_ms >= b.interval_ms {
            return Err(err(format!(
                "{at}: timeout_ms ({}) must be above 0 and below interval_ms ({})",
                b.timeout_ms, b.interval_ms
            )));
        }
    }
    let Some(up) = &c.uplink else {
        if let Some(b) = c.balancers.first() {
            return Err(err(format!(
                "balancer '{}': balancers serve the uplink's forwards; add an [uplink] \
                 with host and a forward to it",
                b.name
            )));
        }
        return Ok(());
    };
    let Some(host) = &up.host else {
        if !up.forwards.is_empty() {
            return Err(err(
                "forwards need the host's side: give [uplink] host = \"ADDRESS/LEN\" in the \
                 uplink segment's subnet"
                    .into(),
            ));
        }
        return Ok(());
    };
    let host: Prefix = host
        .parse()
        .map_err(|m| err(format!("host = '{host}': {m}")))?;
    if !host.addr.is_v4() {
        return Err(err(format!("host = '{host}': give an IPv4 address")));
    }
    if up.trunk {
        return Err(err(
            "host needs an access uplink (vlan = ID), not a trunk: the host's address \
             lives in one segment"
                .into(),
        ));
    }
    let vlan = up.vlan.unwrap_or(0);
    let Some(seg) = c.segments.iter().find(|s| s.segment() == vlan) else {
        return Err(err(format!(
            "host = '{host}': the uplink's vlan {vlan} is not a routed segment; add a \
             [[segment]] with vlan = {vlan} and a gateway in {host}'s subnet"
        )));
    };
    let Some(gw) = seg.gateway_v4() else {
        return Err(err(format!("{} has no IPv4 gateway", seg.label())));
    };
    if !gw.contains(host.addr) || gw.len != host.len || gw.addr == host.addr {
        return Err(err(format!(
            "host = '{host}' must be another address of {}'s subnet {gw}, with its length",
            seg.label()
        )));
    }
    let mut seen = Vec::new();
    for f in &up.forwards {
        let at = format!("forward of {} port {}", f.proto.name(), f.host_port);
        if f.host_port == 0 {
            return Err(err(format!("{at}: host_port must be above 0")));
        }
        if seen.contains(&(f.proto, f.host_port)) {
            return Err(err(format!("{at}: forwarded twice")));
        }
        seen.push((f.proto, f.host_port));
        match (
            f.target().map_err(|m| err(format!("{at}: {m}")))?,
            &f.balancer,
        ) {
            (Some((a, _)), None) if !owned(a) => {
                return Err(err(format!(
                    "{at}: {a} is no port's address in a routed segment; forward to an \
                     address a port owns"
                )))
            }
            (Some(_), None) => {}
            (None, Some(b)) => {
                let Some(bal) = c.balancers.iter().find(|x| &x.name == b) else {
                    return Err(err(format!("{at}: no [[balancer]] named '{b}'")));
                };
                if f.proto != Proto::Tcp {
                    return Err(err(format!(
                        "{at}: balancer '{}' checks TCP; forward tcp to it",
                        bal.name
                    )));
                }
            }
            _ => {
                return Err(err(format!(
                    "{at}: give exactly one of to = \"ADDRESS:PORT\" and balancer = \"NAME\""
                )))
            }
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

    const GOOD: &str = r#"
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
name = "outside"
vlan = 100
gateway = ["10.10.0.1/24"]
[uplink]
tap = "vnet-up"
vlan = 100
host = "10.10.0.2/24"
[[uplink.forward]]
host_port = 8080
balancer = "web"
[[uplink.forward]]
host_port = 2222
to = "10.10.1.10:22"
[[balancer]]
name = "web"
port = 80
backends = ["10.10.1.10", "10.10.1.11"]
"#;

    #[test]
    fn a_written_config_names_on_down_only_when_it_is_not_the_default() {
        let mut c = SwitchConfig::from_toml(GOOD).unwrap();
        assert!(!toml::to_string(&c).unwrap().contains("on_down"));
        c.balancers[0].on_down = super::OnDown::Reset;
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("on_down = \"reset\""), "{text}");
        assert_eq!(SwitchConfig::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn forwards_and_balancers_are_checked_with_the_fix_named() {
        check(GOOD).unwrap();
        for (bad, needle) in [
            (
                GOOD.replace("10.10.1.10:22", "10.10.1.99:22"),
                "forward to an address a port owns",
            ),
            (
                GOOD.replace("10.10.1.10:22", "10.10.1.10"),
                "not ADDRESS:PORT",
            ),
            (
                GOOD.replace("balancer = \"web\"", "balancer = \"api\""),
                "no [[balancer]] named 'api'",
            ),
            (
                GOOD.replace(
                    "backends = [\"10.10.1.10\", \"10.10.1.11\"]",
                    "backends = []",
                ),
                "no backends",
            ),
            (
                GOOD.replace(", \"10.10.1.11\"]", ", \"10.10.1.12\"]"),
                "backend 10.10.1.12 is no port's",
            ),
            (
                GOOD.replace("host = \"10.10.0.2/24\"", "host = \"10.10.5.2/24\""),
                "another address of segment 'outside'",
            ),
            (
                GOOD.replace("host = \"10.10.0.2/24\"", "host = \"10.10.0.1/24\""),
                "another address",
            ),
            (
                GOOD.replace(
                    "tap = \"vnet-up\"\nvlan = 100",
                    "tap = \"vnet-up\"\nvlan = 200",
                ),
                "not a routed segment",
            ),
            (
                GOOD.replace("host_port = 2222", "host_port = 8080"),
                "forwarded twice",
            ),
            (
                GOOD.replace("host = \"10.10.0.2/24\"\n", ""),
                "forwards need the host's side",
            ),
            (
                GOOD.replace("port = 80\n", "port = 80\non_down = \"drop\"\n"),
                "expected `keep` or `reset`",
            ),
            (
                GOOD.replace(
                    "backends = [\"10.10.1.10\", \"10.10.1.11\"]",
                    &format!(
                        "backends = [{}]",
                        (0..257)
                            .map(|i| format!("\"10.10.{}.{}\"", 1 + i / 200, 10 + i % 200))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                "257 backends; a balancer has at most 256",
            ),
            (
                GOOD.replace(
                    "backends = [\"10.10.1.10\", \"10.10.1.11\"]",
                    "backends = [\"10.10.1.10\", \"10.10.1.11\", \"10.10.1.10\"]",
                ),
                "backend 10.10.1.10 is listed twice",
            ),
            (
                GOOD.replace("port = 80\n", "port = 80\ntimeout_ms = 2000\n"),
                "below interval_ms",
            ),
            (
                GOOD.replace(
                    "to = \"10.10.1.10:22\"",
                    "to = \"10.10.1.10:22\"\nbalancer = \"web\"",
                ),
                "exactly one of",
            ),
        ] {
            let e = check(&bad).expect_err(needle);
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
