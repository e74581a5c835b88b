//! The tap uplink: frames between the switch and the host kernel. The tap carries vnet
//! headers both ways and its offloads are on (TUNSETOFFLOAD), so checksum-partial and TSO
//! frames pass between VMs and the host without software segmentation. As a trunk it
//! carries every VLAN tagged (untagged frames are segment 0); as an access port, one VLAN.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::warn;

use crate::config::UplinkConfig;
use crate::counters::DropReason;
use crate::forward::{flush_notifications, switch_frame, Frame, Scratch, MIN_GSO_SIZE};
use crate::port::MAX_GSO_FRAME;
use crate::switch::{flow_hash, PortShared, Switch, TRUNK};
use crate::virtio::{
    FrameSource, GuestSlices, NetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

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
const VNET_HDR_LEN: usize = 12;
/// Most pieces one frame is written from: header, Ethernet header, guest buffers.
const MAX_IOVECS: usize = 66;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: each request here takes a pointer to the type the caller passes.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub struct Uplink {
    pub name: String,
    queues: Vec<File>,
    trunk: bool,
    access_segment: u16,
}

impl Uplink {
    /// Creates (or attaches to) the tap, turns on vnet headers and offloads, brings it up.
    pub fn open(config: &UplinkConfig) -> io::Result<Uplink> {
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
            ioctl(&file, TUNSETIFF, &mut ifr)?;
            let mut hdr_len = VNET_HDR_LEN as libc::c_int;
            ioctl(&file, TUNSETVNETHDRSZ, &mut hdr_len)?;
            // The switch finishes checksums and segments for every VM port that lacks them,
            // so the host may hand us partial checksums and TSO frames.
            let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // SAFETY: TUNSETOFFLOAD takes the flags as the argument value itself.
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads as libc::c_ulong) }
                < 0
            {
                return Err(io::Error::last_os_error());
            }
            queues.push(file);
        }
        set_up(&config.tap)?;
        Ok(Uplink {
            name: config.tap.clone(),
            queues,
            trunk: config.trunk,
            access_segment: config.vlan.unwrap_or(0),
        })
    }

    /// The segment this port belongs to in the switch.
    pub fn segment(config: &UplinkConfig) -> u16 {
        if config.trunk {
            TRUNK
        } else {
            config.vlan.unwrap_or(0)
        }
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
        let mut out = NetHdr::default();
        let tag = self.trunk && segment != 0;
        let shift = if tag { 4 } else { 0 };
        if hdr.needs_csum() {
            out.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            // A guest's offset near 64 KiB must not wrap once the tag moves it.
            out.csum_start = hdr
                .csum_start
                .checked_add(shift)
                .ok_or(DropReason::BadOffload)?;
            out.csum_offset = hdr.csum_offset;
        }
        if hdr.is_gso() {
            out.gso_type = hdr.gso_type;
            out.gso_size = hdr.gso_size;
            out.hdr_len = hdr.hdr_len.saturating_add(shift);
        }
        if !self.trunk && segment != self.access_segment {
            return Err(DropReason::VlanMismatch);
        }
        let vnet = out.to_bytes();
        let mut l2 = [0u8; 18];
        let l2_len = if tag {
            l2[..12].copy_from_slice(&eth[..12]);
            l2[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
            l2[14..16].copy_from_slice(&(segment & 0x0fff).to_be_bytes());
            l2[16..18].copy_from_slice(&eth[12..14]);
            18
        } else {
            l2[..14].copy_from_slice(eth);
            14
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
                // Guest buffers go to the kernel as they are: no copy here.
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

    /// One reader thread per tap queue, switching what the host sends.
    pub fn spawn_readers(
        self: &Arc<Self>,
        switch: Arc<Switch>,
        port: Arc<PortShared>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        (0..self.queues.len())
            .map(|q| {
                let (me, switch, port, stop) =
                    (self.clone(), switch.clone(), port.clone(), stop.clone());
                thread::Builder::new()
                    .name(format!("uplink-{q}"))
                    .spawn(move || me.read_loop(q, &switch, &port, &stop))
            })
            .collect()
    }

    fn read_loop(&self, q: usize, switch: &Switch, port: &PortShared, stop: &AtomicBool) {
        let fd = self.queues[q].as_raw_fd();
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_GSO_FRAME + 4];
        let mut scratch = Scratch::new();
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the timeout lets the thread see `stop`.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reading into our own buffer of buf.len() bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    warn!("uplink {}: read failed: {e}", self.name);
                    return;
                }
                continue;
            }
            let n = n as usize;
            if n < VNET_HDR_LEN + 14 {
                continue;
            }
            match self.ingress(&mut buf[..n], switch.max_frame_len) {
                Ok((hdr, start, segment)) => {
                    let frame_bytes = &buf[start..n];
                    port.counters.count_tx(frame_bytes.len());
                    let frame = Frame {
                        hdr,
                        src: FrameSource::Local(frame_bytes),
                        head: &frame_bytes[..14],
                        hash: flow_hash(frame_bytes),
                        segment,
                    };
                    switch_frame(switch, port, &frame, &mut scratch);
                    flush_notifications(switch, &mut scratch);
                }
                Err(reason) => port.counters.count_drop(reason),
            }
        }
    }

    /// Checks a frame from the host and takes its VLAN tag off. Returns the header, where
    /// the untagged frame starts in `buf`, and its segment.
    fn ingress(
        &self,
        buf: &mut [u8],
        max_frame_len: usize,
    ) -> Result<(NetHdr, usize, u16), DropReason> {
        let mut hdr = NetHdr::parse(&buf[..VNET_HDR_LEN]);
        let mut start = VNET_HDR_LEN;
        let ethertype = u16::from_be_bytes([buf[start + 12], buf[start + 13]]);
        let segment = if ethertype == 0x8100 {
            if !self.trunk || buf.len() < start + 18 {
                return Err(DropReason::VlanMismatch);
            }
            let vid = u16::from_be_bytes([buf[start + 14], buf[start + 15]]) & 0x0fff;
            // Drop the tag: move the MAC addresses 4 bytes on.
            buf.copy_within(start..start + 12, start + 4);
            start += 4;
            if hdr.needs_csum() {
                hdr.csum_start = hdr
                    .csum_start
                    .checked_sub(4)
                    .ok_or(DropReason::BadOffload)?;
            }
            hdr.hdr_len = hdr.hdr_len.saturating_sub(4);
            vid
        } else if self.trunk {
            0
        } else {
            self.access_segment
        };
        let len = buf.len() - start;
        if buf[start + 6] & 1 != 0 {
            return Err(DropReason::Malformed);
        }
        if hdr.is_gso() {
            let kind = hdr.gso_kind();
            if (kind != VIRTIO_NET_HDR_GSO_TCPV4 && kind != VIRTIO_NET_HDR_GSO_TCPV6)
                || usize::from(hdr.gso_size) < MIN_GSO_SIZE
            {
                return Err(DropReason::BadOffload);
            }
        } else if len > max_frame_len {
            return Err(DropReason::Oversize);
        }
        if hdr.needs_csum() && usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 > len
        {
            return Err(DropReason::BadOffload);
        }
        Ok((hdr, start, segment))
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
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut ifr)?;
    ifr.flags |= libc::IFF_UP as i16;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut ifr)
}
