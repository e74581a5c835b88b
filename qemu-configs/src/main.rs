//! `qemu-configs check|render|up|down TOPOLOGY.toml`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info};
use qemu_configs::graph::dot;
use qemu_configs::libvirt::domain;
use qemu_configs::probe::{qemu_version, switch_ready};
use qemu_configs::render::{qemu_args, shell_line, Layout};
use qemu_configs::run::{down_leftovers, up};
use qemu_configs::script::script;
use qemu_configs::switch::{checked_config, uplink_addresses};
use qemu_configs::topology::{place_of, Topology};
use qemu_configs::verify;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(
    version,
    about = "Networks and VMs of one topology file, up and down in one command"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the file and report the first problem, or nothing.
    Check {
        file: PathBuf,
        #[command(flatten)]
        where_: Where,
    },
    /// Print each VM's QEMU command line, a shell script that starts the topology, or
    /// libvirt domain XML (with the switch's config it needs).
    Render {
        file: PathBuf,
        #[command(flatten)]
        where_: Where,
        #[arg(long, value_enum, default_value = "args")]
        format: Format,
    },
    /// Write the topology as Graphviz (networks, VMs, allowed flows, the outside) to FILE.dot,
    /// and FILE.svg where `dot` is installed.
    Graph {
        file: PathBuf,
        /// The .dot file to write [default: NAME.dot in the current folder]
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build the networks, start every VM, and keep them up until SIGINT/SIGTERM (then take
    /// everything down). SIGUSR1 logs the rules' counters and which VMs run.
    Up {
        file: PathBuf,
        #[command(flatten)]
        where_: Where,
    },
    /// From inside every guest of a running topology, try every service port of every other
    /// VM, and each forwarded port from the host; print the matrix beside the policy and
    /// exit non-zero if any cell differs.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        where_: Where,
        /// The host address the forwards are tried on [default: the host's address on the
        /// switch's uplink]
        #[arg(long)]
        host: Option<String>,
        /// The cells as JSON
        #[arg(long)]
        json: bool,
    },
    /// Undo an `up` that did not end cleanly.
    Down {
        file: PathBuf,
        #[command(flatten)]
        where_: Where,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Each VM's QEMU command line.
    Args,
    /// A shell script that starts the switch (its config inline) and the VMs.
    Script,
    /// libvirt domain XML per VM; on the switch, its config first, as a comment.
    Libvirt,
}

#[derive(clap::Args)]
struct Where {
    /// Consoles, logs and pid files [default: /run/qemu-configs/NAME]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// qemu-bridge-plugin, which QEMU runs for each tap (with --acl=, which the stock
    /// qemu-bridge-helper does not take) [default: the one beside this program]
    #[arg(long)]
    helper: Option<PathBuf>,
    /// vhost-net-backend, the switch of mode = "switch" networks [default: the one beside
    /// this program]
    #[arg(long)]
    switch: Option<PathBuf>,
}

impl Where {
    fn layout(&self, topo: &Topology) -> Layout {
        let beside = |name: &str| {
            std::env::current_exe()
                .ok()
                .and_then(|p| Some(p.parent()?.join(name)))
                .unwrap_or_else(|| name.into())
        };
        let helper = self
            .helper
            .clone()
            .unwrap_or_else(|| beside("qemu-bridge-plugin"));
        let switch = self
            .switch
            .clone()
            .unwrap_or_else(|| beside("vhost-net-backend"));
        Layout {
            // Only the switch's vhost-user options depend on it. Not running: `up` says so
            // when it starts QEMU; render assumes a new one.
            qemu_version: if topo.on_switch() {
                qemu_version(&topo.guest.qemu).unwrap_or((10, 0))
            } else {
                (10, 0)
            },
            switch,
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/run/qemu-configs").join(&topo.name)),
            helper,
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Check { file, where_ } => {
            let t = Topology::load(&file)?;
            if t.on_switch() {
                checked_config(&t, &where_.layout(&t)).map_err(anyhow::Error::msg)?;
                qemu_ready(&t, &file)?;
            }
            println!(
                "{}: {} networks{}, {} allowed flows, {} VMs",
                t.name,
                t.network_names().len(),
                if t.on_switch() { " on the switch" } else { "" },
                t.allows.len(),
                t.vms.len()
            );
        }
        Cmd::Render {
            file,
            where_,
            format,
        } => {
            let t = Topology::load(&file)?;
            let layout = where_.layout(&t);
            match format {
                Format::Args => {
                    for vm in &t.vms {
                        println!("# {}", vm.name);
                        println!("{}", shell_line(&t.guest.qemu, &qemu_args(&t, vm, &layout)));
                    }
                }
                Format::Script => print!("{}", script(&t, &layout)),
                Format::Libvirt => {
                    if t.on_switch() {
                        let c = checked_config(&t, &layout).map_err(anyhow::Error::msg)?;
                        println!(
                            "<!-- the switch these domains need: vhost-net-backend --config {}\n{}-->",
                            layout.switch_config().display(),
                            toml::to_string(&c)?.replace("--", "- -")
                        );
                    }
                    for vm in &t.vms {
                        print!("{}", domain(&t, vm, &layout));
                    }
                }
            }
        }
        Cmd::Graph { file, out } => {
            let t = Topology::load(&file)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.dot", t.name)));
            std::fs::write(&out, dot(&t)).with_context(|| format!("{}", out.display()))?;
            println!("{}", out.display());
            let svg = out.with_extension("svg");
            match std::process::Command::new("dot")
                .arg("-Tsvg")
                .arg(&out)
                .arg("-o")
                .arg(&svg)
                .status()
            {
                Ok(s) if s.success() => println!("{}", svg.display()),
                Ok(s) => anyhow::bail!("dot failed ({s}) on {}", out.display()),
                Err(_) => info!(
                    "no `dot` here (Debian: graphviz): only {} was written",
                    out.display()
                ),
            }
        }
        Cmd::Verify {
            file,
            where_,
            host,
            json,
        } => {
            let t = Topology::load(&file)?;
            let layout = where_.layout(&t);
            let host = host.unwrap_or_else(|| uplink_addresses(&t).1.to_string());
            let cells = verify::measure(&t, &layout, &host).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", verify::json(&cells));
            } else {
                print!("{}", verify::table(&cells));
            }
            let differ = cells.iter().filter(|c| c.expected != c.measured).count();
            if differ > 0 {
                anyhow::bail!("{differ} cells differ from the policy");
            }
        }
        Cmd::Down { file, where_ } => {
            let t = Topology::load_for_down(&file)?;
            let stopped = down_leftovers(&t, &where_.layout(&t))?;
            println!("{}: down (stopped: {})", t.name, stopped.join(" "));
        }
        Cmd::Up { file, where_ } => {
            let t = Topology::load(&file)?;
            if t.on_switch() {
                qemu_ready(&t, &file)?;
            }
            let layout = where_.layout(&t);
            // A closed terminal (SIGHUP) takes the topology down like Ctrl-C does.
            let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1])
                .context("installing signal handlers")?;
            let mut running = up(&t, &layout)?;
            info!(
                "{}: up; consoles: {}/NAME.console (socat - UNIX-CONNECT:...), logs NAME.log",
                t.name,
                layout.state_dir.display()
            );
            loop {
                for signal in signals.pending() {
                    if signal == SIGUSR1 {
                        report(&t, &layout, &running.vm_names());
                        continue;
                    }
                    info!("signal {signal}: taking {} down", t.name);
                    running.down();
                    return Ok(());
                }
                if let Some(status) = running.switch_exited() {
                    let why = running.switch_log_tail();
                    running.down();
                    anyhow::bail!("the switch stopped ({status}): {why}");
                }
                while let Some((vm, status)) = running.exited() {
                    running.report_exit(&vm, status);
                }
                if running.vm_names().is_empty() {
                    info!("every VM has stopped: taking {} down", t.name);
                    running.down();
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}

/// Whether the topology's QEMU has what VMs on the switch need; else where the file names
/// it, what it lacks and the fix.
fn qemu_ready(t: &Topology, file: &std::path::Path) -> Result<()> {
    switch_ready(&t.guest.qemu)
        .map_err(|e| anyhow::anyhow!("{}: [guest] qemu: {e}", place_of(file, "[guest]", "qemu")))
}

/// The running VMs and each rule's counters, in the log.
fn report(t: &Topology, layout: &Layout, vms: &[String]) {
    info!("running: {}", vms.join(" "));
    if t.on_switch() {
        match switch_rules(layout) {
            Ok(rules) => {
                for (name, packets) in rules {
                    info!("switch rule {name}: {packets} packets");
                }
            }
            Err(e) => error!("the switch's rule counters: {e}"),
        }
        return;
    }
    match bridge_plugin::net::counters(&t.net_file().table) {
        Ok(rules) => {
            for r in rules {
                info!("{} {}: {} packets", r.chain, r.rule, r.packets);
            }
        }
        Err(e) => error!("rule counters: {e}"),
    }
}

/// `rules` over the switch's control socket: each rule's name and packets, and the
/// default's drops.
fn switch_rules(layout: &Layout) -> Result<Vec<(String, u64)>> {
    use std::io::{BufRead, BufReader, Write};
    let path = layout.switch_control();
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("{}", path.display()))?;
    writeln!(s, "rules")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    Ok(v["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    let name = r["name"].as_str().unwrap_or("?").to_string();
                    (name, r["packets"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default())
}
