//! One vhost-user device per switch port. Each queue pair has its own worker thread and
//! state; a TX burst is switched frame by frame and copied straight into the destination
//! guests' RX buffers.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::MacAddr;
use crate::counters::DropReason;
use crate::offload::{complete_checksum, segment_tcp};
use crate::switch::{flow_hash, Forward, PortId, PortShared, Switch};
use crate::virtio::{
    features as f, needs_interrupt, net_hdr_len, push_used, walk_chain, Cursor, FrameSource,
    GuestMemory, GuestWriter, NetHdr, Segment, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// Largest queue size offered (QEMU accepts up to 1024 for vhost-user).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Chains handled per TX wake-up before notifying and looking again.
const TX_BURST: usize = 256;
/// Bytes of each frame read up front: virtio header aside, enough for Ethernet, IPv6 and ports.
const PEEK_LEN: usize = 96;
/// Largest frame a guest may hand over for segmentation: a 64 KiB IP packet plus Ethernet.
pub const MAX_GSO_FRAME: usize = 65535 + 14;
/// Most RX buffers one mergeable frame may use.
const MAX_MERGED_BUFFERS: usize = 256;

/// Features every port offers; all of them are honoured for every destination, in software
/// where the destination lacks an offload.
pub const BASE_FEATURES: u64 = f::VERSION_1
    | f::MRG_RXBUF
    | f::RING_EVENT_IDX
    | f::RING_INDIRECT_DESC
    | f::CSUM
    | f::GUEST_CSUM
    | f::HOST_TSO4
    | f::HOST_TSO6
    | f::HOST_ECN
    | f::GUEST_TSO4
    | f::GUEST_TSO6
    | f::GUEST_ECN
    | f::MQ
    | f::PROTOCOL_FEATURES;

struct RxChain {
    head: u16,
    cap: u32,
}

/// Per-queue-pair scratch space, allocated once so the data path never allocates.
struct Worker {
    published: bool,
    tx_segs: Vec<Segment>,
    rx_segs: Vec<Segment>,
    rx_chains: Vec<RxChain>,
    /// The whole frame, gathered only when a destination needs software offload.
    frame: Vec<u8>,
    frame_gathered: bool,
    /// One software-finished frame (checksummed copy or TCP segment).
    out: Vec<u8>,
    /// RX queues written during this burst, notified once at its end.
    touched: Vec<Touched>,
}

impl Worker {
    fn new() -> Self {
        Worker {
            published: false,
            tx_segs: Vec::with_capacity(64),
            rx_segs: Vec::with_capacity(MAX_MERGED_BUFFERS),
            rx_chains: Vec::with_capacity(MAX_MERGED_BUFFERS),
            frame: vec![0; MAX_GSO_FRAME],
            frame_gathered: false,
            out: vec![0; MAX_GSO_FRAME],
            touched: Vec::with_capacity(64),
        }
    }
}

/// Buffers used while delivering; split from `Worker` so the TX segments stay borrowed.
struct Delivery<'a> {
    rx_segs: &'a mut Vec<Segment>,
    rx_chains: &'a mut Vec<RxChain>,
    frame: &'a mut Vec<u8>,
    frame_gathered: &'a mut bool,
    out: &'a mut Vec<u8>,
    touched: &'a mut Vec<Touched>,
    /// The Ethernet header as checked and switched: delivered from this copy, so a guest
    /// rewriting its buffer meanwhile cannot change what the decision was made on.
    eth: [u8; 14],
}

/// An RX queue written during a burst, and its used index before the first write.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Touched {
    port: PortId,
    queue: usize,
    old_used: u16,
}

struct PortInner {
    switch: Arc<Switch>,
    shared: Arc<PortShared>,
    workers: Vec<Mutex<Worker>>,
    /// False once the connection ended: old workers still draining must not touch the
    /// port's shared state, which may already belong to the next connection.
    alive: AtomicBool,
}

/// The `VhostUserBackend` of one port for one frontend connection.
#[derive(Clone)]
pub struct Port(Arc<PortInner>);

impl Port {
    pub fn new(switch: Arc<Switch>, id: PortId) -> Port {
        let shared = switch.ports[usize::from(id)].clone();
        let workers = (0..shared.queue_pairs)
            .map(|_| Mutex::new(Worker::new()))
            .collect();
        Port(Arc::new(PortInner {
            switch,
            shared,
            workers,
            alive: AtomicBool::new(true),
        }))
    }

    /// Marks the connection as ended; its workers stop at their next step.
    pub fn retire(&self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }

    fn inner(&self) -> &PortInner {
        &self.0
    }
}

impl VhostUserBackend for Port {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner().shared.queue_pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = BASE_FEATURES;
        if self.inner().switch.mtu.is_some() {
            features |= f::MTU;
        }
        if self.inner().shared.mac.is_some() {
            features |= f::MAC;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        let mut rx = self.inner().shared.rx_write();
        rx.features = features;
        rx.features_acked = true;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's virtio-net keeps its own config space (mac=, host_mtu=) and
        // warns about backends that offer it.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.inner().shared.rx_write().features_acked = false;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each queue knows whether EVENT_IDX is on; the workers ask it.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        self.inner().shared.rx_write().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner().shared.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let inner = self.inner();
        let Some(worker) = inner.workers.get(thread_id) else {
            return Ok(());
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        if !worker.published {
            // The framework hands a queue pair's vrings only to its own worker: publish the
            // RX one so that other ports can deliver into it. Checked under the lock that
            // detaching takes, so a retired connection never publishes into the next one.
            if let Some(rx) = vrings.first() {
                let mut ep = inner.shared.rx_write();
                if !inner.alive.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if let Some(slot) = ep.queues.get_mut(thread_id) {
                    *slot = Some(rx.clone());
                }
            }
            worker.published = true;
        }
        // Event 0 is the RX kick (new buffers): frames are never queued, nothing to do.
        if device_event == 1 {
            if let Some(tx) = vrings.get(1) {
                inner.process_tx(tx, &mut worker);
            }
        }
        // Guest faults are counted, never returned: an error would stop this worker thread.
        Ok(())
    }
}

enum TxOutcome {
    Done,
    /// The ring itself is unusable: the driver broke the protocol.
    Broken(&'static str),
}

impl PortInner {
    fn id(&self) -> PortId {
        self.shared.id
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn process_tx(&self, vring: &Vring, w: &mut Worker) {
        let (atomic, features) = {
            let rx = self.shared.rx_read();
            match rx.mem.clone() {
                Some(m) => (m, rx.features),
                None => return,
            }
        };
        let mem = atomic.memory();
        let hdr_len = net_hdr_len(features);
        while self.alive() {
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return;
            }
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return;
            }
            let event_idx = queue.event_idx_enabled();
            let pending = match queue.avail_idx(&*mem, Ordering::Acquire) {
                Ok(avail) if (avail - Wrapping(queue.next_avail())).0 <= queue.size() => {
                    (avail - Wrapping(queue.next_avail())).0
                }
                _ => {
                    drop(state);
                    return self.broken("TX avail index out of range");
                }
            };
            if event_idx {
                let _ = queue.disable_notification(&*mem);
            }
            let table = GuestAddress(queue.desc_table());
            let size = queue.size();
            let mut handled = 0;
            let mut outcome = TxOutcome::Done;
            while handled < TX_BURST {
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                    if handled < usize::from(pending) {
                        // Entries announced but unreadable: do not spin on them.
                        outcome = TxOutcome::Broken("TX avail ring unreadable");
                    }
                    break;
                };
                let head = chain.head_index();
                w.tx_segs.clear();
                match walk_chain(&mem, table, size, head, false, &mut w.tx_segs) {
                    Ok(total) => self.forward(&mem, total as usize, hdr_len, features, w),
                    Err(e) => {
                        debug!("port {}: bad TX chain {head}: {e}", self.shared.name);
                        self.shared.counters.count_drop(DropReason::BadTxDescriptor);
                    }
                }
                handled += 1;
                if queue.add_used(&*mem, head, 0).is_err() {
                    outcome = TxOutcome::Broken("TX head index out of range");
                    break;
                }
            }
            let notify = queue.needs_notification(&*mem).unwrap_or(true);
            let more = matches!(outcome, TxOutcome::Done)
                && (handled == TX_BURST
                    || (event_idx && queue.enable_notification(&*mem).unwrap_or(false)));
            drop(state);
            self.flush_notifications(&mut w.touched);
            if notify {
                let _ = vring.signal_used_queue();
            }
            if let TxOutcome::Broken(why) = outcome {
                return self.broken(why);
            }
            if !more {
                return;
            }
        }
    }

    fn broken(&self, why: &str) {
        if !self.alive() {
            return;
        }
        warn!(
            "port {}: guest driver broke the virtio protocol ({why}); resetting the connection",
            self.shared.name
        );
        self.shared.counters.count_drop(DropReason::BadTxDescriptor);
        self.shared.reset_connection();
    }

    /// Switches one frame whose buffers are in `w.tx_segs`.
    fn forward(
        &self,
        mem: &GuestMemory,
        total: usize,
        hdr_len: usize,
        features: u64,
        w: &mut Worker,
    ) {
        let counters = &self.shared.counters;
        if total < hdr_len + 14 {
            return counters.count_drop(DropReason::Malformed);
        }
        let segs = &w.tx_segs;
        let mut hdr_bytes = [0u8; 12];
        let whole = FrameSource::Guest {
            mem,
            segs,
            start: Cursor::default(),
            len: total,
        };
        whole.peek(&mut hdr_bytes[..hdr_len]);
        let hdr = NetHdr::parse(&hdr_bytes[..hdr_len]);
        let src = whole.skip(hdr_len);
        let frame_len = src.len();
        let mut peek = [0u8; PEEK_LEN];
        let peeked = src.peek(&mut peek);
        let peek = &peek[..peeked];
        counters.count_tx(frame_len);
        if let Err(reason) = self.check_frame(&hdr, peek, frame_len, features) {
            return counters.count_drop(reason);
        }
        let mut eth = [0u8; 14];
        eth.copy_from_slice(&peek[..14]);
        let mut dst_mac = MacAddr::default();
        let mut src_mac = MacAddr::default();
        dst_mac.0.copy_from_slice(&eth[0..6]);
        src_mac.0.copy_from_slice(&eth[6..12]);
        let hash = flow_hash(peek);

        let mut d = Delivery {
            rx_segs: &mut w.rx_segs,
            rx_chains: &mut w.rx_chains,
            frame: &mut w.frame,
            frame_gathered: &mut w.frame_gathered,
            out: &mut w.out,
            touched: &mut w.touched,
            eth,
        };
        *d.frame_gathered = false;
        match self.switch.decide(self.id(), src_mac, dst_mac) {
            Forward::Local => {}
            Forward::To(p) => {
                self.deliver(&self.switch.ports[usize::from(p)], &hdr, src, hash, &mut d)
            }
            Forward::Flood => {
                for p in self.switch.flood_targets(self.id()) {
                    self.deliver(p, &hdr, src, hash, &mut d);
                }
            }
        }
    }

    fn check_frame(
        &self,
        hdr: &NetHdr,
        peek: &[u8],
        frame_len: usize,
        features: u64,
    ) -> Result<(), DropReason> {
        let ethertype = u16::from_be_bytes([peek[12], peek[13]]);
        if ethertype == 0x8100 || ethertype == 0x88a8 {
            // Access ports carry untagged frames only; a tag could hop segments.
            return Err(DropReason::VlanMismatch);
        }
        if peek[6] & 1 != 0 {
            return Err(DropReason::Malformed);
        }
        if hdr.is_gso() {
            let needed = match hdr.gso_kind() {
                VIRTIO_NET_HDR_GSO_TCPV4 => f::HOST_TSO4,
                VIRTIO_NET_HDR_GSO_TCPV6 => f::HOST_TSO6,
                _ => return Err(DropReason::BadOffload),
            } | if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
                f::HOST_ECN
            } else {
                0
            };
            // The MSS bounds the work of segmenting and the size of each segment.
            let mss = usize::from(hdr.gso_size);
            if features & needed != needed
                || mss < MIN_GSO_SIZE
                || mss + 14 > self.switch.max_frame_len
            {
                return Err(DropReason::BadOffload);
            }
            if frame_len > MAX_GSO_FRAME {
                return Err(DropReason::Oversize);
            }
        } else if frame_len > self.switch.max_frame_len {
            return Err(DropReason::Oversize);
        }
        if hdr.needs_csum()
            && (features & f::CSUM == 0
                || usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 > frame_len)
        {
            return Err(DropReason::BadOffload);
        }
        Ok(())
    }

    /// Delivers one frame to `dst`, finishing offloads in software where `dst` did not
    /// negotiate them.
    fn deliver(
        &self,
        dst: &PortShared,
        hdr: &NetHdr,
        src: FrameSource<'_>,
        hash: u32,
        d: &mut Delivery<'_>,
    ) {
        let rx = dst.rx_read();
        let (Some(atomic), true) = (rx.mem.as_ref(), rx.features_acked) else {
            return dst.counters.count_drop(DropReason::PortDown);
        };
        let Some((qidx, vring)) = rx.pick_queue(hash) else {
            return dst.counters.count_drop(DropReason::PortDown);
        };
        let dmem = atomic.memory();
        let features = rx.features;

        let segment = hdr.is_gso() && !gso_supported(features, hdr);
        let finish_csum = !segment && hdr.needs_csum() && features & f::GUEST_CSUM == 0;
        if !segment && !finish_csum {
            let out = passed_header(hdr);
            self.write_rx(dst, vring, qidx, &dmem, features, &out, src, d);
            return;
        }

        let len = src.len();
        if !*d.frame_gathered {
            src.peek(&mut d.frame[..len]);
            d.frame[..14].copy_from_slice(&d.eth);
            *d.frame_gathered = true;
        }
        let plain = NetHdr::default();
        if finish_csum {
            d.out[..len].copy_from_slice(&d.frame[..len]);
            let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
            if complete_checksum(&mut d.out[..len], start, off).is_err() {
                return self.shared.counters.count_drop(DropReason::BadOffload);
            }
            // Taken out of `d` for the call: write_rx needs the rest of `d`.
            let out = std::mem::take(d.out);
            let finished = FrameSource::Local(&out[..len]);
            self.write_rx(dst, vring, qidx, &dmem, features, &plain, finished, d);
            *d.out = out;
            return;
        }
        let frame = std::mem::take(d.frame);
        let mut out = std::mem::take(d.out);
        let result = segment_tcp(&frame[..len], hdr, &mut out, |seg| {
            // Stop at the first segment that cannot be delivered: the rest would not be.
            let delivered = self.write_rx(
                dst,
                vring,
                qidx,
                &dmem,
                features,
                &plain,
                FrameSource::Local(seg),
                d,
            );
            if delivered {
                Ok(())
            } else {
                Err(())
            }
        });
        *d.frame = frame;
        *d.out = out;
        if result.is_err() {
            self.shared.counters.count_drop(DropReason::BadOffload);
        }
    }

    /// Takes RX buffers from `vring` (several when mergeable), writes the header and the
    /// frame, and puts the buffers on the used ring. Counts a drop on `dst` when it cannot.
    #[allow(clippy::too_many_arguments)]
    fn write_rx(
        &self,
        dst: &PortShared,
        vring: &Vring,
        qidx: usize,
        mem: &GuestMemory,
        features: u64,
        hdr: &NetHdr,
        src: FrameSource<'_>,
        d: &mut Delivery<'_>,
    ) -> bool {
        match write_rx_buffers(vring, mem, features, hdr, src, d) {
            Ok(old_used) => {
                dst.counters.count_rx(src.len());
                if !d
                    .touched
                    .iter()
                    .any(|t| t.port == dst.id && t.queue == qidx)
                {
                    d.touched.push(Touched {
                        port: dst.id,
                        queue: qidx,
                        old_used,
                    });
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

    /// Interrupts each RX queue written in this burst once, if its driver wants it, with no
    /// lock held while signalling.
    fn flush_notifications(&self, touched: &mut Vec<Touched>) {
        for t in touched.drain(..) {
            let (vring, atomic) = {
                let rx = self.switch.ports[usize::from(t.port)].rx_read();
                match (rx.queues.get(t.queue), rx.mem.as_ref()) {
                    (Some(Some(v)), Some(m)) => (v.clone(), m.clone()),
                    _ => continue,
                }
            };
            let notify = {
                let state = vring.get_ref();
                let q = state.get_queue();
                needs_interrupt(
                    &atomic.memory(),
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
    }
}

enum RxError {
    Drop(DropReason),
    Broken,
}

/// Smallest MSS accepted for segmentation (Linux's `tcp_min_snd_mss` default is 48).
const MIN_GSO_SIZE: usize = 48;

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

/// Writes one frame into the RX queue; returns the used index from before the write.
fn write_rx_buffers(
    vring: &Vring,
    mem: &GuestMemory,
    features: u64,
    hdr: &NetHdr,
    src: FrameSource<'_>,
    d: &mut Delivery<'_>,
) -> Result<u16, RxError> {
    let hdr_len = net_hdr_len(features);
    let need = hdr_len + src.len();
    let mergeable = features & f::MRG_RXBUF != 0;

    let mut state = vring.get_mut();
    if !state.is_enabled() {
        return Err(RxError::Drop(DropReason::PortDown));
    }
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return Err(RxError::Drop(DropReason::PortDown));
    }
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(avail) if (avail - Wrapping(queue.next_avail())).0 <= queue.size() => {}
        _ => return Err(RxError::Broken),
    }
    let table = GuestAddress(queue.desc_table());
    let used_ring = GuestAddress(queue.used_ring());
    let size = queue.size();
    let saved = queue.next_avail();
    let old_used = queue.next_used();
    d.rx_segs.clear();
    d.rx_chains.clear();
    let mut cap: usize = 0;
    while cap < need {
        if d.rx_chains.len() == MAX_MERGED_BUFFERS {
            queue.set_next_avail(saved);
            return Err(RxError::Drop(DropReason::RxBufferTooSmall));
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(saved);
            return Err(RxError::Drop(DropReason::NoRxBuffer));
        };
        let head = chain.head_index();
        let walked = walk_chain(mem, table, size, head, true, d.rx_segs);
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
    let mut writer = GuestWriter::new(mem, d.rx_segs);
    let ok = writer.write(&out_hdr.to_bytes()[..hdr_len])
        && match src {
            FrameSource::Guest { .. } => writer.write(&d.eth) && writer.copy_from(src.skip(14)),
            FrameSource::Local(b) => writer.write(b),
        };
    let mut left = if ok { need } else { 0 };
    let used = d.rx_chains.iter().map(|c| {
        let n = left.min(c.cap as usize);
        left -= n;
        (c.head, n as u32)
    });
    let next = push_used(mem, used_ring, size, old_used, used).ok_or(RxError::Broken)?;
    queue.set_next_used(next);
    if ok {
        Ok(old_used)
    } else {
        Err(RxError::Drop(DropReason::BadRxDescriptor))
    }
}
