//! The desired state (`apply FILE.toml`), the changes that reach it, and carrying them out.
//! Only what differs is changed; a dry run prints each change as the equivalent command.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::error::SriovError;
use crate::sysfs::{PfState, Sysfs};
use crate::vf::{mac_string, LinkState, VfNetState, VfNetlink, VfSetting};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VfConfig {
    pub index: u32,
    pub mac: Option<String>,
    pub vlan: Option<u16>,
    #[serde(default)]
    pub qos: u8,
    pub spoof_check: Option<bool>,
    pub trust: Option<bool>,
    pub min_tx_rate: Option<u32>,
    pub max_tx_rate: Option<u32>,
    pub link_state: Option<LinkState>,
    /// "vfio-pci" for passthrough, or "default" for the PF's VF driver.
    pub driver: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PfConfig {
    /// PCI address (0000:03:00.0) or network interface (enp3s0f0) of the PF.
    pub device: String,
    pub num_vfs: u32,
    #[serde(default, rename = "vf")]
    pub vfs: Vec<VfConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    #[serde(rename = "pf")]
    pub pfs: Vec<PfConfig>,
}

impl Desired {
    pub fn load(path: &Path) -> Result<Desired, SriovError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| SriovError::Io(path.to_path_buf(), e))?;
        let d: Desired = toml::from_str(&text).map_err(|e| SriovError::Config {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        for pf in &d.pfs {
            for vf in &pf.vfs {
                let bad = |message: String| SriovError::Config {
                    path: path.to_path_buf(),
                    message: format!("{} vf {}: {message}", pf.device, vf.index),
                };
                if let Some(m) = &vf.mac {
                    parse_mac(m)
                        .ok_or_else(|| bad(format!("mac '{m}' is not like 52:54:00:12:34:56")))?;
                }
                if vf.vlan.is_some_and(|v| v > 4094) {
                    return Err(bad("vlan must be 0..=4094".into()));
                }
                if vf.qos > 7 {
                    return Err(bad("qos must be 0..=7".into()));
                }
                if let Some(d) = &vf.driver {
                    if d != "vfio-pci" && d != "default" {
                        return Err(bad(format!(
                            "driver '{d}': use \"vfio-pci\" or \"default\""
                        )));
                    }
                }
            }
        }
        Ok(d)
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<hostnet::MacAddr>().ok().map(|m| m.0)
}

/// One change to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    NumVfs {
        pf: String,
        from: u32,
        to: u32,
    },
    Vf {
        pf_netdev: String,
        vf: u32,
        setting: VfSetting,
    },
    Driver {
        vf_bdf: String,
        from: Option<String>,
        to_vfio: bool,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::NumVfs { pf, from, to } => {
                let path = format!("/sys/bus/pci/devices/{pf}/sriov_numvfs");
                if *from != 0 && *to != 0 {
                    // The kernel only changes a non-zero count through 0.
                    write!(f, "echo 0 > {path}; echo {to} > {path}")
                } else {
                    write!(f, "echo {to} > {path}")
                }
            }
            Change::Vf {
                pf_netdev,
                vf,
                setting,
            } => {
                write!(
                    f,
                    "ip link set dev {pf_netdev} vf {vf} {}",
                    setting.ip_words()
                )
            }
            Change::Driver {
                vf_bdf,
                from,
                to_vfio,
            } => {
                let dev = format!("/sys/bus/pci/devices/{vf_bdf}");
                let target = if *to_vfio { "vfio-pci" } else { "" };
                write!(f, "echo '{target}' > {dev}/driver_override")?;
                if let Some(d) = from {
                    write!(f, "; echo {vf_bdf} > /sys/bus/pci/drivers/{d}/unbind")?;
                }
                write!(f, "; echo {vf_bdf} > /sys/bus/pci/drivers_probe")
            }
        }
    }
}

/// Where VF settings can be read: the PF's netdev and its VFs as netlink reports them.
pub trait VfSource {
    fn vfs(&mut self, pf_netdev: &str) -> Result<Vec<VfNetState>, SriovError>;
}

impl VfSource for VfNetlink {
    fn vfs(&mut self, pf_netdev: &str) -> Result<Vec<VfNetState>, SriovError> {
        Ok(self.link(pf_netdev)?.vfs)
    }
}

/// The VFs as they will be once planned count changes are made, for a dry run: a PF whose
/// count changes gets all its VFs anew (the kernel goes through 0), each with no settings;
/// any other PF's are read from netlink, opened only if one is asked for.
pub struct AfterCounts {
    /// The netdevs of the PFs whose count changes.
    pub recreated: Vec<String>,
    pub netlink: Option<VfNetlink>,
}

impl VfSource for AfterCounts {
    fn vfs(&mut self, pf_netdev: &str) -> Result<Vec<VfNetState>, SriovError> {
        if self.recreated.iter().any(|n| n == pf_netdev) {
            return Ok(Vec::new());
        }
        let nl = match &mut self.netlink {
            Some(nl) => nl,
            None => self.netlink.insert(VfNetlink::open()?),
        };
        nl.vfs(pf_netdev)
    }
}

pub fn resolve_pf(sysfs: &Sysfs, device: &str) -> Result<PfState, SriovError> {
    let bdf = if device.contains(':') {
        device.to_string()
    } else {
        sysfs.bdf_of_netdev(device)?
    };
    sysfs.pf(&bdf)
}

/// The VF count changes needed.
pub fn plan_counts(sysfs: &Sysfs, desired: &Desired) -> Result<Vec<Change>, SriovError> {
    let mut out = Vec::new();
    for p in &desired.pfs {
        let pf = resolve_pf(sysfs, &p.device)?;
        if p.num_vfs > pf.total_vfs {
            return Err(SriovError::TooMany {
                pf: pf.bdf,
                want: p.num_vfs,
                total: pf.total_vfs,
            });
        }
        if let Some(vf) = p.vfs.iter().find(|v| v.index >= p.num_vfs) {
            return Err(SriovError::NoSuchVf {
                pf: pf.bdf,
                vf: vf.index,
                num: p.num_vfs,
            });
        }
        if pf.num_vfs != p.num_vfs {
            out.push(Change::NumVfs {
                pf: pf.bdf,
                from: pf.num_vfs,
                to: p.num_vfs,
            });
        }
    }
    Ok(out)
}

/// The VF setting and driver changes needed, against the VFs as they are now.
pub fn plan_vfs(
    sysfs: &Sysfs,
    desired: &Desired,
    source: &mut dyn VfSource,
) -> Result<Vec<Change>, SriovError> {
    let mut out = Vec::new();
    for p in &desired.pfs {
        let pf = resolve_pf(sysfs, &p.device)?;
        let wants_settings = p.vfs.iter().any(|v| {
            v.mac.is_some()
                || v.vlan.is_some()
                || v.spoof_check.is_some()
                || v.trust.is_some()
                || v.min_tx_rate.is_some()
                || v.max_tx_rate.is_some()
                || v.link_state.is_some()
        });
        let (netdev, current) = match (&pf.netdev, wants_settings) {
            (Some(n), true) => (n.clone(), source.vfs(n)?),
            (None, true) => return Err(SriovError::NoPfNetdev { pf: pf.bdf }),
            (n, false) => (n.clone().unwrap_or_default(), Vec::new()),
        };
        for v in &p.vfs {
            let now = current
                .iter()
                .find(|c| c.index == v.index)
                .cloned()
                .unwrap_or_default();
            let mut push = |setting: VfSetting| {
                out.push(Change::Vf {
                    pf_netdev: netdev.clone(),
                    vf: v.index,
                    setting,
                })
            };
            if let Some(m) = &v.mac {
                let mac = parse_mac(m).expect("validated");
                if now.mac != mac_string(&mac) {
                    push(VfSetting::Mac(mac));
                }
            }
            if let Some(vlan) = v.vlan {
                if now.vlan != u32::from(vlan) || now.qos != u32::from(v.qos) {
                    push(VfSetting::Vlan { vlan, qos: v.qos });
                }
            }
            if let Some(s) = v.spoof_check {
                if now.spoof_check != Some(s) {
                    push(VfSetting::SpoofCheck(s));
                }
            }
            if let Some(t) = v.trust {
                if now.trust != Some(t) {
                    push(VfSetting::Trust(t));
                }
            }
            if v.min_tx_rate.is_some() || v.max_tx_rate.is_some() {
                let min = v.min_tx_rate.unwrap_or(now.min_tx_rate);
                let max = v.max_tx_rate.unwrap_or(now.max_tx_rate);
                if (min, max) != (now.min_tx_rate, now.max_tx_rate) {
                    push(VfSetting::Rate { min, max });
                }
            }
            if let Some(s) = v.link_state {
                if now.link_state != Some(s) {
                    push(VfSetting::LinkState(s));
                }
            }
            if let Some(d) = &v.driver {
                let Some(vf) = pf.vfs.iter().find(|x| x.index == v.index) else {
                    continue;
                };
                let to_vfio = d == "vfio-pci";
                let is_vfio = vf.driver.as_deref() == Some("vfio-pci");
                if to_vfio != is_vfio || (!to_vfio && vf.driver.is_none()) {
                    if to_vfio && vf.iommu_group.is_none() && !noiommu_enabled(sysfs) {
                        return Err(SriovError::NoIommu { vf: vf.bdf.clone() });
                    }
                    out.push(Change::Driver {
                        vf_bdf: vf.bdf.clone(),
                        from: vf.driver.clone(),
                        to_vfio,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// vfio's unsafe no-IOMMU mode (for tests and hosts without an IOMMU; no isolation).
pub fn noiommu_enabled(sysfs: &Sysfs) -> bool {
    std::fs::read_to_string(
        sysfs
            .root
            .join("sys/module/vfio/parameters/enable_unsafe_noiommu_mode"),
    )
    .is_ok_and(|v| v.trim() == "Y")
}

/// Carries out one change.
pub fn execute(
    sysfs: &Sysfs,
    nl: Option<&mut VfNetlink>,
    change: &Change,
) -> Result<(), SriovError> {
    match change {
        Change::NumVfs { pf, from, to } => {
            let path = sysfs.device(pf).join("sriov_numvfs");
            if *from != 0 && *to != 0 {
                sysfs.write(&path, "0")?;
            }
            sysfs.write(&path, &to.to_string())
        }
        Change::Vf {
            pf_netdev,
            vf,
            setting,
        } => {
            let nl = nl.ok_or_else(|| SriovError::Socket("no netlink socket".into()))?;
            let link = nl.link(pf_netdev)?;
            nl.set(&link, *vf, setting)
        }
        Change::Driver {
            vf_bdf,
            from,
            to_vfio,
        } => {
            let dev = sysfs.device(vf_bdf);
            sysfs.write(
                &dev.join("driver_override"),
                if *to_vfio { "vfio-pci" } else { "\n" },
            )?;
            if from.is_some() {
                sysfs.write(&dev.join("driver/unbind"), vf_bdf)?;
            }
            sysfs.write(&sysfs.root.join("sys/bus/pci/drivers_probe"), vf_bdf)
        }
    }
}

/// `-device vfio-pci` arguments for the VFs bound to vfio-pci, after checking that each
/// one's IOMMU group holds nothing bound to a host driver.
pub fn qemu_args(sysfs: &Sysfs) -> Result<Vec<String>, SriovError> {
    let mut args = Vec::new();
    for pf in sysfs.pfs()? {
        for vf in pf
            .vfs
            .iter()
            .filter(|v| v.driver.as_deref() == Some("vfio-pci"))
        {
            if let Some(group) = &vf.iommu_group {
                for (other, driver) in sysfs.iommu_group(group) {
                    if let Some(d) = driver.filter(|d| d != "vfio-pci" && d != "pci-stub") {
                        return Err(SriovError::GroupInUse {
                            group: group.clone(),
                            vf: vf.bdf.clone(),
                            other,
                            driver: d,
                        });
                    }
                }
            }
            let id = format!("vf-{}", vf.bdf.replace([':', '.'], "-"));
            args.push("-device".into());
            args.push(format!("vfio-pci,host={},id={id}", vf.bdf));
        }
    }
    Ok(args)
}
