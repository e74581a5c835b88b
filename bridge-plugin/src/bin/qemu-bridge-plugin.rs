//! A drop-in for QEMU's `qemu-bridge-helper`:
//!
//!   -netdev bridge,id=n0,br=br0,helper=/usr/lib/qemu/qemu-bridge-plugin
//!   -netdev bridge,id=n0,br=br0,helper="qemu-bridge-plugin --vlan=20"
//!
//! QEMU runs it with `--use-vnet --fd=N --br=BR`; it creates a tap, attaches it to the
//! bridge as the ACL file and the bridge's settings say, and sends the tap's fd back over
//! fd N. It either sends an fd and exits 0, or exits non-zero with one line on stderr.
//!
//! Installed setuid root or with file capabilities, it runs with more privilege than its
//! caller. Then, before anything else, it becomes the caller again with CAP_NET_ADMIN as its
//! only capability (as qemu-bridge-helper does with libcap-ng), so it reads the ACL with the
//! caller's rights; only the administrator's files decide (the default ACL and config
//! folder, which must be root's and writable by no one else); `--acl=`, `--config-dir=` and
//! per-port overrides from the caller are refused; and it runs nothing through the caller's
//! PATH (tc is netlink, nft is /usr/sbin/nft with an empty environment).
//!
//! Its arguments are parsed by hand, not with clap: QEMU and libvirt show its stderr as
//! the reason a VM did not start, so every refusal is one line naming the bridge.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use bridge_plugin::acl::{Acl, Verdict};
use bridge_plugin::netlink::Netlink;
use bridge_plugin::port::{attach, has_net_admin, valid_ifname, PortSettings};
use bridge_plugin::privilege::{drop_to_caller, elevated};
use bridge_plugin::tap::Tap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const DEFAULT_ACL: &str = "/etc/qemu/bridge.conf";
const DEFAULT_CONFIG_DIR: &str = "/etc/qemu/bridge-plugin";

const USAGE: &str = "usage: qemu-bridge-plugin [--use-vnet] --br=BRIDGE --fd=UNIXFD \
[--acl=FILE] [--config-dir=DIR] [--vlan=ID] [--mtu=N] [--isolated=1] [--ingress-mbit=N] [--egress-mbit=N]";

fn run() -> Result<(), String> {
    let elevated = elevated();
    if elevated {
        drop_to_caller().map_err(|e| e.to_string())?;
    }
    let mut use_vnet = false;
    let (mut bridge, mut fd) = (None, None);
    let mut acl_path = PathBuf::from(DEFAULT_ACL);
    let mut config_dir = PathBuf::from(DEFAULT_CONFIG_DIR);
    let mut overrides = Vec::new();
    for arg in std::env::args().skip(1) {
        if arg == "--use-vnet" {
            use_vnet = true;
            continue;
        }
        if arg == "--help" || arg == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let Some((key, value)) = arg.strip_prefix("--").and_then(|a| a.split_once('=')) else {
            return Err(format!("unexpected argument '{arg}' (see --help)"));
        };
        match key {
            "br" => bridge = Some(value.to_string()),
            "fd" => {
                fd = Some(
                    value
                        .parse::<i32>()
                        .map_err(|_| format!("--fd={value} is not a number"))?,
                )
            }
            "acl" => acl_path = PathBuf::from(value),
            "config-dir" => config_dir = PathBuf::from(value),
            _ => overrides.push((key.to_string(), value.to_string())),
        }
    }
    if elevated {
        // Everything but the protocol's own arguments is the caller's choice.
        let chosen: Vec<String> = std::env::args()
            .skip(1)
            .filter_map(|a| Some(a.strip_prefix("--")?.split_once('=')?.0.to_string()))
            .filter(|key| key != "br" && key != "fd")
            .map(|key| format!("--{key}="))
            .collect();
        if !chosen.is_empty() {
            return Err(format!(
                "{} refused: this helper runs setuid or with file capabilities, so only \
                 {DEFAULT_ACL} and {DEFAULT_CONFIG_DIR}/BRIDGE.toml decide (set it there)",
                chosen.join(", ")
            ));
        }
    }
    let bridge = bridge.ok_or("missing --br=BRIDGE (see --help)")?;
    let fd = fd.ok_or("missing --fd=UNIXFD (see --help)")?;
    if !valid_ifname(&bridge) {
        return Err(format!(
            "bridge name '{bridge}' must have 1 to 15 characters, none of them '/', ':' or blank"
        ));
    }
    if !has_net_admin() {
        return Err("needs CAP_NET_ADMIN to create taps: run QEMU's helper as root (setuid) or give it cap_net_admin+ep".into());
    }

    let acl = if elevated {
        Acl::load_root_owned(&acl_path)
    } else {
        Acl::load(&acl_path)
    }
    .map_err(|e| format!("bridge {bridge}: {e}"))?;
    match acl.check(&bridge) {
        Verdict::Allowed => {}
        Verdict::DeniedBy(e) => {
            return Err(format!(
                "bridge {bridge} is denied by {}:{} ({:?})",
                e.path.display(),
                e.line,
                e.rule
            ))
        }
        Verdict::NotAllowed => {
            return Err(format!(
                "bridge {bridge} is not allowed by {}: add 'allow {bridge}'",
                acl_path.display()
            ))
        }
    }
    let mut settings = if elevated {
        PortSettings::for_bridge_root_owned(&config_dir, &bridge)
    } else {
        PortSettings::for_bridge(&config_dir, &bridge)
    }
    .map_err(|e| format!("bridge {bridge}: {e}"))?;
    for (k, v) in &overrides {
        settings
            .set(k, v)
            .map_err(|e| format!("bridge {bridge}: {e}"))?;
    }

    let tap =
        Tap::open("tap%d", 1, use_vnet, false).map_err(|e| format!("cannot create a tap: {e}"))?;
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    attach(&mut nl, &tap.name, &bridge, &settings).map_err(|e| format!("bridge {bridge}: {e}"))?;

    // SAFETY: QEMU passes us this end of its socketpair as fd N; we own it from here on.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    sock.send_with_fd(&[0u8][..], tap.queues[0].as_raw_fd())
        .map_err(|e| format!("cannot send the tap fd over --fd={fd}: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qemu-bridge-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
