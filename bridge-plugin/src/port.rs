//! Settings for a tap attached to a bridge (per-bridge file and helper options), and the
//! attaching itself.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::netlink::{Netlink, NetlinkError};

#[derive(Debug, Error)]
pub enum PortError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("bridge {0} does not exist: create it first (bridge-plugin net up FILE) or fix br=")]
    NoBridge(String),
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Nft(#[from] crate::nft::NftError),
    #[error("{0}")]
    Untrusted(#[from] crate::privilege::PrivilegeError),
}

/// Whether `name` can be a network interface's name (1 to 15 bytes, no '/', whitespace or
/// ':', not "." or ".."), which also keeps it from naming a file outside a folder.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// What the taps of one bridge get. From `<config-dir>/<bridge>.toml`, overridden by the
/// helper's own `--key=value` options.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortSettings {
    /// Access VLAN on a VLAN-filtering bridge.
    pub vlan: Option<u16>,
    /// MTU of the tap; default: the bridge's.
    pub mtu: Option<u32>,
    /// Bridge port isolation: isolated ports reach only non-isolated ones.
    #[serde(default)]
    pub isolated: bool,
    /// Rate limit of traffic into the VM, Mbit/s.
    pub ingress_mbit: Option<u32>,
    /// Rate limit of traffic out of the VM, Mbit/s.
    pub egress_mbit: Option<u32>,
}

impl PortSettings {
    /// Reads `dir/<bridge>.toml` if it exists.
    pub fn for_bridge(dir: &Path, bridge: &str) -> Result<PortSettings, PortError> {
        PortSettings::read(dir, bridge, false)
    }

    /// `for_bridge` for a helper running with privilege: the file, if there is one, must
    /// be root's and writable by no one else, as must the folders above it.
    pub fn for_bridge_root_owned(dir: &Path, bridge: &str) -> Result<PortSettings, PortError> {
        PortSettings::read(dir, bridge, true)
    }

    fn read(dir: &Path, bridge: &str, root_owned: bool) -> Result<PortSettings, PortError> {
        if !valid_ifname(bridge) {
            return Err(PortError::Config {
                path: dir.to_path_buf(),
                message: format!("'{bridge}' is not a bridge name"),
            });
        }
        let path = dir.join(format!("{bridge}.toml"));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if root_owned {
                    crate::privilege::require_root_owned_path(&path)?;
                }
                let s: PortSettings = toml::from_str(&text).map_err(|e| PortError::Config {
                    path: path.clone(),
                    message: e.to_string().replace('\n', " "),
                })?;
                s.validate()
                    .map_err(|message| PortError::Config { path, message })?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PortSettings::default()),
            Err(e) => Err(PortError::Config {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Applies one `--key=value` option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("--{key}={v}: not a number"))
        };
        match key {
            "vlan" => self.vlan = Some(num(value)? as u16),
            "mtu" => self.mtu = Some(num(value)?),
            "isolated" => self.isolated = matches!(value, "1" | "yes" | "true" | "on"),
            "ingress-mbit" => self.ingress_mbit = Some(num(value)?),
            "egress-mbit" => self.egress_mbit = Some(num(value)?),
            _ => return Err(format!("unknown option --{key}")),
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(format!("vlan {v} is out of range: use 1..=4094"));
            }
        }
        if let Some(m) = self.mtu {
            if !(68..=65535).contains(&m) {
                return Err(format!("mtu {m} is out of range: use 68..=65535"));
            }
        }
        Ok(())
    }
}

/// Attaches tap `tap` to `bridge` with `settings`, then brings it up.
pub fn attach(
    nl: &mut Netlink,
    tap: &str,
    bridge: &str,
    settings: &PortSettings,
) -> Result<(), PortError> {
    let br = match nl.link(bridge) {
        Ok(l) => l,
        Err(NetlinkError::NoSuchLink(_)) => return Err(PortError::NoBridge(bridge.to_string())),
        Err(e) => return Err(e.into()),
    };
    if br.kind.as_deref() != Some("bridge") {
        return Err(PortError::NoBridge(bridge.to_string()));
    }
    nl.set_mtu(tap, settings.mtu.unwrap_or(br.mtu))?;
    // A bridge takes the lowest of its ports' MACs as its own; a tap whose MAC starts with
    // FE never is the lowest, so the bridge's MAC stays put as VMs come and go (as
    // qemu-bridge-helper does).
    if let Some(mut mac) = nl.link(tap)?.mac {
        mac[0] = 0xfe;
        nl.set_mac(tap, mac)?;
    }
    nl.set_controller(tap, bridge)?;
    if let Some(vid) = settings.vlan {
        nl.set_access_vlan(tap, vid)?;
    }
    if settings.isolated {
        nl.set_port_isolated(tap, true)?;
    }
    if let Some(rate) = settings.ingress_mbit {
        // Into the VM is the tap's egress: a 256 KiB bucket, 50 ms of queue.
        nl.set_tbf(tap, u64::from(rate) * 125_000, 256 * 1024, 50)?;
    }
    if let Some(rate) = settings.egress_mbit {
        crate::nft::limit_tap_egress(tap, rate)?;
    }
    nl.set_up(tap)?;
    Ok(())
}

/// Whether this process may configure the network (CAP_NET_ADMIN in its effective set).
pub fn has_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_file_and_options() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            PortSettings::for_bridge(d.path(), "br0").unwrap(),
            PortSettings::default()
        );
        std::fs::write(
            d.path().join("br0.toml"),
            "vlan = 20\nisolated = true\ningress_mbit = 100\n",
        )
        .unwrap();
        let mut s = PortSettings::for_bridge(d.path(), "br0").unwrap();
        assert_eq!(
            (s.vlan, s.isolated, s.ingress_mbit),
            (Some(20), true, Some(100))
        );
        s.set("vlan", "30").unwrap();
        assert_eq!(s.vlan, Some(30));
        assert!(s.set("vlan", "5000").unwrap_err().contains("5000"));
        assert!(s.set("colour", "red").unwrap_err().contains("--colour"));
        std::fs::write(d.path().join("br1.toml"), "vlan = 20\nspeed = 3\n").unwrap();
        let e = PortSettings::for_bridge(d.path(), "br1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("br1.toml") && e.contains("speed") && e.contains("line 2"),
            "{e}"
        );
        std::fs::write(d.path().join("br2.toml"), "vlan = 0\n").unwrap();
        assert!(PortSettings::for_bridge(d.path(), "br2")
            .unwrap_err()
            .to_string()
            .contains("vlan 0"));
    }
}
