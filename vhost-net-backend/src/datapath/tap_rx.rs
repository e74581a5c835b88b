//! The tap's readers: one thread per tap queue takes what the host sends, takes a trunk's
//! VLAN tag off, checks the frame (`packet::ingress`) and runs it through the pipeline.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use log::warn;

use super::burst::{self, Burst, Scratch};
use super::Datapath;
use crate::counters::DropReason;
use crate::endpoint::frame::Frame;
use crate::endpoint::tap::{TapPort, VNET_HDR_LEN};
use crate::endpoint::SwitchPort;
use crate::fault;
use crate::packet::flow::flow_hash;
use crate::packet::ingress::{self, Limits};
use crate::packet::vlan::pop_tag;
use crate::types::{ETHERTYPE_VLAN, ETH_HLEN, MAX_GSO_FRAME};
use crate::virtio::copy::FrameSource;
use crate::virtio::{features as f, NetHdr};

/// The offloads turned on on the tap (TUNSETOFFLOAD), as the virtio-net feature bits the
/// host may use in what it sends.
const TAP_OFFLOADS: u64 = f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN;

/// One reader thread per queue of `tap` (port `port`), until `stop`.
pub fn spawn_readers(
    dp: Arc<Datapath>,
    port: Arc<SwitchPort>,
    tap: Arc<TapPort>,
    stop: Arc<AtomicBool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    (0..tap.queue_count())
        .map(|q| {
            let (dp, port, tap, stop) = (dp.clone(), port.clone(), tap.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("uplink-{q}"))
                .spawn(move || read_loop(&dp, &port, &tap, q, &stop))
        })
        .collect()
}

fn read_loop(dp: &Datapath, port: &SwitchPort, tap: &TapPort, q: usize, stop: &AtomicBool) {
    crate::cpu_set::pin(&dp.worker_cpus);
    let fd = tap.queue(q).as_raw_fd();
    // Room for the largest frame the host may send, tagged, and one byte more: a read that
    // fills it all was a larger frame, cut short.
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_GSO_FRAME + 4 + 1];
    let mut scratch = Scratch::default();
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
                warn!("uplink {}: read failed: {e}", tap.name);
                return;
            }
            continue;
        }
        // The kernel may report more than it wrote (a frame cut short): never trust it.
        let n = n as usize;
        if n >= buf.len() {
            port.counters.count_drop(DropReason::Oversize);
            continue;
        }
        if n < VNET_HDR_LEN + ETH_HLEN {
            continue;
        }
        match take_in(tap, &mut buf[..n], dp.max_frame_len) {
            Ok((hdr, start, segment)) => {
                let frame_bytes = &buf[start..n];
                // The tap's one queue: a burst of one frame each read.
                let queue = port.counters.queue(0);
                queue.add_tx(1, frame_bytes.len() as u64);
                let frame = Frame {
                    hdr,
                    src: FrameSource::Local(frame_bytes),
                    head: &frame_bytes[..ETH_HLEN],
                    hash: flow_hash(frame_bytes),
                    segment,
                };
                let started = Instant::now();
                // A panic (a bug) drops this frame; the reader goes on with a new scratch.
                let done = fault::contain("switching a frame from the tap", || {
                    burst::run(dp, port, Burst::Local(frame), &mut scratch);
                    burst::flush(dp, &mut scratch);
                });
                queue.add_burst(1, started.elapsed().as_nanos() as u64);
                if done.is_none() {
                    port.counters.count_drop(DropReason::InternalError);
                    scratch = Scratch::default();
                }
            }
            Err(reason) => port.counters.count_drop(reason),
        }
    }
}

/// Takes a frame from the host in: its trunk tag off, then the same check as every frame
/// entering the switch. Returns its header, where the untagged frame starts in `buf`, and
/// its segment.
fn take_in(
    tap: &TapPort,
    buf: &mut [u8],
    max_frame_len: usize,
) -> Result<(NetHdr, usize, u16), DropReason> {
    let mut hdr = NetHdr::parse(&buf[..VNET_HDR_LEN]);
    let mut start = VNET_HDR_LEN;
    let ethertype = u16::from_be_bytes([buf[start + 12], buf[start + 13]]);
    let segment = if ethertype == ETHERTYPE_VLAN && tap.trunk {
        let (vid, untagged) = pop_tag(buf, start, &mut hdr)?;
        start = untagged;
        vid
    } else if tap.trunk {
        0
    } else {
        tap.access_segment
    };
    let limits = Limits {
        max_frame_len,
        offloads: TAP_OFFLOADS,
    };
    let frame = &buf[start..];
    ingress::check(&hdr, &frame[..ETH_HLEN], frame.len(), limits)?;
    Ok((hdr, start, segment))
}
