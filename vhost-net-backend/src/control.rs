//! The control socket's commands: counters, the policy's rules and flows, and changes to
//! the policy at run time (a reload of the config, or rules and ports edited one at a
//! time). Every reply is one line of JSON; a refused change leaves everything as it was.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use log::info;
use serde::Serialize;
use serde_json::{json, Value};

use crate::balancer::Balancer;
use crate::capture;
use crate::config::policy::{OneOrMany, PortItem};
use crate::config::{Action, PortConfig, PortMode, RateConfig, RuleConfig, SwitchConfig};
use crate::counters::CounterSnapshot;
use crate::datapath::{ports, Datapath};
use crate::endpoint::SwitchPort;
use crate::packet::l3::Ip;
use crate::policy::conntrack::{tcp, Conn};
use crate::policy::flow_log::{proto_name, tcp_flags_text};
use crate::policy::rules::RuleSet;
use crate::port_sockets::{self, PortSockets};
use crate::types::PortId;

/// Reads the config again (the file and command line it came from).
pub type Reloader = Box<dyn Fn() -> Result<SwitchConfig, String> + Send + Sync>;

pub const COMMANDS: &str = "stats, rules, flows [port=NAME] [addr=IP], flush [port=NAME] \
[addr=IP] [proto=P] [dport=N], reload, rule-add [at=N] action=allow|deny [from=..] [to=..] \
[proto=..] [ports=..] [name=..] [rate_bps=N] [rate_pps=N], rule-remove NAME|N, \
rule-move NAME|N TO, port-set NAME [groups=A,B] [addresses=IP,IP] [tx_bps=N] [tx_pps=N] \
[rx_bps=N] [rx_pps=N], port-add name=NAME,socket=PATH[,vlan=ID][,mac=MAC][,queues=N]..., \
port-del NAME, capture PORT FILE [count=N], capture-stop PORT, routes, neighbours, leases, balancers, ports, macs [port=NAME], mac-flush [port=NAME]";

#[derive(Serialize)]
struct PortStats {
    name: String,
    vlan: u16,
    connected: bool,
    #[serde(flatten)]
    counters: CounterSnapshot,
}

/// Counters of every port as one JSON document.
pub fn stats_json(dp: &Datapath) -> String {
    let ports: Vec<PortStats> = dp
        .ports
        .in_use()
        .iter()
        .map(|p| PortStats {
            name: p.name.clone(),
            vlan: p.segment,
            connected: p.connected(),
            counters: p.counters.snapshot(),
        })
        .collect();
    let c = &dp.policy.counters;
    json!({
        "ports": ports,
        "mac_entries": dp.switch.macs.len(),
        "flows": dp.policy.conntrack.len(),
        "flows_refused_table_full": c.table_full.load(Ordering::Relaxed),
        "flows_refused_port_full": c.port_full.load(Ordering::Relaxed),
        "spoofed": c.spoofed.load(Ordering::Relaxed),
        "denied_unlogged": dp.policy.denied.unlogged.load(Ordering::Relaxed),
    })
    .to_string()
}

pub struct Control {
    dp: Arc<Datapath>,
    sockets: Arc<PortSockets>,
    balancers: Vec<Arc<Balancer>>,
    /// The config in force, edited by the commands.
    running: Mutex<SwitchConfig>,
    reloader: Mutex<Option<Reloader>>,
}

impl Control {
    pub fn new(
        dp: Arc<Datapath>,
        sockets: Arc<PortSockets>,
        running: SwitchConfig,
        balancers: Vec<Arc<Balancer>>,
    ) -> Control {
        Control {
            dp,
            sockets,
            balancers,
            running: Mutex::new(running),
            reloader: Mutex::new(None),
        }
    }

    /// How `reload` reads the config again.
    pub fn set_reloader(&self, reloader: Reloader) {
        *self.reloader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reloader);
    }

    /// Answers one command line.
    pub fn handle(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        let mut cmd = words.next().unwrap_or("").to_string();
        let mut args: Vec<&str> = words.collect();
        // `port add|del|set ...`, as OVS's and ip's users type it.
        if cmd == "port" && !args.is_empty() {
            cmd = format!("port-{}", args.remove(0));
        }
        let cmd = cmd.as_str();
        let reply = match cmd {
            "stats" => return stats_json(&self.dp),
            "rules" => Ok(self.rules()),
            "flows" => filter(&args).map(|f| self.flows(&f)),
            "flush" => filter(&args).map(|f| {
                let n = self.dp.policy.flush(|c| f.matches(c, &self.dp));
                json!({ "flushed": n })
            }),
            "reload" => self.reload().map(|()| json!({ "ok": true })),
            "rule-add" => self.edit(|c| rule_add(c, &args)),
            "rule-remove" => self.edit(|c| {
                let i = rule_index(c, args.first().copied())?;
                c.rules.remove(i);
                Ok(())
            }),
            "rule-move" => self.edit(|c| {
                let i = rule_index(c, args.first().copied())?;
                let to: usize = args
                    .get(1)
                    .and_then(|t| t.parse().ok())
                    .filter(|t| (1..=c.rules.len()).contains(t))
                    .ok_or(format!("rule-move needs a position 1..={}", c.rules.len()))?;
                let r = c.rules.remove(i);
                c.rules.insert(to - 1, r);
                Ok(())
            }),
            "port-set" => self.edit(|c| port_set(c, &args)),
            "port-add" => self.edit(|c| port_add(c, &args)),
            "port-del" => self.edit(|c| port_del(c, &args)),
            "capture" => self.capture(&args),
            "capture-stop" => self.capture_stop(&args),
            "routes" => Ok(self.routes()),
            "neighbours" => Ok(self.neighbours()),
            "leases" => Ok(self.leases()),
            "balancers" => Ok(self.balancers()),
            "ports" => Ok(self.ports()),
            "macs" => self.port_arg(&args).map(|p| self.macs(p)),
            "mac-flush" => self
                .port_arg(&args)
                .map(|p| json!({ "flushed": self.dp.switch.macs.flush(p) })),
            "" => Err(format!("no command; try one of: {COMMANDS}")),
            other => Err(format!("unknown command '{other}'; try one of: {COMMANDS}")),
        };
        match reply {
            Ok(v) => v.to_string(),
            Err(e) => json!({ "error": e }).to_string(),
        }
    }

    /// Reads the config again and applies what changed in the policy; on an error the
    /// running rules stay.
    pub fn reload(&self) -> Result<(), String> {
        let new = {
            let reloader = self.reloader.lock().unwrap_or_else(|e| e.into_inner());
            let reloader = reloader
                .as_ref()
                .ok_or("this switch was not started from a config it can read again")?;
            reloader()?
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        self.apply(&mut running, new)
    }

    /// Applies `edit` to a copy of the running config, then puts it in force.
    fn edit(
        &self,
        edit: impl FnOnce(&mut SwitchConfig) -> Result<(), String>,
    ) -> Result<Value, String> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = running.clone();
        // Positions in the file no longer hold once rules are edited.
        new.rule_positions.clear();
        edit(&mut new)?;
        self.apply(&mut running, new)?;
        Ok(json!({ "ok": true }))
    }

    /// Puts `new` in force over `running`: the policy and routes, and the ports that came,
    /// went or changed (each brought down or up alone; the others never notice). On an
    /// error nothing changed, except when a port's socket could not be bound: that port
    /// is left out (the error names it) and the rest is in force.
    fn apply(&self, running: &mut SwitchConfig, new: SwitchConfig) -> Result<(), String> {
        let (old, new) = (&*running, &new);
        new.validate_running().map_err(|e| e.to_string())?;
        let changed = restart_only_changes(old, new);
        if !changed.is_empty() {
            return Err(format!(
                "{} changed, which only a restart applies; nothing was changed",
                changed.join(", ")
            ));
        }
        let plan = self.dp.ports.plan(old, new)?;
        RuleSet::compile(&plan.by_id).map_err(|e| e.to_string())?;
        for &id in &plan.down {
            let name = self.dp.ports.name(id);
            self.sockets.stop(id);
            self.dp.ports.set(SwitchPort::vacant(id));
            info!("port {name}: deleted");
        }
        let mut applied = new.clone();
        let mut failed = Vec::new();
        let mut listening = Vec::new();
        for (id, p) in &plan.up {
            match port_sockets::open(p) {
                Ok(l) => {
                    self.dp.ports.set(ports::vm_port(*id, p));
                    listening.push((*id, l));
                }
                Err(e) => {
                    applied.ports.retain(|a| a.name != p.name);
                    failed.push(e.to_string());
                }
            }
        }
        // The switch and the policy see the new table before a guest can connect.
        self.dp.switch.set_ports(&self.dp.ports.profiles());
        for id in plan.down.iter().chain(plan.up.iter().map(|(id, _)| id)) {
            self.dp.switch.macs.forget_port(*id);
            self.dp.router.neighbours.forget_port(*id);
            self.dp
                .policy
                .flush(|c| c.orig_port == *id || c.reply_port == *id);
        }
        let by_id = self.dp.ports.by_id(&applied);
        // Checked above; it can fail only if a port left out (its socket) was the one
        // that gave a rule its group: the running rules stay, the ports are in force.
        if let Err(e) = self.dp.policy.replace(&by_id) {
            failed.push(format!("{e}; the rules in force are the old ones"));
            applied.rules = old.rules.clone();
            applied.rule_positions = old.rule_positions.clone();
            applied.policy = old.policy.clone();
        }
        self.dp.router.set_ports(&by_id);
        for (id, l) in listening {
            let name = self.dp.ports.name(id);
            match self.sockets.start(id, l) {
                Ok(()) => info!("port {name}: added"),
                Err(e) => failed.push(e.to_string()),
            }
        }
        *running = applied;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// `capture PORT FILE [count=N]`: starts writing the port's frames to FILE (pcap).
    fn capture(&self, args: &[&str]) -> Result<Value, String> {
        let usage = "capture needs a port and an absolute file: capture PORT FILE [count=N]";
        let (Some(name), Some(file)) = (args.first(), args.get(1)) else {
            return Err(usage.into());
        };
        let mut count = capture::DEFAULT_COUNT;
        for (k, v) in key_values(&args[2..])? {
            match k {
                "count" => {
                    count = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(format!("count '{v}' is not a whole number above 0"))?
                }
                _ => return Err(format!("unknown key '{k}' (count)")),
            }
        }
        let port = self.port_named(name)?;
        capture::start(port, std::path::Path::new(file), count)?;
        Ok(json!({ "capturing": name, "file": file, "count": count }))
    }

    /// `capture-stop PORT`: ends the port's capture, its file complete.
    fn capture_stop(&self, args: &[&str]) -> Result<Value, String> {
        let [name] = args else {
            return Err("capture-stop needs one port name".into());
        };
        let port = self.port_named(name)?;
        let was = port.capture.active();
        port.capture.stop();
        Ok(json!({ "stopped": was }))
    }

    fn routes(&self) -> Value {
        let r = &self.dp.router;
        let segments: Vec<Value> = r
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let gws: Vec<String> = s.gateways.iter().map(|g| g.to_string()).collect();
                let (packets, bytes) = r.segment_traffic(i);
                json!({ "segment": s.name, "vlan": s.vlan, "gateways": gws.join(" "),
                        "packets": packets, "bytes": bytes })
            })
            .collect();
        let routes: Vec<Value> = r
            .routes
            .iter()
            .enumerate()
            .map(|(i, (to, via))| {
                let seg = r.segment_holding(*via);
                let (packets, bytes) = r.route_traffic(i);
                json!({
                    "to": to.to_string(),
                    "via": via.to_string(),
                    "segment": seg.map(|s| s.name.as_str()),
                    "packets": packets,
                    "bytes": bytes,
                })
            })
            .collect();
        json!({ "router_mac": r.mac.to_string(), "segments": segments, "routes": routes })
    }

    fn neighbours(&self) -> Value {
        let rows: Vec<Value> = self
            .dp
            .router
            .neighbours
            .rows()
            .iter()
            .map(|n| {
                json!({
                    "ip": n.ip.to_string(),
                    "mac": n.at.mac.to_string(),
                    "port": self.dp.ports.name(n.at.port),
                    "vlan": n.at.segment,
                    "source": if n.age.is_some() { "learned" } else { "config" },
                    "age_secs": n.age,
                })
            })
            .collect();
        json!({ "neighbours": rows })
    }

    /// Each balancer's backends: health, slots, checks, and the connections to it the
    /// policy tracks (null without a policy).
    fn balancers(&self) -> Value {
        let conns = self
            .dp
            .policy
            .active()
            .then(|| self.dp.policy.conntrack.all());
        let rows: Vec<Value> = self
            .balancers
            .iter()
            .flat_map(|b| {
                let port = b.config.port;
                let conns = &conns;
                b.rows().into_iter().map(move |r| {
                    let ip = Ip::v4(r.address.octets());
                    let open = conns.as_ref().map(|all| {
                        all.iter()
                            .filter(|c| c.key.dst == ip && c.key.dport == port)
                            .count()
                    });
                    json!({
                        "balancer": b.config.name,
                        "backend": format!("{}:{port}", r.address),
                        "state": if r.up { "up" } else { "down" },
                        "slots": r.slots,
                        "connections": open,
                        "checks_passed": r.checks_passed,
                        "checks_failed": r.checks_failed,
                        "last_error": r.last_error,
                    })
                })
            })
            .collect();
        json!({ "balancers": rows })
    }

    /// `port=NAME` among `args`, if given: that port's id.
    fn port_arg(&self, args: &[&str]) -> Result<Option<PortId>, String> {
        let Some(name) = args.iter().find_map(|a| a.strip_prefix("port=")) else {
            return match args.first() {
                Some(a) => Err(format!("'{a}' is not port=NAME")),
                None => Ok(None),
            };
        };
        self.port_named(name).map(|p| Some(p.id))
    }

    fn port_named(&self, name: &str) -> Result<Arc<SwitchPort>, String> {
        self.dp
            .ports
            .by_name(name)
            .ok_or_else(|| format!("no port named '{name}'"))
    }

    /// Every port: kind, segment, queue pairs offered, whether a guest is attached, what
    /// it negotiated, its configured MAC and how many MACs it holds in the table.
    fn ports(&self) -> Value {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let rows: Vec<Value> = self
            .dp
            .ports
            .in_use()
            .iter()
            .map(|p| {
                let config = running.ports.iter().find(|c| c.name == p.name);
                let mode = config.map(|c| match c.mode {
                    PortMode::Server => "server",
                    PortMode::Client => "client",
                });
                let (kind, features) = match p.as_vm() {
                    Some(vm) => {
                        let rx = vm.vm.rx_read();
                        ("vm", rx.features_acked.then_some(rx.features))
                    }
                    None => ("tap", None),
                };
                json!({
                    "name": p.name,
                    "kind": kind,
                    "vlan": p.segment,
                    "queue_pairs": p.queue_pairs,
                    "connected": p.connected(),
                    "features": features.map(|f| format!("{f:#x}")),
                    "mac": p.mac.map(|m| m.to_string()),
                    "macs_learned": self.dp.switch.macs.count_of(p.id),
                    "mode": mode,
                    "socket": config.map(|c| c.socket.display().to_string()),
                })
            })
            .collect();
        json!({ "ports": rows })
    }

    /// The MAC table, of one port or all.
    fn macs(&self, port: Option<PortId>) -> Value {
        let rows: Vec<Value> = self
            .dp
            .switch
            .macs
            .rows()
            .into_iter()
            .filter(|r| port.is_none_or(|p| p == r.2))
            .map(|(vlan, mac, id, age)| {
                json!({ "vlan": vlan, "mac": mac.to_string(), "port": self.dp.ports.name(id), "age_secs": age })
            })
            .collect();
        json!({ "macs": rows })
    }

    fn leases(&self) -> Value {
        let rows: Vec<Value> = self
            .dp
            .router
            .leases()
            .iter()
            .map(|(segment, l)| {
                let port = l.port.map(|p| self.dp.ports.name(p));
                json!({
                    "segment": segment,
                    "address": l.address.to_string(),
                    "port": port,
                    "mac": l.mac.map(|m| m.to_string()),
                    "kind": if l.port.is_some() { "static" } else { "pool" },
                    "expires_in": l.expires_in,
                })
            })
            .collect();
        json!({ "leases": rows })
    }

    fn rules(&self) -> Value {
        let rules = self.dp.policy.rules();
        let mut live = vec![(0u64, 0u64); rules.rules.len()];
        for c in self.dp.policy.conntrack.all() {
            if let Some(l) = c.rule().and_then(|i| live.get_mut(i as usize)) {
                let [a, b] = c.totals();
                l.0 += a.0 + b.0;
                l.1 += a.1 + b.1;
            }
        }
        let list: Vec<Value> = rules
            .rules
            .iter()
            .zip(live)
            .enumerate()
            .map(|(i, (r, (p, b)))| {
                json!({
                    "index": i + 1,
                    "name": r.name,
                    "rule": r.text,
                    "action": r.action.name(),
                    "hits": r.counters.hits.load(Ordering::Relaxed),
                    "packets": r.counters.packets.load(Ordering::Relaxed) + p,
                    "bytes": r.counters.bytes.load(Ordering::Relaxed) + b,
                })
            })
            .collect();
        json!({
            "enabled": rules.enabled,
            "default": rules.default.name(),
            "rules": list,
            "flows": self.dp.policy.conntrack.len(),
        })
    }

    fn flows(&self, f: &FlowFilter) -> Value {
        let rules = self.dp.policy.rules();
        let now = self.dp.policy.now();
        let name = |p: u16| self.dp.ports.name(p);
        let list: Vec<Value> = self
            .dp
            .policy
            .conntrack
            .all()
            .iter()
            .filter(|c| f.matches(c, &self.dp))
            .map(|c| {
                let [a, b] = c.totals();
                let flags = c.dirs[0].flags.load(Ordering::Relaxed)
                    | c.dirs[1].flags.load(Ordering::Relaxed);
                json!({
                    "src_port": name(c.orig_port),
                    "dst_port": name(c.reply_port),
                    "proto": proto_name(c.key.proto),
                    "src": c.key.src.to_string(),
                    "dst": c.key.dst.to_string(),
                    "sport": c.key.sport,
                    "dport": c.key.dport,
                    "segment": c.key.zone,
                    "state": tcp::name(c.state.load(Ordering::Relaxed)),
                    "tcp_flags": tcp_flags_text(flags),
                    "packets": a.0, "bytes": a.1, "packets_back": b.0, "bytes_back": b.1,
                    "rule": rules.decider_name(c.rule()),
                    "expires_in": c.expires_at().saturating_sub(now),
                })
            })
            .collect();
        json!({ "flows": list })
    }
}

/// What of a config only a restart applies, by name, where `old` and `new` differ.
fn restart_only_changes(old: &SwitchConfig, new: &SwitchConfig) -> Vec<String> {
    let mut changed = Vec::new();
    if old.mtu != new.mtu {
        changed.push("mtu".to_string());
    }
    if old.mac_ageing_secs != new.mac_ageing_secs {
        changed.push("mac_ageing_secs".into());
    }
    if (
        &old.control_socket,
        &old.control_socket_owner,
        &old.control_socket_group,
        &old.control_socket_mode,
    ) != (
        &new.control_socket,
        &new.control_socket_owner,
        &new.control_socket_group,
        &new.control_socket_mode,
    ) {
        changed.push("control_socket (or its owner, group, mode)".into());
    }
    if old.uplink != new.uplink {
        changed.push("uplink".into());
    }
    if old.poll_us != new.poll_us {
        changed.push("poll_us".into());
    }
    if (old.workers, &old.worker_cpus) != (new.workers, &new.worker_cpus) {
        changed.push("workers or worker_cpus".into());
    }
    if (&old.segments, &old.routes, old.router_mac) != (&new.segments, &new.routes, new.router_mac)
    {
        changed.push("[[segment]], [[route]] or router_mac".into());
    }
    if old.max_ports != new.max_ports {
        changed.push("max_ports".into());
    }
    // Built with their health checks and the host's NAT at start.
    if old.balancers != new.balancers {
        changed.push("[[balancer]]".into());
    }
    if old.metrics_address != new.metrics_address {
        changed.push("metrics_address".into());
    }
    let settings = |c: &SwitchConfig| {
        c.policy.clone().map(|mut p| {
            p.default = Action::Deny;
            p
        })
    };
    if settings(old).unwrap_or_default() != settings(new).unwrap_or_default() {
        changed.push("[policy] limits or flow log".into());
    }
    changed
}

/// Selects tracked flows: by port name, by address (either end), protocol, destination port.
#[derive(Default)]
struct FlowFilter {
    port: Option<String>,
    addr: Option<Ip>,
    proto: Option<String>,
    dport: Option<u16>,
}

impl FlowFilter {
    fn matches(&self, c: &Conn, dp: &Datapath) -> bool {
        let port_named = |id: u16, n: &str| {
            dp.ports
                .get(id)
                .is_some_and(|p| !p.is_vacant() && p.name == n)
        };
        self.port
            .as_deref()
            .is_none_or(|n| port_named(c.orig_port, n) || port_named(c.reply_port, n))
            && self.addr.is_none_or(|a| c.key.src == a || c.key.dst == a)
            && self
                .proto
                .as_deref()
                .is_none_or(|p| proto_name(c.key.proto) == p)
            && self.dport.is_none_or(|d| c.key.dport == d)
    }
}

fn key_values<'a>(args: &[&'a str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .ok_or_else(|| format!("'{a}' is not key=value"))
        })
        .collect()
}

fn filter(args: &[&str]) -> Result<FlowFilter, String> {
    let mut f = FlowFilter::default();
    for (k, v) in key_values(args)? {
        match k {
            "port" => f.port = Some(v.to_string()),
            "addr" => {
                f.addr = Some(Ip::from(
                    v.parse::<IpAddr>()
                        .map_err(|_| format!("addr '{v}' is not an IP address"))?,
                ))
            }
            "proto" => f.proto = Some(v.to_string()),
            "dport" => {
                f.dport = Some(
                    v.parse()
                        .map_err(|_| format!("dport '{v}' is not a port"))?,
                )
            }
            _ => return Err(format!("unknown filter '{k}' (port, addr, proto, dport)")),
        }
    }
    Ok(f)
}

fn list(v: &str) -> OneOrMany<String> {
    OneOrMany::Many(v.split(',').map(str::to_string).collect())
}

fn rule_add(c: &mut SwitchConfig, args: &[&str]) -> Result<(), String> {
    let mut rule = RuleConfig {
        name: None,
        action: Action::Deny,
        from: OneOrMany::One("any".into()),
        to: OneOrMany::One("any".into()),
        proto: None,
        ports: None,
        rate: None,
    };
    let mut at = c.rules.len() + 1;
    let mut action = None;
    for (k, v) in key_values(args)? {
        match k {
            "at" => {
                at = v
                    .parse()
                    .ok()
                    .filter(|a| (1..=c.rules.len() + 1).contains(a))
                    .ok_or(format!("at={v}: use a position 1..={}", c.rules.len() + 1))?
            }
            "action" => {
                action = Some(match v {
                    "allow" => Action::Allow,
                    "deny" => Action::Deny,
                    _ => return Err(format!("action '{v}' is not allow or deny")),
                })
            }
            "name" => rule.name = Some(v.to_string()),
            "from" => rule.from = list(v),
            "to" => rule.to = list(v),
            "proto" => rule.proto = Some(list(v)),
            "ports" => {
                rule.ports = Some(OneOrMany::Many(
                    v.split(',')
                        .map(|p| PortItem::Text(p.to_string()))
                        .collect(),
                ))
            }
            "rate_bps" | "rate_pps" => set_rate(&mut rule.rate, k, v)?,
            _ => {
                return Err(format!(
                    "unknown key '{k}' (at, action, name, from, to, proto, ports, rate_bps, \
                     rate_pps)"
                ))
            }
        }
    }
    rule.action = action.ok_or("rule-add needs action=allow or action=deny")?;
    if rule
        .name
        .as_ref()
        .is_some_and(|n| c.rules.iter().any(|r| r.name.as_ref() == Some(n)))
    {
        return Err("a rule of that name exists; give another name".into());
    }
    c.rules.insert(at - 1, rule);
    Ok(())
}

/// A rule by name (a rule without one by the name `rules` shows for it, `ruleN`), or by
/// position from 1.
fn rule_index(c: &SwitchConfig, which: Option<&str>) -> Result<usize, String> {
    let which = which.ok_or("name the rule (its name or position)")?;
    if let Some(i) = c
        .rules
        .iter()
        .position(|r| r.name.as_deref() == Some(which))
    {
        return Ok(i);
    }
    if let Some(i) = c
        .rules
        .iter()
        .enumerate()
        .position(|(i, r)| r.name.is_none() && which == r.shown_name(i))
    {
        return Ok(i);
    }
    which
        .parse::<usize>()
        .ok()
        .filter(|i| (1..=c.rules.len()).contains(i))
        .map(|i| i - 1)
        .ok_or(format!("no rule named or numbered '{which}'"))
}

fn port_set(c: &mut SwitchConfig, args: &[&str]) -> Result<(), String> {
    let name = args.first().ok_or("port-set needs a port name")?;
    let port = c
        .ports
        .iter_mut()
        .find(|p| p.name == *name)
        .ok_or(format!("no port named '{name}'"))?;
    for (k, v) in key_values(&args[1..])? {
        match k {
            "groups" => {
                port.groups = v
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(String::from)
                    .collect()
            }
            "addresses" => {
                port.addresses = v
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(|a| a.parse().map_err(|_| format!("'{a}' is not an IP address")))
                    .collect::<Result<_, _>>()?
            }
            "tx_bps" | "tx_pps" => set_rate(&mut port.rate_tx, k, v)?,
            "rx_bps" | "rx_pps" => set_rate(&mut port.rate_rx, k, v)?,
            _ => {
                return Err(format!(
                    "unknown key '{k}' (groups, addresses, tx_bps, tx_pps, rx_bps, rx_pps)"
                ))
            }
        }
    }
    Ok(())
}

/// `port-add name=NAME,socket=PATH[,vlan=..]...`: the same spec as `--port`.
fn port_add(c: &mut SwitchConfig, args: &[&str]) -> Result<(), String> {
    let [spec] = args else {
        return Err(
            "port-add needs one spec: name=NAME,socket=PATH[,vlan=ID][,mac=MAC]\
                    [,queues=N][,group=G]...[,ip=ADDR]..."
                .into(),
        );
    };
    let port = PortConfig::parse_spec(spec).map_err(|e| e.to_string())?;
    if port.socket.as_os_str().is_empty() {
        return Err(format!("port spec '{spec}': socket=PATH is missing"));
    }
    if c.ports.iter().any(|p| p.name == port.name) {
        return Err(format!(
            "a port named '{}' exists: delete it first, or use port-set",
            port.name
        ));
    }
    c.ports.push(port);
    Ok(())
}

/// `port-del NAME`.
fn port_del(c: &mut SwitchConfig, args: &[&str]) -> Result<(), String> {
    let [name] = args else {
        return Err("port-del needs one port name".into());
    };
    let before = c.ports.len();
    c.ports.retain(|p| p.name != *name);
    if c.ports.len() == before {
        return Err(format!("no port named '{name}'"));
    }
    Ok(())
}

/// Sets the bits/s (`*_bps`) or packets/s (`*_pps`) of a rate from `v`; 0 removes it.
fn set_rate(rate: &mut Option<RateConfig>, key: &str, v: &str) -> Result<(), String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("{key} '{v}' is not a whole number"))?;
    let r = rate.get_or_insert_with(RateConfig::default);
    if key.ends_with("_bps") {
        r.bits_per_sec = (n > 0).then_some(n);
        r.burst_bytes = None;
    } else {
        r.packets_per_sec = (n > 0).then_some(n);
        r.burst_packets = None;
    }
    if r.bits_per_sec.is_none() && r.packets_per_sec.is_none() {
        *rate = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BALANCER: &str = "[[balancer]]\nname = \"web\"\nport = 80\n\
                            backends = [\"10.10.1.10\", \"10.10.1.11\"]\n";

    fn changes(old: &str, new: &str) -> Vec<String> {
        let parse = |t: &str| SwitchConfig::from_toml(t).expect("a valid file");
        restart_only_changes(&parse(old), &parse(new))
    }

    #[test]
    fn a_reload_names_what_only_a_restart_applies() {
        assert!(changes(BALANCER, BALANCER).is_empty());
        assert_eq!(changes("mtu = 1500\n", "mtu = 9000\n"), ["mtu"]);
        // A balancer's backends, checks or presence: its checks and the host's NAT were
        // built at start (a reload said ok and changed nothing).
        let fewer = BALANCER.replace(", \"10.10.1.11\"", "");
        assert_eq!(changes(BALANCER, &fewer), ["[[balancer]]"]);
        assert_eq!(changes(BALANCER, ""), ["[[balancer]]"]);
        assert_eq!(
            changes(BALANCER, &format!("{BALANCER}interval_ms = 200\n")),
            ["[[balancer]]"]
        );
    }
}
