//! A topology on our switch: the vhost-net-backend configuration its networks, VMs and
//! allowed flows make. Each network is a routed segment (its own VLAN) with DHCP; each VM
//! NIC a port in it, in the network's group, with its address as the static binding; each
//! `[[allow]]` a rule, default deny; the uplink a tap towards the host with NAT for the
//! networks that may go out and the forwards (a balancer where a network has several VMs).

use std::net::Ipv4Addr;

use bridge_plugin::net::{parse_cidr, subnet};
use vhost_net_backend::config::policy::{OneOrMany, PortItem};
use vhost_net_backend::config::{
    Action, BalancerConfig, DhcpConfig, ForwardConfig, PolicyConfig, PortConfig, Proto, RuleConfig,
    SegmentConfig, SwitchConfig, UplinkConfig,
};

use crate::render::Layout;
use crate::topology::Topology;

/// The uplink's segment; networks take 100, 101, ... in file order.
pub const UPLINK_VLAN: u16 = 4000;

pub fn vlan(topo: &Topology, network: &str) -> u16 {
    let i = topo
        .switch_networks
        .iter()
        .position(|n| n.name == network)
        .unwrap_or(0);
    100 + i as u16
}

/// The switch's and the host's addresses on the uplink, with the subnet's length.
pub fn uplink_addresses(topo: &Topology) -> (Ipv4Addr, Ipv4Addr, u8) {
    let (a, len) =
        parse_cidr(&topo.switch.uplink_subnet).unwrap_or((Ipv4Addr::new(100, 64, 0, 0), 30));
    let base = u32::from(subnet(a, len));
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2), len)
}

fn one(s: &str) -> OneOrMany<String> {
    OneOrMany::One(s.to_string())
}

/// `switch_config`, checked as the switch will check it at start (rules compiled too), so
/// that `check` and `up` refuse what the switch would.
pub fn checked_config(topo: &Topology, layout: &Layout) -> Result<SwitchConfig, String> {
    let c = switch_config(topo, layout);
    c.validate()
        .map_err(|e| format!("the switch would refuse this file: {e}"))?;
    vhost_net_backend::policy::rules::RuleSet::compile(&c)
        .map_err(|e| format!("the switch would refuse this file's rules: {e}"))?;
    Ok(c)
}

/// The switch configuration of `topo` (on the switch), its files in `layout`.
pub fn switch_config(topo: &Topology, layout: &Layout) -> SwitchConfig {
    let mut c = SwitchConfig {
        control_socket: Some(layout.switch_control()),
        policy: Some(PolicyConfig {
            flow_log: Some(layout.state_dir.join("flows.log")),
            flow_log_interval_secs: 10,
            ..PolicyConfig::default()
        }),
        ..SwitchConfig::default()
    };
    for vm in &topo.vms {
        for nic in topo.nics(vm) {
            c.ports.push(PortConfig {
                socket: layout.vm_socket(&nic.port),
                vlan: Some(vlan(topo, &nic.network)),
                mac: Some(nic.mac),
                queues: topo.switch.queues,
                groups: vec![nic.network.clone()],
                addresses: nic.ip().map(|a| vec![a.into()]).unwrap_or_default(),
                name: nic.port,
                ..PortConfig::default()
            });
        }
    }
    for n in &topo.switch_networks {
        c.segments.push(SegmentConfig {
            vlan: Some(vlan(topo, &n.name)),
            name: Some(n.name.clone()),
            gateway: vec![n.address.clone()],
            dhcp: Some(DhcpConfig {
                pool: None,
                dns: Vec::new(),
                lease_secs: 3600,
                mtu: n.mtu,
            }),
            ra_interval_secs: SegmentConfig::default_ra_interval(),
        });
    }
    let (switch_ip, host_ip, len) = uplink_addresses(topo);
    c.segments.push(SegmentConfig {
        vlan: Some(UPLINK_VLAN),
        name: Some("uplink".into()),
        gateway: vec![format!("{switch_ip}/{len}")],
        dhcp: None,
        ra_interval_secs: SegmentConfig::default_ra_interval(),
    });
    let mut forwards = Vec::new();
    for n in &topo.switch_networks {
        let backends: Vec<Ipv4Addr> = topo
            .nics_on(&n.name)
            .filter_map(|(_, nic)| nic.ip())
            .collect();
        for f in &n.forward {
            let mut fwd = ForwardConfig {
                proto: Proto::Tcp,
                host_port: f.host_port,
                to: None,
                balancer: None,
            };
            if let [only] = backends.as_slice() {
                fwd.to = Some(format!("{only}:{}", f.guest_port));
            } else {
                let name = format!("{}-{}", n.name, f.guest_port);
                if !c.balancers.iter().any(|b| b.name == name) {
                    c.balancers.push(BalancerConfig {
                        name: name.clone(),
                        port: f.guest_port,
                        backends: backends.clone(),
                        interval_ms: 1000,
                        timeout_ms: 500,
                        rise: 2,
                        fall: 2,
                        on_down: f.on_down,
                    });
                }
                fwd.balancer = Some(name);
            }
            forwards.push(fwd);
            c.rules.push(RuleConfig {
                name: Some(format!(
                    "outside -> {} tcp/{} (forward)",
                    n.name, f.guest_port
                )),
                action: Action::Allow,
                from: one("outside"),
                to: one(&n.name),
                proto: Some(one("tcp")),
                ports: Some(OneOrMany::One(PortItem::Number(f.guest_port))),
                rate: None,
            });
        }
        if n.nat {
            c.rules.push(RuleConfig {
                name: Some(format!("{} -> outside (nat)", n.name)),
                action: Action::Allow,
                from: one(&n.name),
                to: one("outside"),
                proto: None,
                ports: None,
                rate: None,
            });
        }
    }
    for a in &topo.allows {
        c.rules.push(RuleConfig {
            name: Some(a.to_string()),
            action: Action::Allow,
            from: one(&a.from),
            to: one(&a.to),
            proto: Some(one(a.proto.name())),
            ports: a.port.map(|p| OneOrMany::One(PortItem::Number(p))),
            rate: None,
        });
    }
    c.uplink = Some(UplinkConfig {
        tap: topo.uplink_tap(),
        vlan: Some(UPLINK_VLAN),
        trunk: false,
        queues: 1,
        host: Some(format!("{host_ip}/{len}")),
        masquerade: topo.switch_networks.iter().any(|n| n.nat),
        forwards,
    });
    c
}
