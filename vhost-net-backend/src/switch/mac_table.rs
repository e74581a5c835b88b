//! The MAC table: learned (segment, MAC) to port mappings with ageing, bounded in total and
//! per port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::RwLock;

use crate::types::{MacAddr, PortId};

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

impl MacTable {
    /// Whether `mac` in `vlan` is learned on `port` (fresh or not).
    pub fn holds(&self, vlan: u16, mac: MacAddr, port: PortId) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .map
            .get(&(vlan, mac))
            .is_some_and(|e| e.port.load(Ordering::Relaxed) == port)
    }

    /// How many entries `port` holds.
    pub fn count_of(&self, port: PortId) -> usize {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .per_port
            .get(usize::from(port))
            .copied()
            .unwrap_or(0)
    }

    /// Every entry: VLAN, MAC, port, seconds since last heard; sorted by VLAN and MAC.
    pub fn rows(&self) -> Vec<(u16, MacAddr, PortId, u64)> {
        let now = self.now.load(Ordering::Relaxed);
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = entries
            .map
            .iter()
            .map(|((vlan, mac), e)| {
                let age = now.saturating_sub(e.seen.load(Ordering::Relaxed));
                (*vlan, *mac, e.port.load(Ordering::Relaxed), age)
            })
            .collect();
        rows.sort_by_key(|r| (r.0, r.1 .0));
        rows
    }

    /// Forgets the entries of `port`, or all; how many went. Frames to those MACs are
    /// flooded until they are heard again.
    pub fn flush(&self, port: Option<PortId>) -> usize {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let before = entries.map.len();
        entries.retain(|e| port.is_some_and(|p| e.port.load(Ordering::Relaxed) != p));
        let gone = before - entries.map.len();
        drop(entries);
        self.version.fetch_add(1, Ordering::Release);
        gone
    }

    /// Changes whenever a lookup could answer differently (see `version`).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_list_and_flush_forgets_a_port_or_all() {
        let t = MacTable::new(300);
        let mac = |n: u8| MacAddr([2, 0, 0, 0, 0, n]);
        t.learn(10, mac(2), 1);
        t.learn(10, mac(1), 0);
        t.learn(20, mac(3), 1);
        let rows = t.rows();
        assert_eq!(
            rows.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(),
            vec![(10, mac(1), 0), (10, mac(2), 1), (20, mac(3), 1)]
        );
        let v = t.version();
        assert_eq!(t.flush(Some(1)), 2);
        assert_ne!(t.version(), v, "workers' caches must drop what they hold");
        assert_eq!(t.lookup(10, mac(2)), None);
        assert_eq!(t.lookup(10, mac(1)), Some(0));
        assert_eq!(t.count_of(1), 0);
        assert_eq!(t.flush(None), 1);
        assert!(t.is_empty());
    }

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
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
