//! A VM's TX ring as a source of frames: a burst of chains is taken, each walked and its
//! first bytes copied and checked (`packet::ingress`), then the burst goes through the
//! pipeline, the chains go back to the guest and the queues written are interrupted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use log::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::burst::{self, Burst, Scratch};
use super::Datapath;
use crate::counters::DropReason;
use crate::endpoint::frame::{TxFrame, MAX_HEAD};
use crate::endpoint::vm::{VmEndpoint, Vring};
use crate::endpoint::SwitchPort;
use crate::mem::Ram;
use crate::packet::flow::flow_hash;
use crate::packet::ingress::{self, Limits};
use crate::virtio::chain::{walk_chain, DescTable, Segment};
use crate::virtio::copy::{Cursor, FrameSource};
use crate::virtio::ring::{avail_head, avail_idx, checked_avail_idx, needs_interrupt, push_used};
use crate::virtio::{features as f, net_hdr_len, NetHdr};

/// Chains handled before they are returned to the guest and the ring is looked at again.
/// Half of QEMU's default ring: the guest refills one half while the other is switched.
/// A burst of the whole ring let it run dry each time, and each burst then began with a
/// kick and a wake-up (64 B at 256 entries without polling: 8.3 Mpps, 17.8 with 128).
pub const TX_BURST: usize = 128;
/// How many chains ahead of its walk a chain's first descriptor is fetched.
const PREFETCH_AHEAD: usize = 8;
/// How many frames ahead of its checks a TX chain's first buffer is fetched.
const TX_BUF_AHEAD: usize = 8;
/// Bytes of each frame read up front: virtio header aside, enough for Ethernet, IPv6 and
/// ports; a frame this short is then delivered from this copy in one write.
const PEEK_LEN: usize = MAX_HEAD;
/// A chain walked in a burst: its buffers, `tx_segs[first..end]`, and their total length.
#[derive(Clone, Copy)]
struct WalkedChain {
    first: usize,
    end: usize,
    total: usize,
}

/// How long one call of `TxQueue::process` may run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Turn {
    /// Until the ring is empty (and stays so for `--poll-us`): the queue has a thread of
    /// its own.
    UntilEmpty,
    /// One burst: the thread serves other queues too, and calls again while `process`
    /// says so (polling, too, is the caller's then).
    OneBurst,
}

/// Per-queue-pair state of one connection.
pub struct Worker {
    /// Since when the ring has been found empty with kicks left off (`Turn::OneBurst`
    /// with `--poll-us`): the polling window's start.
    quiet_since: Option<Instant>,
    /// The heads of this burst's chains.
    tx_heads: Vec<u16>,
    /// The buffers of every chain of this burst, one after another.
    tx_segs: Vec<Segment>,
    /// The chains walked in this burst.
    tx_walked: Vec<WalkedChain>,
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
    pub fn new() -> Self {
        Worker {
            quiet_since: None,
            tx_heads: Vec::with_capacity(TX_BURST),
            tx_segs: Vec::with_capacity(4 * TX_BURST),
            tx_walked: Vec::with_capacity(TX_BURST),
            tx_frames: Vec::with_capacity(TX_BURST),
            tx_used: Vec::with_capacity(TX_BURST),
            tx_packets: 0,
            tx_bytes: 0,
            scratch: Scratch::default(),
        }
    }
}

impl Default for Worker {
    fn default() -> Self {
        Worker::new()
    }
}

/// One VM port's TX queue as its worker drives it.
pub struct TxQueue<'a> {
    pub dp: &'a Datapath,
    pub port: &'a SwitchPort,
    pub vm: &'a VmEndpoint,
    /// False once the connection ended: stop at the next step.
    pub alive: &'a AtomicBool,
    /// This TX ring's vring index, for its interrupts.
    pub vring_index: usize,
}

/// Starts fetching the first buffer of walked chain `k`, if there is one (a chain of empty
/// buffers has none: it is counted as malformed when its turn comes).
fn prefetch_first_buffer(ram: &Ram, walked: &[WalkedChain], segs: &[Segment], k: usize) {
    if let Some(seg) = walked.get(k).and_then(|c| segs.get(c.first)) {
        ram.prefetch(seg.addr);
    }
}

/// Turns guest kicks back on; true if chains arrived meanwhile (process them first).
fn rearm(queue: &mut virtio_queue::Queue, ram: &Ram) -> bool {
    queue.enable_notification(ram.memory()).unwrap_or(true)
}

enum TxOutcome {
    Done,
    /// The ring itself is unusable: the driver broke the protocol.
    Broken(&'static str),
}

impl TxQueue<'_> {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Takes what the guest transmitted, a burst at a time, until its ring is empty (or,
    /// with `--poll-us`, stays empty for that long), or for one burst (`turn`). True when
    /// the caller should call again: chains are left, or the polling window is open (the
    /// guest's kicks are off then).
    pub fn process(&self, vring: &Vring, w: &mut Worker, turn: Turn) -> bool {
        let Some((mut ram, mut features, mut generation)) = self.connection_state() else {
            return false;
        };
        while self.alive() {
            if !self.vm.is_current(generation) {
                // A new memory table (or features) arrived while this loop ran, as it may
                // for ever while the guest keeps sending or the worker polls: the old table
                // may describe memory the guest no longer uses.
                match self.connection_state() {
                    Some(now) => (ram, features, generation) = now,
                    None => return false,
                }
            }
            let hdr_len = net_hdr_len(features);
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return false;
            }
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return false;
            }
            let event_idx = queue.event_idx_enabled();
            let pending = match checked_avail_idx(&ram, queue) {
                Some(avail) => avail.wrapping_sub(queue.next_avail()),
                None => {
                    drop(state);
                    self.broken("TX avail index out of range");
                    return false;
                }
            };
            // No kicks while this runs. Without EVENT_IDX that is the used ring's
            // NO_NOTIFY flag (with it, nothing to write): a driver that never saw it set
            // kicked after every burst it sent (DPDK's virtio PMD: a syscall per 32 frames,
            // about 30 ns a frame of its core).
            let _ = queue.disable_notification(ram.memory());
            // A burst's time, for the queue's busy counter: two clock reads a burst.
            let started = Instant::now();
            let table = DescTable::new(&ram, GuestAddress(queue.desc_table()), queue.size())
                .with_indirect(features & f::RING_INDIRECT_DESC != 0);
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
                        w.tx_walked.push(WalkedChain {
                            first,
                            end: w.tx_segs.len(),
                            total: total as usize,
                        });
                    }
                    Err(e) => {
                        debug!("port {}: bad TX chain {head}: {e}", self.port.name);
                        // A head out of range breaks the ring itself: counted once, below.
                        if head < size {
                            self.port.counters.count_drop(DropReason::BadTxDescriptor);
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
                let chain = w.tx_walked[k];
                self.take_frame(&ram, chain, hdr_len, features, w);
            }
            // Delivered before the chains go back: the guest may reuse their buffers then.
            let burst = Burst::Guest {
                ram: &ram,
                segs: &w.tx_segs,
                frames: &w.tx_frames,
            };
            burst::run(self.dp, self.port, burst, &mut w.scratch);
            // Counted before the guest can see its chains returned; TX queue 2n + 1 is
            // queue pair n's.
            let counters = self.port.counters.queue(self.vring_index / 2);
            counters.add_tx(w.tx_packets, w.tx_bytes);
            if handled > 0 {
                counters.add_burst(handled, started.elapsed().as_nanos() as u64);
            }
            (w.tx_packets, w.tx_bytes) = (0, 0);
            // Returned to the guest in one go, with one index store.
            let new_used =
                match push_used(&ram, used_ring, size, old_used, w.tx_used.iter().copied()) {
                    Some(n) => n,
                    None => {
                        drop(state);
                        // What this burst delivered to others still reaches them.
                        burst::flush(self.dp, &mut w.scratch);
                        self.broken("TX used ring outside memory");
                        return false;
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
            let polling = done && !burst_left && self.dp.poll_us > 0;
            let more = done && (burst_left || (!polling && rearm(queue, &ram)));
            drop(state);
            burst::flush(self.dp, &mut w.scratch);
            if notify {
                self.vm.notifier.ring(self.vring_index);
            }
            if let TxOutcome::Broken(why) = outcome {
                self.broken(why);
                return false;
            }
            if more {
                if turn == Turn::OneBurst {
                    return true;
                }
                continue;
            }
            if polling {
                match turn {
                    Turn::UntilEmpty => {
                        if self.poll_for_tx(vring, &ram, generation) {
                            continue;
                        }
                    }
                    Turn::OneBurst => {
                        let now = Instant::now();
                        if handled > 0 {
                            w.quiet_since = Some(now);
                        }
                        let since = *w.quiet_since.get_or_insert(now);
                        if now.duration_since(since).as_micros() < u128::from(self.dp.poll_us) {
                            return true;
                        }
                        w.quiet_since = None;
                    }
                }
                // The window closed empty: ask for kicks again, unless work slipped in.
                let mut state = vring.get_mut();
                if rearm(state.get_queue_mut(), &ram) {
                    if turn == Turn::OneBurst {
                        return true;
                    }
                    continue;
                }
            }
            return false;
        }
        false
    }

    /// The connection's guest memory and features now, and the generation they belong to.
    fn connection_state(&self) -> Option<(Ram, u64, u64)> {
        let rx = self.vm.rx_read();
        let generation = self.vm.generation();
        let atomic = rx.mem.clone()?;
        Some((
            Ram::new(atomic.memory().into_inner()),
            rx.features,
            generation,
        ))
    }

    /// Busy-polls the TX ring for up to `--poll-us` for new chains, so a latency-sensitive
    /// guest's next frame is taken without waiting for its kick to wake this thread. Also
    /// true when the connection changed (the caller looks again with the new memory).
    fn poll_for_tx(&self, vring: &Vring, ram: &Ram, generation: u64) -> bool {
        let window = self.dp.poll_us;
        if window == 0 {
            return false;
        }
        let end = std::time::Instant::now() + std::time::Duration::from_micros(window);
        while std::time::Instant::now() < end && self.alive() {
            if !self.vm.is_current(generation) {
                return true;
            }
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
        if self.vm.first_breakage() {
            warn!(
                "port {}: guest driver broke the virtio protocol ({why}); resetting the connection",
                self.port.name
            );
        }
        self.port.counters.count_drop(DropReason::BadTxDescriptor);
        self.vm.reset_connection();
    }

    /// Checks the frame whose buffers are `w.tx_segs[first..]` and queues it for
    /// switching with the rest of the burst.
    fn take_frame(
        &self,
        ram: &Ram,
        chain: WalkedChain,
        hdr_len: usize,
        features: u64,
        w: &mut Worker,
    ) {
        let WalkedChain { first, end, total } = chain;
        let counters = &self.port.counters;
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
        let limits = Limits {
            max_frame_len: self.dp.max_frame_len,
            offloads: features,
        };
        // Counted as sent once it passed: a dropped frame counts as a drop only.
        match ingress::check(&t.hdr, t.head(), len, limits) {
            Ok(()) => {
                t.hash = flow_hash(t.head());
                w.tx_packets += 1;
                w.tx_bytes += len as u64;
            }
            Err(reason) => {
                w.tx_frames.pop();
                counters.count_drop(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    use super::*;
    use crate::config::{PortConfig, SwitchConfig};
    use crate::endpoint::test_rings::{post, used, vring, Layout};
    use crate::endpoint::vm::RxEndpoint;
    use crate::endpoint::Endpoint;
    use crate::mem::GuestMemory;
    use crate::virtio::chain::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::virtio::features as f;
    use crate::virtio::test_util::{mem, put_desc};

    const TX: Layout = Layout::at(0x1000);
    const RX: Layout = Layout::at(0);
    const BUFS: u64 = 0x4000;

    fn two_ports() -> Arc<Datapath> {
        two_ports_polled(0)
    }

    fn two_ports_polled(poll_us: u64) -> Arc<Datapath> {
        let port = |name: &str| PortConfig {
            name: name.into(),
            socket: format!("/nonexistent/{name}").into(),
            ..Default::default()
        };
        Datapath::new(
            &SwitchConfig {
                ports: vec![port("a"), port("b")],
                poll_us,
                ..Default::default()
            },
            None,
        )
        .expect("no policy to compile")
    }

    /// Attaches guest memory `m` to port `id`, with RX queue `rx` if given.
    fn attach(dp: &Datapath, id: usize, m: &GuestMemory, rx: Option<Layout>) -> Arc<VmEndpoint> {
        let Endpoint::Vm(vm) = &dp.ports.load()[id].endpoint else {
            panic!("a VM port")
        };
        let atomic = GuestMemoryAtomic::new(m.clone());
        *vm.rx_write() = RxEndpoint {
            mem: Some(atomic.clone()),
            features: f::VERSION_1,
            features_acked: true,
            queues: vec![rx.map(|l| vring(&atomic, l))],
        };
        vm.clone()
    }

    fn frame(len: usize, last: u8) -> Vec<u8> {
        let mut fr: Vec<u8> = (0..len).map(|i| i as u8 ^ last).collect();
        fr[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x22]);
        fr[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x11]);
        fr[12..14].copy_from_slice(&[0x08, 0x00]);
        fr
    }

    #[test]
    fn a_tx_burst_is_walked_checked_switched_and_returned() {
        let dp = two_ports();
        let (ma, mb) = (mem(), mem());
        let a = attach(&dp, 0, &ma, None);
        let _b = attach(&dp, 1, &mb, Some(RX));
        for i in 0..3u16 {
            put_desc(
                &mb,
                RX.desc,
                i,
                BUFS + 0x800 * u64::from(i),
                0x800,
                VIRTQ_DESC_F_WRITE,
                0,
            );
            post(&mb, RX, i, i);
        }
        // Chain 0: header and frame in one buffer. Chain 1 (heads 1, 2): the header, then
        // the frame. Chain 3: a device-writable buffer, which a TX chain may not hold.
        let (f0, f1) = (frame(60, 0), frame(100, 1));
        let mut one = vec![0u8; 12];
        one.extend_from_slice(&f0);
        ma.write_slice(&one, GuestAddress(BUFS)).unwrap();
        put_desc(&ma, TX.desc, 0, BUFS, one.len() as u32, 0, 0);
        ma.write_slice(&f1, GuestAddress(BUFS + 0x1000)).unwrap();
        put_desc(&ma, TX.desc, 1, BUFS + 0x800, 12, VIRTQ_DESC_F_NEXT, 2);
        put_desc(&ma, TX.desc, 2, BUFS + 0x1000, f1.len() as u32, 0, 0);
        put_desc(&ma, TX.desc, 3, BUFS + 0x2000, 64, VIRTQ_DESC_F_WRITE, 0);
        // Chain 4: a frame from a multicast source, which ingress refuses.
        let mut multicast = one.clone();
        multicast[12 + 6] |= 1;
        ma.write_slice(&multicast, GuestAddress(BUFS + 0x3000))
            .unwrap();
        put_desc(&ma, TX.desc, 4, BUFS + 0x3000, multicast.len() as u32, 0, 0);
        for (i, head) in [0u16, 1, 3, 4].into_iter().enumerate() {
            post(&ma, TX, i as u16, head);
        }

        let atomic = GuestMemoryAtomic::new(ma.clone());
        let txq = vring(&atomic, TX);
        let alive = AtomicBool::new(true);
        let queue = TxQueue {
            dp: &dp,
            port: &dp.ports.load()[0],
            vm: &a,
            alive: &alive,
            vring_index: 1,
        };
        let mut w = Worker::new();
        assert!(!queue.process(&txq, &mut w, Turn::UntilEmpty));

        // Every chain back to the guest, in order, the bad one too.
        assert_eq!(used(&ma, TX, 0), (4, (0, 0)));
        assert_eq!(used(&ma, TX, 1).1, (1, 0));
        assert_eq!(used(&ma, TX, 2).1, (3, 0));
        assert_eq!(used(&ma, TX, 3).1, (4, 0));
        // Both good frames reached b (flooded: b's MAC is not learned), whole.
        assert_eq!(used(&mb, RX, 0), (2, (0, 12 + 60)));
        assert_eq!(used(&mb, RX, 1).1, (1, 12 + 100));
        let mut got = vec![0u8; 100];
        mb.read_slice(&mut got, GuestAddress(BUFS + 0x800 + 12))
            .unwrap();
        assert_eq!(got, f1);
        let (ca, cb) = (
            dp.ports.load()[0].counters.snapshot(),
            dp.ports.load()[1].counters.snapshot(),
        );
        assert_eq!((ca.tx_packets, ca.tx_bytes), (2, 160));
        assert_eq!(ca.drop_count(DropReason::BadTxDescriptor), 1);
        // The refused frame counts as a drop, not as sent.
        assert_eq!(ca.drop_count(DropReason::Malformed), 1);
        assert_eq!((cb.rx_packets, cb.rx_bytes), (2, 160));
        // a's MAC was learned on its port.
        let src = crate::types::MacAddr([2, 0, 0, 0, 0, 0x11]);
        assert_eq!(dp.switch.macs.lookup(0, src), Some(0));
    }

    /// The used ring's flags: 1 is NO_NOTIFY (the guest's kicks are off).
    fn used_flags(m: &GuestMemory, l: Layout) -> u16 {
        m.read_obj(GuestAddress(l.used)).unwrap()
    }

    #[test]
    fn a_shared_worker_polls_by_being_called_again_never_by_spinning() {
        let dp = two_ports_polled(50_000);
        let ma = mem();
        let a = attach(&dp, 0, &ma, None);
        let one = [vec![0u8; 12], frame(60, 0)].concat();
        ma.write_slice(&one, GuestAddress(BUFS)).unwrap();
        put_desc(&ma, TX.desc, 0, BUFS, one.len() as u32, 0, 0);
        post(&ma, TX, 0, 0);
        let atomic = GuestMemoryAtomic::new(ma.clone());
        let txq = vring(&atomic, TX);
        let alive = AtomicBool::new(true);
        let queue = TxQueue {
            dp: &dp,
            port: &dp.ports.load()[0],
            vm: &a,
            alive: &alive,
            vring_index: 1,
        };
        let mut w = Worker::new();
        // One burst, then back to the caller with the window open and kicks off.
        let started = Instant::now();
        assert!(queue.process(&txq, &mut w, Turn::OneBurst));
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        assert_eq!(used(&ma, TX, 0), (1, (0, 0)));
        assert_eq!(used_flags(&ma, TX), 1);
        // A chain posted meanwhile is taken by the next call, which keeps polling.
        ma.write_slice(&one, GuestAddress(BUFS + 0x800)).unwrap();
        put_desc(&ma, TX.desc, 1, BUFS + 0x800, one.len() as u32, 0, 0);
        post(&ma, TX, 1, 1);
        assert!(queue.process(&txq, &mut w, Turn::OneBurst));
        assert_eq!(used(&ma, TX, 1), (2, (1, 0)));
        // Once the window has passed empty: kicks on again, and done.
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(!queue.process(&txq, &mut w, Turn::OneBurst));
        assert_eq!(used_flags(&ma, TX), 0);
        // A queue of its own polls the whole window in one call.
        ma.write_slice(&one, GuestAddress(BUFS + 0x1000)).unwrap();
        put_desc(&ma, TX.desc, 2, BUFS + 0x1000, one.len() as u32, 0, 0);
        post(&ma, TX, 2, 2);
        let started = Instant::now();
        assert!(!queue.process(&txq, &mut w, Turn::UntilEmpty));
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(used(&ma, TX, 2), (3, (2, 0)));
    }
}
