//! `verify`: the reachability matrix of a running topology, measured from inside its
//! guests and from the host, beside what the file's policy says, cell by cell. Guests are
//! driven over their serial console (a shell that runs one line at a time, as our guest
//! image's console does); every TCP service port of every other VM is tried with
//! busybox `nc`, and every forwarded host port from the host.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::render::Layout;
use crate::topology::{Topology, Vm};

/// A service: a VM NIC's address and TCP port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Service {
    vm: String,
    /// The NIC's port name: the VM's for its first NIC, "VM.ethN" for others.
    nic: String,
    network: String,
    address: String,
    port: u16,
}

/// One cell: `from` (a VM, or "outside") to a service.
#[derive(Clone, Debug)]
pub struct Cell {
    /// Where the cell goes in the table: its row (source) and column (service).
    pub row: usize,
    pub col: usize,
    pub from: String,
    pub to: String,
    pub expected: bool,
    pub measured: bool,
    /// What decides it in the file: the allow, the forward, or the default.
    pub rule: String,
}

/// Every TCP port the file gives a VM NIC: the ports of `[[allow]]`s to its network and
/// of forwards to it.
fn services(topo: &Topology) -> Vec<Service> {
    let mut out = Vec::new();
    for vm in &topo.vms {
        for nic in topo.nics(vm) {
            let mut ports: Vec<u16> = topo
                .allows
                .iter()
                .filter(|a| a.to == nic.network && a.proto.name() == "tcp")
                .filter_map(|a| a.port)
                .collect();
            if let Some(n) = topo.switch_network(&nic.network) {
                ports.extend(n.forward.iter().map(|f| f.guest_port));
            }
            if let Some(n) = topo.network(&nic.network) {
                ports.extend(n.forward.iter().map(|f| f.guest_port));
            }
            ports.sort_unstable();
            ports.dedup();
            let address = nic.ip().map(|a| a.to_string()).unwrap_or_default();
            out.extend(ports.into_iter().map(|port| Service {
                vm: vm.name.clone(),
                nic: nic.port.clone(),
                network: nic.network.clone(),
                address: address.clone(),
                port,
            }));
        }
    }
    out
}

/// The network `vm`'s traffic to `to` leaves from: a NIC of its own on `to`'s network,
/// else its first NIC's (the guest's default route).
fn source_network(topo: &Topology, vm: &Vm, to: &Service) -> String {
    topo.nics(vm)
        .into_iter()
        .find(|n| n.network == to.network)
        .map_or_else(|| vm.network.clone(), |n| n.network)
}

/// What the file says of `from` (a network) to `to`'s port, and the rule that says it.
fn policy(topo: &Topology, from: &str, to: &Service) -> (bool, String) {
    let allow = topo.allows.iter().find(|a| {
        a.from == from
            && a.to == to.network
            && a.proto.name() == "tcp"
            && a.port.is_none_or(|p| p == to.port)
    });
    match allow {
        Some(a) => (true, a.to_string()),
        None => (false, "default deny".into()),
    }
}

/// A guest's console, one command at a time.
struct Console {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Console {
    fn open(layout: &Layout, vm: &str) -> Result<Console, String> {
        let path = layout.console(vm);
        let s = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(Console {
            reader: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            writer: s,
        })
    }

    /// Runs `cmd` in the guest; its exit status.
    fn status(&mut self, cmd: &str) -> Result<i32, String> {
        writeln!(self.writer, "{cmd} >/dev/null 2>&1; echo \"@@$?@@\"")
            .map_err(|e| e.to_string())?;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("the console closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("no answer from the console: {e}")),
            }
            let line = line.trim();
            if let Some(code) = line.strip_prefix("@@").and_then(|l| l.strip_suffix("@@")) {
                return code.parse().map_err(|_| format!("odd status '{code}'"));
            }
        }
    }
}

/// Measures every cell: each VM to each other VM's services (from its console), and the
/// host to each forwarded port (on `host_address`) and, on the switch, straight to each
/// service (with the route the host has to the guests: only forwards get in).
pub fn measure(topo: &Topology, layout: &Layout, host_address: &str) -> Result<Vec<Cell>, String> {
    let services = services(topo);
    let mut cells = Vec::new();
    for (row, vm) in topo.vms.iter().enumerate() {
        let mut console = Console::open(layout, &vm.name)?;
        for (col, s) in services.iter().enumerate().filter(|(_, s)| s.vm != vm.name) {
            let (expected, rule) = policy(topo, &source_network(topo, vm, s), s);
            // busybox nc: 0 once connected (stdin at its end closes it), else 1.
            let status = console.status(&format!("nc -w 2 {} {} </dev/null", s.address, s.port))?;
            cells.push(Cell {
                row,
                col,
                from: vm.name.clone(),
                to: s.label(),
                expected,
                measured: status == 0,
                rule,
            });
        }
    }
    let connects = |to: String| -> Result<bool, String> {
        let to: SocketAddr = to
            .parse()
            .map_err(|_| format!("'{to}' is not an IPv4 address and port"))?;
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
    };
    let outside = topo.vms.len();
    if topo.on_switch() {
        for (col, s) in services.iter().enumerate() {
            cells.push(Cell {
                row: outside,
                col,
                from: "outside".into(),
                to: s.label(),
                expected: false,
                measured: connects(format!("{}:{}", s.address, s.port))?,
                rule: "not forwarded (from outside, only forwards reach the guests)".into(),
            });
        }
    }
    for (i, (host_port, target, rule)) in forwards(topo).into_iter().enumerate() {
        cells.push(Cell {
            row: outside,
            col: services.len() + i,
            from: "outside".into(),
            to: format!("host:{host_port} -> {target}"),
            expected: true,
            measured: connects(format!("{host_address}:{host_port}"))?,
            rule,
        });
    }
    Ok(cells)
}

impl Service {
    /// Its column in the table: the NIC's port name and the TCP port.
    fn label(&self) -> String {
        format!("{}:{}", self.nic, self.port)
    }
}

/// The forwards: host port, where it goes, and its line in the file.
fn forwards(topo: &Topology) -> Vec<(u16, String, String)> {
    let mut out = Vec::new();
    for n in &topo.switch_networks {
        let names: Vec<String> = topo.nics_on(&n.name).map(|(_, nic)| nic.port).collect();
        for f in &n.forward {
            out.push((
                f.host_port,
                format!("{}:{}", names.join("|"), f.guest_port),
                format!("forward {} -> {}:{}", f.host_port, n.name, f.guest_port),
            ));
        }
    }
    for n in &topo.networks {
        for f in &n.forward {
            out.push((
                f.host_port,
                format!("{}:{}", f.guest, f.guest_port),
                format!("forward {} -> {}:{}", f.host_port, f.guest, f.guest_port),
            ));
        }
    }
    out
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✔"
    } else {
        "✘"
    }
}

/// The matrix for people: a row per source, a column per service; a cell is what was
/// measured, with "≠" where the policy says otherwise; then each differing cell with
/// the rule that should have decided it.
pub fn table(cells: &[Cell]) -> String {
    let mut rows: Vec<(usize, &str)> = cells.iter().map(|c| (c.row, c.from.as_str())).collect();
    let mut cols: Vec<(usize, &str)> = cells.iter().map(|c| (c.col, c.to.as_str())).collect();
    for v in [&mut rows, &mut cols] {
        v.sort_unstable();
        v.dedup();
    }
    let rows: Vec<&str> = rows.into_iter().map(|(_, r)| r).collect();
    let cols: Vec<&str> = cols.into_iter().map(|(_, c)| c).collect();
    let width = |s: &str| s.chars().count();
    let first = rows.iter().map(|r| width(r)).max().unwrap_or(4).max(4);
    let mut out = format!("{:first$}", "from");
    for c in &cols {
        out.push_str(&format!("  {c}"));
    }
    out.push('\n');
    for r in &rows {
        out.push_str(&format!("{r:first$}"));
        for col in &cols {
            let text = match cells.iter().find(|c| c.from == *r && c.to == *col) {
                Some(c) if c.expected == c.measured => mark(c.measured).to_string(),
                Some(c) => format!("{}≠", mark(c.measured)),
                None => "·".into(),
            };
            out.push_str(&format!("  {text:<w$}", w = width(col)));
        }
        out.push('\n');
    }
    let wrong: Vec<&Cell> = cells.iter().filter(|c| c.expected != c.measured).collect();
    if wrong.is_empty() {
        out.push_str(&format!(
            "every cell ({}) is what the policy says ({} allowed, {} denied)\n",
            cells.len(),
            cells.iter().filter(|c| c.expected).count(),
            cells.iter().filter(|c| !c.expected).count()
        ));
    } else {
        for c in wrong {
            out.push_str(&format!(
                "{} -> {}: measured {}, the policy says {} ({})\n",
                c.from,
                c.to,
                mark(c.measured),
                mark(c.expected),
                c.rule
            ));
        }
    }
    out
}

pub fn json(cells: &[Cell]) -> Value {
    json!({
        "cells": cells.iter().map(|c| json!({
            "from": c.from, "to": c.to, "expected": c.expected,
            "measured": c.measured, "rule": c.rule,
        })).collect::<Vec<_>>(),
        "differ": cells.iter().filter(|c| c.expected != c.measured).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(from: &str, to: &str, expected: bool, measured: bool) -> Cell {
        Cell {
            row: usize::from(from != "web1"),
            col: usize::from(to != "app1:8080"),
            from: from.into(),
            to: to.into(),
            expected,
            measured,
            rule: "allow web -> app tcp/8080".into(),
        }
    }

    #[test]
    fn the_table_marks_each_cell_and_names_the_rule_of_a_wrong_one() {
        let good = [
            cell("web1", "app1:8080", true, true),
            cell("app1", "web1:80", false, false),
        ];
        let t = table(&good);
        assert!(t.contains("every cell (2) is what the policy says"), "{t}");
        assert!(t.lines().nth(1).unwrap().starts_with("web1") && t.contains('✔'));
        let bad = [cell("web1", "app1:8080", true, false)];
        let t = table(&bad);
        assert!(t.contains("✘≠"), "{t}");
        assert!(
            t.contains(
                "web1 -> app1:8080: measured ✘, the policy says ✔ (allow web -> app tcp/8080)"
            ),
            "{t}"
        );
        assert_eq!(json(&bad)["differ"], 1);
    }
}
