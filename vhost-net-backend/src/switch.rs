//! The switch: the MAC table with ageing, VLAN segments and the forwarding decision, and the
//! table of ports whose RX queues other ports deliver into. No guest memory is read here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use vhost_user_backend::{ShutdownHandle, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use crate::config::{MacAddr, SwitchConfig};
use crate::counters::PortCounters;
use crate::ram::Ram;
use crate::uplink::Uplink;
use crate::virtio::GuestMemory;

pub type PortId = u16;

/// The segment of a trunk port: it carries every VLAN, tagged.
pub const TRUNK: u16 = u16::MAX;

/// Most MAC entries kept; a guest spraying random source addresses cannot grow the table
/// past this (new addresses are then flooded to, as unknown).
pub const MAC_TABLE_CAPACITY: usize = 16 * 1024;

/// A fast keyed hash for MAC table keys: SipHash cost more than the rest of a lookup. The
/// per-process random seed keeps a guest from choosing colliding addresses.
#[derive(Clone, Copy)]
struct MacHasher(u64);

impl std::hash::Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let h = self.0 ^ (self.0 >> 31);
        h.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h >> 29)
    }
}

#[derive(Clone)]
struct MacHashBuilder(u64);

impl std::hash::BuildHasher for MacHashBuilder {
    type Hasher = MacHasher;
    fn build_hasher(&self) -> MacHasher {
        MacHasher(self.0)
    }
}

impl MacHashBuilder {
    fn random() -> Self {
        use std::hash::BuildHasher;
        MacHashBuilder(std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1)
    }
}

struct MacEntry {
    port: AtomicU16,
    seen: AtomicU64,
}

/// Most MAC entries one port may hold, so one guest spraying source addresses cannot crowd
/// the others out of the table.
pub const MAC_PER_PORT_LIMIT: usize = 1024;

/// The table and, per port, how many entries it holds (both under one lock).
struct Entries {
    map: HashMap<(u16, MacAddr), MacEntry, MacHashBuilder>,
    per_port: Vec<usize>,
}

impl Entries {
    fn count(&mut self, port: PortId) -> &mut usize {
        let i = usize::from(port);
        if self.per_port.len() <= i {
            self.per_port.resize(i + 1, 0);
        }
        &mut self.per_port[i]
    }

    fn retain(&mut self, mut keep: impl FnMut(&MacEntry) -> bool) {
        let per_port = &mut self.per_port;
        self.map.retain(|_, e| {
            let k = keep(e);
            if !k {
                if let Some(c) = per_port.get_mut(usize::from(e.port.load(Ordering::Relaxed))) {
                    *c = c.saturating_sub(1);
                }
            }
            k
        });
    }
}

/// Learned (VLAN, MAC) to port mappings. Lookups and refreshes take the read lock only.
pub struct MacTable {
    entries: RwLock<Entries>,
    ageing_secs: u64,
    /// Coarse clock in seconds, advanced by `tick`, so the hot path makes no clock call.
    now: AtomicU64,
    /// Changes whenever a lookup could answer differently: an entry added or moved, the
    /// clock advanced, entries removed. Workers' `DecisionCache`s are valid while it stays.
    version: AtomicU64,
}

impl MacTable {
    pub fn new(ageing_secs: u64) -> Self {
        MacTable {
            entries: RwLock::new(Entries {
                map: HashMap::with_capacity_and_hasher(256, MacHashBuilder::random()),
                per_port: Vec::new(),
            }),
            ageing_secs,
            now: AtomicU64::new(0),
            version: AtomicU64::new(0),
        }
    }

    fn fresh(&self, e: &MacEntry, now: u64) -> bool {
        now.saturating_sub(e.seen.load(Ordering::Relaxed)) <= self.ageing_secs
    }

    pub fn learn(&self, vlan: u16, mac: MacAddr, port: PortId) {
        self.learn_and_lookup(vlan, mac, port, None);
    }

    /// Learns `mac` on `port` and looks `dst` up, under one read lock in the common case
    /// (the source already known there).
    pub fn learn_and_lookup(
        &self,
        vlan: u16,
        mac: MacAddr,
        port: PortId,
        dst: Option<MacAddr>,
    ) -> Option<PortId> {
        let now = self.now.load(Ordering::Relaxed);
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            let known = match entries.map.get(&(vlan, mac)) {
                Some(e) if e.port.load(Ordering::Relaxed) == port => {
                    // Refresh only when the clock moved: no write to a shared line per frame.
                    if e.seen.load(Ordering::Relaxed) != now {
                        e.seen.store(now, Ordering::Relaxed);
                    }
                    true
                }
                Some(_) => false,
                None => {
                    entries.map.len() >= MAC_TABLE_CAPACITY
                        || entries
                            .per_port
                            .get(usize::from(port))
                            .copied()
                            .unwrap_or(0)
                            >= MAC_PER_PORT_LIMIT
                }
            };
            if known {
                return dst.and_then(|d| {
                    entries
                        .map
                        .get(&(vlan, d))
                        .filter(|e| self.fresh(e, now))
                        .map(|e| e.port.load(Ordering::Relaxed))
                });
            }
        }
        self.insert(vlan, mac, port, now);
        dst.and_then(|d| self.lookup(vlan, d))
    }

    fn insert(&self, vlan: u16, mac: MacAddr, port: PortId, now: u64) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let previous = entries
            .map
            .get(&(vlan, mac))
            .map(|e| e.port.load(Ordering::Relaxed));
        if previous == Some(port) {
            return;
        }
        if *entries.count(port) >= MAC_PER_PORT_LIMIT
            || (previous.is_none() && entries.map.len() >= MAC_TABLE_CAPACITY)
        {
            return;
        }
        // A station that moved to another port is re-learned there at once.
        if let Some(old) = previous {
            let c = entries.count(old);
            *c = c.saturating_sub(1);
        }
        *entries.count(port) += 1;
        entries.map.insert(
            (vlan, mac),
            MacEntry {
                port: AtomicU16::new(port),
                seen: AtomicU64::new(now),
            },
        );
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn lookup(&self, vlan: u16, mac: MacAddr) -> Option<PortId> {
        let now = self.now.load(Ordering::Relaxed);
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .map
            .get(&(vlan, mac))
            .filter(|e| self.fresh(e, now))
            .map(|e| e.port.load(Ordering::Relaxed))
    }

    /// Advances the clock by `secs` and drops the entries that aged out.
    pub fn tick(&self, secs: u64) {
        let now = self.now.fetch_add(secs, Ordering::Relaxed) + secs;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|e| self.fresh(e, now));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Forgets everything learned on a port (its guest went away).
    pub fn forget_port(&self, port: PortId) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|e| e.port.load(Ordering::Relaxed) != port);
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a port exposes to the others while a guest is attached: its memory, negotiated
/// features and RX vrings (one slot per queue pair).
#[derive(Default)]
pub struct RxEndpoint {
    pub mem: Option<GuestMemoryAtomic<GuestMemory>>,
    pub features: u64,
    pub features_acked: bool,
    pub queues: Vec<Option<VringRwLock<GuestMemoryAtomic<GuestMemory>>>>,
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
                let state = v.get_ref();
                if state.is_enabled() && state.get_queue().ready() && open.enabled < MAX_QP {
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

    /// Number of RX queues published so far.
    pub fn queue_count(&self) -> usize {
        self.queues.iter().filter(|q| q.is_some()).count()
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
    queues: [Option<(usize, VringRwLock<GuestMemoryAtomic<GuestMemory>>)>; MAX_QP],
    enabled: usize,
}

impl OpenEndpoint {
    /// The RX queue a flow goes to, among the enabled ones.
    pub fn pick_queue(
        &self,
        hash: u32,
    ) -> Option<&(usize, VringRwLock<GuestMemoryAtomic<GuestMemory>>)> {
        if self.enabled == 0 {
            return None;
        }
        // The hash scaled to the queue count: a multiply, where `%` would divide per frame.
        let i = (u64::from(hash) * self.enabled as u64) >> 32;
        self.queues[i as usize].as_ref()
    }

    /// RX queue `index`, if it was enabled when the endpoint was opened.
    pub fn queue(&self, index: usize) -> Option<&VringRwLock<GuestMemoryAtomic<GuestMemory>>> {
        self.queues[..self.enabled]
            .iter()
            .flatten()
            .find(|(i, _)| *i == index)
            .map(|(_, v)| v)
    }
}

/// The state of one port that outlives a guest connection.
pub struct PortShared {
    pub id: PortId,
    pub name: String,
    pub segment: u16,
    pub queue_pairs: u16,
    pub mac: Option<MacAddr>,
    pub counters: PortCounters,
    rx: RwLock<RxEndpoint>,
    /// Changes with every change of `rx`: an endpoint opened for a burst is used only while
    /// it is still the port's current one.
    generation: AtomicU64,
    /// Closes the current vhost-user connection (a guest that broke the protocol).
    pub connection: Mutex<Option<ShutdownHandle>>,
    /// Set when this port is the uplink instead of a VM port.
    pub uplink: OnceLock<Arc<Uplink>>,
}

impl PortShared {
    pub fn rx_read(&self) -> std::sync::RwLockReadGuard<'_, RxEndpoint> {
        self.rx.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The RX side for a change; whatever was opened before is stale from now on.
    pub fn rx_write(&self) -> std::sync::RwLockWriteGuard<'_, RxEndpoint> {
        let rx = self.rx.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        rx
    }

    /// Takes what deliveries to this port need for one burst.
    pub fn open_rx(&self) -> OpenEndpoint {
        let rx = self.rx_read();
        // Read under the read lock: no change is half made.
        rx.open(self.id, self.generation.load(Ordering::Acquire))
    }

    /// Whether `ep` is still this port's current RX side. Checked under the destination
    /// queue's lock before writing or publishing, which `detach` takes after a change.
    pub fn is_current(&self, ep_generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == ep_generation
    }

    /// Withdraws everything a guest connection published, so that no other port writes
    /// into memory that is no longer this guest's.
    pub fn detach(&self) {
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

/// A worker's recent forwarding decisions, reused while the MAC table's version stays the
/// same: a flow's frames come in bursts, and a hit skips the table's lock and two lookups.
/// A hit needs no refresh of the entries' `seen` time either: the clock has not moved since
/// the decision that refreshed them, or the version would have changed.
#[derive(Default)]
pub struct DecisionCache {
    slots: [Option<CachedDecision>; DECISION_SLOTS],
}

const DECISION_SLOTS: usize = 8;

#[derive(Clone, Copy)]
struct CachedDecision {
    version: u64,
    src: PortId,
    segment: u16,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    forward: Forward,
}

/// The forwarding decision for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    To(PortId),
    Flood,
    /// The destination sits behind the source port itself: nothing to do.
    Local,
    /// The source MAC is configured on another port: a spoofed frame.
    Spoofed,
}

pub struct Switch {
    pub ports: Vec<Arc<PortShared>>,
    /// MACs configured on ports (`mac=`): only that port may send from them.
    pinned: HashMap<MacAddr, PortId>,
    pub macs: MacTable,
    pub mtu: Option<u16>,
    pub max_frame_len: usize,
    /// Busy-poll window of the TX workers after a burst, microseconds (0: none).
    pub poll_us: u64,
}

impl Switch {
    /// The VM ports of `config`, then the uplink (if any) as the last port.
    pub fn new(config: &SwitchConfig) -> Arc<Switch> {
        let uplink = config
            .uplink
            .as_ref()
            .map(|u| ("uplink".to_string(), Uplink::segment(u), u.queues, None));
        let ports: Vec<Arc<PortShared>> = config
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.segment(), p.queues, p.mac))
            .chain(uplink)
            .enumerate()
            .map(|(i, (name, segment, queues, mac))| {
                Arc::new(PortShared {
                    id: i as PortId,
                    name,
                    segment,
                    queue_pairs: queues,
                    mac,
                    counters: PortCounters::default(),
                    rx: RwLock::new(RxEndpoint {
                        queues: vec![None; usize::from(queues)],
                        ..Default::default()
                    }),
                    generation: AtomicU64::new(0),
                    connection: Mutex::new(None),
                    uplink: OnceLock::new(),
                })
            })
            .collect();
        let pinned = ports
            .iter()
            .filter_map(|p| p.mac.map(|m| (m, p.id)))
            .collect();
        Arc::new(Switch {
            pinned,
            ports,
            macs: MacTable::new(config.mac_ageing_secs),
            mtu: config.mtu,
            max_frame_len: config.max_frame_len(),
            poll_us: config.poll_us,
        })
    }

    pub fn port_by_name(&self, name: &str) -> Option<&Arc<PortShared>> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// `decide`, answered from `cache` when the same decision was made since the MAC table
    /// last changed.
    pub fn decide_cached(
        &self,
        cache: &mut DecisionCache,
        src: PortId,
        segment: u16,
        src_mac: MacAddr,
        dst_mac: MacAddr,
    ) -> Forward {
        // Read before deciding: a change made meanwhile leaves this entry stale, not wrong.
        let version = self.macs.version.load(Ordering::Acquire);
        let slot = &mut cache.slots[usize::from(src_mac.0[5] ^ dst_mac.0[5]) % DECISION_SLOTS];
        if let Some(c) = slot {
            if c.version == version
                && c.src == src
                && c.segment == segment
                && c.src_mac == src_mac
                && c.dst_mac == dst_mac
            {
                return c.forward;
            }
        }
        let forward = self.decide(src, segment, src_mac, dst_mac);
        *slot = Some(CachedDecision {
            version,
            src,
            segment,
            src_mac,
            dst_mac,
            forward,
        });
        forward
    }

    /// Learns the source and decides where a frame from `src`, in `segment`, goes.
    pub fn decide(&self, src: PortId, segment: u16, src_mac: MacAddr, dst_mac: MacAddr) -> Forward {
        if self.pinned.get(&src_mac).is_some_and(|p| *p != src) {
            return Forward::Spoofed;
        }
        let dst = (!dst_mac.is_multicast()).then_some(dst_mac);
        let found = self.macs.learn_and_lookup(segment, src_mac, src, dst);
        if dst.is_none() {
            return Forward::Flood;
        }
        match found {
            Some(p) if p == src => Forward::Local,
            Some(p) => Forward::To(p),
            None => Forward::Flood,
        }
    }

    /// The ports a flooded frame from `src` in `segment` reaches: that segment's ports and
    /// any trunk, never back to the source.
    pub fn flood_targets(
        &self,
        src: PortId,
        segment: u16,
    ) -> impl Iterator<Item = &Arc<PortShared>> {
        self.ports
            .iter()
            .filter(move |p| p.id != src && (p.segment == segment || p.segment == TRUNK))
    }
}

/// A hash of a frame's flow (MACs, IP addresses, TCP/UDP ports) that picks the destination
/// RX queue, so one flow stays on one queue and in order. Mixes whole words: it runs for
/// every frame.
pub fn flow_hash(frame: &[u8]) -> u32 {
    fn mix(h: u64, v: u64) -> u64 {
        (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
    }
    fn word(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        let n = b.len().min(8);
        w[..n].copy_from_slice(&b[..n]);
        u64::from_le_bytes(w)
    }
    if frame.len() < 14 {
        return mix(0x51_7cc1_b727_220a, word(frame)) as u32;
    }
    let mut h = mix(
        mix(0x51_7cc1_b727_220a, word(&frame[0..8])),
        word(&frame[8..12]),
    );
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (proto, l4) = match ethertype {
        0x0800 if frame.len() >= 34 => {
            h = mix(h, word(&frame[26..34]));
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
            (if fragment { 0 } else { frame[23] }, 14 + ihl)
        }
        0x86dd if frame.len() >= 54 => {
            for chunk in frame[22..54].chunks(8) {
                h = mix(h, word(chunk));
            }
            (frame[20], 54)
        }
        _ => (0, 0),
    };
    if (proto == 6 || proto == 17) && frame.len() >= l4 + 4 {
        h = mix(h, word(&frame[l4..l4 + 4]));
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortConfig;

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
    }

    fn switch(vlans: &[Option<u16>]) -> Arc<Switch> {
        let ports = vlans
            .iter()
            .enumerate()
            .map(|(i, v)| PortConfig {
                name: format!("p{i}"),
                socket: format!("/tmp/p{i}").into(),
                vlan: *v,
                mac: None,
                queues: 1,
                listen_fd: None,
            })
            .collect();
        Switch::new(&SwitchConfig {
            ports,
            mac_ageing_secs: 10,
            ..Default::default()
        })
    }

    #[test]
    fn learns_floods_and_never_hairpins() {
        let s = switch(&[None, None, None]);
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::Flood);
        let targets: Vec<_> = s.flood_targets(0, 0).map(|p| p.id).collect();
        assert_eq!(targets, vec![1, 2]);
        assert_eq!(s.decide(1, 0, mac(2), mac(1)), Forward::To(0));
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::To(1));
        assert_eq!(s.decide(0, 0, mac(1), MacAddr([0xff; 6])), Forward::Flood);
        assert_eq!(s.decide(0, 0, mac(3), mac(1)), Forward::Local);
        // A station that moves is learned at its new port.
        assert_eq!(s.decide(2, 0, mac(2), mac(1)), Forward::To(0));
        assert_eq!(s.macs.lookup(0, mac(2)), Some(2));
        s.macs.forget_port(2);
        assert_eq!(s.macs.lookup(0, mac(2)), None);
    }

    #[test]
    fn cached_decisions_follow_every_table_change() {
        let s = switch(&[None, None, None]);
        let mut c = DecisionCache::default();
        // Port 0's frames from mac(1) to mac(2), decided through the cache.
        let mut one_to_two = |segment| s.decide_cached(&mut c, 0, segment, mac(1), mac(2));
        assert_eq!(one_to_two(0), Forward::Flood);
        assert_eq!(one_to_two(0), Forward::Flood);
        // mac(2) learned on port 1: the cached flood is stale.
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        // Moved to port 2.
        s.decide(2, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(2));
        // Same MACs in another segment: not the cached answer.
        assert_eq!(one_to_two(5), Forward::Flood);
        s.macs.forget_port(2);
        assert_eq!(one_to_two(0), Forward::Flood);
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        // Aged out (ageing is 10 s here): the clock moving invalidates the cache too.
        s.macs.tick(11);
        assert_eq!(one_to_two(0), Forward::Flood);
        // Another source port with the same MACs: not the cached answer either.
        let mut c2 = DecisionCache::default();
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(
            s.decide_cached(&mut c2, 0, 0, mac(1), mac(2)),
            Forward::To(1)
        );
        assert_eq!(
            s.decide_cached(&mut c2, 1, 0, mac(1), mac(2)),
            Forward::Local
        );
    }

    #[test]
    fn vlans_are_separate_segments() {
        let s = switch(&[Some(10), Some(10), Some(20)]);
        let t: Vec<_> = s.flood_targets(0, 10).map(|p| p.id).collect();
        assert_eq!(t, vec![1]);
        assert_eq!(s.flood_targets(2, 20).count(), 0);
        s.decide(2, 20, mac(9), mac(1));
        // Learned on VLAN 20 only: VLAN 10 still floods for it.
        assert_eq!(s.decide(0, 10, mac(1), mac(9)), Forward::Flood);
    }

    #[test]
    fn flow_hash_follows_the_flow() {
        let mut a = vec![0u8; 60];
        a[12] = 0x08;
        a[14] = 0x45;
        a[23] = 6;
        let base = flow_hash(&a);
        let mut payload_changed = a.clone();
        payload_changed[50] = 9;
        assert_eq!(flow_hash(&payload_changed), base);
        let mut port_changed = a.clone();
        port_changed[35] = 1;
        assert_ne!(flow_hash(&port_changed), base);
        assert_ne!(flow_hash(&a[..5]), 0);
    }

    #[test]
    fn entries_age_out() {
        let t = MacTable::new(10);
        t.learn(0, mac(1), 3);
        t.tick(5);
        assert_eq!(t.lookup(0, mac(1)), Some(3));
        t.learn(0, mac(1), 3); // refreshed at 5
        t.tick(10);
        assert_eq!(t.lookup(0, mac(1)), Some(3));
        t.tick(1);
        assert_eq!(t.lookup(0, mac(1)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn configured_macs_are_pinned_and_ports_are_bounded() {
        let ports = (0..3)
            .map(|i| PortConfig {
                name: format!("p{i}"),
                socket: format!("/tmp/p{i}").into(),
                vlan: None,
                mac: (i == 0).then_some(mac(1)),
                queues: 1,
                listen_fd: None,
            })
            .collect();
        let s = Switch::new(&SwitchConfig {
            ports,
            ..Default::default()
        });
        assert_eq!(s.decide(1, 0, mac(1), mac(2)), Forward::Spoofed);
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::Flood);
        assert_eq!(s.macs.lookup(0, mac(1)), Some(0));
        for i in 0..(MAC_PER_PORT_LIMIT + 50) as u32 {
            let b = i.to_be_bytes();
            s.macs.learn(0, MacAddr([2, 9, b[0], b[1], b[2], b[3]]), 1);
        }
        assert_eq!(s.macs.len(), 1 + MAC_PER_PORT_LIMIT);
        s.macs.learn(0, mac(7), 2);
        assert_eq!(s.macs.lookup(0, mac(7)), Some(2), "other ports still learn");
        s.macs.forget_port(1);
        s.macs.learn(0, mac(8), 1);
        assert_eq!(
            s.macs.lookup(0, mac(8)),
            Some(1),
            "forgetting frees the port's share"
        );
    }

    #[test]
    fn table_is_bounded() {
        let t = MacTable::new(10);
        for i in 0..(MAC_TABLE_CAPACITY + 10) as u32 {
            let b = i.to_be_bytes();
            // Spread over ports: each port's own limit is lower than the table's.
            t.learn(
                0,
                MacAddr([2, 0, b[0], b[1], b[2], b[3]]),
                (i % 64) as PortId,
            );
        }
        assert_eq!(t.len(), MAC_TABLE_CAPACITY);
    }
}
