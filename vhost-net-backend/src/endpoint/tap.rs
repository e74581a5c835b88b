//! The tap uplink as a destination: frames to the host kernel, with vnet headers and the
//! tap's offloads on (TUNSETOFFLOAD), so checksum-partial and TSO frames pass between VMs
//! and the host without software segmentation. As a trunk it carries every VLAN tagged
//! (untagged frames are segment 0); as an access port, one VLAN.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::config::UplinkConfig;
use crate::counters::DropReason;
use crate::packet::vlan::{passed_header, push_tag};
use crate::types::{ETH_HLEN, TRUNK};
use crate::virtio::copy::{FrameSource, GuestSlices};
use crate::virtio::NetHdr;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: libc::c_uint = 1;
const TUN_F_TSO4: libc::c_uint = 2;
const TUN_F_TSO6: libc::c_uint = 4;
const TUN_F_TSO_ECN: libc::c_uint = 8;
/// The vnet header on the tap: `virtio_net_hdr_v1` with `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;
/// Most pieces one frame is written from: header, Ethernet header, guest buffers.
const MAX_IOVECS: usize = 66;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An interface ioctl that reads and writes a `struct ifreq` (TUNSETIFF, SIOCGIFFLAGS,
/// SIOCSIFFLAGS: each takes exactly that).
fn ioctl_ifreq(fd: &impl AsRawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request passed here takes a pointer to a `struct ifreq`, which IfReq
    // lays out, and the kernel writes no more than that struct.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) })
}

pub struct TapPort {
    pub name: String,
    queues: Vec<File>,
    pub trunk: bool,
    pub access_segment: u16,
}

impl TapPort {
    /// Creates (or attaches to) the tap, turns on vnet headers and offloads, brings it up.
    pub fn open(config: &UplinkConfig) -> io::Result<TapPort> {
        let mut queues = Vec::new();
        for _ in 0..config.queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            let mut ifr = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
                _pad: [0; 22],
            };
            let n = config.tap.len().min(libc::IFNAMSIZ - 1);
            ifr.name[..n].copy_from_slice(&config.tap.as_bytes()[..n]);
            ioctl_ifreq(&file, TUNSETIFF, &mut ifr)?;
            let hdr_len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives here.
            check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) })?;
            // The switch finishes checksums and segments for every VM port that lacks them,
            // so the host may hand us partial checksums and TSO frames.
            let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // SAFETY: TUNSETOFFLOAD takes the flags as the argument value itself.
            check(unsafe {
                libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads as libc::c_ulong)
            })?;
            queues.push(file);
        }
        set_up(&config.tap)?;
        Ok(TapPort {
            name: config.tap.clone(),
            queues,
            trunk: config.trunk,
            access_segment: config.vlan.unwrap_or(0),
        })
    }

    /// The segment this port belongs to in the switch.
    pub fn segment(&self) -> u16 {
        if self.trunk {
            TRUNK
        } else {
            self.access_segment
        }
    }

    /// How many queues (one descriptor each) the tap has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The descriptor of queue `q`, for its reader.
    pub fn queue(&self, q: usize) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.queues[q].as_fd()
    }

    /// Writes one frame to the tap: vnet header, Ethernet header (tagged on a trunk), then
    /// the rest straight from the source's buffers, in one writev.
    pub fn send(
        &self,
        hash: u32,
        hdr: &NetHdr,
        src: FrameSource<'_>,
        eth: &[u8; 14],
        segment: u16,
    ) -> Result<(), DropReason> {
        let tag = self.trunk && segment != 0;
        if !self.trunk && segment != self.access_segment {
            return Err(DropReason::VlanMismatch);
        }
        let out = passed_header(hdr, if tag { 4 } else { 0 }).ok_or(DropReason::BadOffload)?;
        let vnet = out.to_bytes();
        let mut l2 = [0u8; 18];
        let l2_len = if tag {
            push_tag(eth, segment, &mut l2)
        } else {
            l2[..ETH_HLEN].copy_from_slice(eth);
            ETH_HLEN
        };
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        iov[0] = libc::iovec {
            iov_base: vnet.as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        };
        iov[1] = libc::iovec {
            iov_base: l2.as_ptr() as *mut libc::c_void,
            iov_len: l2_len,
        };
        let mut n = 2;
        match src.skip(14) {
            FrameSource::Local(b) => {
                iov[n] = libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                };
                n += 1;
            }
            FrameSource::Guest {
                mem,
                segs,
                start,
                len,
            } => {
                // Guest buffers go to the kernel as they are: no copy here. (vm-memory's
                // pointer guards are no-ops without a dirty bitmap, which we never use.)
                for slice in GuestSlices::new(mem, segs, start, len) {
                    let (Ok(slice), true) = (slice, n < MAX_IOVECS) else {
                        return Err(DropReason::BadTxDescriptor);
                    };
                    iov[n] = libc::iovec {
                        iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                        iov_len: slice.len(),
                    };
                    n += 1;
                }
            }
        }
        let q = &self.queues[hash as usize % self.queues.len()];
        // SAFETY: every iovec points at memory that lives until writev returns.
        let r = unsafe { libc::writev(q.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r < 0 {
            Err(DropReason::PortDown)
        } else {
            Ok(())
        }
    }
}

/// Brings an interface up (SIOCGIFFLAGS / SIOCSIFFLAGS).
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain datagram socket used only for interface ioctls, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    let mut ifr = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    ifr.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut ifr)?;
    ifr.flags |= libc::IFF_UP as i16;
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut ifr)
}
