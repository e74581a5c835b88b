//! Tap devices from `/dev/net/tun`: single or multi-queue, with or without vnet headers,
//! through typed ioctls (the request numbers computed by vmm-sys-util from the kernel's
//! `_IOW('T', n, type)` definitions, not typed in by hand).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_uint};

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

const TUNTAP: c_uint = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;

/// TUNSETOFFLOAD flags: what the kernel may hand the tap's reader unfinished.
pub const TUN_F_CSUM: c_uint = 1;
pub const TUN_F_TSO4: c_uint = 2;
pub const TUN_F_TSO6: c_uint = 4;
pub const TUN_F_TSO_ECN: c_uint = 8;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("tap name '{0}' is longer than 15 bytes")]
    NameTooLong(String),
    #[error("cannot create tap {name}: {source}")]
    Create { name: String, source: io::Error },
    #[error("tap {name}: cannot set the vnet header size: {source}")]
    VnetHdrSize { name: String, source: io::Error },
    #[error("tap {name}: cannot turn offloads on: {source}")]
    Offload { name: String, source: io::Error },
    #[error("cannot bring {name} up: {source}")]
    Up { name: String, source: io::Error },
}

/// `struct ifreq` as the TUN and interface-flag ioctls use it: a name and 16-bit flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Result<IfReq, TapError> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::NameTooLong(name.to_string()));
        }
        let mut ifr = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(ifr)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open tap: one file per queue and its kernel name. It disappears with its last file
/// unless it existed (persistent) before.
pub struct Tap {
    pub name: String,
    pub queues: Vec<File>,
}

impl Tap {
    /// Creates (or attaches to) tap `name` (`%d` picks the next free number) with `queues`
    /// queues; `multi_queue` even for one queue (so more can attach later).
    pub fn open(
        name: &str,
        queues: usize,
        vnet_hdr: bool,
        multi_queue: bool,
    ) -> Result<Tap, TapError> {
        let mut flags = IFF_TAP | IFF_NO_PI;
        if vnet_hdr {
            flags |= IFF_VNET_HDR;
        }
        if multi_queue || queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut name = name.to_string();
        let mut files = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut ifr = IfReq::new(&name, flags)?;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq lays out.
            check(unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifr) }).map_err(
                |source| TapError::Create {
                    name: name.clone(),
                    source,
                },
            )?;
            name = ifr.name();
            files.push(file);
        }
        Ok(Tap {
            name,
            queues: files,
        })
    }

    /// Sets the vnet header length on every queue (12: `virtio_net_hdr_v1`).
    pub fn set_vnet_hdr_size(&self, len: c_int) -> Result<(), TapError> {
        for q in &self.queues {
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives here.
            check(unsafe { ioctl_with_ref(q, TUNSETVNETHDRSZ(), &len) }).map_err(|source| {
                TapError::VnetHdrSize {
                    name: self.name.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Turns on the offloads `flags` (`TUN_F_*`) on every queue.
    pub fn set_offload(&self, flags: c_uint) -> Result<(), TapError> {
        for q in &self.queues {
            // SAFETY: TUNSETOFFLOAD takes the flags as the argument value itself.
            check(unsafe { ioctl_with_val(q, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) })
                .map_err(|source| TapError::Offload {
                    name: self.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// The interface name of an open tap and whether it carries vnet headers.
pub fn tap_info(file: &File) -> io::Result<(String, bool)> {
    let mut ifr = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq`, which IfReq lays out.
    check(unsafe { ioctl_with_mut_ref(file, TUNGETIFF(), &mut ifr) })?;
    Ok((ifr.name(), ifr.flags & IFF_VNET_HDR != 0))
}

/// Brings interface `name` up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP).
pub fn set_up(name: &str) -> Result<(), TapError> {
    let up_err = |source| TapError::Up {
        name: name.to_string(),
        source,
    };
    // SAFETY: a plain datagram socket, used only for interface ioctls.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(raw).map_err(up_err)?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut ifr = IfReq::new(name, 0)?;
    // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`.
    check(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS as libc::c_ulong, &mut ifr) })
        .map_err(up_err)?;
    ifr.flags |= libc::IFF_UP as i16;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`.
    check(unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS as libc::c_ulong, &ifr) })
        .map_err(up_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_kernels() {
        // From <linux/if_tun.h> on x86_64 (and every architecture with the generic
        // _IOC layout): the values the old hand-written constants had.
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNGETIFF(), 0x8004_54d2);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
    }

    #[test]
    fn names_longer_than_the_kernel_takes_are_refused() {
        assert!(matches!(
            IfReq::new("a-very-long-tap-name", 0),
            Err(TapError::NameTooLong(_))
        ));
        assert_eq!(IfReq::new("tap%d", 0).unwrap().name(), "tap%d");
    }
}
