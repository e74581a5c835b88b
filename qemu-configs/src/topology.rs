//! The topology file: networks and the flows allowed between them (bridge-plugin's network
//! file), the VMs on them, and how to boot those VMs. Loaded and checked as a whole, so
//! `up` never starts half of a wrong file.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use bridge_plugin::net::{parse_cidr, subnet, Allow, NetFile, Network};
use hostnet::MacAddr;
use serde::Deserialize;
use thiserror::Error;
use vhost_net_backend::config::OnDown;

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Network(#[from] bridge_plugin::net::NetError),
    #[error("vm {vm}: {message}")]
    Vm { vm: String, message: String },
    #[error("[guest]: {0}")]
    Guest(String),
    #[error("{0}")]
    Switch(String),
    /// An `[[allow]]` (the `index`th, from 0) whose `key` is wrong.
    #[error("[[allow]] {label}: {message}")]
    Allow {
        index: usize,
        key: &'static str,
        label: String,
        message: String,
    },
    /// A key of `[switch]`.
    #[error("[switch] {key}: {message}")]
    SwitchKey { key: &'static str, message: String },
    /// Another error, where in the file it is.
    #[error("{path}:{line}:{column}: {source}")]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        source: Box<TopologyError>,
    },
}

/// Line and column (from 1) of the value of `line`'s `key = value`, if it is that key.
fn value_at(line: &str, key: &str) -> Option<usize> {
    let (k, value) = line.split_once('=')?;
    (k.trim() == key).then(|| line.find(value.trim()).map_or(1, |c| c + 1))
}

/// Where `[[table]]`'s entry `name = "NAME"` is written in `text`: line and column
/// (from 1) of its name.
fn locate(text: &str, table: &str, name: &str) -> Option<(usize, usize)> {
    let header = format!("[[{table}]]");
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == header;
            continue;
        }
        let named = t
            .split_once('=')
            .is_some_and(|(_, v)| v.trim().trim_matches('"') == name);
        if let Some(column) = value_at(line, "name").filter(|_| inside && named) {
            return Some((i + 1, column));
        }
    }
    None
}

/// Where `key` of the table `header` (`[switch]`, or the `nth` `[[allow]]` from 0) is
/// written in `text`: its value's line and column, or the header's line when the key is
/// not written (a default).
fn locate_key(text: &str, header: &str, nth: usize, key: &str) -> Option<(usize, usize)> {
    let mut seen = 0;
    let mut start = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if start.is_some() {
                break;
            }
            if t == header {
                if seen == nth {
                    start = Some(i + 1);
                }
                seen += 1;
            }
            continue;
        }
        if let Some(column) = value_at(line, key).filter(|_| start.is_some()) {
            return Some((i + 1, column));
        }
    }
    start.map(|line| (line, 1))
}

/// "FILE:LINE:COL" of `key` in the table `header` (`[guest]`, `[switch]`) of the file at
/// `path` (its header's line when the key is not written); just "FILE" if unreadable.
pub fn place_of(path: &Path, header: &str, key: &str) -> String {
    let at = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| locate_key(&text, header, 0, key));
    match at {
        Some((line, column)) => format!("{}:{line}:{column}", path.display()),
        None => path.display().to_string(),
    }
}

/// How every VM boots, unless the VM says otherwise.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// `kvm`, `tcg`, or QEMU's fallback list `kvm:tcg`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Direct kernel boot: kernel and initrd...
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// ...with this command line. `{name}`, `{address}`, `{gateway}` and `{run}` (the VM's
    /// `run`, base64-encoded) are filled in per VM.
    #[serde(default = "default_append")]
    pub append: String,
    /// Or a disk image to boot from (one VM's; others give their own `disk`).
    pub disk: Option<PathBuf>,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// More QEMU arguments for every VM.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// How long a VM may take to power off after the ACPI power button before it gets
    /// SIGTERM (a guest that ignores the button only delays `down` by this).
    #[serde(default = "default_shutdown_secs")]
    pub shutdown_secs: u64,
}

fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn default_accel() -> String {
    "kvm:tcg".into()
}
fn default_append() -> String {
    "console=ttyS0".into()
}
fn default_memory() -> u32 {
    256
}
fn default_cpus() -> u32 {
    1
}
fn default_shutdown_secs() -> u64 {
    30
}

/// One VM: its first NIC on `network`, more in `[[vm.nic]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    pub network: String,
    /// Its address, CIDR, inside the network's subnet.
    pub address: String,
    /// Default: 52:54:00:0a:NN:VV from the network's and the VM's place in the file.
    pub mac: Option<MacAddr>,
    /// Further NICs, the guest's eth1, eth2, ... in file order.
    #[serde(default)]
    pub nic: Vec<NicConfig>,
    /// A command the guest starts at boot (handed over as `{run}` in `append`).
    pub run: Option<String>,
    pub memory_mib: Option<u32>,
    /// This VM's disk image, when VMs boot from disks.
    pub disk: Option<PathBuf>,
}

/// A VM's further NIC, `[[vm.nic]]`: each on a network of its own.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    pub network: String,
    pub address: String,
    pub mac: Option<MacAddr>,
}

/// A NIC of a VM as `up` makes it: the first is the VM's own `network` and `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The guest's ethN; QEMU's netdev netN.
    pub index: usize,
    pub network: String,
    /// CIDR.
    pub address: String,
    pub mac: MacAddr,
    /// Its port on the switch (and the socket's name): the VM's name for the first NIC,
    /// "VM.ethN" for the others (a VM name has no '.').
    pub port: String,
}

impl Nic {
    /// The address without its length.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        parse_cidr(&self.address).map(|(a, _)| a)
    }
}

/// A network of our own switch (`mode = "switch"`): a segment and subnet of one
/// vhost-net-backend, whose gateway, DHCP server and firewall the switch is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchNetwork {
    pub name: String,
    /// Always "switch" (the other modes are kernel bridges).
    pub mode: String,
    /// The switch's (gateway) address with the subnet, CIDR; VMs get theirs by DHCP.
    pub address: String,
    /// The MTU DHCP gives the VMs (and QEMU's host_mtu).
    pub mtu: Option<u16>,
    /// Its VMs may open connections to the outside, through source NAT on the host.
    #[serde(default)]
    pub nat: bool,
    /// Host ports forwarded to the network's service: its one VM, or a balancer over all.
    #[serde(default)]
    pub forward: Vec<SwitchForward>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchForward {
    /// Only tcp: the balancer checks its backends with TCP.
    #[serde(default = "default_tcp")]
    pub proto: String,
    pub host_port: u16,
    pub guest_port: u16,
    /// With a balancer (several VMs): a down VM's open connections are kept to finish or
    /// time out ("keep"), or reset at their next packet ("reset").
    #[serde(default)]
    pub on_down: OnDown,
}

fn default_tcp() -> String {
    "tcp".into()
}

/// `[switch]`: how the topology's vhost-net-backend is set up, for `mode = "switch"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSection {
    /// The tap between the switch and the host (default: "vs-" and the topology's name).
    pub uplink: Option<String>,
    /// The uplink's subnet: the switch takes its first address, the host the second.
    #[serde(default = "default_uplink_subnet")]
    pub uplink_subnet: String,
    /// Queue pairs of every VM NIC (QEMU `queues=`, the port's `queues`).
    #[serde(default = "default_queues")]
    pub queues: u16,
}

fn default_uplink_subnet() -> String {
    "100.64.0.0/30".into()
}
fn default_queues() -> u16 {
    1
}

impl Default for SwitchSection {
    fn default() -> Self {
        SwitchSection {
            uplink: None,
            uplink_subnet: default_uplink_subnet(),
            queues: 1,
        }
    }
}

/// The file as written: networks are read once their mode is known.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    name: String,
    guest: Guest,
    #[serde(default)]
    switch: SwitchSection,
    #[serde(rename = "network")]
    networks: Vec<toml::Value>,
    #[serde(default, rename = "allow")]
    allows: Vec<Allow>,
    #[serde(default, rename = "vm")]
    vms: Vec<Vm>,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub name: String,
    pub guest: Guest,
    pub switch: SwitchSection,
    /// Kernel-bridge networks (bridge-plugin's modes).
    pub networks: Vec<Network>,
    /// Networks of our switch; a file has these or kernel ones, not both.
    pub switch_networks: Vec<SwitchNetwork>,
    pub allows: Vec<Allow>,
    pub vms: Vec<Vm>,
}

impl Topology {
    /// The topology at `path`, every check passed.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        Self::load_with(path, Self::parse)
    }

    /// The topology at `path` as `down` needs it: only the names that name files and
    /// nftables objects checked. `down` stops what `up` started and removes what it
    /// recorded, so a file refused since `up` (an edit, a check added) still takes it down.
    pub fn load_for_down(path: &Path) -> Result<Topology, TopologyError> {
        Self::load_with(path, |text| {
            let topo = Self::parse_unchecked(text)?;
            topo.validate_names()?;
            Ok(topo)
        })
    }

    fn load_with(
        path: &Path,
        parse: impl Fn(&str) -> Result<Topology, TopologyError>,
    ) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse(&text).map_err(|e| {
            // The entry an error is about, where the file has it: "vm NAME: ..." and
            // "network 'NAME': ...".
            let at = match &e {
                TopologyError::Parse { message, .. } => {
                    return TopologyError::Parse {
                        path: path.to_path_buf(),
                        message: message.clone(),
                    }
                }
                TopologyError::Vm { vm, .. } => locate(&text, "vm", vm),
                TopologyError::Switch(m) => m
                    .strip_prefix("network '")
                    .and_then(|r| r.split_once('\''))
                    .and_then(|(n, _)| locate(&text, "network", n)),
                TopologyError::Allow { index, key, .. } => {
                    locate_key(&text, "[[allow]]", *index, key)
                }
                TopologyError::SwitchKey { key, .. } => locate_key(&text, "[switch]", 0, key),
                TopologyError::Network(bridge_plugin::net::NetError::Invalid {
                    network, ..
                }) => locate(&text, "network", network),
                _ => None,
            };
            match at {
                Some((line, column)) => TopologyError::At {
                    path: path.to_path_buf(),
                    line,
                    column,
                    source: Box::new(e),
                },
                None => e,
            }
        })
    }

    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        let topo = Self::parse_unchecked(text)?;
        topo.validate()?;
        Ok(topo)
    }

    fn parse_unchecked(text: &str) -> Result<Topology, TopologyError> {
        let parse_err = |e: toml::de::Error| TopologyError::Parse {
            path: PathBuf::from("topology"),
            message: e.to_string().trim().replace('\n', " "),
        };
        let file: TopologyFile = toml::from_str(text).map_err(parse_err)?;
        let (mut networks, mut switch_networks) = (Vec::new(), Vec::new());
        for (i, n) in file.networks.into_iter().enumerate() {
            let label = n
                .get("name")
                .and_then(|v| v.as_str())
                .map_or(format!("[[network]] {}", i + 1), |s| {
                    format!("network '{s}'")
                });
            let bad = |e: toml::de::Error| TopologyError::Parse {
                path: PathBuf::from("topology"),
                message: format!("{label}: {}", e.message().trim()),
            };
            if n.get("mode").and_then(|m| m.as_str()) == Some("switch") {
                switch_networks.push(n.try_into().map_err(bad)?);
            } else {
                networks.push(n.try_into().map_err(bad)?);
            }
        }
        let topo = Topology {
            name: file.name,
            guest: file.guest,
            switch: file.switch,
            networks,
            switch_networks,
            allows: file.allows,
            vms: file.vms,
        };
        Ok(topo)
    }

    /// Whether the topology runs on our switch (its networks are `mode = "switch"`).
    pub fn on_switch(&self) -> bool {
        !self.switch_networks.is_empty()
    }

    pub fn switch_network(&self, name: &str) -> Option<&SwitchNetwork> {
        self.switch_networks.iter().find(|n| n.name == name)
    }

    /// The names of every network, in file order within their kind.
    pub fn network_names(&self) -> Vec<&str> {
        self.networks
            .iter()
            .map(|n| n.name.as_str())
            .chain(self.switch_networks.iter().map(|n| n.name.as_str()))
            .collect()
    }

    /// The host's (or, on the switch, the gateway's) address on a network, CIDR.
    fn network_address(&self, name: &str) -> Option<&str> {
        match self.switch_network(name) {
            Some(n) => Some(&n.address),
            None => self.network(name)?.address.as_deref(),
        }
    }

    /// The host side: bridges, addresses, NAT and the rules between networks, in an
    /// nftables table of this topology's own, so that topologies live side by side.
    pub fn net_file(&self) -> NetFile {
        NetFile {
            networks: self.networks.clone(),
            allows: self.allows.clone(),
            table: format!("qemu_configs_{}", self.name.replace(['-', '.'], "_")),
        }
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// The VM's NICs, its first (`network`, `address`) then `[[vm.nic]]`'s. A MAC not
    /// configured is derived from the network's and the VM's places in the file.
    pub fn nics(&self, vm: &Vm) -> Vec<Nic> {
        let idx = self.vms.iter().position(|v| v.name == vm.name).unwrap_or(0);
        let first = (vm.network.as_str(), vm.address.as_str(), vm.mac);
        let rest = vm
            .nic
            .iter()
            .map(|n| (n.network.as_str(), n.address.as_str(), n.mac));
        std::iter::once(first)
            .chain(rest)
            .enumerate()
            .map(|(index, (network, address, mac))| {
                let net = self.network_names().iter().position(|n| *n == network);
                Nic {
                    index,
                    network: network.to_string(),
                    address: address.to_string(),
                    mac: mac.unwrap_or(MacAddr([
                        0x52,
                        0x54,
                        0x00,
                        0x0a,
                        net.unwrap_or(0) as u8,
                        idx as u8 + 1,
                    ])),
                    port: if index == 0 {
                        vm.name.clone()
                    } else {
                        format!("{}.eth{index}", vm.name)
                    },
                }
            })
            .collect()
    }

    /// Every VM's NICs on `network`, with their VM.
    pub fn nics_on<'a>(&'a self, network: &'a str) -> impl Iterator<Item = (&'a Vm, Nic)> + 'a {
        self.vms.iter().flat_map(move |vm| {
            self.nics(vm)
                .into_iter()
                .filter(move |n| n.network == network)
                .map(move |n| (vm, n))
        })
    }

    /// The MTU `nic`'s network gives its VMs (QEMU's host_mtu), where it sets one.
    pub fn nic_mtu(&self, nic: &Nic) -> Option<u32> {
        match self.switch_network(&nic.network) {
            Some(n) => n.mtu.map(u32::from),
            None => self.network(&nic.network)?.mtu,
        }
    }

    /// The host's address on the VM's first network, where it has one: the VM's gateway.
    pub fn gateway(&self, vm: &Vm) -> Option<Ipv4Addr> {
        parse_cidr(self.network_address(&vm.network)?).map(|(addr, _)| addr)
    }

    /// The disk `vm` boots from, if VMs boot from disks.
    pub fn disk<'a>(&'a self, vm: &'a Vm) -> Option<&'a Path> {
        vm.disk.as_deref().or(self.guest.disk.as_deref())
    }

    /// The topology's and the VMs' names: they name the state folder, the nftables table,
    /// pid files and sockets, and go into the helper's command line, so they are plain.
    fn validate_names(&self) -> Result<(), TopologyError> {
        if self.name.is_empty()
            || self.name.len() > 32
            || self.name.starts_with('.')
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(TopologyError::Guest(format!(
                "name '{}': 1 to 32 letters, digits, '-', '_' or '.', not starting with '.'",
                self.name
            )));
        }
        for vm in &self.vms {
            if vm.name.is_empty()
                || vm.name.len() > 32
                || !vm
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(TopologyError::Vm {
                    vm: vm.name.clone(),
                    message: "a name has 1 to 32 letters, digits, '-' or '_' (it names files)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), TopologyError> {
        // Checked first, so that their own messages name the problem.
        self.validate_names()?;
        self.validate_allows()?;
        if self.on_switch() {
            self.validate_switch()?;
        } else {
            self.net_file().validate()?;
            // A forward to an address no VM has sends the host's port nowhere.
            for n in &self.networks {
                for f in &n.forward {
                    let owned = self
                        .nics_on(&n.name)
                        .any(|(_, nic)| nic.ip() == Some(f.guest));
                    if !owned {
                        return Err(bridge_plugin::net::NetError::Invalid {
                            network: n.name.clone(),
                            message: format!(
                                "forward of host port {} goes to {}, which no VM on the \
                                 network has (give a VM that address, or forward to one)",
                                f.host_port, f.guest
                            ),
                        }
                        .into());
                    }
                }
            }
        }
        let g = &self.guest;
        if g.initrd.is_some() && g.kernel.is_none() {
            return Err(TopologyError::Guest(
                "initrd needs a kernel (kernel = \"PATH\")".into(),
            ));
        }
        if !matches!(g.accel.as_str(), "kvm" | "tcg" | "kvm:tcg" | "tcg:kvm") {
            return Err(TopologyError::Guest(format!(
                "accel '{}' is not kvm, tcg or kvm:tcg",
                g.accel
            )));
        }
        if self.vms.len() > 250 {
            return Err(TopologyError::Guest("more than 250 VMs in one file".into()));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut macs = HashSet::new();
        let mut disks = HashSet::new();
        for vm in &self.vms {
            let bad = |message: String| TopologyError::Vm {
                vm: vm.name.clone(),
                message,
            };
            if !names.insert(&vm.name) {
                return Err(bad("two VMs have this name".into()));
            }
            if vm.nic.len() > 7 {
                return Err(bad("more than 8 NICs".into()));
            }
            let mut networks = HashSet::new();
            for nic in self.nics(vm) {
                // The first NIC's errors read as before; the others' name their ethN.
                let bad = |message: String| {
                    bad(if nic.index == 0 {
                        message
                    } else {
                        format!("nic eth{}: {message}", nic.index)
                    })
                };
                if !networks.insert(nic.network.clone()) {
                    return Err(bad(format!(
                        "a second NIC on network '{}': give each NIC of a VM its own network",
                        nic.network
                    )));
                }
                self.validate_nic(&nic, &mut addrs, &mut macs)
                    .map_err(bad)?;
            }
            if vm.run.as_deref().is_some_and(|r| r.len() > 1024) {
                return Err(bad(
                    "run is longer than 1024 bytes: put a script in the image instead".into(),
                ));
            }
            match (&g.kernel, self.disk(vm)) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "give either [guest] kernel (and initrd) or a disk, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(bad(
                        "nothing to boot: give [guest] kernel = \"PATH\" (and initrd), or disk = \"PATH\"".into(),
                    ))
                }
                (None, Some(d)) if !disks.insert(d) => {
                    return Err(bad(format!(
                        "disk {} is another VM's too: two VMs writing one image corrupt it; give each VM its own disk = \"PATH\"",
                        d.display()
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One NIC: its network exists, its address is in that network's subnet and is no
    /// one else's, its MAC is unicast and no one else's.
    fn validate_nic(
        &self,
        nic: &Nic,
        addrs: &mut HashSet<Ipv4Addr>,
        macs: &mut HashSet<MacAddr>,
    ) -> Result<(), String> {
        if !self.network_names().contains(&nic.network.as_str()) {
            return Err(format!(
                "network '{}' is not in the file (networks: {})",
                nic.network,
                self.network_names().join(", ")
            ));
        }
        let Some((addr, prefix)) = parse_cidr(&nic.address) else {
            return Err(format!(
                "address '{}' is not an IPv4 CIDR like 10.0.0.10/24",
                nic.address
            ));
        };
        let net_address = self.network_address(&nic.network);
        if let Some((host, host_prefix)) = net_address.and_then(parse_cidr) {
            if prefix != host_prefix || subnet(addr, prefix) != subnet(host, host_prefix) {
                return Err(format!(
                    "address {} is outside network {} ({})",
                    nic.address,
                    nic.network,
                    net_address.unwrap_or_default()
                ));
            }
            if addr == host {
                return Err(format!(
                    "address {addr} is the {} own address on {}",
                    if self.on_switch() {
                        "switch's"
                    } else {
                        "host's"
                    },
                    nic.network
                ));
            }
        }
        if !addrs.insert(addr) {
            return Err(format!("address {addr} is taken by another NIC"));
        }
        if nic.mac.0[0] & 1 != 0 {
            return Err(format!("MAC {} is a multicast address", nic.mac));
        }
        if !macs.insert(nic.mac) {
            return Err(format!("MAC {} is taken by another NIC", nic.mac));
        }
        Ok(())
    }

    /// The switch networks, their allows and forwards, and `[switch]`.
    fn validate_switch(&self) -> Result<(), TopologyError> {
        let err = |m: String| TopologyError::Switch(m);
        if let Some(n) = self.networks.first() {
            return Err(err(format!(
                "network '{}' is a kernel bridge (mode {:?}) in a file whose other networks \
                 are mode = \"switch\"; give every network mode = \"switch\", or none",
                n.name, n.mode
            )));
        }
        let mut names = HashSet::new();
        let mut subnets: Vec<(Ipv4Addr, u8, &str)> = Vec::new();
        for n in &self.switch_networks {
            let at = format!("network '{}'", n.name);
            if n.name.is_empty()
                || n.name == "outside"
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(format!(
                    "{at}: a name has letters, digits, '-' or '_', and is not 'outside'"
                )));
            }
            if !names.insert(&n.name) {
                return Err(err(format!("{at}: two networks have this name")));
            }
            let Some((a, len)) = parse_cidr(&n.address).filter(|(_, l)| *l <= 30) else {
                return Err(err(format!(
                    "{at}: address '{}' is not the gateway's IPv4 CIDR with room for VMs, as \
                     in 10.10.1.1/24",
                    n.address
                )));
            };
            if let Some((_, _, other)) = subnets.iter().find(|(b, l, _)| {
                let l = (*l).min(len);
                subnet(a, l) == subnet(*b, l)
            }) {
                return Err(err(format!(
                    "{at}: subnet {} overlaps network '{other}'; give each network its own",
                    n.address
                )));
            }
            subnets.push((a, len, &n.name));
            if n.mtu.is_some_and(|m| !(68..=9000).contains(&m)) {
                return Err(err(format!("{at}: mtu must be 68..=9000")));
            }
            // Every NIC on the network, a VM's first or a further one: each is a backend.
            let vms = self.nics_on(&n.name).count();
            for f in &n.forward {
                if f.proto != "tcp" {
                    return Err(err(format!(
                        "{at}: forward of {} port {}: only tcp is forwarded to a switch network",
                        f.proto, f.host_port
                    )));
                }
                if vms == 0 {
                    return Err(err(format!(
                        "{at}: forward of host port {} goes to no VM: the network has none",
                        f.host_port
                    )));
                }
                if f.host_port == 0 || f.guest_port == 0 {
                    return Err(err(format!("{at}: forward ports must be above 0")));
                }
                if f.on_down == OnDown::Reset && vms == 1 {
                    return Err(err(format!(
                        "{at}: forward of host port {}: on_down = \"reset\" acts on a \
                         balancer's backends, and one VM gets a plain forward (no health \
                         checks); remove on_down or add VMs to the network",
                        f.host_port
                    )));
                }
                // One balancer per guest port: its forwards agree on what it does.
                if let Some(g) = n
                    .forward
                    .iter()
                    .find(|g| g.guest_port == f.guest_port && g.on_down != f.on_down)
                {
                    return Err(err(format!(
                        "{at}: forwards of host ports {} and {} go to guest port {} with \
                         different on_down; give both the same",
                        g.host_port, f.host_port, f.guest_port
                    )));
                }
            }
        }
        let key_err = |key, message| TopologyError::SwitchKey { key, message };
        if !(1..=16).contains(&self.switch.queues) {
            return Err(key_err(
                "queues",
                format!(
                    "{} queue pairs: the switch offers 1 to 16 a port",
                    self.switch.queues
                ),
            ));
        }
        if parse_cidr(&self.switch.uplink_subnet).is_none_or(|(_, l)| l > 30) {
            return Err(key_err(
                "uplink_subnet",
                format!(
                    "'{}' is not an IPv4 subnet with room for two addresses, as in \
                     100.64.0.0/30",
                    self.switch.uplink_subnet
                ),
            ));
        }
        if self.uplink_tap().len() > 15 {
            return Err(key_err(
                "uplink",
                format!(
                    "'{}' is longer than an interface name may be (15)",
                    self.uplink_tap()
                ),
            ));
        }
        Ok(())
    }

    /// Each `[[allow]]` names networks of the file (or the outside, on the switch), and a
    /// port only where its protocol has ports.
    fn validate_allows(&self) -> Result<(), TopologyError> {
        for (index, a) in self.allows.iter().enumerate() {
            let bad = |key, message| TopologyError::Allow {
                index,
                key,
                label: format!("{} -> {}", a.from, a.to),
                message,
            };
            for (key, end) in [("from", &a.from), ("to", &a.to)] {
                let outside = end == "outside" && self.on_switch();
                if !outside && !self.network_names().contains(&end.as_str()) {
                    return Err(bad(
                        key,
                        format!(
                            "'{end}' is no network of the file (networks: {}{})",
                            self.network_names().join(", "),
                            if self.on_switch() { ", or outside" } else { "" }
                        ),
                    ));
                }
            }
            if a.port.is_some() && a.proto.name() == "icmp" {
                return Err(bad(
                    "port",
                    "icmp has no ports: leave port out, or give proto = \"tcp\" or \"udp\"".into(),
                ));
            }
        }
        Ok(())
    }

    /// The switch's uplink tap.
    pub fn uplink_tap(&self) -> String {
        self.switch.uplink.clone().unwrap_or_else(|| {
            let name: String = self
                .name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(12)
                .collect();
            format!("vs-{name}")
        })
    }
}

/// Standard base64, for handing a command over as one kernel command-line word.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const THREE_TIER: &str = r#"
name = "shop"
[guest]
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd"
append = "console=ttyS0 vnet.ip={address} vnet.gw={gateway} vnet.run={run}"

[[network]]
name = "web"
mode = "nat"
bridge = "br-web"
address = "10.10.1.1/24"
uplink = "eth0"
[[network.forward]]
proto = "tcp"
host_port = 8080
guest = "10.10.1.10"
guest_port = 80

[[network]]
name = "app"
mode = "host-only"
bridge = "br-app"
address = "10.10.2.1/24"

[[allow]]
from = "web"
to = "app"
proto = "tcp"
port = 8080

[[vm]]
name = "web1"
network = "web"
address = "10.10.1.10/24"
run = "httpd -p 80"

[[vm]]
name = "app1"
network = "app"
address = "10.10.2.10/24"
"#;

    fn err(text: &str) -> String {
        Topology::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn loads_and_derives_macs_and_gateways() {
        let t = Topology::parse(THREE_TIER).unwrap();
        assert_eq!(t.vms.len(), 2);
        assert_eq!(t.nics(&t.vms[0])[0].mac.to_string(), "52:54:00:0a:00:01");
        assert_eq!(t.nics(&t.vms[1])[0].mac.to_string(), "52:54:00:0a:01:02");
        assert_eq!(t.gateway(&t.vms[1]), Some(Ipv4Addr::new(10, 10, 2, 1)));
        assert_eq!(t.net_file().allows.len(), 1);
        assert_eq!(t.net_file().table, "qemu_configs_shop");
    }

    #[test]
    fn bad_files_name_the_problem() {
        let e = err(&THREE_TIER.replace("network = \"app\"", "network = \"ap\""));
        assert!(
            e.contains("vm app1") && e.contains("'ap'") && e.contains("web, app"),
            "{e}"
        );
        let e = err(&THREE_TIER.replace("10.10.2.10/24", "10.10.3.10/24"));
        assert!(e.contains("outside network app"), "{e}");
        let e = err(&THREE_TIER.replace("10.10.2.10/24", "10.10.2.1/24"));
        assert!(e.contains("host's own address"), "{e}");
        let e = err(&THREE_TIER.replace("name = \"app1\"", "name = \"web1\""));
        assert!(e.contains("two VMs have this name"), "{e}");
        let e = err(&THREE_TIER.replace("kernel = \"/boot/vmlinuz\"\n", ""));
        assert!(e.contains("initrd needs a kernel"), "{e}");
        let e = err(&THREE_TIER.replace(
            "address = \"10.10.2.10/24\"",
            "address = \"10.10.2.10/24\"\nmac = \"52:54:00:0a:00:01\"",
        ));
        assert!(e.contains("MAC 52:54:00:0a:00:01 is taken"), "{e}");
        let e = err(&THREE_TIER.replace("name = \"app1\"", "name = \"app 1\""));
        assert!(e.contains("letters, digits"), "{e}");
        let e = err(&THREE_TIER.replace(
            "[[vm]]\nname = \"web1\"",
            "[[vm]]\nname = \"web1\"\ncolor = \"red\"",
        ));
        assert!(e.contains("unknown field") && e.contains("color"), "{e}");
        // The network part is bridge-plugin's own check.
        let e = err(&THREE_TIER.replace("uplink = \"eth0\"\n", ""));
        assert!(e.contains("needs uplink"), "{e}");
        let e = err(&THREE_TIER.replace("br-app", "br$(reboot)"));
        assert!(e.contains("letters, digits"), "{e}");
        let e = err(&THREE_TIER.replace("10.10.2.1/24", "10.10.1.2/24"));
        assert!(e.contains("overlaps network 'web'"), "{e}");
        let e = err(&THREE_TIER.replace("guest = \"10.10.1.10\"", "guest = \"10.10.1.99\""));
        assert!(
            e.contains("network 'web'")
                && e.contains("goes to 10.10.1.99, which no VM on the network has"),
            "{e}"
        );
        let e = err(&THREE_TIER.replace("name = \"shop\"", "name = \"../etc\""));
        assert!(e.contains("name '../etc'"), "{e}");
        // Disks: one per VM.
        let disks = THREE_TIER.replace(
            "kernel = \"/boot/vmlinuz\"\ninitrd = \"/boot/initrd\"",
            "disk = \"/vm/base.qcow2\"",
        );
        let e = err(&disks);
        assert!(
            e.contains("vm app1: disk /vm/base.qcow2 is another VM's too"),
            "{e}"
        );
        let own = disks.replace(
            "network = \"app\"\n",
            "network = \"app\"\ndisk = \"/vm/app1.qcow2\"\n",
        );
        Topology::parse(&own).unwrap();
    }

    #[test]
    fn down_reads_a_file_refused_since_up_checking_only_its_names() {
        let dir = std::env::temp_dir().join(format!("qc-down-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        // An overlap `up` refuses: `down` still reads the file.
        std::fs::write(&path, THREE_TIER.replace("10.10.2.1/24", "10.10.1.2/24")).unwrap();
        let e = Topology::load(&path).unwrap_err().to_string();
        assert!(e.contains("overlaps network 'web'"), "{e}");
        let t = Topology::load_for_down(&path).unwrap();
        assert_eq!(t.net_file().table, "qemu_configs_shop");
        assert_eq!(t.vms.len(), 2);
        // Names still checked: they name pid files, sockets and the table.
        for bad in [
            THREE_TIER.replace("name = \"app1\"", "name = \"../app1\""),
            THREE_TIER.replace("name = \"shop\"", "name = \"../etc\""),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Topology::load_for_down(&path).unwrap_err().to_string();
            assert!(e.contains("letters, digits"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_of_a_file_name_its_line_and_column() {
        let dir = std::env::temp_dir().join(format!("qc-at-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(
            &path,
            THREE_TIER.replace("network = \"app\"", "network = \"ap\""),
        )
        .unwrap();
        let e = Topology::load(&path).unwrap_err().to_string();
        let line = THREE_TIER
            .lines()
            .position(|l| l == "name = \"app1\"")
            .unwrap()
            + 1;
        assert!(
            e.starts_with(&format!(
                "{}:{line}:8: vm app1: network 'ap'",
                path.display()
            )),
            "{e}"
        );
        // A kernel network's error (bridge-plugin's check) at the network's name.
        std::fs::write(&path, THREE_TIER.replace("uplink = \"eth0\"\n", "")).unwrap();
        let e = Topology::load(&path).unwrap_err().to_string();
        let line = THREE_TIER
            .lines()
            .position(|l| l == "name = \"web\"")
            .unwrap()
            + 1;
        assert!(
            e.starts_with(&format!("{}:{line}:8: ", path.display())) && e.contains("needs uplink"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A switch topology with two networks, an allow and a `[switch]` table.
    const ON_SWITCH: &str = r#"
name = "sw"
[guest]
kernel = "/boot/vmlinuz"

[switch]
queues = 2

[[network]]
name = "web"
mode = "switch"
address = "10.10.1.1/24"

[[network]]
name = "app"
mode = "switch"
address = "10.10.2.1/24"

[[allow]]
from = "web"
to = "app"
proto = "tcp"
port = 8080

[[allow]]
from = "outside"
to = "web"
proto = "tcp"
port = 80

[[vm]]
name = "web1"
network = "web"
address = "10.10.1.10/24"
"#;

    /// ON_SWITCH with app1 on app and, by a second NIC, on web.
    pub fn two_nics() -> String {
        format!(
            "{ON_SWITCH}\n[[vm]]\nname = \"app1\"\nnetwork = \"app\"\naddress = \"10.10.2.10/24\"\n\
             [[vm.nic]]\nnetwork = \"web\"\naddress = \"10.10.1.20/24\"\n"
        )
    }

    #[test]
    fn a_forward_counts_every_nic_on_its_network_and_its_on_down_is_checked() {
        // web's service on web1 and on app1's second NIC: a balancer over both.
        let forward = "[[network.forward]]\nhost_port = 8080\nguest_port = 80\n";
        let with = |extra: &str| {
            two_nics().replace(
                "address = \"10.10.1.1/24\"\n",
                &format!("address = \"10.10.1.1/24\"\n{forward}{extra}"),
            )
        };
        let t = Topology::parse(&with("on_down = \"reset\"\n")).unwrap();
        assert_eq!(t.switch_networks[0].forward[0].on_down, OnDown::Reset);
        // Only a secondary NIC on the network: still a VM to forward to.
        let t = Topology::parse(&two_nics().replace(
            "address = \"10.10.2.1/24\"\n",
            &format!("address = \"10.10.2.1/24\"\n{forward}"),
        ));
        assert!(t.is_ok(), "{:?}", t.err());
        let e = err(&with("on_down = \"drop\"\n"));
        assert!(e.contains("expected `keep` or `reset`"), "{e}");
        let e = err(&format!(
            "{}{forward}",
            ON_SWITCH.replace(
                "address = \"10.10.1.1/24\"\n",
                "address = \"10.10.1.1/24\"\n[[network.forward]]\nhost_port = 8080\nguest_port = 80\non_down = \"reset\"\n"
            )
        ));
        assert!(e.contains("one VM gets a plain forward"), "{e}");
        let e = err(&with(&format!(
            "on_down = \"reset\"\n{}",
            forward.replace("8080", "8081")
        )));
        assert!(e.contains("different on_down"), "{e}");
    }

    #[test]
    fn a_vm_may_have_a_nic_on_each_of_several_networks() {
        let t = Topology::parse(&two_nics()).unwrap();
        let nics = t.nics(&t.vms[1]);
        let seen: Vec<(usize, &str, &str, String, &str)> = nics
            .iter()
            .map(|n| {
                let mac = n.mac.to_string();
                (
                    n.index,
                    n.network.as_str(),
                    n.address.as_str(),
                    mac,
                    n.port.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    0,
                    "app",
                    "10.10.2.10/24",
                    "52:54:00:0a:01:02".into(),
                    "app1"
                ),
                (
                    1,
                    "web",
                    "10.10.1.20/24",
                    "52:54:00:0a:00:02".into(),
                    "app1.eth1"
                ),
            ]
        );
        let on_web: Vec<String> = t.nics_on("web").map(|(_, n)| n.port).collect();
        assert_eq!(on_web, ["web1", "app1.eth1"]);
        // Each NIC is checked as a VM's first is, and names its ethN.
        let e = err(&two_nics().replace("10.10.1.20/24", "10.10.3.20/24"));
        assert!(
            e.contains("vm app1: nic eth1: address 10.10.3.20/24 is outside network web"),
            "{e}"
        );
        let e = err(&two_nics().replace("10.10.1.20/24", "10.10.1.10/24"));
        assert!(e.contains("nic eth1: address 10.10.1.10 is taken"), "{e}");
        let e = err(&two_nics().replace(
            "network = \"web\"\naddress = \"10.10.1.20",
            "network = \"app\"\naddress = \"10.10.2.20",
        ));
        assert!(e.contains("nic eth1: a second NIC on network 'app'"), "{e}");
        let e = err(&two_nics().replace(
            "network = \"web\"\naddress = \"10.10.1.20",
            "network = \"wbe\"\naddress = \"10.10.1.20",
        ));
        assert!(
            e.contains("nic eth1: network 'wbe' is not in the file"),
            "{e}"
        );
        let e = err(&format!("{}mac = \"52:54:00:0a:00:01\"\n", two_nics()));
        assert!(
            e.contains("nic eth1: MAC 52:54:00:0a:00:01 is taken"),
            "{e}"
        );
    }

    /// `text`'s error when loaded from a file, and the line (from 1) of `needle` in it.
    fn load_err(text: &str, needle: &str) -> (String, usize, PathBuf) {
        let dir = std::env::temp_dir().join(format!("qc-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", needle.len()));
        std::fs::write(&path, text).unwrap();
        let e = Topology::load(&path).unwrap_err().to_string();
        let line = text.lines().position(|l| l == needle).map_or(0, |i| i + 1);
        (e, line, path)
    }

    #[test]
    fn errors_of_allows_and_the_switch_table_name_their_line_and_column() {
        Topology::parse(ON_SWITCH).unwrap();
        // The second allow's `to`, a network that is not there.
        let text = ON_SWITCH.replace("to = \"web\"", "to = \"wbe\"");
        let (e, line, path) = load_err(&text, "to = \"wbe\"");
        assert_eq!(
            e,
            format!(
                "{}:{line}:6: [[allow]] outside -> wbe: 'wbe' is no network of the file \
                 (networks: web, app, or outside)",
                path.display()
            )
        );
        // A port on icmp: the port's line.
        let text = ON_SWITCH.replacen("proto = \"tcp\"", "proto = \"icmp\"", 1);
        let (e, line, path) = load_err(&text, "port = 8080");
        assert!(
            e.starts_with(&format!(
                "{}:{line}:8: [[allow]] web -> app: icmp has no ports",
                path.display()
            )),
            "{e}"
        );
        // [switch] keys: the value written.
        let text = ON_SWITCH.replace("queues = 2", "queues = 17");
        let (e, line, path) = load_err(&text, "queues = 17");
        assert_eq!(
            e,
            format!(
                "{}:{line}:10: [switch] queues: 17 queue pairs: the switch offers 1 to 16 a port",
                path.display()
            )
        );
        let text = ON_SWITCH.replace("queues = 2", "queues = 2\nuplink = \"vs-a-very-long-one\"");
        let (e, line, path) = load_err(&text, "uplink = \"vs-a-very-long-one\"");
        assert!(
            e.starts_with(&format!(
                "{}:{line}:10: [switch] uplink: 'vs-a-very-long-one' is longer",
                path.display()
            )),
            "{e}"
        );
        let text = ON_SWITCH.replace(
            "[switch]\nqueues = 2",
            "[switch]\nuplink_subnet = \"100.64.0.0/31\"",
        );
        let (e, line, path) = load_err(&text, "uplink_subnet = \"100.64.0.0/31\"");
        assert!(
            e.starts_with(&format!(
                "{}:{line}:17: [switch] uplink_subnet:",
                path.display()
            )),
            "{e}"
        );
        // Kernel-bridge files: the same check, without the outside.
        let text = THREE_TIER.replace("to = \"app\"", "to = \"apps\"");
        let (e, line, path) = load_err(&text, "to = \"apps\"");
        assert_eq!(
            e,
            format!(
                "{}:{line}:6: [[allow]] web -> apps: 'apps' is no network of the file \
                 (networks: web, app)",
                path.display()
            )
        );
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"httpd -p 80 -h /www"),
            "aHR0cGQgLXAgODAgLWggL3d3dw=="
        );
    }
}
