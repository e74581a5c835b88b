//! `bridge-plugin net up|down|show FILE`: the kernel network modes for QEMU/KVM guests, and
//! `bridge-plugin tap`: a multi-queue tap handed to a QEMU it starts.
//! (The bridge helper QEMU runs is the `qemu-bridge-plugin` binary.)

use std::path::PathBuf;
use std::process::ExitCode;

use bridge_plugin::launch::Launch;
use bridge_plugin::net::{counters, NetFile};
use bridge_plugin::netlink::Netlink;
use bridge_plugin::port::{has_net_admin, PortSettings};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// The kernel network modes for QEMU/KVM guests (NAT, bridged, internal, host-only, segments
/// with default-deny rules between them), and multi-queue taps handed to QEMU.
///
/// The bridge helper QEMU runs (`-netdev bridge,helper=...`) is the `qemu-bridge-plugin`
/// binary. Every command needs CAP_NET_ADMIN.
#[derive(Parser)]
#[command(name = "bridge-plugin", version, args_override_self = true)]
struct Cli {
    // `bridge-plugin --json net show FILE`, as the hand-made parser took it.
    #[arg(long, hide = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The networks of a file: `net up|down|show FILE [--json]`.
    Net {
        /// Print `show` as JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        verb: NetVerb,
    },
    /// Create a multi-queue tap on BRIDGE (vnet headers, vhost-net where the kernel has it)
    /// and run QEMU with it as `-netdev tap,id=NETDEV,fds=...`.
    ///
    /// Give the device netdev=NETDEV (default net0), mq=on,vectors=2N+2:
    /// `bridge-plugin tap --br=BRIDGE --queues=N -- qemu-system-x86_64 ...
    /// -device virtio-net-pci,netdev=net0,mq=on,vectors=2N+2`. Options take `--key=value` or
    /// `--key value`.
    Tap(TapArgs),
}

#[derive(Subcommand)]
enum NetVerb {
    /// Create the file's bridges, addresses, NAT and the rules between segments (default
    /// deny, counters on every rule); running it again changes nothing.
    Up(NetFileArg),
    /// Remove our nftables table and the file's bridges, nothing else.
    Down(NetFileArg),
    /// Bridges and rule counters (what was allowed and dropped).
    Show(NetFileArg),
}

#[derive(Args)]
struct NetFileArg {
    /// The networks file (TOML: [[network]] and [[allow]]).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

// The tap settings stay strings: `PortSettings::set` parses them, as it does the
// `--key=value` options of qemu-bridge-plugin.
#[derive(Args)]
struct TapArgs {
    /// The bridge to attach the tap to.
    #[arg(long, value_name = "BRIDGE", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    br: String,
    /// Queues of the tap (1 to 16).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    queues: u16,
    /// The netdev id QEMU gets (`-netdev tap,id=NETDEV`).
    #[arg(long, value_name = "NETDEV", default_value = "net0")]
    id: String,
    /// Access VLAN on a VLAN-filtering bridge (1 to 4094).
    #[arg(long, value_name = "ID")]
    vlan: Option<String>,
    /// MTU of the tap (68 to 65535); default: the bridge's.
    #[arg(long, value_name = "N")]
    mtu: Option<String>,
    /// Bridge port isolation (1, yes, true or on): isolated ports reach only non-isolated
    /// ones.
    #[arg(long, value_name = "1")]
    isolated: Option<String>,
    /// Rate limit of traffic into the VM, Mbit/s.
    #[arg(long, value_name = "N")]
    ingress_mbit: Option<String>,
    /// Rate limit of traffic out of the VM, Mbit/s.
    #[arg(long, value_name = "N")]
    egress_mbit: Option<String>,
    /// The QEMU command line, after `--`.
    #[arg(last = true, required = true, value_name = "QEMU ARGS")]
    qemu: Vec<String>,
}

fn tap(args: TapArgs) -> Result<(), String> {
    let mut settings = PortSettings::default();
    for (key, value) in [
        ("vlan", &args.vlan),
        ("mtu", &args.mtu),
        ("isolated", &args.isolated),
        ("ingress-mbit", &args.ingress_mbit),
        ("egress-mbit", &args.egress_mbit),
    ] {
        if let Some(value) = value {
            settings.set(key, value)?;
        }
    }
    if !has_net_admin() {
        return Err("needs CAP_NET_ADMIN: run it as root".into());
    }
    let launch = Launch {
        bridge: args.br,
        queues: usize::from(args.queues),
        netdev_id: args.id,
        settings,
        qemu: args.qemu,
    };
    Err(launch.exec())
}

fn net(verb: &NetVerb, json: bool) -> Result<(), String> {
    let net = match verb {
        NetVerb::Down(f) => NetFile::load_for_down(&f.file),
        NetVerb::Up(f) | NetVerb::Show(f) => NetFile::load(&f.file),
    }
    .map_err(|e| e.to_string())?;
    if !has_net_admin() {
        return Err("needs CAP_NET_ADMIN: run it as root".into());
    }
    match verb {
        NetVerb::Up(_) => net.up().map_err(|e| e.to_string()),
        NetVerb::Down(_) => net.down().map_err(|e| e.to_string()),
        NetVerb::Show(_) => {
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
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::init();
    let result = match cli.command {
        Cmd::Net { json, verb } => net(&verb, json || cli.json),
        Cmd::Tap(args) => {
            if cli.json {
                Cli::command()
                    .error(
                        ErrorKind::ArgumentConflict,
                        "--json is an option of `net`, not of `tap`",
                    )
                    .exit();
            }
            tap(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bridge-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
