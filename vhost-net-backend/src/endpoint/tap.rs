//! The tap uplink as a destination: frames to the host kernel, with vnet headers and the
//! tap's offloads on (TUNSETOFFLOAD), so checksum-partial and TSO frames pass between VMs
//! and the host without software segmentation. As a trunk it carries every VLAN tagged
//! (untagged frames are segment 0); as an access port, one VLAN.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};

use hostnet::tap::{set_up, Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};

use crate::config::UplinkConfig;
use crate::counters::DropReason;
use crate::packet::vlan::{passed_header, push_tag};
use crate::types::{ETH_HLEN, TRUNK};
use crate::virtio::copy::{FrameSource, GuestSlices};
use crate::virtio::NetHdr;

/// The vnet header on the tap: `virtio_net_hdr_v1` with `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;
/// Most pieces one frame is written from: header, Ethernet header, guest buffers.
const MAX_IOVECS: usize = 66;

pub struct TapPort {
    pub name: String,
    queues: Vec<File>,
    pub trunk: bool,
    pub access_segment: u16,
}

impl TapPort {
    /// Creates (or attaches to) the tap, turns on vnet headers and offloads, brings it up.
    pub fn open(config: &UplinkConfig) -> Result<TapPort, TapError> {
        let tap = Tap::open(&config.tap, usize::from(config.queues.max(1)), true, true)?;
        tap.set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int)?;
        // The switch finishes checksums and segments for every VM port that lacks them,
        // so the host may hand us partial checksums and TSO frames.
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)?;
        set_up(&tap.name)?;
        Ok(TapPort {
            name: tap.name,
            queues: tap.queues,
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

    /// Writes one frame to the tap: vnet header, Ethernet header (tagged on a trunk), the
    /// rest of `head` (the frame's first bytes as switched: a routed frame's are
    /// rewritten), then the rest straight from the source's buffers, in one writev.
    pub fn send(
        &self,
        hash: u32,
        hdr: &NetHdr,
        src: FrameSource<'_>,
        head: &[u8],
        segment: u16,
    ) -> Result<(), DropReason> {
        let (eth, head_rest) = head
            .split_first_chunk::<ETH_HLEN>()
            .ok_or(DropReason::Malformed)?;
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
        if !head_rest.is_empty() {
            iov[n] = libc::iovec {
                iov_base: head_rest.as_ptr() as *mut libc::c_void,
                iov_len: head_rest.len(),
            };
            n += 1;
        }
        match src.skip(head.len()) {
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
