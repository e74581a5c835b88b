//! Tap devices from /dev/net/tun: single or multi-queue, with or without vnet headers.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An open tap: its queues (one fd each) and its kernel name. It disappears when the
/// last fd closes (it is never made persistent).
pub struct Tap {
    pub name: String,
    pub queues: Vec<File>,
}

fn ioctl(file: &File, req: libc::c_ulong, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: TUNSETIFF/TUNGETIFF read and write a `struct ifreq`, which IfReq lays out.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, ifr as *mut IfReq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates a tap named after `template` (`%d` picks the next free number).
    pub fn create(template: &str, queues: usize, vnet_hdr: bool) -> std::io::Result<Tap> {
        let mut flags = IFF_TAP | IFF_NO_PI;
        if vnet_hdr {
            flags |= IFF_VNET_HDR;
        }
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut name = template.to_string();
        let mut files = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            let mut ifr = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags,
                _pad: [0; 22],
            };
            let n = name.len().min(libc::IFNAMSIZ - 1);
            ifr.name[..n].copy_from_slice(&name.as_bytes()[..n]);
            ioctl(&file, TUNSETIFF, &mut ifr)?;
            name = name_of(&ifr);
            files.push(file);
        }
        Ok(Tap {
            name,
            queues: files,
        })
    }
}

fn name_of(ifr: &IfReq) -> String {
    let end = ifr
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ifr.name.len());
    String::from_utf8_lossy(&ifr.name[..end]).into_owned()
}

/// The interface name and flags of an open tap fd.
pub fn tap_info(file: &File) -> std::io::Result<(String, bool)> {
    let mut ifr = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    ioctl(file, TUNGETIFF, &mut ifr)?;
    Ok((name_of(&ifr), ifr.flags & IFF_VNET_HDR != 0))
}
