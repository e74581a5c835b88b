use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SriovError {
    #[error("no PCI device {0}: see `sriov-helper list` for the physical functions")]
    NoDevice(String),
    #[error("{0} has no SR-IOV capability (no sriov_totalvfs): pick a physical function from `sriov-helper list`")]
    NoSriov(String),
    #[error("{pf}: {want} VFs asked, but the device supports at most {total}")]
    TooMany { pf: String, want: u32, total: u32 },
    #[error("{pf}: vf {vf} is configured but num_vfs is {num}: raise num_vfs or remove the entry")]
    NoSuchVf { pf: String, vf: u32, num: u32 },
    #[error("{pf} has no network interface (is its driver loaded?): VF settings go through it")]
    NoPfNetdev { pf: String },
    #[error("writing '{value}' to {path}: {source}{}", write_hint(.source))]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("{what} on {pf}: {source}{}", netlink_hint(.source))]
    Netlink {
        what: String,
        pf: String,
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Socket(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{vf}: the IOMMU is off (no iommu_group), so vfio-pci cannot take it: boot with intel_iommu=on iommu=pt (or amd_iommu=on), or load vfio with enable_unsafe_noiommu_mode=1")]
    NoIommu { vf: String },
    #[error("IOMMU group {group} of {vf} also holds {other}, bound to {driver}: bind it to vfio-pci as well (or unbind it), a group is passed through whole")]
    GroupInUse {
        group: String,
        vf: String,
        other: String,
        driver: String,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("needs root: changing VFs takes CAP_NET_ADMIN and write access to sysfs")]
    NotRoot,
}

fn write_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBUSY) => " (VFs are in use: detach them from guests and unbind them first)",
        Some(libc::ENETDOWN) => " (the PF is down: bring it up first)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (run as root)",
        Some(libc::ERANGE) | Some(libc::EINVAL) => " (the kernel refused the value)",
        Some(libc::ENOMEM) | Some(libc::ENOSPC) => {
            " (the device or the bus cannot fit that many VFs)"
        }
        _ => "",
    }
}

fn netlink_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => " (the PF driver does not support this VF setting)",
        Some(libc::ENETDOWN) => " (the PF is down: bring it up first)",
        Some(libc::EPERM) => " (run as root)",
        Some(libc::EINVAL) => " (the driver refused the value)",
        _ => "",
    }
}
