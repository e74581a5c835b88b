use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

mod systemd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
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

  # Counters, the policy's rules and flows, run-time changes (see `ctl --help`):
  vhost-net-backend ctl --socket /run/vnet/control.sock stats
  vhost-net-backend ctl rules
  vhost-net-backend ctl rule-add at=1 action=allow from=web to=app proto=tcp ports=8080
  kill -USR1 <pid>      # the counters, in the log
  kill -HUP <pid>       # read --config again and apply its policy (an error keeps the old)

  # A policy (in the --config file): web may reach app on tcp/8080, nothing else passes.
  [[port]]
  name = \"web1\"
  socket = \"/run/vnet/web1.sock\"
  groups = [\"web\"]
  addresses = [\"10.0.1.10\"]
  [[rule]]
  action = \"allow\"
  from = \"web\"
  to = \"app\"
  proto = \"tcp\"
  ports = 8080";

/// A vhost-user-net backend that is a learning virtual switch between VM NICs.
///
/// Each port is a vhost-user socket that one VM NIC connects to (QEMU is the client). Frames
/// are switched by MAC address within a port's VLAN and copied once, guest to guest. Offloads
/// (checksum, TSO, mergeable RX buffers, multi-queue) are negotiated per port and finished in
/// software for guests that lack them. Log level: RUST_LOG=info (default), debug, warn.
#[derive(Parser, Debug, Clone)]
#[command(version, after_help = EXAMPLES)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// A port: name=NAME,socket=PATH[,vlan=ID][,mac=MAC][,queues=N][,max_macs=N][,group=G][,ip=ADDR]
    /// [,socket_owner=U][,socket_group=G][,socket_mode=0660].
    /// Repeat for more ports. vlan puts the port on an access VLAN (1-4094); queues is the
    /// number of queue pairs offered (QEMU queues=, 1-16); mac is offered to the guest in
    /// the config space; max_macs limits the source MACs the guest may send from (mac
    /// counts as one); group (repeatable) names the port's groups for policy rules; ip
    /// (repeatable) the addresses it owns, the only ones it may send from; socket_owner,
    /// socket_group and socket_mode set who may connect (a QEMU running as another user).
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,

    /// A TOML file with `mtu`, `mac_ageing_secs`, `control_socket`, `poll_us`, `workers`,
    /// `worker_cpus`, `[[port]]` tables
    /// (name, socket, vlan, mac, queues, max_macs, groups, addresses, socket_owner,
    /// socket_group, socket_mode), `[policy]` (default,
    /// max_flows, max_flows_per_port, flow_log, flow_log_max_bytes, flow_log_interval_secs)
    /// and `[[rule]]` tables (name, action, from, to, proto, ports). Command-line ports are
    /// added to the file's. SIGHUP reads it again.
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

    /// Serve every port's queue pairs with N threads, each pair given to the one with the
    /// fewest, one TX burst at a time in turn (as OVS's PMD threads). Default: a thread of
    /// its own for each queue pair of each connected port.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Run the datapath's threads (the workers, the uplink's readers) on these CPUs, e.g.
    /// 2-3 or 1,3: with --workers, worker i on the i-th CPU of the list.
    #[arg(long, value_name = "LIST")]
    worker_cpus: Option<String>,

    /// A socket answering the line `stats` with every port's counters as JSON.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics; a port alone means 127.0.0.1:PORT.
    #[arg(long, value_name = "ADDR:PORT", value_parser = vhost_net_backend::metrics::parse_address)]
    metrics: Option<std::net::SocketAddr>,

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

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Talk to a running switch over its control socket.
    Ctl(CtlArgs),
    /// Write the vhost-user description file QEMU's docs ask every backend to install
    /// (docs/interop/vhost-user.json), naming this binary, so that management tools find it.
    InstallDescription {
        /// Where description files of vhost-user backends live.
        #[arg(long, default_value = "/usr/share/qemu/vhost-user")]
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = CTL_HELP)]
struct CtlArgs {
    /// The switch's control socket.
    #[arg(long, default_value = "/run/vnet/control.sock")]
    socket: PathBuf,
    /// Print the reply as JSON, not as a table.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

const CTL_HELP: &str = "\
Commands:
  stats                              counters of every port and of the policy
  rules                              the rules with hits, packets and bytes
  flows [port=NAME] [addr=IP] [proto=P] [dport=N]   tracked connections
  flush [port=NAME] [addr=IP] [proto=P] [dport=N]   end tracked connections
  reload                             read the config again (as SIGHUP)
  rule-add [at=N] action=allow|deny [from=A,B] [to=A,B] [proto=P] [ports=80,8000-8100] [name=N]
           [rate_bps=N] [rate_pps=N]
  rule-remove NAME|N                 rule-move NAME|N TO
  port-set NAME [groups=A,B] [addresses=IP,IP] [tx_bps=N] [tx_pps=N] [rx_bps=N] [rx_pps=N]
           (tx: what the guest sends, rx: what it receives; 0 removes the limit)
  port-add name=NAME,socket=PATH[,vlan=ID][,mac=MAC][,queues=N][,group=G]...[,ip=ADDR]...
                                     a new port, served at once (the spec of --port)
  port-del NAME                      delete a port; its guest is disconnected, its socket removed
                                     (also `port add|del|set`; SIGHUP or `reload` applies the
                                     ports of the config file the same way)
  capture PORT FILE [count=N]        write the port's frames, both ways, to FILE (pcap: tcpdump -r,
                                     Wireshark): a new file, absolute path; 1000 frames by default
  capture-stop PORT                  end a capture early (the file is complete)
  routes                             routed segments with their gateways, static routes,
                                     packets and bytes routed by each
  neighbours                         the router's neighbour table (configured and learned)
  leases                             DHCP: static bindings and pool leases of every segment
  balancers                          each balancer's backends: health, slots, connections, checks
  ports                              every port: kind, vlan, queue pairs, attached, negotiated features, MACs
  macs [port=NAME]                   the MAC table (vlan, mac, port, age)
  mac-flush [port=NAME]              forget learned MACs (of a port): their frames flood until heard again";

/// Writes `DIR/50-vhost-net-backend.json`: type net, this binary's absolute path.
fn install_description(dir: &Path) -> Result<()> {
    let binary = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("cannot find this program's own path")?;
    let description = serde_json::json!({
        "description": "vhost-net-backend: a vhost-user-net virtual switch (VLANs, policy, routing)",
        "type": "net",
        "binary": binary,
    });
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("50-vhost-net-backend.json");
    std::fs::write(&path, format!("{:#}\n", description))
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// `args` with its options taken out of the command's words too: `ctl rules --json`
/// reads as `ctl --json rules` (the command takes every word after it, and the switch
/// refused `--json` as an argument of `flows`, or `rules` ignored it).
fn ctl_options(args: &CtlArgs) -> Result<CtlArgs> {
    let mut out = CtlArgs {
        command: Vec::new(),
        ..args.clone()
    };
    let mut words = args.command.iter();
    while let Some(w) = words.next() {
        match w.as_str() {
            "--json" => out.json = true,
            "--socket" => match words.next() {
                Some(path) => out.socket = path.into(),
                None => bail!("--socket needs a path"),
            },
            w if w.starts_with("--socket=") => out.socket = w["--socket=".len()..].into(),
            w => out.command.push(w.to_string()),
        }
    }
    if out.command.is_empty() {
        bail!("no command: try `vhost-net-backend ctl --help`");
    }
    Ok(out)
}

/// Sends one command to a running switch and prints its reply.
fn ctl(args: &CtlArgs) -> Result<()> {
    let args = &ctl_options(args)?;
    let mut conn = UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "cannot reach the switch at {} (is it running with --control-socket?)",
            args.socket.display()
        )
    })?;
    writeln!(conn, "{}", args.command.join(" "))?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply)?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("the switch's reply is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    if args.json {
        println!("{}", reply.trim_end());
        return Ok(());
    }
    match args.command[0].as_str() {
        "rules" => print_table(
            &v["rules"],
            &[
                "index", "name", "action", "rule", "hits", "packets", "bytes",
            ],
            &format!(
                "policy {}, default {}, {} tracked flows",
                if v["enabled"] == true { "on" } else { "off" },
                v["default"].as_str().unwrap_or("?"),
                v["flows"]
            ),
        ),
        "flows" => print_table(
            &v["flows"],
            &[
                "src_port",
                "dst_port",
                "proto",
                "src",
                "sport",
                "dst",
                "dport",
                "state",
                "packets",
                "packets_back",
                "rule",
                "expires_in",
            ],
            "",
        ),
        "routes" => {
            print_table(
                &v["segments"],
                &["segment", "vlan", "gateways", "packets", "bytes"],
                &format!("gateway MAC {}", v["router_mac"].as_str().unwrap_or("?")),
            );
            println!();
            print_table(
                &v["routes"],
                &["to", "via", "segment", "packets", "bytes"],
                "",
            );
        }
        "neighbours" => print_table(
            &v["neighbours"],
            &["ip", "mac", "port", "vlan", "source", "age_secs"],
            "",
        ),
        "balancers" => print_table(
            &v["balancers"],
            &[
                "balancer",
                "backend",
                "state",
                "slots",
                "connections",
                "checks_passed",
                "checks_failed",
                "last_error",
            ],
            "",
        ),
        "ports" => print_table(
            &v["ports"],
            &[
                "name",
                "kind",
                "mode",
                "vlan",
                "queue_pairs",
                "connected",
                "features",
                "mac",
                "macs_learned",
                "socket",
            ],
            "",
        ),
        "macs" => print_table(&v["macs"], &["vlan", "mac", "port", "age_secs"], ""),
        "leases" => print_table(
            &v["leases"],
            &["segment", "address", "kind", "port", "mac", "expires_in"],
            "",
        ),
        _ => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}

fn print_table(rows: &serde_json::Value, columns: &[&str], title: &str) {
    if !title.is_empty() {
        println!("{title}");
    }
    let cell = |row: &serde_json::Value, c: &str| match &row[c] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let rows = rows.as_array().cloned().unwrap_or_default();
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .fold(c.len(), usize::max)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_string()).collect());
    for r in &rows {
        line(columns.iter().map(|c| cell(r, c)).collect());
    }
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
    if let Some(n) = args.workers {
        config.workers = n;
    }
    if let Some(cpus) = &args.worker_cpus {
        config.worker_cpus = vhost_net_backend::cpu_set::parse(cpus)
            .map_err(|e| anyhow::anyhow!("--worker-cpus: {e}"))?;
    }
    if let Some(spec) = &args.uplink {
        config.uplink = Some(UplinkConfig::parse_spec(spec)?);
    }
    if args.metrics.is_some() {
        config.metrics_address = args.metrics;
    }
    if args.control_socket.is_some() {
        config.control_socket = args.control_socket.clone();
    }
    config.validate()?;
    Ok(config)
}

/// Takes the listening socket the parent passed as `--fd N`: the one place this process
/// claims a descriptor by number (socket activation's are claimed in `systemd`).
fn inherited_listener(fd: i32) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only asks whether `fd` is open; no memory is touched.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("--fd {fd} is not an open file descriptor");
    }
    // SAFETY: `fd` is open, was handed to this process by its parent for this use, and
    // nothing else in the process has claimed it (it is read once, here).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    listening(owned, &format!("--fd {fd}"))
}

/// `fd` if it is a listening Unix socket (a connected one would make accept() fail every
/// time it is called).
fn listening(fd: OwnedFd, what: &str) -> Result<OwnedFd> {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `on`, whose size `len` gives.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut on as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let listener = UnixListener::from(fd);
    if rc != 0 || on == 0 || listener.local_addr().is_err() {
        bail!("{what} is not a listening Unix socket");
    }
    Ok(listener.into())
}

/// The sockets systemd activated the service with, as (port index, socket): by name when
/// every `FileDescriptorName=` is a port's name, else in the order of the ports.
fn activated(config: &SwitchConfig, skip_last: bool) -> Result<Vec<(usize, OwnedFd)>> {
    let fds = systemd::listen_fds().map_err(anyhow::Error::msg)?;
    if fds.is_empty() {
        return Ok(Vec::new());
    }
    let ports = config.ports.len() - usize::from(skip_last);
    if fds.len() > ports {
        bail!(
            "systemd passed {} sockets for {ports} ports; give each socket a port",
            fds.len()
        );
    }
    let by_name = fds
        .iter()
        .all(|(n, _)| config.ports[..ports].iter().any(|p| &p.name == n));
    let mut out = Vec::new();
    for (i, (name, fd)) in fds.into_iter().enumerate() {
        let port = if by_name {
            config
                .ports
                .iter()
                .position(|p| p.name == name)
                .unwrap_or(i)
        } else {
            i
        };
        let fd = listening(fd, &format!("activated socket {} ({name})", i + 3))?;
        info!(
            "port {}: socket from systemd ({name})",
            config.ports[port].name
        );
        out.push((port, fd));
    }
    Ok(out)
}

fn run(args: Args) -> Result<()> {
    if args.print_capabilities {
        println!("{{\n  \"type\": \"net\"\n}}");
        return Ok(());
    }
    match &args.command {
        Some(Command::Ctl(ctl_args)) => return ctl(ctl_args),
        Some(Command::InstallDescription { dir }) => return install_description(dir),
        None => {}
    }
    let config = build_config(&args)?;
    let mut inherited = match args.fd {
        Some(fd) => vec![(config.ports.len() - 1, inherited_listener(fd)?)],
        None => Vec::new(),
    };
    inherited.extend(activated(&config, args.fd.is_some())?);
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGHUP]).context("installing signal handlers")?;
    let server = Server::start_with(&config, inherited)?;
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} ports",
        config.ports.len()
    ));
    if let Some(every) = systemd::watchdog_interval() {
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                systemd::notify("WATCHDOG=1");
                std::thread::sleep(every);
            })
            .context("starting the watchdog thread")?;
    }
    let again = args.clone();
    server.set_reloader(Box::new(move || {
        build_config(&again).map_err(|e| format!("{e:#}"))
    }));
    for p in &config.ports {
        let how = match p.mode {
            vhost_net_backend::PortMode::Server => "listening on",
            vhost_net_backend::PortMode::Client => "connecting to its frontend at",
        };
        info!(
            "port {}: {how} {} (vlan {}, {} queue pair(s))",
            p.name,
            p.socket.display(),
            p.vlan.map_or("none".to_string(), |v| v.to_string()),
            p.queues
        );
    }
    for signal in signals.forever() {
        match signal {
            SIGUSR1 => info!("counters: {}", server.stats_json()),
            SIGHUP => {
                systemd::notify("RELOADING=1");
                match server.reload() {
                    Ok(()) => info!("SIGHUP: config read again, policy applied"),
                    Err(e) => error!("SIGHUP: {e}; the running policy stays"),
                }
                systemd::notify("READY=1");
            }
            _ => {
                info!("signal {signal}: shutting down");
                break;
            }
        }
    }
    systemd::notify("STOPPING=1");
    server.stop();
    Ok(())
}

fn main() {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // Under systemd (stderr connected to the journal), each line carries its priority the
    // way journald reads it (sd-daemon(3): "<3>" error ... "<7>" debug).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        logger.format(|out, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        });
    }
    logger.init();
    if let Err(e) = run(Args::parse()) {
        error!("{e:#}");
        std::process::exit(1);
    }
}
