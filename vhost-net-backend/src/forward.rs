//! Delivering a switched frame: to each destination port's RX queue (one copy, offloads
//! finished in software where the receiver lacks them) or to the uplink. Shared by the
//! vhost-user ports' workers and the uplink's readers.

use log::{debug, warn};
use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress};

use crate::config::MacAddr;
use crate::counters::DropReason;
use crate::offload::{complete_checksum, segment_tcp};
use crate::port::{Vring, MAX_GSO_FRAME, TX_BURST};
use crate::ram::Ram;
use crate::switch::{DecisionCache, Forward, OpenEndpoint, PortId, PortShared, Switch};
use crate::virtio::{
    avail_head, avail_idx, features as f, needs_interrupt, net_hdr_len, publish_used, push_used,
    walk_chain, write_frame_whole, write_used, Cursor, DescTable, FrameSource, GuestSlice,
    GuestWriter, NetHdr, Segment, WireHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Most bytes of the next frame fetched ahead of its copy.
const PREFETCH_BODY: usize = 1536;
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

/// The RX buffers taken for one frame.
struct RxBufs {
    segs: Vec<Segment>,
    chains: Vec<RxChain>,
}

/// Buffers for delivering, allocated once per worker so the data path never allocates.
pub(crate) struct Scratch {
    rx: RxBufs,
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
    /// The decision for each frame of a TX burst.
    forwards: Vec<Forward>,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch {
            rx: RxBufs {
                segs: Vec::with_capacity(MAX_MERGED_BUFFERS),
                chains: Vec::with_capacity(MAX_MERGED_BUFFERS),
            },
            frame: vec![0; MAX_GSO_FRAME],
            frame_gathered: false,
            out: vec![0; MAX_GSO_FRAME],
            touched: Vec::with_capacity(64),
            avail_cache: Vec::with_capacity(64),
            open: Vec::with_capacity(64),
            decisions: DecisionCache::default(),
            forwards: Vec::with_capacity(TX_BURST),
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

/// A frame of a TX burst, checked and waiting to be switched with the rest of the burst.
pub(crate) struct TxFrame {
    pub hdr: NetHdr,
    /// Its buffers: `segs[first..end]` of the burst's buffers.
    pub first: usize,
    pub end: usize,
    /// Where the frame starts, after the virtio header, and its length.
    pub start: Cursor,
    pub len: usize,
    /// The virtio header (`hdr_len` bytes) and the frame's first `head_len` bytes, as read.
    pub peeked: [u8; 12 + MAX_HEAD],
    pub hdr_len: usize,
    pub head_len: usize,
    pub hash: u32,
}

impl TxFrame {
    /// Starts fetching the frame's bytes beyond its head (up to an MTU's worth: the
    /// hardware prefetcher follows a longer copy by itself), which the driver's core wrote
    /// last: while one frame is copied, the next one's arrive.
    fn prefetch_body(&self, ram: &Ram, segs: &[Segment]) {
        let mut left = self.len.saturating_sub(self.head_len).min(PREFETCH_BODY);
        let mut skip = self.head_len + self.hdr_len;
        for seg in &segs[self.first..self.end] {
            let seg_len = seg.len as usize;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            if let Some(m) = ram.map(seg.addr, seg_len) {
                for off in (skip..skip + n).step_by(64) {
                    m.prefetch(off);
                }
            }
            left -= n;
            skip = 0;
            if left == 0 {
                break;
            }
        }
    }

    pub fn head(&self) -> &[u8] {
        &self.peeked[self.hdr_len..self.hdr_len + self.head_len]
    }

    fn frame<'a>(&'a self, ram: &'a Ram, segs: &'a [Segment], segment: u16) -> Frame<'a> {
        Frame {
            hdr: self.hdr,
            src: FrameSource::Guest {
                mem: ram,
                segs: &segs[self.first..self.end],
                start: self.start,
                len: self.len,
            },
            head: self.head(),
            hash: self.hash,
            segment,
        }
    }
}

/// Switches a burst of frames from port `from`: learns and decides each in order, then
/// delivers them; consecutive frames for one RX queue are written under one lock of it.
pub(crate) fn switch_burst(
    switch: &Switch,
    from: &PortShared,
    ram: &Ram,
    segs: &[Segment],
    frames: &[TxFrame],
    s: &mut Scratch,
) {
    s.forwards.clear();
    for t in frames {
        let mut dst_mac = MacAddr::default();
        let mut src_mac = MacAddr::default();
        dst_mac.0.copy_from_slice(&t.head()[0..6]);
        src_mac.0.copy_from_slice(&t.head()[6..12]);
        let forward =
            switch.decide_cached(&mut s.decisions, from.id, from.segment, src_mac, dst_mac);
        s.forwards.push(forward);
    }
    let d = Deliverer { from };
    let mut i = 0;
    while i < frames.len() {
        let frame = frames[i].frame(ram, segs, from.segment);
        s.frame_gathered = false;
        match s.forwards[i] {
            Forward::Local => {}
            Forward::Spoofed => from.counters.count_drop(DropReason::SpoofedMac),
            Forward::To(p) => {
                let dst = &switch.ports[usize::from(p)];
                if dst.uplink.get().is_none() {
                    if let Some(next) = d.deliver_run(dst, ram, segs, frames, i, s) {
                        i = next;
                        continue;
                    }
                }
                d.deliver(dst, &frame, s);
            }
            Forward::Flood => {
                for p in switch.flood_targets(from.id, from.segment) {
                    d.deliver(p, &frame, s);
                }
            }
        }
        i += 1;
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

impl<'a> RxQueue<'a> {
    /// The RX queue of `port` (opened for this burst as `ep`) that a flow with `hash` goes
    /// to; None if the port cannot take frames now.
    fn pick(port: &'a PortShared, ep: &'a OpenEndpoint, hash: u32) -> Option<Self> {
        let mem = ep.ram.as_ref()?;
        let (index, vring) = ep.pick_queue(hash)?;
        Some(RxQueue {
            port,
            vring,
            index: *index,
            mem,
            features: ep.features,
            generation: ep.generation,
        })
    }
}

struct Deliverer<'a> {
    from: &'a PortShared,
}

impl Deliverer<'_> {
    /// The endpoint of `dst` opened in this burst (opening it on first use).
    fn endpoint(dst: &PortShared, s: &mut Scratch) -> usize {
        match s.open.iter().position(|o| o.port == dst.id) {
            Some(i) => i,
            None => {
                s.open.push(dst.open_rx());
                s.open.len() - 1
            }
        }
    }

    /// Writes frames `i..` of a burst under one lock of the RX queue of `dst` that frame `i`
    /// goes to, for as long as they go there and need no software offload; returns the index
    /// of the first frame not handled, or None if frame `i` is not such a frame.
    fn deliver_run(
        &self,
        dst: &PortShared,
        ram: &Ram,
        segs: &[Segment],
        frames: &[TxFrame],
        i: usize,
        s: &mut Scratch,
    ) -> Option<usize> {
        let k = Self::endpoint(dst, s);
        let Scratch {
            open,
            rx,
            touched,
            avail_cache,
            forwards,
            ..
        } = s;
        let ep = &open[k];
        let rxq = RxQueue::pick(dst, ep, frames[i].hash)?;
        let index = &rxq.index;
        let plain = |j: usize| {
            forwards[j] == Forward::To(dst.id)
                && !needs_software(ep.features, &frames[j].hdr)
                && ep.pick_queue(frames[j].hash).map(|q| q.0) == Some(*index)
        };
        if !plain(i) {
            return None;
        }
        let mut state = rxq.vring.get_mut();
        let mut locked = match LockedRx::new(&mut state, &rxq, avail_cache) {
            Ok(l) => l,
            Err(_) => {
                drop(state);
                // Not writable: each frame is counted as dropped by the general path.
                return None;
            }
        };
        let old_used = locked.queue.next_used();
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut j = i;
        let mut broken = false;
        // A port that changed meanwhile (new memory table or features) stops the run: the
        // rest take the general path, which sees the change.
        while j < frames.len() && plain(j) && dst.is_current(rxq.generation) {
            if let Some(next) = frames.get(j + 1) {
                next.prefetch_body(ram, segs);
                // Small frames gain nothing: their buffer's first line comes with the
                // used-ring write's latency anyway, and the lookup costs more.
                if next.len > 512 {
                    locked.prefetch_following_buffer((next.len + 12).min(PREFETCH_BODY));
                }
            }
            let t = &frames[j];
            let header = passed_header(&t.hdr);
            let short = if t.head_len == t.len {
                locked.write_short(header, t.head(), None)
            } else if t.end - t.first == 1 {
                // One TX buffer: the rest of the frame follows its head in it.
                segs[t.first]
                    .addr
                    .checked_add((t.hdr_len + t.head_len) as u64)
                    .and_then(|at| ram.slice(at, t.len - t.head_len))
                    .and_then(|rest| locked.write_short(header, t.head(), Some(rest)))
            } else {
                None
            };
            let written = short.unwrap_or_else(|| {
                let frame = t.frame(ram, segs, self.from.segment);
                locked.write(header, frame.src, frame.head, rx)
            });
            match written {
                Ok(()) => {
                    packets += 1;
                    bytes += t.len as u64;
                }
                Err(RxError::Drop(reason)) => dst.counters.count_drop(reason),
                Err(RxError::Broken) => {
                    broken = true;
                    j += 1;
                    break;
                }
            }
            j += 1;
        }
        let avail = locked.avail;
        // Bad chains handed back unused move the used ring too: the driver hears of them.
        let moved = locked.queue.next_used() != old_used;
        drop(state);
        remember_avail(avail_cache, (dst.id, *index), avail);
        if moved {
            let t = Touched {
                port: dst.id,
                queue: *index,
                old_used,
                packets,
                bytes,
            };
            note_touched(touched, t);
        }
        if broken {
            dst.counters.count_drop(DropReason::BadRxDescriptor);
            warn!(
                "port {}: guest driver broke the virtio protocol on RX; resetting the connection",
                dst.name
            );
            dst.reset_connection();
        }
        Some(j)
    }

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
        let i = Self::endpoint(dst, d);
        // Taken out of `d` for the call: write_rx needs the rest of `d`.
        let open = std::mem::take(&mut d.open);
        let ep = &open[i];
        match RxQueue::pick(dst, ep, hash) {
            Some(rxq) => self.deliver_to(&rxq, frame, d),
            None => dst.counters.count_drop(DropReason::PortDown),
        }
        d.open = open;
    }

    /// `deliver` once the destination queue is chosen.
    fn deliver_to(&self, rxq: &RxQueue<'_>, frame: &Frame<'_>, d: &mut Scratch) {
        let (hdr, src, features) = (&frame.hdr, frame.src, rxq.features);

        if !needs_software(features, hdr) {
            let out = passed_header(hdr);
            self.write_rx(rxq, out, src, frame.head, d);
            return;
        }

        let segment = hdr.is_gso() && !gso_supported(features, hdr);
        let finish_csum = !segment;
        let len = src.len();
        if !d.frame_gathered {
            src.peek(&mut d.frame[..len]);
            d.frame[..frame.head.len()].copy_from_slice(frame.head);
            d.frame_gathered = true;
        }
        let plain = WireHdr::default();
        if finish_csum {
            d.out[..len].copy_from_slice(&d.frame[..len]);
            let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
            if complete_checksum(&mut d.out[..len], start, off).is_err() {
                return self.from.counters.count_drop(DropReason::BadOffload);
            }
            // Taken out of `d` for the call: write_rx needs the rest of `d`.
            let out = std::mem::take(&mut d.out);
            let finished = FrameSource::Local(&out[..len]);
            self.write_rx(rxq, plain, finished, frame.head, d);
            d.out = out;
            return;
        }
        let whole = std::mem::take(&mut d.frame);
        let mut out = std::mem::take(&mut d.out);
        let result = segment_tcp(&whole[..len], hdr, &mut out, |seg| {
            // Stop at the first segment that cannot be delivered: the rest would not be.
            let delivered = self.write_rx(rxq, plain, FrameSource::Local(seg), frame.head, d);
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
        hdr: WireHdr,
        src: FrameSource<'_>,
        head: &[u8],
        d: &mut Scratch,
    ) -> bool {
        let (dst, qidx) = (rxq.port, rxq.index);
        let (result, moved_from) = write_rx_buffers(rxq, hdr, src, head, d);
        // Bad chains handed back unused move the used ring too: the driver hears of them.
        if let Some(old_used) = moved_from {
            let delivered = result.is_ok();
            note_touched(
                &mut d.touched,
                Touched {
                    port: dst.id,
                    queue: qidx,
                    old_used,
                    packets: u64::from(delivered),
                    bytes: if delivered { src.len() as u64 } else { 0 },
                },
            );
        }
        match result {
            Ok(()) => true,
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

/// Whether a frame's offloads must be finished in software for a receiver with `features`:
/// a GSO frame it cannot take whole, or a checksum it does not accept unfinished.
fn needs_software(features: u64, hdr: &NetHdr) -> bool {
    hdr.is_gso() && !gso_supported(features, hdr)
        || hdr.needs_csum() && features & f::GUEST_CSUM == 0
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
fn passed_header(hdr: &NetHdr) -> WireHdr {
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
    out.to_wire()
}

fn read_avail(queue: &virtio_queue::Queue, ram: &Ram) -> Result<u16, RxError> {
    match avail_idx(ram, GuestAddress(queue.avail_ring())) {
        Some(avail) if avail.wrapping_sub(queue.next_avail()) <= queue.size() => Ok(avail),
        _ => Err(RxError::Broken),
    }
}

fn remember_avail(cache: &mut Vec<((PortId, usize), u16)>, key: (PortId, usize), avail: u16) {
    match cache.iter_mut().find(|c| c.0 == key) {
        Some(c) => c.1 = avail,
        None => cache.push((key, avail)),
    }
}

/// Adds deliveries to an RX queue's tally for this burst; the first write's used index is
/// the one kept (notification decisions count from it).
fn note_touched(touched: &mut Vec<Touched>, new: Touched) {
    match touched
        .iter_mut()
        .find(|t| t.port == new.port && t.queue == new.queue)
    {
        Some(t) => {
            t.packets += new.packets;
            t.bytes += new.bytes;
        }
        None => touched.push(new),
    }
}

/// An RX queue under its lock, with what every write into it needs looked up once.
struct LockedRx<'a> {
    queue: &'a mut virtio_queue::Queue,
    ram: &'a Ram,
    table: DescTable<'a>,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    size: u16,
    hdr_len: usize,
    mergeable: bool,
    /// The last avail index read: it only grows, so entries up to it can be taken without
    /// reading it again (each read pulls a cache line the driver keeps writing).
    avail: u16,
}

impl<'a> LockedRx<'a> {
    /// Checks that the queue may be written (enabled, ready, its port unchanged since the
    /// endpoint was opened) and looks up its rings.
    fn new(
        state: &'a mut VringState,
        rxq: &RxQueue<'a>,
        avail_cache: &[((PortId, usize), u16)],
    ) -> Result<Self, RxError> {
        if !state.is_enabled() || !rxq.port.is_current(rxq.generation) {
            return Err(RxError::Drop(DropReason::PortDown));
        }
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return Err(RxError::Drop(DropReason::PortDown));
        }
        let size = queue.size();
        let key = (rxq.port.id, rxq.index);
        let avail = match avail_cache.iter().find(|c| c.0 == key) {
            Some(c) if c.1.wrapping_sub(queue.next_avail()) <= size => c.1,
            _ => read_avail(queue, rxq.mem)?,
        };
        Ok(LockedRx {
            table: DescTable::new(rxq.mem, GuestAddress(queue.desc_table()), size),
            avail_ring: GuestAddress(queue.avail_ring()),
            used_ring: GuestAddress(queue.used_ring()),
            size,
            hdr_len: net_hdr_len(rxq.features),
            mergeable: rxq.features & f::MRG_RXBUF != 0,
            ram: rxq.mem,
            avail,
            queue,
        })
    }

    /// The short path: a frame whose bytes are `head` (its first bytes as checked) and
    /// `rest` (the rest, in one piece of the sender's memory) into the next chain, if that
    /// is one writable buffer that holds it, with no lists built on the way: their
    /// entries, stored and at once read back by wider loads, made those loads wait for the
    /// store buffer to drain. None, with nothing taken, where this does not apply: `write`
    /// then handles the frame.
    #[inline(always)]
    fn write_short(
        &mut self,
        hdr: WireHdr,
        head: &[u8],
        rest: Option<GuestSlice<'_>>,
    ) -> Option<Result<(), RxError>> {
        let next = self.queue.next_avail();
        if next == self.avail {
            return None;
        }
        let chain = avail_head(self.ram, self.avail_ring, self.size, next)?;
        let seg = self.table.lone(self.ram, chain, true)?;
        let len = self.hdr_len + head.len() + rest.as_ref().map_or(0, |r| r.len());
        let hdr = hdr.with_num_buffers(1);
        write_frame_whole(self.ram, seg, hdr, self.hdr_len, head, rest)?;
        self.queue.set_next_avail(next.wrapping_add(1));
        let used = (chain, len as u32);
        let old_used = self.queue.next_used();
        Some(
            match write_used(
                self.ram,
                self.used_ring,
                self.size,
                old_used,
                [used].into_iter(),
            ) {
                Some(n) => {
                    self.queue.set_next_used(n);
                    Ok(())
                }
                None => Err(RxError::Broken),
            },
        )
    }

    /// Starts fetching the first `len` bytes of the buffer after the next one, if that is
    /// a lone buffer the driver already made available: the next frame is written there,
    /// and its lines (evicted, or last touched by the driver's core) then arrive while this
    /// frame is copied, not one store miss at a time. (Fetching them for writing,
    /// `prefetchw`, measured no better.)
    fn prefetch_following_buffer(&self, len: usize) {
        let index = self.queue.next_avail().wrapping_add(1);
        let ahead = self.avail.wrapping_sub(index);
        if ahead == 0 || ahead > self.size {
            return;
        }
        let buffer = avail_head(self.ram, self.avail_ring, self.size, index)
            .and_then(|chain| self.table.lone(self.ram, chain, true))
            .and_then(|seg| self.ram.map(seg.addr, seg.len as usize));
        if let Some(m) = buffer {
            for off in (0..len).step_by(64) {
                m.prefetch(off);
            }
        }
    }

    /// Writes one frame into the queue's buffers and puts them on the used ring (published
    /// at the end of the burst).
    fn write(
        &mut self,
        hdr: WireHdr,
        src: FrameSource<'_>,
        head: &[u8],
        bufs: &mut RxBufs,
    ) -> Result<(), RxError> {
        let (ram, hdr_len, size) = (self.ram, self.hdr_len, self.size);
        let need = hdr_len + src.len();
        let queue = &mut *self.queue;
        let saved = queue.next_avail();
        let old_used = queue.next_used();
        bufs.segs.clear();
        bufs.chains.clear();
        let mut cap: usize = 0;
        while cap < need {
            if bufs.chains.len() == MAX_MERGED_BUFFERS {
                queue.set_next_avail(saved);
                return Err(RxError::Drop(DropReason::RxBufferTooSmall));
            }
            let next = queue.next_avail();
            if next == self.avail {
                self.avail = read_avail(queue, ram)?;
            }
            let avail = self.avail;
            let head = match (next != avail).then(|| avail_head(ram, self.avail_ring, size, next)) {
                Some(Some(h)) => h,
                Some(None) => return Err(RxError::Broken),
                None => {
                    queue.set_next_avail(saved);
                    return Err(RxError::Drop(DropReason::NoRxBuffer));
                }
            };
            queue.set_next_avail(next.wrapping_add(1));
            let walked = walk_chain(ram, &self.table, head, true, &mut bufs.segs);
            // A chain that cannot hold even the header is as useless as a malformed one.
            let bad = match walked {
                Ok(len) if len as usize >= hdr_len || !bufs.chains.is_empty() && len > 0 => None,
                Ok(_) => Some("RX buffer too small for the virtio-net header".to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = bad {
                debug!("bad RX chain {head}: {why}");
                if head >= size {
                    return Err(RxError::Broken);
                }
                // Hand back every chain taken for this frame, unused, so none leaks.
                let unused = bufs.chains.iter().map(|c| (c.head, 0)).chain([(head, 0)]);
                let next = push_used(ram, self.used_ring, size, old_used, unused)
                    .ok_or(RxError::Broken)?;
                queue.set_next_used(next);
                return Err(RxError::Drop(DropReason::BadRxDescriptor));
            }
            let len = walked.unwrap_or(0);
            cap += len as usize;
            bufs.chains.push(RxChain { head, cap: len });
            if !self.mergeable && cap < need {
                // Keep the buffer for a frame that fits; this one cannot be delivered.
                queue.set_next_avail(saved);
                return Err(RxError::Drop(DropReason::RxBufferTooSmall));
            }
        }

        let out_hdr = hdr.with_num_buffers(bufs.chains.len() as u16);
        let mut writer = GuestWriter::new(ram, &bufs.segs);
        let ok = match src {
            // The checked first bytes from their copy, the rest straight from the sender's
            // memory.
            FrameSource::Guest { .. } => {
                writer.write_net_hdr(out_hdr, hdr_len)
                    && writer.write(head)
                    && writer.copy_from(src.skip(head.len()))
            }
            FrameSource::Local(b) => writer.write_net_hdr(out_hdr, hdr_len) && writer.write(b),
        };
        let mut left = if ok { need } else { 0 };
        let used = bufs.chains.iter().map(|c| {
            let n = left.min(c.cap as usize);
            left -= n;
            (c.head, n as u32)
        });
        // Published at the end of the burst (flush_notifications), with one index store.
        let next = write_used(ram, self.used_ring, size, old_used, used).ok_or(RxError::Broken)?;
        queue.set_next_used(next);
        if ok {
            Ok(())
        } else {
            Err(RxError::Drop(DropReason::BadRxDescriptor))
        }
    }
}

/// Writes one frame into the RX queue; also returns the used index from before the write
/// if the write moved it (the frame delivered, or bad chains handed back).
fn write_rx_buffers(
    rxq: &RxQueue<'_>,
    hdr: WireHdr,
    src: FrameSource<'_>,
    head: &[u8],
    d: &mut Scratch,
) -> (Result<(), RxError>, Option<u16>) {
    let mut state = rxq.vring.get_mut();
    let mut rx = match LockedRx::new(&mut state, rxq, &d.avail_cache) {
        Ok(rx) => rx,
        Err(e) => return (Err(e), None),
    };
    let old_used = rx.queue.next_used();
    // A small frame takes the short path, as in runs (`deliver_run`).
    let short = match src {
        FrameSource::Guest { .. } if head.len() == src.len() => rx.write_short(hdr, head, None),
        _ => None,
    };
    let result = short.unwrap_or_else(|| rx.write(hdr, src, head, &mut d.rx));
    let avail = rx.avail;
    let moved = (rx.queue.next_used() != old_used).then_some(old_used);
    remember_avail(&mut d.avail_cache, (rxq.port.id, rxq.index), avail);
    (result, moved)
}
