use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use vhost_net_backend::config::UplinkConfig;
use vhost_net_backend::{PortConfig, Server, SwitchConfig};

const EXAMPLES: &str = "\
Examples:
  # Two VM ports on one segment, a third on VLAN 20, jumbo frames up to 9000 bytes:
  vhost-net-backend --port name=vm1,socket=/run/vnet/vm1.sock \\
                    --port name=vm2,socket=/run/vnet/vm2.sock \\
                    --port name=db1,socket=/run/vnet/db1.sock,vlan=20 \\
                    --control-socket /run/vnet/control.sock

  # A VM attached to port vm1 (guest memory must be shared with the backend):
  qemu-system-x86_64 -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=chr0,path=/run/vnet/vm1.sock,reconnect=1 \\
    -netdev vhost-user,id=net0,chardev=chr0,queues=2 \\
    -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=6 ...
  (QEMU 7.2 under TCG: add vectors=0 to the device; QEMU 9.2 and later: reconnect-ms=1000.)

  # Counters of every port, as JSON:
  echo stats | socat - UNIX-CONNECT:/run/vnet/control.sock
  kill -USR1 <pid>      # the same counters, in the log";

/// A vhost-user-net backend that is a learning virtual switch between VM NICs.
///
/// Each port is a vhost-user socket that one VM NIC connects to (QEMU is the client). Frames
/// are switched by MAC address within a port's VLAN and copied once, guest to guest. Offloads
/// (checksum, TSO, mergeable RX buffers, multi-queue) are negotiated per port and finished in
/// software for guests that lack them. Log level: RUST_LOG=info (default), debug, warn.
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Args {
    /// A port: name=NAME,socket=PATH[,vlan=ID][,mac=MAC][,queues=N][,max_macs=N]. Repeat for more ports.
    /// vlan puts the port on an access VLAN (1-4094); queues is the number of queue pairs
    /// offered (QEMU queues=, 1-16); mac is offered to the guest in the config space;
    /// max_macs limits the source MACs the guest may send from (mac counts as one).
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,

    /// A TOML file with `mtu`, `mac_ageing_secs`, `control_socket` and `[[port]]` tables
    /// (name, socket, vlan, mac, queues). Command-line ports are added to the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Largest IP MTU forwarded, also advertised to guests (VIRTIO_NET_F_MTU; QEMU needs
    /// host_mtu=N on the device). Without it frames up to 9000 bytes pass and no MTU is imposed.
    #[arg(long, value_name = "N")]
    mtu: Option<u16>,

    /// An uplink to the host kernel: tap:NAME[,vlan=ID|,trunk][,queues=N]. The tap is created
    /// (or attached to) with vnet headers and offloads on; put it on a host bridge to reach
    /// the host and, through its NAT, the outside.
    #[arg(long, value_name = "SPEC")]
    uplink: Option<String>,

    /// After each TX burst, busy-poll the ring this many microseconds before sleeping:
    /// lower latency at the cost of CPU. Default 0 (off).
    #[arg(long, value_name = "US")]
    poll_us: Option<u64>,

    /// A socket answering the line `stats` with every port's counters as JSON.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// vhost-user convention: serve one port (named after the file) on this socket.
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// vhost-user convention: serve one port on this inherited, listening socket fd.
    #[arg(long, value_name = "FDNUM")]
    fd: Option<i32>,

    /// vhost-user convention: print the backend's capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,
}

fn build_config(args: &Args) -> Result<SwitchConfig> {
    let mut config = match &args.config {
        Some(path) => SwitchConfig::from_file(path)?,
        None => SwitchConfig::default(),
    };
    for spec in &args.ports {
        config.ports.push(PortConfig::parse_spec(spec)?);
    }
    if let Some(path) = &args.socket_path {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("port0")
            .to_string();
        config.ports.push(PortConfig {
            name,
            socket: path.clone(),
            ..Default::default()
        });
    }
    if let Some(fd) = args.fd {
        config.ports.push(PortConfig {
            name: format!("fd{fd}"),
            socket: PathBuf::new(),
            ..Default::default()
        });
    }
    if args.mtu.is_some() {
        config.mtu = args.mtu;
    }
    if let Some(us) = args.poll_us {
        config.poll_us = us;
    }
    if let Some(spec) = &args.uplink {
        config.uplink = Some(UplinkConfig::parse_spec(spec)?);
    }
    if args.control_socket.is_some() {
        config.control_socket = args.control_socket.clone();
    }
    config.validate()?;
    Ok(config)
}

/// Takes the listening socket the parent passed as `--fd N`: the one place this process
/// claims a descriptor by number.
fn inherited_listener(fd: i32) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `fd` is open; no memory is touched.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("--fd {fd} is not an open file descriptor");
    }
    // SAFETY: `fd` is open, was handed to this process by its parent for this use, and
    // nothing else in the process has claimed it (it is read once, here).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    if listener.local_addr().is_err() {
        bail!("--fd {fd} is not a listening Unix socket");
    }
    Ok(listener.into())
}

fn run(args: Args) -> Result<()> {
    if args.print_capabilities {
        println!("{{\n  \"type\": \"net\"\n}}");
        return Ok(());
    }
    let config = build_config(&args)?;
    let inherited = match args.fd {
        Some(fd) => vec![(config.ports.len() - 1, inherited_listener(fd)?)],
        None => Vec::new(),
    };
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGUSR1]).context("installing signal handlers")?;
    let server = Server::start_with(&config, inherited)?;
    for p in &config.ports {
        info!(
            "port {}: listening on {} (vlan {}, {} queue pair(s))",
            p.name,
            p.socket.display(),
            p.vlan.map_or("none".to_string(), |v| v.to_string()),
            p.queues
        );
    }
    for signal in signals.forever() {
        match signal {
            SIGUSR1 => info!("counters: {}", server.stats_json()),
            _ => {
                info!("signal {signal}: shutting down");
                break;
            }
        }
    }
    server.stop();
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Args::parse()) {
        error!("{e:#}");
        std::process::exit(1);
    }
}
