//! The switch configuration: from a TOML file or from `--port` specs on the command line.

pub mod north_south;
pub mod policy;
pub mod route;
pub mod socket_access;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::types::MacAddr;
pub use north_south::{BalancerConfig, ForwardConfig, OnDown, Proto};
pub use policy::{Action, PolicyConfig, RateConfig, RuleConfig};
pub use route::{DhcpConfig, RouteConfig, SegmentConfig, DEFAULT_ROUTER_MAC};
use thiserror::Error;

/// Largest number of queue pairs one port may offer.
pub const MAX_QUEUE_PAIRS: u16 = 16;
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Most threads of the worker pool (`workers`).
pub const MAX_WORKERS: usize = 256;
/// Largest frame payload the switch forwards when no `--mtu` is given: jumbo frames work
/// out of the box.
pub const DEFAULT_FORWARD_MTU: u16 = 9000;
pub const DEFAULT_MAC_AGEING_SECS: u64 = 300;
/// VM ports a switch holds, counting those added at run time, unless `max_ports` says
/// otherwise.
pub const DEFAULT_MAX_PORTS: u16 = 64;
/// Most VM ports `max_ports` may ask for: each place costs a few hundred bytes in every
/// per-port table, used or not.
pub const MAX_PORTS_LIMIT: u16 = 4000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("port spec '{spec}': {message} (expected name=NAME,socket=PATH[,vlan=ID][,mac=MAC][,queues=N][,max_macs=N][,group=G]...[,ip=ADDR]...[,socket_owner=U][,socket_group=G][,socket_mode=0660][,mode=server|client])")]
    PortSpec { spec: String, message: String },
    #[error("port '{port}': {message}")]
    Port { port: String, message: String },
    #[error("no ports configured: give --port name=NAME,socket=PATH (or --socket-path, --fd, --config FILE)")]
    NoPorts,
    #[error("uplink '{spec}': {message} (expected tap:NAME[,vlan=ID][,trunk][,queues=N])")]
    Uplink { spec: String, message: String },
    #[error("poll-us {0} is out of range: use 0..=1000000 (a second)")]
    PollUs(u64),
    #[error("workers {0} is out of range: use 0 (a thread per queue pair) to {MAX_WORKERS}")]
    Workers(usize),
    #[error("worker CPU {cpu} is not one this process may run on ({allowed}); see `taskset -p $$` or the cgroup's cpuset")]
    WorkerCpu { cpu: usize, allowed: String },
    #[error("mtu {0} is out of range: use 68..=65521")]
    Mtu(u32),
    #[error("{ports} ports are configured but max_ports is {max}: raise max_ports (up to {MAX_PORTS_LIMIT}) or remove ports")]
    TooManyPorts { ports: usize, max: usize },
    #[error("max_ports {0} is out of range: use 1..={MAX_PORTS_LIMIT}")]
    MaxPorts(u16),
    #[error("{0}")]
    Control(String),
    #[error("{at}: {message}")]
    Rule { at: String, message: String },
    #[error("[policy]: {0}")]
    Policy(String),
    #[error("routing: {0}")]
    Routing(String),
    #[error("uplink: {0}")]
    NorthSouth(String),
}

/// Queue pairs a VM port offers unless told: all a guest may ask for. A pair its guest
/// never starts costs no thread and no burst state (`vhost_user::worker_pool`).
fn default_queues() -> u16 {
    MAX_QUEUE_PAIRS
}

/// The uplink's tap queues: one reader thread each, from the start.
fn default_uplink_queues() -> u16 {
    1
}

/// One switch port: a vhost-user socket that one VM NIC connects to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    pub socket: PathBuf,
    /// Access VLAN; frames never cross from one VLAN to another. None: the untagged segment.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// MAC offered to the guest through the device config space.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Queue pairs offered (QEMU `queues=` up to this); 16 unless told.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Port security: the guest may send from at most this many MAC addresses (its `mac=`
    /// counts as one and is always allowed); frames from others are dropped as
    /// `spoofed_mac`. `max_macs = 1` with `mac=` pins the port to that MAC. None: up to the
    /// table's per-port limit are learned, and a guest may send from any MAC.
    #[serde(default)]
    pub max_macs: Option<u16>,
    /// The groups (tiers) the port belongs to, which rules name.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The IP addresses the guest owns. Given any of a family, it may send from no other of
    /// that family (nor claim one in ARP or neighbour discovery).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// A rate limit on what the guest sends into the switch.
    #[serde(default)]
    pub rate_tx: Option<RateConfig>,
    /// A rate limit on what the switch delivers to the guest.
    #[serde(default)]
    pub rate_rx: Option<RateConfig>,
    /// The socket's owner and group (names or numbers) and mode (octal, `"0660"`), set
    /// once it is created: what lets a QEMU running as another user connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// Who listens on `socket`: the switch (`server`), or QEMU (`client`: the switch
    /// connects, and connects again whenever the connection ends).
    #[serde(default)]
    pub mode: PortMode,
}

/// Which side of a port's vhost-user socket listens.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// The switch listens; QEMU connects (`-chardev socket,path=...,reconnect=1`).
    #[default]
    Server,
    /// QEMU listens (`-chardev socket,path=...,server=on`, libvirt's `mode='server'`);
    /// the switch connects, and a restarted switch connects again.
    Client,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            name: String::new(),
            socket: PathBuf::new(),
            vlan: None,
            mac: None,
            queues: default_queues(),
            max_macs: None,
            groups: Vec::new(),
            addresses: Vec::new(),
            rate_tx: None,
            rate_rx: None,
            socket_owner: None,
            socket_group: None,
            socket_mode: None,
            mode: PortMode::Server,
        }
    }
}

impl PortConfig {
    /// Parses `name=web1,socket=/run/web1.sock[,vlan=10][,mac=..][,queues=2][,max_macs=N]`.
    pub fn parse_spec(spec: &str) -> Result<PortConfig, ConfigError> {
        let err = |message: String| ConfigError::PortSpec {
            spec: spec.to_string(),
            message,
        };
        let (mut name, mut vlan, mut mac, mut queues) = (None, None, None, default_queues());
        let mut socket: Option<PathBuf> = None;
        // Who may connect to it.
        let (mut socket_owner, mut socket_group, mut socket_mode) = (None, None, None);
        let (mut max_macs, mut groups, mut addresses) = (None, Vec::new(), Vec::new());
        let mut mode = PortMode::Server;
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
            match k {
                "name" => name = Some(v.to_string()),
                "socket" => socket = Some(PathBuf::from(v)),
                "vlan" => {
                    vlan = Some(
                        v.parse()
                            .map_err(|_| err(format!("vlan '{v}' is not a number")))?,
                    )
                }
                "mac" => mac = Some(v.parse().map_err(err)?),
                "queues" => {
                    queues = v
                        .parse()
                        .map_err(|_| err(format!("queues '{v}' is not a number")))?
                }
                "max_macs" => {
                    max_macs = Some(
                        v.parse()
                            .map_err(|_| err(format!("max_macs '{v}' is not a number")))?,
                    )
                }
                "group" => groups.push(v.to_string()),
                "socket_owner" => socket_owner = Some(v.to_string()),
                "socket_group" => socket_group = Some(v.to_string()),
                "socket_mode" => socket_mode = Some(v.to_string()),
                "mode" => {
                    mode = match v {
                        "server" => PortMode::Server,
                        "client" => PortMode::Client,
                        _ => return Err(err(format!("mode '{v}' is not server or client"))),
                    }
                }
                "ip" => addresses.push(
                    v.parse()
                        .map_err(|_| err(format!("ip '{v}' is not an IPv4 or IPv6 address")))?,
                ),
                _ => return Err(err(format!("unknown key '{k}'"))),
            }
        }
        Ok(PortConfig {
            name: name.ok_or_else(|| err("missing name=".into()))?,
            socket: socket.ok_or_else(|| err("missing socket=".into()))?,
            socket_owner,
            socket_group,
            socket_mode,
            vlan,
            mac,
            queues,
            max_macs,
            groups,
            addresses,
            mode,
            ..Default::default()
        })
    }

    /// Who may connect to its socket, resolved.
    pub fn socket_access(&self) -> Result<socket_access::SocketAccess, String> {
        socket_access::SocketAccess::resolve(
            self.socket_owner.as_deref(),
            self.socket_group.as_deref(),
            self.socket_mode.as_deref(),
        )
    }

    /// The VLAN the port belongs to; 0 stands for the untagged segment.
    pub fn segment(&self) -> u16 {
        self.vlan.unwrap_or(0)
    }
}

/// The tap uplink between the switch and the host kernel.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Tap name; created if missing, attached to if it exists (multi-queue, vnet headers).
    pub tap: String,
    /// Access VLAN of the uplink (untagged on the wire).
    #[serde(default)]
    pub vlan: Option<u16>,
    /// Carry every VLAN as 802.1Q-tagged frames; untagged frames are the untagged segment.
    #[serde(default)]
    pub trunk: bool,
    #[serde(default = "default_uplink_queues")]
    pub queues: u16,
    /// The host's address on the tap, with the uplink segment's length
    /// (`"10.10.0.2/24"`): the switch sets it, routes every routed subnet through its
    /// gateway, and programs the host's NAT (`north_south`). None: the host side is left
    /// to the user.
    #[serde(default)]
    pub host: Option<String>,
    /// Guests reach the outside through source NAT to the host's addresses.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Host ports forwarded to a guest or a balancer: all the outside may reach.
    #[serde(default, rename = "forward")]
    pub forwards: Vec<ForwardConfig>,
}

fn default_true() -> bool {
    true
}

impl UplinkConfig {
    /// Parses `tap:NAME[,vlan=ID][,trunk][,queues=N]`.
    pub fn parse_spec(spec: &str) -> Result<UplinkConfig, ConfigError> {
        let err = |message: String| ConfigError::Uplink {
            spec: spec.to_string(),
            message,
        };
        let mut items = spec.split(',');
        let tap = items
            .next()
            .and_then(|k| k.strip_prefix("tap:"))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err("it must start with tap:NAME".into()))?;
        let mut up = UplinkConfig {
            tap: tap.to_string(),
            vlan: None,
            trunk: false,
            queues: 1,
            host: None,
            masquerade: true,
            forwards: Vec::new(),
        };
        for item in items {
            match item.split_once('=') {
                None if item == "trunk" => up.trunk = true,
                Some(("vlan", v)) => {
                    up.vlan = Some(
                        v.parse()
                            .map_err(|_| err(format!("vlan '{v}' is not a number")))?,
                    )
                }
                Some(("queues", v)) => {
                    up.queues = v
                        .parse()
                        .map_err(|_| err(format!("queues '{v}' is not a number")))?
                }
                _ => return Err(err(format!("unknown option '{item}'"))),
            }
        }
        Ok(up)
    }
}

fn default_ageing() -> u64 {
    DEFAULT_MAC_AGEING_SECS
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// Largest IP MTU forwarded, and advertised to guests (VIRTIO_NET_F_MTU). None: forward
    /// up to 9000 bytes and advertise nothing.
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default = "default_ageing")]
    pub mac_ageing_secs: u64,
    /// Unix socket answering `stats` with the counters as JSON.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// The control socket's owner and group (names or numbers) and mode (`"0660"`): who
    /// may read counters and change the switch. None: root's, with the process umask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket_mode: Option<String>,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
    /// After a TX burst, keep polling the ring this long (microseconds) before sleeping:
    /// lower latency for a core's worth of CPU. 0: off.
    #[serde(default)]
    pub poll_us: u64,
    /// Threads serving every VM port's queue pairs, each pair given to the one with the
    /// fewest (OVS's PMD threads). 0: a thread of its own for each queue pair.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub workers: usize,
    /// CPUs the datapath's threads (the workers, the uplink's readers) run on. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_cpus: Vec<usize>,
    /// The policy's settings; present, or with any rule, traffic no rule allows is dropped.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// The policy's rules, first match deciding.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Where each rule starts in the file it came from ("line L, column C"), for errors.
    #[serde(skip)]
    pub rule_positions: Vec<String>,
    /// Segments the switch routes between, each with its subnets and gateway.
    #[serde(default, rename = "segment")]
    pub segments: Vec<SegmentConfig>,
    /// Static routes through next hops in those segments.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// The gateways' MAC (`DEFAULT_ROUTER_MAC` if unset).
    #[serde(default)]
    pub router_mac: Option<MacAddr>,
    /// Services spread over several guests, for the uplink's forwards.
    #[serde(default, rename = "balancer")]
    pub balancers: Vec<BalancerConfig>,
    /// VM ports the switch can hold, counting those added at run time (`ctl port-add`).
    /// None: `DEFAULT_MAX_PORTS`, or as many as are configured if that is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ports: Option<u16>,
    /// Where Prometheus scrapes `/metrics` (`"127.0.0.1:9465"`). None: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            mtu: None,
            mac_ageing_secs: DEFAULT_MAC_AGEING_SECS,
            control_socket: None,
            control_socket_owner: None,
            control_socket_group: None,
            control_socket_mode: None,
            ports: Vec::new(),
            uplink: None,
            poll_us: 0,
            workers: 0,
            worker_cpus: Vec::new(),
            policy: None,
            rules: Vec::new(),
            rule_positions: Vec::new(),
            segments: Vec::new(),
            routes: Vec::new(),
            router_mac: None,
            balancers: Vec::new(),
            max_ports: None,
            metrics_address: None,
        }
    }
}

impl SwitchConfig {
    pub fn from_file(path: &Path) -> Result<SwitchConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<SwitchConfig, String> {
        #[derive(Deserialize)]
        struct RulePositions {
            #[serde(default)]
            rule: Vec<toml::Spanned<serde::de::IgnoredAny>>,
        }
        let mut config: SwitchConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let positions: RulePositions = toml::from_str(text).map_err(|e| e.to_string())?;
        config.rule_positions = positions
            .rule
            .iter()
            .map(|r| {
                let before = &text[..r.span().start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}")
            })
            .collect();
        Ok(config)
    }

    /// Whether a policy is configured: then traffic no rule allows is dropped.
    pub fn has_policy(&self) -> bool {
        self.policy.is_some() || !self.rules.is_empty()
    }

    /// Where rule `i` was written, for errors: its position in the file, or its number.
    pub fn rule_at(&self, i: usize) -> String {
        let name = self.rules[i]
            .name
            .as_ref()
            .map_or(String::new(), |n| format!(" '{n}'"));
        match self.rule_positions.get(i) {
            Some(pos) => format!("rule {}{name} ({pos})", i + 1),
            None => format!("rule {}{name}", i + 1),
        }
    }

    pub fn router_mac(&self) -> MacAddr {
        self.router_mac.unwrap_or(DEFAULT_ROUTER_MAC)
    }

    /// Largest IP packet forwarded as one frame.
    pub fn forward_mtu(&self) -> u16 {
        self.mtu.unwrap_or(DEFAULT_FORWARD_MTU)
    }

    /// Largest Ethernet frame (without the virtio-net header) forwarded as one frame.
    pub fn max_frame_len(&self) -> usize {
        usize::from(self.forward_mtu()) + 14
    }

    /// Who may connect to the control socket, resolved.
    pub fn control_socket_access(&self) -> Result<socket_access::SocketAccess, String> {
        socket_access::SocketAccess::resolve(
            self.control_socket_owner.as_deref(),
            self.control_socket_group.as_deref(),
            self.control_socket_mode.as_deref(),
        )
    }

    /// How many VM ports the switch can hold.
    pub fn port_capacity(&self) -> usize {
        match self.max_ports {
            Some(n) => usize::from(n),
            None => usize::from(DEFAULT_MAX_PORTS).max(self.ports.len()),
        }
    }

    /// Checks a config to start a switch from: `validate_running`, and at least one port.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ports.is_empty() {
            return Err(ConfigError::NoPorts);
        }
        self.validate_running()
    }

    /// Checks a config for a running switch, whose ports may all have been deleted.
    pub fn validate_running(&self) -> Result<(), ConfigError> {
        self.control_socket_access()
            .map_err(|m| ConfigError::Control(format!("control socket: {m}")))?;
        if let Some(n) = self
            .max_ports
            .filter(|n| !(1..=MAX_PORTS_LIMIT).contains(n))
        {
            return Err(ConfigError::MaxPorts(n));
        }
        if self.ports.len() > self.port_capacity() {
            return Err(ConfigError::TooManyPorts {
                ports: self.ports.len(),
                max: self.port_capacity(),
            });
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65521).contains(&mtu) {
                return Err(ConfigError::Mtu(u32::from(mtu)));
            }
        }
        if self.poll_us > 1_000_000 {
            return Err(ConfigError::PollUs(self.poll_us));
        }
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::Workers(self.workers));
        }
        if let Err((cpu, allowed)) = crate::cpu_set::check(&self.worker_cpus) {
            let allowed = allowed.iter().map(|c| c.to_string()).collect::<Vec<_>>();
            return Err(ConfigError::WorkerCpu {
                cpu,
                allowed: format!("allowed: {}", allowed.join(",")),
            });
        }
        if let Some(up) = &self.uplink {
            let bad = |message: &str| ConfigError::Uplink {
                spec: up.tap.clone(),
                message: message.to_string(),
            };
            if up.tap.is_empty() || up.tap.len() > 15 {
                return Err(bad("the tap name must have 1 to 15 characters"));
            }
            if up.trunk && up.vlan.is_some() {
                return Err(bad(
                    "trunk carries every VLAN: give vlan= or trunk, not both",
                ));
            }
            if up.vlan.is_some_and(|v| !(1..=4094).contains(&v)) {
                return Err(bad("vlan is out of range: use 1..=4094"));
            }
            if !(1..=MAX_QUEUE_PAIRS).contains(&up.queues) {
                return Err(bad("queues is out of range: use 1..=16"));
            }
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        for p in &self.ports {
            let err = |message: String| ConfigError::Port {
                port: p.name.clone(),
                message,
            };
            if p.name.is_empty() || p.name.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(err(
                    "name must be non-empty, without spaces or commas".into()
                ));
            }
            if self.uplink.is_some() && p.name == "uplink" {
                return Err(err(
                    "'uplink' names the tap uplink in counters and commands; give this \
                     port another name"
                        .into(),
                ));
            }
            if !names.insert(&p.name) {
                return Err(err(
                    "name is used by two ports; give each port its own".into()
                ));
            }
            // A port on an inherited socket (`--fd`, `Server::start_with`) has no path.
            if !p.socket.as_os_str().is_empty() && !sockets.insert(&p.socket) {
                return Err(err(format!(
                    "socket {} is used by two ports; give each port its own",
                    p.socket.display()
                )));
            }
            if let Some(v) = p.vlan {
                if !(1..=4094).contains(&v) {
                    return Err(err(format!("vlan {v} is out of range: use 1..=4094")));
                }
            }
            p.socket_access().map_err(err)?;
            if p.mode == PortMode::Client {
                if p.socket.as_os_str().is_empty() {
                    return Err(err("mode client needs socket=PATH: QEMU's socket".into()));
                }
                if p.socket_owner.is_some() || p.socket_group.is_some() || p.socket_mode.is_some() {
                    return Err(err(
                        "socket_owner, socket_group and socket_mode apply to sockets the switch \
                         creates; in mode client QEMU creates the socket"
                            .into(),
                    ));
                }
            }
            if let Some(n) = p.max_macs {
                let most = crate::switch::MAC_PER_PORT_LIMIT;
                if n == 0 || usize::from(n) > most {
                    return Err(err(format!("max_macs {n} is out of range: use 1..={most}")));
                }
            }
            if !(1..=MAX_QUEUE_PAIRS).contains(&p.queues) {
                return Err(err(format!(
                    "queues {} is out of range: use 1..={MAX_QUEUE_PAIRS}",
                    p.queues
                )));
            }
            for (what, rate) in [("rate_tx", &p.rate_tx), ("rate_rx", &p.rate_rx)] {
                if let Some(r) = rate {
                    r.check().map_err(|m| err(format!("{what}: {m}")))?;
                }
            }
            if let Some(m) = p.mac {
                if m.is_multicast() || m == MacAddr::default() {
                    return Err(err(format!("mac {m} must be a unicast, non-zero address")));
                }
                if m == self.router_mac() {
                    return Err(err(format!(
                        "mac {m} is the switch's gateway MAC; give the port another, or set \
                         router_mac"
                    )));
                }
            }
        }
        if self.router_mac().is_multicast() || self.router_mac() == MacAddr::default() {
            return Err(ConfigError::Routing(format!(
                "router_mac {} must be a unicast, non-zero address",
                self.router_mac()
            )));
        }
        route::check(self)?;
        north_south::check(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_specs() {
        let p = PortConfig::parse_spec(
            "name=web1,socket=/tmp/w.sock,vlan=10,mac=52:54:00:00:00:01,queues=4",
        )
        .unwrap();
        assert_eq!(p.name, "web1");
        assert_eq!(p.socket, PathBuf::from("/tmp/w.sock"));
        assert_eq!(p.vlan, Some(10));
        assert_eq!(p.mac.unwrap().to_string(), "52:54:00:00:00:01");
        assert_eq!(p.queues, 4);
        assert_eq!(p.max_macs, None);
        let secured = PortConfig::parse_spec("name=a,socket=/a,max_macs=2").unwrap();
        assert_eq!(secured.max_macs, Some(2));
        let mut c = SwitchConfig {
            ports: vec![secured],
            ..Default::default()
        };
        c.validate().unwrap();
        c.ports[0].max_macs = Some(0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_macs 0") && e.contains("1..=1024"), "{e}");
        for (bad, needle) in [
            ("name=a,socket=/x,max_macs=many", "max_macs 'many'"),
            ("socket=/x", "missing name"),
            ("name=a", "missing socket"),
            ("name=a,socket=/x,vlan=ten", "vlan 'ten'"),
            ("name=a,socket=/x,colour=red", "unknown key 'colour'"),
            ("name=a,socket=/x,mac=zz", "not a MAC"),
            ("name=a,socket", "not key=value"),
        ] {
            let e = PortConfig::parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_and_validates_files() {
        let c = SwitchConfig::from_toml(
            "mtu = 1500\n[[port]]\nname = \"a\"\nsocket = \"/a\"\nvlan = 10\n[[port]]\nname = \"b\"\nsocket = \"/b\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_frame_len(), 1514);
        assert_eq!(c.ports[1].segment(), 0);
        assert!(
            SwitchConfig::from_toml("[[port]]\nname = \"a\"\nsocket = \"/a\"\nspeed = 1\n")
                .unwrap_err()
                .contains("speed")
        );

        let mut dup = c.clone();
        dup.ports[1].socket = "/a".into();
        assert!(dup
            .validate()
            .unwrap_err()
            .to_string()
            .contains("socket /a is used by two"));
        let mut v = c.clone();
        v.ports[0].vlan = Some(4095);
        assert!(v.validate().unwrap_err().to_string().contains("vlan 4095"));
        let mut q = c.clone();
        q.ports[0].queues = 17;
        assert!(q.validate().is_err());
        let mut m = c.clone();
        m.mtu = Some(20);
        assert!(m.validate().is_err());
        // With an uplink, "uplink" is its name: a VM port cannot take it.
        let mut u = c.clone();
        u.ports[1].name = "uplink".into();
        u.validate().unwrap();
        u.uplink = Some(UplinkConfig::parse_spec("tap:vnet0").unwrap());
        let e = u.validate().unwrap_err().to_string();
        assert!(e.contains("'uplink' names the tap uplink"), "{e}");
        assert!(matches!(
            SwitchConfig::default().validate(),
            Err(ConfigError::NoPorts)
        ));
        let e = SwitchConfig::from_file(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"));
    }
}
