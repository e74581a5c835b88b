//! A VM's port as a destination: its RX side as the guest published it, and the RX ring
//! driver that writes frames into it (the short path for one-buffer frames, mergeable
//! buffers, offloads finished in software for a guest that lacks them, bad chains handed
//! back), with one interrupt per queue per burst.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{debug, warn};
use vhost_user_backend::{ShutdownHandle, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::frame::{Frame, TxFrame, MAX_HEAD, PREFETCH_BODY};
use super::notifier::Notifier;
use crate::counters::{DropReason, PortCounters};
use crate::fault;
use crate::mem::{GuestMemory, GuestSlice, Ram};
use crate::packet::offload::{complete_checksum, segment_tcp};
use crate::packet::vlan::passed_header;
use crate::types::{PortId, MAX_GSO_FRAME};
use crate::virtio::chain::{walk_chain_within, DescTable, Segment, MAX_CHAIN_SEGMENTS};
use crate::virtio::copy::{write_frame_whole, FrameSource, GuestWriter};
use crate::virtio::ring::{
    avail_head, checked_avail_idx, needs_interrupt, publish_used, push_used, write_used,
};
use crate::virtio::{
    features as f, net_hdr_len, NetHdr, WireHdr, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

pub use crate::vring::Vring;

/// Most RX buffers one mergeable frame may use.
const MAX_MERGED_BUFFERS: usize = 256;

/// What a port exposes to the others while a guest is attached: its memory, negotiated
/// features and RX vrings (one slot per queue pair).
#[derive(Default)]
pub struct RxEndpoint {
    pub mem: Option<GuestMemoryAtomic<GuestMemory>>,
    pub features: u64,
    pub features_acked: bool,
    pub queues: Vec<Option<Vring>>,
}

impl RxEndpoint {
    fn open(&self, port: PortId, generation: u64) -> OpenEndpoint {
        let mut open = OpenEndpoint {
            port,
            generation,
            ram: None,
            features: self.features,
            queues: Default::default(),
            enabled: 0,
        };
        let (Some(atomic), true) = (self.mem.as_ref(), self.features_acked) else {
            return open;
        };
        for (i, q) in self.queues.iter().enumerate() {
            if let Some(v) = q {
                if v.usable() && open.enabled < MAX_QP {
                    open.queues[open.enabled] = Some((i, v.clone()));
                    open.enabled += 1;
                }
            }
        }
        if open.enabled > 0 {
            open.ram = Some(Ram::new(atomic.memory().into_inner()));
        }
        open
    }

    /// Number of RX queues the guest has started and enabled: those frames go to.
    pub fn queue_count(&self) -> usize {
        self.queues.iter().flatten().filter(|v| v.usable()).count()
    }
}

const MAX_QP: usize = crate::config::MAX_QUEUE_PAIRS as usize;

/// A port's RX side as one burst of deliveries sees it: its memory, features and the RX
/// queues its guest has enabled (a guest may use fewer queue pairs than offered, and change
/// that at run time). Taken once per burst, so the port's lock, its memory handle and its
/// queues' states are not touched again for every frame; each write still takes the queue's
/// own lock and checks that it is enabled.
pub struct OpenEndpoint {
    pub port: PortId,
    /// The port's `generation` when this was taken.
    pub generation: u64,
    /// None when no guest is attached, its features are not acked or no queue is enabled.
    pub ram: Option<Ram>,
    pub features: u64,
    queues: [Option<(usize, Vring)>; MAX_QP],
    enabled: usize,
}

impl OpenEndpoint {
    /// The RX queue a flow goes to, among the enabled ones.
    pub fn pick_queue(&self, hash: u32) -> Option<&(usize, Vring)> {
        if self.enabled == 0 {
            return None;
        }
        // The hash scaled to the queue count: a multiply, where `%` would divide per frame.
        let i = (u64::from(hash) * self.enabled as u64) >> 32;
        self.queues[i as usize].as_ref()
    }

    /// RX queue `index`, if it was enabled when the endpoint was opened.
    pub fn queue(&self, index: usize) -> Option<&Vring> {
        self.queues[..self.enabled]
            .iter()
            .flatten()
            .find(|(i, _)| *i == index)
            .map(|(_, v)| v)
    }
}

/// A VM port's RX side and connection: what outlives one guest connection.
pub struct VmEndpoint {
    rx: RwLock<RxEndpoint>,
    queue_pairs: u16,
    /// Changes with every change of `rx`: an endpoint opened for a burst is used only while
    /// it is still the port's current one.
    generation: AtomicU64,
    /// Closes the current vhost-user connection (a guest that broke the protocol).
    pub connection: Mutex<Option<ShutdownHandle>>,
    /// Whether this connection's broken ring was logged already: every frame sent to it
    /// until the reset takes effect would log again.
    broken_logged: AtomicBool,
    /// Raises this port's interrupts, on the connection's notifier thread.
    pub notifier: Arc<Notifier>,
}

impl VmEndpoint {
    pub fn new(queue_pairs: u16) -> VmEndpoint {
        VmEndpoint {
            rx: RwLock::new(RxEndpoint {
                queues: vec![None; usize::from(queue_pairs)],
                ..Default::default()
            }),
            queue_pairs,
            generation: AtomicU64::new(0),
            connection: Mutex::new(None),
            broken_logged: AtomicBool::new(false),
            notifier: Arc::new(Notifier::new(2 * usize::from(queue_pairs))),
        }
    }
}

impl VmEndpoint {
    pub fn rx_read(&self) -> std::sync::RwLockReadGuard<'_, RxEndpoint> {
        self.rx.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The RX side for a change; whatever was opened before is stale from now on.
    pub fn rx_write(&self) -> std::sync::RwLockWriteGuard<'_, RxEndpoint> {
        let rx = self.rx.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        rx
    }

    /// Takes what deliveries to port `id` (this one) need for one burst.
    pub fn open_rx(&self, id: PortId) -> OpenEndpoint {
        let rx = self.rx_read();
        // Read under the read lock: no change is half made.
        rx.open(id, self.generation.load(Ordering::Acquire))
    }

    /// The generation now (read under `rx_read` to pair it with what that shows).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether `ep` is still this port's current RX side. Checked under the destination
    /// queue's lock before writing or publishing, which `detach` takes after a change.
    #[inline]
    pub fn is_current(&self, ep_generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == ep_generation
    }

    /// Withdraws everything a guest connection published, so that no other port writes
    /// into memory that is no longer this guest's.
    /// True the first time this connection is found broken, false after: log only then.
    pub fn first_breakage(&self) -> bool {
        !self.broken_logged.swap(true, Ordering::Relaxed)
    }

    pub fn detach(&self) {
        // The next connection gets its own report.
        self.broken_logged.store(false, Ordering::Relaxed);
        let old = std::mem::replace(
            &mut *self.rx_write(),
            RxEndpoint {
                queues: vec![None; usize::from(self.queue_pairs)],
                ..Default::default()
            },
        );
        // A delivery that checked the generation before it changed is finishing under its
        // queue's lock: taking each lock once waits for it. Later ones see the change.
        for vring in old.queues.iter().flatten() {
            drop(vring.get_mut());
        }
        self.notifier.clear();
    }

    /// Drops the current connection; the frontend reconnects and renegotiates.
    pub fn reset_connection(&self) {
        if let Some(h) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }
}

/// A VM port as the RX driver sees it.
#[derive(Clone, Copy)]
pub struct VmPort<'a> {
    pub id: PortId,
    pub name: &'a str,
    pub counters: &'a PortCounters,
    pub vm: &'a VmEndpoint,
}

/// A guest that broke the RX ring protocol: counted, and its connection reset.
fn rx_broken(dst: VmPort<'_>) {
    dst.counters.count_drop(DropReason::BadRxDescriptor);
    if dst.vm.first_breakage() {
        warn!(
            "port {}: guest driver broke the virtio protocol on RX; resetting the connection",
            dst.name
        );
    }
    dst.vm.reset_connection();
}

struct RxChain {
    head: u16,
    cap: u32,
}

/// An RX queue written during a burst, and its used index before the first write.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Touched {
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

/// What a worker needs to deliver into VM ports, allocated once so the data path never
/// allocates.
pub struct RxScratch {
    rx: RxBufs,
    /// The whole frame, gathered only when a destination needs software offload.
    frame: Vec<u8>,
    frame_gathered: bool,
    /// One software-finished frame (checksummed copy or TCP segment).
    out: Vec<u8>,
    /// RX queues written during this burst, notified once at its end.
    touched: Vec<Touched>,
    /// Avail indexes of RX queues read during this burst.
    avail_cache: Vec<((PortId, usize), u16)>,
    /// Used entries of a run held back (`LockedRx::shadow`).
    used_shadow: Vec<(u16, u32)>,
    /// Destination ports' RX sides as this burst found them.
    open: Vec<OpenEndpoint>,
}

impl Default for RxScratch {
    fn default() -> Self {
        RxScratch {
            rx: RxBufs {
                segs: Vec::with_capacity(MAX_MERGED_BUFFERS),
                chains: Vec::with_capacity(MAX_MERGED_BUFFERS),
            },
            frame: vec![0; MAX_GSO_FRAME],
            frame_gathered: false,
            out: vec![0; MAX_GSO_FRAME],
            touched: Vec::with_capacity(64),
            avail_cache: Vec::with_capacity(64),
            used_shadow: Vec::with_capacity(SHADOW_USED),
            open: Vec::with_capacity(64),
        }
    }
}

/// The destination RX queue of one delivery.
struct RxQueue<'a> {
    port: VmPort<'a>,
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
    fn pick(port: VmPort<'a>, ep: &'a OpenEndpoint, hash: u32) -> Option<Self> {
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

impl RxScratch {
    /// A new frame is being delivered: whatever was gathered of the last one is stale.
    pub fn next_frame(&mut self) {
        self.frame_gathered = false;
    }

    /// The endpoint of port `id` opened in this burst (opening it on first use).
    fn endpoint(&mut self, id: PortId, vm: &VmEndpoint) -> usize {
        match self.open.iter().position(|o| o.port == id) {
            Some(i) => i,
            None => {
                self.open.push(vm.open_rx(id));
                self.open.len() - 1
            }
        }
    }

    /// Writes `frames` (a run of a burst all going to `dst`, in `segment`) under one lock
    /// of the RX queue the first goes to, for as long as they go there and need no software
    /// offload; returns how many it handled (0: the first is not such a frame, `deliver`
    /// takes it). `heads`, if given, are the frames' heads as routed (one per frame, each
    /// as long as the frame's own), written in place of what the sender wrote.
    pub fn deliver_run(
        &mut self,
        dst: VmPort<'_>,
        ram: &Ram,
        segs: &[Segment],
        frames: &[TxFrame],
        heads: Option<&[[u8; MAX_HEAD]]>,
        segment: u16,
    ) -> usize {
        let vm = dst.vm;
        let k = self.endpoint(dst.id, vm);
        let RxScratch {
            open,
            rx,
            touched,
            avail_cache,
            used_shadow,
            ..
        } = self;
        let ep = &open[k];
        let Some(rxq) = RxQueue::pick(dst, ep, frames[0].hash) else {
            return 0;
        };
        let index = &rxq.index;
        let plain = |t: &TxFrame| {
            !needs_software(ep.features, &t.hdr)
                && ep.pick_queue(t.hash).map(|q| q.0) == Some(*index)
        };
        if !plain(&frames[0]) {
            return 0;
        }
        let mut state = rxq.vring.get_mut();
        // Under `contain`: a panic here must not poison the receiver's ring (see `fault`).
        let run = fault::contain("delivering frames", || {
            fault::inject_delivery(dst.id);
            // Not writable: None, and each frame is counted as dropped by the general path.
            let mut locked =
                LockedRx::new(&mut state, &rxq, avail_cache, Some(used_shadow)).ok()?;
            let old_used = locked.queue.next_used();
            let (mut packets, mut bytes) = (0u64, 0u64);
            let mut j = 0;
            let mut broken = false;
            // A port that changed meanwhile (new memory table or features) stops the run: the
            // rest take the general path, which sees the change.
            while j < frames.len() && plain(&frames[j]) && vm.is_current(rxq.generation) {
                if let Some(next) = frames.get(j + 1) {
                    next.prefetch_body(ram, segs);
                    // Small frames gain nothing: their buffer's first line comes with the
                    // used-ring write's latency anyway, and the lookup costs more.
                    if next.len > 512 {
                        locked.prefetch_following_buffer((next.len + 12).min(PREFETCH_BODY));
                    }
                }
                let t = &frames[j];
                let header = passed(&t.hdr);
                let head = heads.map_or(t.head(), |h| &h[j][..t.head_len]);
                let short = if t.head_len == t.len {
                    locked.write_short(header, head, None)
                } else if t.end - t.first == 1 {
                    // One TX buffer: the rest of the frame follows its head in it.
                    segs[t.first]
                        .addr
                        .checked_add((t.hdr_len + t.head_len) as u64)
                        .and_then(|at| ram.slice(at, t.len - t.head_len))
                        .and_then(|rest| locked.write_short(header, head, Some(rest)))
                } else {
                    None
                };
                let written = short.unwrap_or_else(|| {
                    let frame = t.frame(ram, segs, segment);
                    locked.write(header, frame.src, head, rx)
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
            // Even after a failure: the entries counted in next_used must be in the ring
            // before the burst's flush publishes it.
            if locked.write_shadow().is_err() {
                broken = true;
            }
            // Bad chains handed back unused move the used ring too: the driver hears of them.
            let moved = locked.queue.next_used() != old_used;
            Some((j, packets, bytes, broken, locked.avail, moved, old_used))
        });
        drop(state);
        let (j, packets, bytes, broken, avail, moved, old_used) = match run {
            Some(Some(done)) => done,
            Some(None) => return 0,
            None => {
                for _ in frames {
                    dst.counters.count_drop(DropReason::InternalError);
                }
                return frames.len();
            }
        };
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
            rx_broken(dst);
        }
        j
    }

    /// Delivers one frame to `dst`, finishing offloads in software where `dst` did not
    /// negotiate them.
    pub fn deliver(&mut self, from: &PortCounters, dst: VmPort<'_>, frame: &Frame<'_>) {
        let i = self.endpoint(dst.id, dst.vm);
        // Taken out for the call: write_rx needs the rest of `self`.
        let open = std::mem::take(&mut self.open);
        let ep = &open[i];
        match RxQueue::pick(dst, ep, frame.hash) {
            Some(rxq) => self.deliver_to(from, &rxq, frame),
            None => dst.counters.count_drop(DropReason::PortDown),
        }
        self.open = open;
    }

    /// `deliver` for one copy of a flooded frame. A TSO frame with an MSS below
    /// `FLOOD_MIN_MSS` goes only to receivers that take it whole: segmenting it in software
    /// for every flood target would let a guest turn one 64 KiB frame with a 48-byte MSS
    /// into 1,366 frames at each port of its segment. Learned unicast is segmented as
    /// usual (one receiver, as a host's own stack would).
    pub fn deliver_flooded(&mut self, from: &PortCounters, dst: VmPort<'_>, frame: &Frame<'_>) {
        if frame.hdr.is_gso() && usize::from(frame.hdr.gso_size) < FLOOD_MIN_MSS {
            let i = self.endpoint(dst.id, dst.vm);
            if !gso_supported(self.open[i].features, &frame.hdr) {
                return from.count_drop(DropReason::BadOffload);
            }
        }
        self.deliver(from, dst, frame);
    }

    /// `deliver` once the destination queue is chosen.
    fn deliver_to(&mut self, from: &PortCounters, rxq: &RxQueue<'_>, frame: &Frame<'_>) {
        let d = self;
        let (hdr, src, features) = (&frame.hdr, frame.src, rxq.features);

        if !needs_software(features, hdr) {
            let out = passed(hdr);
            d.write_rx(rxq, out, src, frame.head);
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
                return from.count_drop(DropReason::BadOffload);
            }
            // Taken out of `d` for the call: write_rx needs the rest of `d`.
            let out = std::mem::take(&mut d.out);
            let finished = FrameSource::Local(&out[..len]);
            // Whole already, head included (and its checksum completed).
            d.write_rx(rxq, plain, finished, &[]);
            d.out = out;
            return;
        }
        let whole = std::mem::take(&mut d.frame);
        let mut out = std::mem::take(&mut d.out);
        let result = segment_tcp(&whole[..len], hdr, &mut out, |seg| {
            // Stop at the first segment that cannot be delivered: the rest would not be.
            let delivered = d.write_rx(rxq, plain, FrameSource::Local(seg), &[]);
            if delivered {
                Ok(())
            } else {
                Err(())
            }
        });
        d.frame = whole;
        d.out = out;
        if result.is_err() {
            from.count_drop(DropReason::BadOffload);
        }
    }

    /// Takes RX buffers from `vring` (several when mergeable), writes the header and the
    /// frame, and puts the buffers on the used ring. Counts a drop on `dst` when it cannot.
    fn write_rx(
        &mut self,
        rxq: &RxQueue<'_>,
        hdr: WireHdr,
        src: FrameSource<'_>,
        head: &[u8],
    ) -> bool {
        let d = self;
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
                rx_broken(dst);
                false
            }
        }
    }

    /// Interrupts each RX queue written in this burst once, if its driver wants it, with no
    /// lock held while signalling.
    pub fn flush<'p>(&mut self, port: impl Fn(PortId) -> Option<VmPort<'p>>) {
        let scratch = self;
        scratch.avail_cache.clear();
        for t in scratch.touched.drain(..) {
            let Some(VmPort { counters, vm, .. }) = port(t.port) else {
                continue;
            };
            counters.queue(t.queue).add_rx(t.packets, t.bytes);
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
                if !q.ready() || !vm.is_current(generation) {
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
                // RX queue pair i is vring 2i.
                vm.notifier.ring(2 * t.queue);
            }
        }
        scratch.open.clear();
    }
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

/// The header a receiver with the matching offloads gets.
#[inline]
fn passed(hdr: &NetHdr) -> WireHdr {
    // Nothing moves the offsets here, so nothing can overflow.
    passed_header(hdr, 0).unwrap_or_default().to_wire()
}

fn read_avail(queue: &virtio_queue::Queue, ram: &Ram) -> Result<u16, RxError> {
    checked_avail_idx(ram, queue).ok_or(RxError::Broken)
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
    /// Used entries of short-path frames not yet in the used ring (the last ones before
    /// `queue.next_used()`): written together, so the used ring's lines, which the driver
    /// keeps reading, are taken from its core once per run instead of once per frame.
    shadow: Option<&'a mut Vec<(u16, u32)>>,
}

/// Smallest MSS of a TSO frame segmented in software for a flood target: IPv4's default
/// MSS (RFC 9293), at most 123 segments of a 64 KiB frame.
const FLOOD_MIN_MSS: usize = 536;

/// Used entries held back by a short-path run before they are written.
const SHADOW_USED: usize = 32;

impl<'a> LockedRx<'a> {
    /// Checks that the queue may be written (enabled, ready, its port unchanged since the
    /// endpoint was opened) and looks up its rings.
    fn new(
        state: &'a mut VringState,
        rxq: &RxQueue<'a>,
        avail_cache: &[((PortId, usize), u16)],
        mut shadow: Option<&'a mut Vec<(u16, u32)>>,
    ) -> Result<Self, RxError> {
        if let Some(s) = shadow.as_deref_mut() {
            s.clear();
        }
        if !state.is_enabled() || !rxq.port.vm.is_current(rxq.generation) {
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
            table: DescTable::new(rxq.mem, GuestAddress(queue.desc_table()), size)
                .with_indirect(rxq.features & f::RING_INDIRECT_DESC != 0),
            avail_ring: GuestAddress(queue.avail_ring()),
            used_ring: GuestAddress(queue.used_ring()),
            size,
            hdr_len: net_hdr_len(rxq.features),
            mergeable: rxq.features & f::MRG_RXBUF != 0,
            ram: rxq.mem,
            avail,
            shadow,
            queue,
        })
    }

    /// Writes the held-back used entries into the used ring (not published: that is the
    /// burst's flush). Must run before the lock is released and before `write`.
    fn write_shadow(&mut self) -> Result<(), RxError> {
        let Some(shadow) = self.shadow.as_deref_mut().filter(|s| !s.is_empty()) else {
            return Ok(());
        };
        let at = self.queue.next_used().wrapping_sub(shadow.len() as u16);
        write_used(
            self.ram,
            self.used_ring,
            self.size,
            at,
            shadow.iter().copied(),
        )
        .ok_or(RxError::Broken)?;
        shadow.clear();
        Ok(())
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
        let Some(shadow) = self.shadow.as_deref_mut() else {
            // One frame alone: its entry goes straight into the ring.
            return Some(
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
            );
        };
        shadow.push(used);
        self.queue.set_next_used(old_used.wrapping_add(1));
        if shadow.len() == SHADOW_USED {
            if let Err(e) = self.write_shadow() {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
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
        self.write_shadow()?;
        let (ram, hdr_len, size) = (self.ram, self.hdr_len, self.size);
        let need = hdr_len + src.len();
        let queue = &mut *self.queue;
        let saved = queue.next_avail();
        let old_used = queue.next_used();
        bufs.segs.clear();
        bufs.chains.clear();
        let mut cap: usize = 0;
        // One budget of descriptor visits for the frame, all its chains together: a
        // receiver posting chains of empty descriptors makes a sender walk at most this
        // many per frame, not 1024 for each of 256 chains.
        let mut budget = MAX_CHAIN_SEGMENTS;
        while cap < need {
            if bufs.chains.len() == MAX_MERGED_BUFFERS {
                // So many buffers, still too small: tiny buffers no driver posts but to
                // make senders work. They are handed back, used, so the next frame does
                // not walk them again.
                let unused = bufs.chains.iter().map(|c| (c.head, 0));
                let next = push_used(ram, self.used_ring, size, old_used, unused)
                    .ok_or(RxError::Broken)?;
                queue.set_next_used(next);
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
            let walked =
                walk_chain_within(ram, &self.table, head, true, &mut bufs.segs, &mut budget);
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
            // A local frame's first bytes may have been rewritten (routed) in `head` too.
            FrameSource::Local(b) => {
                let rest = &b[head.len().min(b.len())..];
                writer.write_net_hdr(out_hdr, hdr_len) && writer.write(head) && writer.write(rest)
            }
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
    d: &mut RxScratch,
) -> (Result<(), RxError>, Option<u16>) {
    let mut state = rxq.vring.get_mut();
    // Under `contain`: a panic here must not poison the receiver's ring (see `fault`).
    let written = fault::contain("delivering a frame", || {
        fault::inject_delivery(rxq.port.id);
        let mut rx = match LockedRx::new(&mut state, rxq, &d.avail_cache, None) {
            Ok(rx) => rx,
            Err(e) => return (Err(e), None, None),
        };
        let old_used = rx.queue.next_used();
        // A small frame takes the short path, as in runs (`deliver_run`).
        let short = match src {
            FrameSource::Guest { .. } if head.len() == src.len() => rx.write_short(hdr, head, None),
            _ => None,
        };
        let result = short.unwrap_or_else(|| rx.write(hdr, src, head, &mut d.rx));
        let moved = (rx.queue.next_used() != old_used).then_some(old_used);
        (result, moved, Some(rx.avail))
    });
    drop(state);
    let Some((result, moved, avail)) = written else {
        return (Err(RxError::Drop(DropReason::InternalError)), None);
    };
    if let Some(avail) = avail {
        remember_avail(&mut d.avail_cache, (rxq.port.id, rxq.index), avail);
    }
    (result, moved)
}

/// Rings laid out by hand in a test guest's memory, as a driver would.
#[cfg(test)]
pub(crate) mod test_rings {
    use vhost_user_backend::VringT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    use super::Vring;
    use crate::mem::GuestMemory;

    pub const SIZE: u16 = 16;

    /// Where one queue's rings sit: descriptor table, avail ring, used ring.
    #[derive(Clone, Copy)]
    pub struct Layout {
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
    }

    impl Layout {
        pub const fn at(base: u64) -> Layout {
            Layout {
                desc: base,
                avail: base + 0x400,
                used: base + 0x800,
            }
        }
    }

    /// A ready, enabled queue of SIZE entries at `l`, without EVENT_IDX.
    pub fn vring(mem: &GuestMemoryAtomic<GuestMemory>, l: Layout) -> Vring {
        let v = Vring::new(mem.clone(), 256).unwrap();
        v.set_queue_size(SIZE);
        v.set_queue_info(l.desc, l.avail, l.used).unwrap();
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Makes chain `head` available as avail entry `idx` and publishes idx + 1.
    pub fn post(mem: &GuestMemory, l: Layout, idx: u16, head: u16) {
        let slot = u64::from(idx % SIZE);
        mem.write_obj(head, GuestAddress(l.avail + 4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(l.avail + 2))
            .unwrap();
    }

    /// The used index the device published and used entry `i` (head, length).
    pub fn used(mem: &GuestMemory, l: Layout, i: u16) -> (u16, (u32, u32)) {
        let idx: u16 = mem.read_obj(GuestAddress(l.used + 2)).unwrap();
        let at = l.used + 4 + 8 * u64::from(i % SIZE);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (idx, (id, len))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    use super::test_rings::{post, used, vring, Layout};
    use super::*;
    use crate::virtio::chain::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::virtio::test_util::{mem, put_desc};

    const RX: Layout = Layout::at(0);
    const BUFS: u64 = 0x4000;

    /// A VM endpoint whose guest negotiated `features` and has one RX queue at `RX`.
    fn endpoint(m: &GuestMemory, features: u64) -> VmEndpoint {
        let atomic = GuestMemoryAtomic::new(m.clone());
        let vm = VmEndpoint::new(1);
        *vm.rx_write() = RxEndpoint {
            mem: Some(atomic.clone()),
            features,
            features_acked: true,
            queues: vec![Some(vring(&atomic, RX))],
        };
        vm
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    /// Delivers `bytes` (a local frame) to port 0 = `vm`, then flushes.
    fn deliver(vm: &VmEndpoint, counters: &PortCounters, bytes: &[u8]) {
        let port = VmPort {
            id: 0,
            name: "b",
            counters,
            vm,
        };
        let from = PortCounters::default();
        let mut rx = RxScratch::default();
        let f = Frame {
            hdr: NetHdr::default(),
            src: FrameSource::Local(bytes),
            head: &bytes[..14],
            hash: 7,
            segment: 0,
        };
        rx.deliver(&from, port, &f);
        rx.flush(|id| (id == 0).then_some(port));
    }

    #[test]
    fn a_frame_lands_in_a_posted_buffer_with_its_header_and_used_entry() {
        let m = mem();
        let vm = endpoint(&m, f::VERSION_1);
        put_desc(&m, RX.desc, 3, BUFS, 2048, VIRTQ_DESC_F_WRITE, 0);
        post(&m, RX, 0, 3);
        let counters = PortCounters::default();
        let f = frame(60);
        deliver(&vm, &counters, &f);
        assert_eq!(used(&m, RX, 0), (1, (3, 12 + 60)));
        let mut got = vec![0u8; 72];
        m.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        assert_eq!(NetHdr::parse(&got[..12]).num_buffers, 1);
        assert_eq!(&got[12..], &f[..]);
        let c = counters.snapshot();
        assert_eq!((c.rx_packets, c.rx_bytes), (1, 60));
    }

    #[test]
    fn a_mergeable_frame_spans_buffers_and_without_mrg_it_waits_for_a_big_one() {
        let m = mem();
        for (i, at) in [(0u16, 0u64), (1, 64), (2, 128)] {
            put_desc(&m, RX.desc, i, BUFS + at, 64, VIRTQ_DESC_F_WRITE, 0);
            post(&m, RX, i, i);
        }
        let f = frame(150);
        // Without MRG_RXBUF a 64-byte buffer cannot hold it: dropped, nothing taken.
        let plain = endpoint(&m, f::VERSION_1);
        let counters = PortCounters::default();
        deliver(&plain, &counters, &f);
        assert_eq!(used(&m, RX, 0).0, 0);
        assert_eq!(
            counters.snapshot().drop_count(DropReason::RxBufferTooSmall),
            1
        );
        // With it, three buffers: 64 + 64 + 34 bytes, num_buffers 3.
        let merged = endpoint(&m, f::VERSION_1 | f::MRG_RXBUF);
        let counters = PortCounters::default();
        deliver(&merged, &counters, &f);
        assert_eq!(used(&m, RX, 0), (3, (0, 64)));
        assert_eq!(used(&m, RX, 1).1, (1, 64));
        assert_eq!(used(&m, RX, 2).1, (2, 34));
        let mut got = vec![0u8; 12 + 150];
        m.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        assert_eq!(NetHdr::parse(&got[..12]).num_buffers, 3);
        assert_eq!(&got[12..], &f[..]);
        assert_eq!(counters.snapshot().rx_packets, 1);
    }

    #[test]
    fn bad_chains_come_back_unused_and_an_empty_ring_drops() {
        let m = mem();
        let vm = endpoint(&m, f::VERSION_1);
        let counters = PortCounters::default();
        // Nothing posted: no buffer.
        deliver(&vm, &counters, &frame(60));
        assert_eq!(counters.snapshot().drop_count(DropReason::NoRxBuffer), 1);
        // A buffer outside guest memory, and a chain whose next index is out of range.
        put_desc(&m, RX.desc, 0, 0x7fff_0000, 2048, VIRTQ_DESC_F_WRITE, 0);
        post(&m, RX, 0, 0);
        deliver(&vm, &counters, &frame(60));
        assert_eq!(used(&m, RX, 0), (1, (0, 0)));
        put_desc(
            &m,
            RX.desc,
            1,
            BUFS,
            8,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            200,
        );
        post(&m, RX, 1, 1);
        deliver(&vm, &counters, &frame(60));
        assert_eq!(used(&m, RX, 1), (2, (1, 0)));
        assert_eq!(
            counters.snapshot().drop_count(DropReason::BadRxDescriptor),
            2
        );
        // The ring still works.
        put_desc(&m, RX.desc, 2, BUFS, 2048, VIRTQ_DESC_F_WRITE, 0);
        post(&m, RX, 2, 2);
        deliver(&vm, &counters, &frame(60));
        assert_eq!(used(&m, RX, 2), (3, (2, 72)));
    }

    #[test]
    fn a_frame_walks_one_budget_of_descriptors_and_consumes_what_it_tried() {
        // Chains that are each an indirect table of 1000 empty descriptors and one byte: a
        // mergeable receiver's way of making every sender walk ~1000 descriptors per chain,
        // 16 chains per frame, again for every frame, since a frame that did not fit took
        // nothing.
        use crate::virtio::chain::VIRTQ_DESC_F_INDIRECT;
        let m = mem();
        let table = 0x8000u64;
        for i in 0..1000u16 {
            put_desc(
                &m,
                table,
                i,
                BUFS,
                0,
                VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                i + 1,
            );
        }
        put_desc(&m, table, 1000, BUFS, 1, VIRTQ_DESC_F_WRITE, 0);
        // Chain 0 holds the header and a byte; chains 1..16, a byte each behind 1000 empty
        // descriptors: 28 bytes in all, not enough for the frame, at 15,000 visits.
        put_desc(&m, RX.desc, 0, BUFS, 13, VIRTQ_DESC_F_WRITE, 0);
        post(&m, RX, 0, 0);
        for i in 1..16u16 {
            put_desc(&m, RX.desc, i, table, 1001 * 16, VIRTQ_DESC_F_INDIRECT, 0);
            post(&m, RX, i, i);
        }
        let vm = endpoint(&m, f::VERSION_1 | f::MRG_RXBUF | f::RING_INDIRECT_DESC);
        let counters = PortCounters::default();
        deliver(&vm, &counters, &frame(60));
        // The third chain ran out of the frame's budget: all three handed back, used.
        assert_eq!(used(&m, RX, 0), (3, (0, 0)));
        assert_eq!(used(&m, RX, 1).1, (1, 0));
        assert_eq!(used(&m, RX, 2).1, (2, 0));
        assert_eq!(
            counters.snapshot().drop_count(DropReason::BadRxDescriptor),
            1
        );
        // The next frame starts after them (and its first chain, too small, goes back).
        deliver(&vm, &counters, &frame(60));
        assert_eq!(used(&m, RX, 3), (4, (3, 0)));
    }

    #[test]
    fn a_broken_ring_is_counted_every_time_and_logged_once_per_connection() {
        let m = mem();
        let vm = endpoint(&m, f::VERSION_1);
        // An avail index a whole ring and more ahead of what was taken: the protocol broken.
        m.write_obj(100u16, GuestAddress(RX.avail + 2)).unwrap();
        let counters = PortCounters::default();
        assert!(!vm.broken_logged.load(Ordering::Relaxed));
        deliver(&vm, &counters, &frame(60));
        assert!(
            vm.broken_logged.load(Ordering::Relaxed),
            "the first one is logged"
        );
        assert!(!vm.first_breakage(), "and only the first");
        deliver(&vm, &counters, &frame(60));
        assert_eq!(
            counters.snapshot().drop_count(DropReason::BadRxDescriptor),
            2
        );
        // A new connection's breakage is reported again.
        vm.detach();
        assert!(vm.first_breakage());
    }
}
