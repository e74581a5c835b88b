//! Delivering a switched frame: to each destination port's RX queue (one copy, offloads
//! finished in software where the receiver lacks them) or to the uplink. Shared by the
//! vhost-user ports' workers and the uplink's readers.

use log::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use crate::config::MacAddr;
use crate::counters::DropReason;
use crate::offload::{complete_checksum, segment_tcp};
use crate::port::{Vring, MAX_GSO_FRAME};
use crate::ram::Ram;
use crate::switch::{DecisionCache, Forward, OpenEndpoint, PortId, PortShared, Switch};
use crate::virtio::{
    avail_head, avail_idx, features as f, needs_interrupt, net_hdr_len, publish_used, push_used,
    walk_chain, write_used, DescTable, FrameSource, GuestWriter, NetHdr, Segment,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Most RX buffers one mergeable frame may use.
const MAX_MERGED_BUFFERS: usize = 256;
/// Smallest MSS accepted for segmentation (Linux's `tcp_min_snd_mss` default is 48).
pub const MIN_GSO_SIZE: usize = 48;

pub(crate) struct RxChain {
    head: u16,
    cap: u32,
}

/// An RX queue written during a burst, and its used index before the first write.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Touched {
    port: PortId,
    queue: usize,
    old_used: u16,
    /// Frames and bytes delivered to it, counted at the end of the burst.
    packets: u64,
    bytes: u64,
}

/// Buffers for delivering, allocated once per worker so the data path never allocates.
pub(crate) struct Scratch {
    rx_segs: Vec<Segment>,
    rx_chains: Vec<RxChain>,
    /// The whole frame, gathered only when a destination needs software offload.
    frame: Vec<u8>,
    frame_gathered: bool,
    /// One software-finished frame (checksummed copy or TCP segment).
    out: Vec<u8>,
    /// RX queues written during this burst, notified once at its end.
    pub(crate) touched: Vec<Touched>,
    /// Avail indexes of RX queues read during this burst.
    avail_cache: Vec<((PortId, usize), u16)>,
    /// Destination ports' RX sides as this burst found them.
    open: Vec<OpenEndpoint>,
    decisions: DecisionCache,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch {
            rx_segs: Vec::with_capacity(MAX_MERGED_BUFFERS),
            rx_chains: Vec::with_capacity(MAX_MERGED_BUFFERS),
            frame: vec![0; MAX_GSO_FRAME],
            frame_gathered: false,
            out: vec![0; MAX_GSO_FRAME],
            touched: Vec::with_capacity(64),
            avail_cache: Vec::with_capacity(64),
            open: Vec::with_capacity(64),
            decisions: DecisionCache::default(),
        }
    }
}

/// Most bytes of a frame's start kept in `Frame::head`.
pub(crate) const MAX_HEAD: usize = 128;

/// A frame that passed the sender's checks, ready to be switched.
#[derive(Clone, Copy)]
pub(crate) struct Frame<'a> {
    pub hdr: NetHdr,
    pub src: FrameSource<'a>,
    /// The frame's first bytes (at least its Ethernet header) as checked and switched:
    /// delivered from this copy, so a guest rewriting its buffer meanwhile cannot change
    /// what the decision was made on. A small frame is all here, and goes out in one write.
    pub head: &'a [u8],
    pub hash: u32,
    /// The VLAN segment the frame belongs to.
    pub segment: u16,
}

impl Frame<'_> {
    pub fn eth(&self) -> &[u8; 14] {
        self.head[..14]
            .try_into()
            .expect("a frame's head holds its Ethernet header")
    }
}

/// Switches one frame from port `from`: learns, decides, delivers.
pub(crate) fn switch_frame(switch: &Switch, from: &PortShared, frame: &Frame<'_>, s: &mut Scratch) {
    let mut dst_mac = MacAddr::default();
    let mut src_mac = MacAddr::default();
    dst_mac.0.copy_from_slice(&frame.head[0..6]);
    src_mac.0.copy_from_slice(&frame.head[6..12]);
    s.frame_gathered = false;
    let d = Deliverer { from };
    match switch.decide_cached(&mut s.decisions, from.id, frame.segment, src_mac, dst_mac) {
        Forward::Local => {}
        Forward::Spoofed => from.counters.count_drop(DropReason::SpoofedMac),
        Forward::To(p) => d.deliver(&switch.ports[usize::from(p)], frame, s),
        Forward::Flood => {
            for p in switch.flood_targets(from.id, frame.segment) {
                d.deliver(p, frame, s);
            }
        }
    }
}

/// The destination RX queue of one delivery.
struct RxQueue<'a> {
    port: &'a PortShared,
    vring: &'a Vring,
    index: usize,
    mem: &'a Ram,
    features: u64,
    /// The endpoint's generation: writes stop once the port has changed.
    generation: u64,
}

struct Deliverer<'a> {
    from: &'a PortShared,
}

impl Deliverer<'_> {
    /// Delivers one frame to `dst`, finishing offloads in software where `dst` did not
    /// negotiate them.
    fn deliver(&self, dst: &PortShared, frame: &Frame<'_>, d: &mut Scratch) {
        let (hdr, src, hash) = (&frame.hdr, frame.src, frame.hash);
        if let Some(uplink) = dst.uplink.get() {
            return match uplink.send(hash, hdr, src, frame.eth(), frame.segment) {
                Ok(()) => dst.counters.count_rx(src.len()),
                Err(reason) => dst.counters.count_drop(reason),
            };
        }
        // Taken out of `d` for the call: write_rx needs the rest of `d`.
        let mut open = std::mem::take(&mut d.open);
        let i = match open.iter().position(|o| o.port == dst.id) {
            Some(i) => i,
            None => {
                open.push(dst.open_rx());
                open.len() - 1
            }
        };
        let ep = &open[i];
        match (ep.ram.as_ref(), ep.pick_queue(hash)) {
            (Some(mem), Some((index, vring))) => {
                let rxq = RxQueue {
                    port: dst,
                    vring,
                    index: *index,
                    mem,
                    features: ep.features,
                    generation: ep.generation,
                };
                self.deliver_to(&rxq, frame, d);
            }
            _ => dst.counters.count_drop(DropReason::PortDown),
        }
        d.open = open;
    }

    /// `deliver` once the destination queue is chosen.
    fn deliver_to(&self, rxq: &RxQueue<'_>, frame: &Frame<'_>, d: &mut Scratch) {
        let (hdr, src, features) = (&frame.hdr, frame.src, rxq.features);

        let segment = hdr.is_gso() && !gso_supported(features, hdr);
        let finish_csum = !segment && hdr.needs_csum() && features & f::GUEST_CSUM == 0;
        if !segment && !finish_csum {
            let out = passed_header(hdr);
            self.write_rx(rxq, &out, src, frame.head, d);
            return;
        }

        let len = src.len();
        if !d.frame_gathered {
            src.peek(&mut d.frame[..len]);
            d.frame[..frame.head.len()].copy_from_slice(frame.head);
            d.frame_gathered = true;
        }
        let plain = NetHdr::default();
        if finish_csum {
            d.out[..len].copy_from_slice(&d.frame[..len]);
            let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
            if complete_checksum(&mut d.out[..len], start, off).is_err() {
                return self.from.counters.count_drop(DropReason::BadOffload);
            }
            // Taken out of `d` for the call: write_rx needs the rest of `d`.
            let out = std::mem::take(&mut d.out);
            let finished = FrameSource::Local(&out[..len]);
            self.write_rx(rxq, &plain, finished, frame.head, d);
            d.out = out;
            return;
        }
        let whole = std::mem::take(&mut d.frame);
        let mut out = std::mem::take(&mut d.out);
        let result = segment_tcp(&whole[..len], hdr, &mut out, |seg| {
            // Stop at the first segment that cannot be delivered: the rest would not be.
            let delivered = self.write_rx(rxq, &plain, FrameSource::Local(seg), frame.head, d);
            if delivered {
                Ok(())
            } else {
                Err(())
            }
        });
        d.frame = whole;
        d.out = out;
        if result.is_err() {
            self.from.counters.count_drop(DropReason::BadOffload);
        }
    }

    /// Takes RX buffers from `vring` (several when mergeable), writes the header and the
    /// frame, and puts the buffers on the used ring. Counts a drop on `dst` when it cannot.
    #[allow(clippy::too_many_arguments)]
    fn write_rx(
        &self,
        rxq: &RxQueue<'_>,
        hdr: &NetHdr,
        src: FrameSource<'_>,
        head: &[u8],
        d: &mut Scratch,
    ) -> bool {
        let (dst, qidx) = (rxq.port, rxq.index);
        match write_rx_buffers(rxq, hdr, src, head, d) {
            Ok(old_used) => {
                let bytes = src.len() as u64;
                match d
                    .touched
                    .iter_mut()
                    .find(|t| t.port == dst.id && t.queue == qidx)
                {
                    Some(t) => {
                        t.packets += 1;
                        t.bytes += bytes;
                    }
                    None => d.touched.push(Touched {
                        port: dst.id,
                        queue: qidx,
                        old_used,
                        packets: 1,
                        bytes,
                    }),
                }
                true
            }
            Err(RxError::Drop(reason)) => {
                dst.counters.count_drop(reason);
                false
            }
            Err(RxError::Broken) => {
                dst.counters.count_drop(DropReason::BadRxDescriptor);
                warn!(
                    "port {}: guest driver broke the virtio protocol on RX; resetting the connection",
                    dst.name
                );
                dst.reset_connection();
                false
            }
        }
    }
}

/// Interrupts each RX queue written in this burst once, if its driver wants it, with no
/// lock held while signalling.
pub(crate) fn flush_notifications(switch: &Switch, scratch: &mut Scratch) {
    scratch.avail_cache.clear();
    for t in scratch.touched.drain(..) {
        let port = &switch.ports[usize::from(t.port)];
        port.counters.add_rx(t.packets, t.bytes);
        // Touched queues were written through an endpoint opened in this burst.
        let Some((vring, mem, generation)) = scratch
            .open
            .iter()
            .find(|o| o.port == t.port)
            .and_then(|o| Some((o.queue(t.queue)?, o.ram.as_ref()?, o.generation)))
        else {
            continue;
        };
        let notify = {
            // Under the lock: next_used only grows, so this store never goes back, whichever
            // worker wrote the last entries.
            let state = vring.get_ref();
            let q = state.get_queue();
            // A port that changed meanwhile (its guest gone or renegotiating) is not written.
            if !q.ready() || !port.is_current(generation) {
                continue;
            }
            if publish_used(mem, GuestAddress(q.used_ring()), q.next_used()).is_none() {
                continue;
            }
            needs_interrupt(
                mem,
                GuestAddress(q.avail_ring()),
                q.size(),
                q.event_idx_enabled(),
                t.old_used,
                q.next_used(),
            )
        };
        if notify {
            let _ = vring.signal_used_queue();
        }
    }
    scratch.open.clear();
}

enum RxError {
    Drop(DropReason),
    Broken,
}

fn gso_supported(features: u64, hdr: &NetHdr) -> bool {
    let kind = match hdr.gso_kind() {
        VIRTIO_NET_HDR_GSO_TCPV4 => f::GUEST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => f::GUEST_TSO6,
        _ => return false,
    };
    let ecn = if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
        f::GUEST_ECN
    } else {
        0
    };
    let needed = kind | ecn | f::GUEST_CSUM;
    features & needed == needed
}

/// The header a receiver gets for a frame passed on with its offloads: only the checksum
/// and GSO requests, rebuilt field by field (a sender's DATA_VALID or stray bits are not
/// passed on).
fn passed_header(hdr: &NetHdr) -> NetHdr {
    let mut out = NetHdr::default();
    if hdr.needs_csum() {
        out.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        out.csum_start = hdr.csum_start;
        out.csum_offset = hdr.csum_offset;
    }
    if hdr.is_gso() {
        out.gso_type = hdr.gso_type;
        out.gso_size = hdr.gso_size;
        out.hdr_len = hdr.hdr_len;
    }
    out
}

fn read_avail(queue: &virtio_queue::Queue, ram: &Ram) -> Result<u16, RxError> {
    match avail_idx(ram, GuestAddress(queue.avail_ring())) {
        Some(avail) if avail.wrapping_sub(queue.next_avail()) <= queue.size() => Ok(avail),
        _ => Err(RxError::Broken),
    }
}

fn remember_avail(d: &mut Scratch, key: (PortId, usize), avail: u16) {
    match d.avail_cache.iter_mut().find(|c| c.0 == key) {
        Some(c) => c.1 = avail,
        None => d.avail_cache.push((key, avail)),
    }
}

/// Writes one frame into the RX queue; returns the used index from before the write.
fn write_rx_buffers(
    rxq: &RxQueue<'_>,
    hdr: &NetHdr,
    src: FrameSource<'_>,
    head: &[u8],
    d: &mut Scratch,
) -> Result<u16, RxError> {
    let (vring, mem, features) = (rxq.vring, rxq.mem, rxq.features);
    let key = (rxq.port.id, rxq.index);
    let hdr_len = net_hdr_len(features);
    let need = hdr_len + src.len();
    let mergeable = features & f::MRG_RXBUF != 0;

    let mut state = vring.get_mut();
    if !state.is_enabled() || !rxq.port.is_current(rxq.generation) {
        return Err(RxError::Drop(DropReason::PortDown));
    }
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return Err(RxError::Drop(DropReason::PortDown));
    }
    let table = DescTable::new(mem, GuestAddress(queue.desc_table()), queue.size());
    let used_ring = GuestAddress(queue.used_ring());
    let avail_ring = GuestAddress(queue.avail_ring());
    let size = queue.size();
    let saved = queue.next_avail();
    // The avail index seen earlier in this burst still holds (it only grows); re-read it
    // only when those entries are used up, as each read pulls a contended cache line.
    let mut avail = match d.avail_cache.iter().find(|c| c.0 == key) {
        Some(c) if c.1.wrapping_sub(saved) <= size => c.1,
        _ => read_avail(queue, mem)?,
    };
    let old_used = queue.next_used();
    d.rx_segs.clear();
    d.rx_chains.clear();
    let mut cap: usize = 0;
    while cap < need {
        if d.rx_chains.len() == MAX_MERGED_BUFFERS {
            queue.set_next_avail(saved);
            return Err(RxError::Drop(DropReason::RxBufferTooSmall));
        }
        let next = queue.next_avail();
        if next == avail {
            avail = read_avail(queue, mem)?;
        }
        let head = match (next != avail).then(|| avail_head(mem, avail_ring, size, next)) {
            Some(Some(h)) => h,
            Some(None) => return Err(RxError::Broken),
            None => {
                queue.set_next_avail(saved);
                remember_avail(d, key, avail);
                return Err(RxError::Drop(DropReason::NoRxBuffer));
            }
        };
        queue.set_next_avail(next.wrapping_add(1));
        let walked = walk_chain(mem, &table, head, true, &mut d.rx_segs);
        // A chain that cannot hold even the header is as useless as a malformed one.
        let bad = match walked {
            Ok(len) if len as usize >= hdr_len || !d.rx_chains.is_empty() && len > 0 => None,
            Ok(_) => Some("RX buffer too small for the virtio-net header".to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = bad {
            debug!("bad RX chain {head}: {why}");
            if head >= size {
                return Err(RxError::Broken);
            }
            // Hand back every chain taken for this frame, unused, so none leaks.
            let unused = d.rx_chains.iter().map(|c| (c.head, 0)).chain([(head, 0)]);
            let next = push_used(mem, used_ring, size, old_used, unused).ok_or(RxError::Broken)?;
            queue.set_next_used(next);
            return Err(RxError::Drop(DropReason::BadRxDescriptor));
        }
        let len = walked.unwrap_or(0);
        cap += len as usize;
        d.rx_chains.push(RxChain { head, cap: len });
        if !mergeable && cap < need {
            // Keep the buffer for a frame that fits; this one cannot be delivered.
            queue.set_next_avail(saved);
            return Err(RxError::Drop(DropReason::RxBufferTooSmall));
        }
    }

    let out_hdr = NetHdr {
        num_buffers: d.rx_chains.len() as u16,
        ..*hdr
    };
    let mut writer = GuestWriter::new(mem, &d.rx_segs);
    let ok = match src {
        FrameSource::Guest { .. } => {
            // Header and the checked first bytes in one write; the rest straight from the
            // sender's memory.
            let mut first = [0u8; 12 + MAX_HEAD];
            let n = hdr_len + head.len();
            first[..hdr_len].copy_from_slice(&out_hdr.to_bytes()[..hdr_len]);
            first[hdr_len..n].copy_from_slice(head);
            writer.write(&first[..n]) && writer.copy_from(src.skip(head.len()))
        }
        FrameSource::Local(b) => writer.write(&out_hdr.to_bytes()[..hdr_len]) && writer.write(b),
    };
    let mut left = if ok { need } else { 0 };
    let used = d.rx_chains.iter().map(|c| {
        let n = left.min(c.cap as usize);
        left -= n;
        (c.head, n as u32)
    });
    // Published at the end of the burst (flush_notifications), with one index store.
    let next = write_used(mem, used_ring, size, old_used, used).ok_or(RxError::Broken)?;
    queue.set_next_used(next);
    remember_avail(d, key, avail);
    if ok {
        Ok(old_used)
    } else {
        Err(RxError::Drop(DropReason::BadRxDescriptor))
    }
}
