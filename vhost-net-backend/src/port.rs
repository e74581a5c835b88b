//! One vhost-user device per switch port. Each queue pair has its own worker thread and
//! state; a TX burst is switched frame by frame and copied straight into the destination
//! guests' RX buffers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

use crate::counters::DropReason;
use crate::forward::{flush_notifications, switch_burst, Scratch, TxFrame, MAX_HEAD, MIN_GSO_SIZE};
use crate::ram::Ram;
use crate::switch::{flow_hash, PortId, PortShared, Switch};
use crate::virtio::{
    avail_head, avail_idx, features as f, needs_interrupt, net_hdr_len, push_used, walk_chain,
    Cursor, DescTable, FrameSource, GuestMemory, NetHdr, Segment, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// Largest queue size offered (QEMU accepts up to 1024 for vhost-user).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Chains handled before they are returned to the guest and the ring is looked at again.
/// Half of QEMU's default ring: the guest refills one half while the other is switched.
/// A burst of the whole ring let it run dry each time, and each burst then began with a
/// kick and a wake-up (64 B at 256 entries without polling: 8.3 Mpps, 17.8 with 128).
pub(crate) const TX_BURST: usize = 128;
/// How many chains ahead of its walk a chain's first descriptor is fetched.
const PREFETCH_AHEAD: usize = 8;
/// How many frames ahead of its checks a TX chain's first buffer is fetched.
const TX_BUF_AHEAD: usize = 8;
/// Bytes of each frame read up front: virtio header aside, enough for Ethernet, IPv6 and
/// ports; a frame this short is then delivered from this copy in one write.
const PEEK_LEN: usize = MAX_HEAD;
/// Largest frame a guest may hand over for segmentation: a 64 KiB IP packet plus Ethernet.
pub const MAX_GSO_FRAME: usize = 65535 + 14;

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

/// Per-queue-pair state of one connection.
struct Worker {
    published: bool,
    /// The heads of this burst's chains.
    tx_heads: Vec<u16>,
    /// The buffers of every chain of this burst, one after another.
    tx_segs: Vec<Segment>,
    /// The chains walked in this burst: their buffers in `tx_segs` and total length.
    tx_walked: Vec<(usize, usize, usize)>,
    /// The frames of this burst that passed the checks, switched together at its end.
    tx_frames: Vec<TxFrame>,
    /// Chains finished in this burst, returned together.
    tx_used: Vec<(u16, u32)>,
    /// Frames and bytes sent in this burst, counted at its end.
    tx_packets: u64,
    tx_bytes: u64,
    scratch: Scratch,
}

impl Worker {
    fn new() -> Self {
        Worker {
            published: false,
            tx_heads: Vec::with_capacity(TX_BURST),
            tx_segs: Vec::with_capacity(4 * TX_BURST),
            tx_walked: Vec::with_capacity(TX_BURST),
            tx_frames: Vec::with_capacity(TX_BURST),
            tx_used: Vec::with_capacity(TX_BURST),
            tx_packets: 0,
            tx_bytes: 0,
            scratch: Scratch::new(),
        }
    }
}

struct PortInner {
    switch: Arc<Switch>,
    shared: Arc<PortShared>,
    workers: Vec<Mutex<Worker>>,
    /// False once the connection ended: old workers still draining must not touch the
    /// port's shared state, which may already belong to the next connection.
    alive: AtomicBool,
    /// The workers' exit-event descriptors handed to vhost-user-backend, which (0.24.0)
    /// registers them with its epoll as raw descriptors and never closes them: closed by
    /// `close_exit_events` once the connection's daemon is gone, or every reconnect of a
    /// guest would leave one per queue pair open.
    exit_events: Mutex<Vec<RawFd>>,
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
            exit_events: Mutex::new(Vec::new()),
        }))
    }

    /// Closes the exit-event descriptors vhost-user-backend took and left open. Only once
    /// the daemon that took them is dropped (its worker threads joined): nothing uses them
    /// then, and the crate never closes them itself, so none is closed twice. (Were a
    /// worker still running, it would still exit: it is woken through the notifier, a
    /// duplicate of the same eventfd, which keeps the epoll entry alive.)
    pub(crate) fn close_exit_events(&self) {
        let fds =
            std::mem::take(&mut *self.0.exit_events.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: `fd` came from `exit_event`; vhost-user-backend turned it into a raw
            // descriptor that nothing owns (see `exit_events`), so this is its only owner.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
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
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.inner()
            .exit_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
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

/// Starts fetching the first buffer of walked chain `k`, if there is one (a chain of empty
/// buffers has none: it is counted as malformed when its turn comes).
fn prefetch_first_buffer(ram: &Ram, walked: &[(usize, usize, usize)], segs: &[Segment], k: usize) {
    if let Some(seg) = walked.get(k).and_then(|c| segs.get(c.0)) {
        ram.prefetch(seg.addr);
    }
}

/// Turns guest kicks back on; true if chains arrived meanwhile (process them first).
fn rearm(queue: &mut virtio_queue::Queue, ram: &Ram, event_idx: bool) -> bool {
    if event_idx {
        queue.enable_notification(ram.memory()).unwrap_or(false)
    } else {
        avail_idx(ram, GuestAddress(queue.avail_ring())).is_some_and(|a| a != queue.next_avail())
    }
}

enum TxOutcome {
    Done,
    /// The ring itself is unusable: the driver broke the protocol.
    Broken(&'static str),
}

impl PortInner {
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
        let ram = Ram::new(atomic.memory().into_inner());
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
            let pending = match avail_idx(&ram, GuestAddress(queue.avail_ring())) {
                Some(avail) if avail.wrapping_sub(queue.next_avail()) <= queue.size() => {
                    avail.wrapping_sub(queue.next_avail())
                }
                _ => {
                    drop(state);
                    return self.broken("TX avail index out of range");
                }
            };
            if event_idx {
                let _ = queue.disable_notification(ram.memory());
            }
            let table = DescTable::new(&ram, GuestAddress(queue.desc_table()), queue.size());
            let used_ring = GuestAddress(queue.used_ring());
            let old_used = queue.next_used();
            w.tx_used.clear();
            if w.tx_segs.capacity() > 16 * TX_BURST {
                // A burst of many-buffer chains grew it: give the memory back.
                w.tx_segs = Vec::with_capacity(4 * TX_BURST);
            }
            w.tx_segs.clear();
            w.tx_frames.clear();
            let avail_ring = GuestAddress(queue.avail_ring());
            let size = queue.size();
            let mut handled = 0;
            let mut outcome = TxOutcome::Done;
            // One read of the avail index per burst: it sits on a cache line the guest keeps
            // writing, and re-reading it for every chain was the most expensive thing here.
            // The burst's heads first (a few cache lines), so that each chain's first
            // descriptor is fetched a few chains ahead of its walk, and its first buffer a
            // few frames ahead of its checks (closer to its use than during the walk, which
            // measured 1-2 ns a frame slower at 64 B): the driver's core wrote them last.
            w.tx_heads.clear();
            for k in 0..TX_BURST.min(usize::from(pending)) {
                let next = queue.next_avail().wrapping_add(k as u16);
                match avail_head(&ram, avail_ring, size, next) {
                    Some(head) => w.tx_heads.push(head),
                    None => {
                        // Entries announced but unreadable: do not spin on them.
                        outcome = TxOutcome::Broken("TX avail ring unreadable");
                        break;
                    }
                }
            }
            for &head in w.tx_heads.iter().take(PREFETCH_AHEAD) {
                table.prefetch(head);
            }
            w.tx_walked.clear();
            for k in 0..w.tx_heads.len() {
                let head = w.tx_heads[k];
                if let Some(&ahead) = w.tx_heads.get(k + PREFETCH_AHEAD) {
                    table.prefetch(ahead);
                }
                queue.set_next_avail(queue.next_avail().wrapping_add(1));
                let first = w.tx_segs.len();
                let walked = match table.lone(&ram, head, false) {
                    Some(seg) => {
                        w.tx_segs.push(seg);
                        Ok(seg.len)
                    }
                    None => walk_chain(&ram, &table, head, false, &mut w.tx_segs),
                };
                match walked {
                    Ok(total) => {
                        w.tx_walked.push((first, w.tx_segs.len(), total as usize));
                    }
                    Err(e) => {
                        debug!("port {}: bad TX chain {head}: {e}", self.shared.name);
                        // A head out of range breaks the ring itself: counted once, below.
                        if head < size {
                            self.shared.counters.count_drop(DropReason::BadTxDescriptor);
                        }
                        w.tx_segs.truncate(first);
                    }
                }
                handled += 1;
                if head >= size {
                    outcome = TxOutcome::Broken("TX head index out of range");
                    break;
                }
                // TX descriptors are device-readable only: used length 0.
                w.tx_used.push((head, 0));
            }
            for k in 0..TX_BUF_AHEAD {
                prefetch_first_buffer(&ram, &w.tx_walked, &w.tx_segs, k);
            }
            for k in 0..w.tx_walked.len() {
                prefetch_first_buffer(&ram, &w.tx_walked, &w.tx_segs, k + TX_BUF_AHEAD);
                let (first, end, total) = w.tx_walked[k];
                self.take_frame(&ram, first, end, total, hdr_len, features, w);
            }
            // Delivered before the chains go back: the guest may reuse their buffers then.
            switch_burst(
                &self.switch,
                &self.shared,
                &ram,
                &w.tx_segs,
                &w.tx_frames,
                &mut w.scratch,
            );
            // Counted before the guest can see its chains returned.
            self.shared.counters.add_tx(w.tx_packets, w.tx_bytes);
            (w.tx_packets, w.tx_bytes) = (0, 0);
            // Returned to the guest in one go, with one index store.
            let new_used =
                match push_used(&ram, used_ring, size, old_used, w.tx_used.iter().copied()) {
                    Some(n) => n,
                    None => {
                        drop(state);
                        // What this burst delivered to others still reaches them.
                        flush_notifications(&self.switch, &mut w.scratch);
                        return self.broken("TX used ring outside memory");
                    }
                };
            queue.set_next_used(new_used);
            let notify = needs_interrupt(
                &ram,
                GuestAddress(queue.avail_ring()),
                size,
                event_idx,
                old_used,
                new_used,
            );
            let done = matches!(outcome, TxOutcome::Done);
            let burst_left = handled == TX_BURST || handled < usize::from(pending);
            // While polling, kicks stay off: the guest need not make a syscall per burst.
            let polling = done && !burst_left && self.switch.poll_us > 0;
            let more = done && (burst_left || (!polling && rearm(queue, &ram, event_idx)));
            drop(state);
            flush_notifications(&self.switch, &mut w.scratch);
            if notify {
                let _ = vring.signal_used_queue();
            }
            if let TxOutcome::Broken(why) = outcome {
                return self.broken(why);
            }
            if more || (polling && self.poll_for_tx(vring, &ram)) {
                continue;
            }
            if polling {
                // The window closed empty: ask for kicks again, unless work slipped in.
                let mut state = vring.get_mut();
                if rearm(state.get_queue_mut(), &ram, event_idx) {
                    continue;
                }
            }
            return;
        }
    }

    /// Busy-polls the TX ring for up to `--poll-us` for new chains, so a latency-sensitive
    /// guest's next frame is taken without waiting for its kick to wake this thread.
    fn poll_for_tx(&self, vring: &Vring, ram: &Ram) -> bool {
        let window = self.switch.poll_us;
        if window == 0 {
            return false;
        }
        let end = std::time::Instant::now() + std::time::Duration::from_micros(window);
        while std::time::Instant::now() < end && self.alive() {
            {
                let state = vring.get_ref();
                let q = state.get_queue();
                if !q.ready() {
                    return false;
                }
                if avail_idx(ram, GuestAddress(q.avail_ring())).is_some_and(|a| a != q.next_avail())
                {
                    return true;
                }
            }
            // Let other workers sharing this core run: a polling worker that kept the core
            // would delay the very frames it is waiting for.
            std::thread::yield_now();
        }
        false
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

    /// Checks the frame whose buffers are `w.tx_segs[first..]` and queues it for
    /// switching with the rest of the burst.
    #[allow(clippy::too_many_arguments)]
    fn take_frame(
        &self,
        ram: &Ram,
        first: usize,
        end: usize,
        total: usize,
        hdr_len: usize,
        features: u64,
        w: &mut Worker,
    ) {
        let counters = &self.shared.counters;
        if total < hdr_len + 14 {
            return counters.count_drop(DropReason::Malformed);
        }
        let segs = &w.tx_segs[first..end];
        let whole = FrameSource::Guest {
            mem: ram,
            segs,
            start: Cursor::default(),
            len: total,
        };
        let mut start = Cursor::default();
        start.advance(segs, hdr_len);
        let len = total - hdr_len;
        w.tx_packets += 1;
        w.tx_bytes += len as u64;
        // The header and the frame's first bytes in one pass over the guest's buffers,
        // straight into the burst's frame list.
        w.tx_frames.push(TxFrame {
            hdr: NetHdr::default(),
            first,
            end,
            start,
            len,
            peeked: [0; 12 + MAX_HEAD],
            hdr_len,
            head_len: 0,
            hash: 0,
        });
        let Some(t) = w.tx_frames.last_mut() else {
            return;
        };
        let n = whole.peek(&mut t.peeked[..hdr_len + PEEK_LEN]);
        t.hdr = NetHdr::parse(&t.peeked[..hdr_len]);
        t.head_len = n.saturating_sub(hdr_len);
        // Fewer than 14 bytes: the chain's buffers were checked, so only a torn mapping.
        let checked = if t.head_len < 14 {
            Err(DropReason::Malformed)
        } else {
            self.check_frame(&t.hdr, t.head(), len, features)
        };
        match checked {
            Ok(()) => t.hash = flow_hash(t.head()),
            Err(reason) => {
                w.tx_frames.pop();
                counters.count_drop(reason);
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
}
