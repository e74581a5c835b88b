//! SR-IOV state in sysfs, under a root that tests point at a fake tree with the kernel's
//! layout (`sys/bus/pci/devices/BDF/{sriov_totalvfs,sriov_numvfs,virtfnN,physfn,driver,
//! iommu_group,net/NAME}`, `sys/kernel/iommu_groups/N/devices/BDF`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::SriovError;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VfState {
    pub index: u32,
    pub bdf: String,
    pub driver: Option<String>,
    pub netdev: Option<String>,
    pub iommu_group: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PfState {
    pub bdf: String,
    pub netdev: Option<String>,
    pub driver: Option<String>,
    pub total_vfs: u32,
    pub num_vfs: u32,
    pub iommu_group: Option<String>,
    pub vfs: Vec<VfState>,
}

/// sysfs under `root` ("/" on a real host). Every write is also recorded, in order.
#[derive(Debug)]
pub struct Sysfs {
    pub root: PathBuf,
    pub writes: std::cell::RefCell<Vec<(PathBuf, String)>>,
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn read_u32(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            root: root.into(),
            writes: Default::default(),
        }
    }

    pub fn device(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(bdf)
    }

    fn netdev_of(&self, dev: &Path) -> Option<String> {
        let mut names: Vec<String> = fs::read_dir(dev.join("net"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.into_iter().next()
    }

    /// The PCI address of a network interface.
    pub fn bdf_of_netdev(&self, netdev: &str) -> Result<String, SriovError> {
        link_name(&self.root.join("sys/class/net").join(netdev).join("device")).ok_or_else(|| {
            SriovError::NoDevice(format!("{netdev} (no such interface, or not a PCI device)"))
        })
    }

    /// Every physical function: a PCI device with `sriov_totalvfs`.
    pub fn pfs(&self) -> Result<Vec<PfState>, SriovError> {
        let dir = self.root.join("sys/bus/pci/devices");
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(SriovError::Io(dir, e)),
        };
        let mut bdfs: Vec<String> = entries
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|b| self.device(b).join("sriov_totalvfs").exists())
            .collect();
        bdfs.sort();
        for b in bdfs {
            out.push(self.pf(&b)?);
        }
        Ok(out)
    }

    pub fn pf(&self, bdf: &str) -> Result<PfState, SriovError> {
        let dev = self.device(bdf);
        if !dev.exists() {
            return Err(SriovError::NoDevice(bdf.to_string()));
        }
        let total_vfs = read_u32(&dev.join("sriov_totalvfs"))
            .ok_or_else(|| SriovError::NoSriov(bdf.to_string()))?;
        let num_vfs = read_u32(&dev.join("sriov_numvfs")).unwrap_or(0);
        let mut vfs = Vec::new();
        for index in 0..num_vfs {
            let Some(vf) = link_name(&dev.join(format!("virtfn{index}"))) else {
                continue;
            };
            let vdev = self.device(&vf);
            vfs.push(VfState {
                index,
                driver: link_name(&vdev.join("driver")),
                netdev: self.netdev_of(&vdev),
                iommu_group: link_name(&vdev.join("iommu_group")),
                bdf: vf,
            });
        }
        Ok(PfState {
            bdf: bdf.to_string(),
            netdev: self.netdev_of(&dev),
            driver: link_name(&dev.join("driver")),
            total_vfs,
            num_vfs,
            iommu_group: link_name(&dev.join("iommu_group")),
            vfs,
        })
    }

    /// BDFs in an IOMMU group, with their drivers.
    pub fn iommu_group(&self, group: &str) -> Vec<(String, Option<String>)> {
        let dir = self
            .root
            .join("sys/kernel/iommu_groups")
            .join(group)
            .join("devices");
        let mut out: Vec<(String, Option<String>)> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let bdf = e.file_name().to_string_lossy().into_owned();
                        let driver = link_name(&self.device(&bdf).join("driver"));
                        (bdf, driver)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Writes one sysfs attribute.
    pub fn write(&self, path: &Path, value: &str) -> Result<(), SriovError> {
        let shown = path
            .strip_prefix(&self.root)
            .map(|p| Path::new("/").join(p))
            .unwrap_or(path.to_path_buf());
        self.writes
            .borrow_mut()
            .push((shown.clone(), value.to_string()));
        fs::write(path, value).map_err(|e| SriovError::Write {
            path: shown,
            value: value.to_string(),
            source: e,
        })
    }
}
