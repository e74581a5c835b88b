//! `bridge-plugin net up|down|show FILE`: the kernel network modes for QEMU/KVM guests.
//! (The bridge helper QEMU runs is the `qemu-bridge-plugin` binary.)

use std::path::PathBuf;
use std::process::ExitCode;

use bridge_plugin::launch::Launch;
use bridge_plugin::net::{counters, NetFile};
use bridge_plugin::netlink::Netlink;
use bridge_plugin::port::{has_net_admin, PortSettings};

const USAGE: &str = "usage: bridge-plugin net up|down|show FILE [--json]
       bridge-plugin tap --br=BRIDGE [--queues=N] [--id=NETDEV] [--vlan=ID] [--mtu=N]
                         [--isolated=1] [--ingress-mbit=N] [--egress-mbit=N] -- QEMU ARGS...

  up    create the file's bridges, addresses, NAT and the rules between segments
        (default deny, counters on every rule); running it again changes nothing
  down  remove our nftables table and the file's bridges, nothing else
  show  bridges and rule counters (what was allowed and dropped)
  tap   create a multi-queue tap on BRIDGE (vnet headers, vhost-net where the kernel has it)
        and run QEMU with it as `-netdev tap,id=NETDEV,fds=...`: give the device
        netdev=NETDEV (default net0), mq=on,vectors=2N+2";

fn tap(args: &[String]) -> Result<(), String> {
    let split = args.iter().position(|a| a == "--").ok_or(USAGE)?;
    let mut launch = Launch {
        bridge: String::new(),
        queues: 1,
        netdev_id: "net0".into(),
        settings: PortSettings::default(),
        qemu: args[split + 1..].to_vec(),
    };
    for arg in &args[1..split] {
        let (k, v) = arg
            .strip_prefix("--")
            .and_then(|a| a.split_once('='))
            .ok_or_else(|| format!("unexpected argument '{arg}'\n{USAGE}"))?;
        match k {
            "br" => launch.bridge = v.to_string(),
            "id" => launch.netdev_id = v.to_string(),
            "queues" => {
                launch.queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=16).contains(q))
                    .ok_or_else(|| format!("--queues={v}: use 1 to 16"))?
            }
            _ => launch.settings.set(k, v)?,
        }
    }
    if launch.bridge.is_empty() {
        return Err(format!("missing --br=BRIDGE\n{USAGE}"));
    }
    if !has_net_admin() {
        return Err("needs CAP_NET_ADMIN: run it as root".into());
    }
    Err(launch.exec())
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("tap") {
        return tap(args);
    }
    let json = args.iter().any(|a| a == "--json");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--json").collect();
    let (Some(group), Some(verb), Some(file)) = (rest.first(), rest.get(1), rest.get(2)) else {
        return Err(USAGE.into());
    };
    if group.as_str() != "net" {
        return Err(USAGE.into());
    }
    let file_path = PathBuf::from(file.as_str());
    let net = NetFile::load(&file_path).map_err(|e| e.to_string())?;
    if !has_net_admin() {
        return Err("needs CAP_NET_ADMIN: run it as root".into());
    }
    match verb.as_str() {
        "up" => net.up().map_err(|e| e.to_string()),
        "down" => net.down().map_err(|e| e.to_string()),
        "show" => {
            let mut nl = Netlink::open().map_err(|e| e.to_string())?;
            let links = nl.links().map_err(|e| e.to_string())?;
            let rules = counters(&net.table).map_err(|e| e.to_string())?;
            if json {
                let bridges: Vec<_> = net
                    .networks
                    .iter()
                    .map(|n| {
                        let l = links.iter().find(|l| l.name == n.bridge);
                        serde_json::json!({"network": n.name, "bridge": n.bridge, "mode": n.mode,
                            "present": l.is_some(), "up": l.is_some_and(|l| l.up),
                            "mtu": l.map(|l| l.mtu)})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"networks": bridges, "rules": rules})
                );
            } else {
                for n in &net.networks {
                    let state = match links.iter().find(|l| l.name == n.bridge) {
                        Some(l) => format!("{} mtu {}", if l.up { "up" } else { "down" }, l.mtu),
                        None => "absent".into(),
                    };
                    println!(
                        "{:<12} {:<10} {:<16} {state}",
                        n.name,
                        format!("{:?}", n.mode),
                        n.bridge
                    );
                }
                for r in &rules {
                    println!(
                        "{:>10} pkts {:>12} bytes  {:<12} {}",
                        r.packets, r.bytes, r.chain, r.rule
                    );
                }
            }
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bridge-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
