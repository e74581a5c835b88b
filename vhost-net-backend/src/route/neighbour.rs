//! The router's neighbour table: which port and MAC an address of a routed segment is at.
//! Bindings from the config (a port's `mac` and `addresses`) are fixed: learning never
//! moves them. Others are learned from ARP, neighbour discovery and packets sent to the
//! gateway, bounded per port and in all so that one guest cannot push out another's, and
//! forgotten after the MAC ageing time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use crate::packet::l3::Ip;
use crate::types::{MacAddr, PortId};

/// Learned entries in all, and per port.
pub const MAX_LEARNED: usize = 16_384;
pub const MAX_LEARNED_PER_PORT: usize = 256;
/// Addresses being asked for at once; and how often one is asked again (ms).
const MAX_ASKING: usize = 1024;
const ASK_EVERY_MS: u128 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub port: PortId,
    pub mac: MacAddr,
    pub segment: u16,
}

#[derive(Clone, Copy, Debug)]
struct Learned {
    at: Neighbour,
    /// Seconds since the table started, when last heard from.
    seen: u64,
}

/// Slots of a worker's cache, per kind: direct-mapped by a hash of the address.
const CACHE_SLOTS: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct CacheSlot {
    ip: Ip,
    /// Where it is (a lookup), or where it was heard from (a learn); None: not known.
    at: Option<Neighbour>,
    /// The coarse second it was heard at.
    heard: u64,
    valid: bool,
}

#[inline]
fn cache_slot(ip: Ip) -> usize {
    let x = (ip.0 as u64) ^ ((ip.0 >> 64) as u64);
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - CACHE_SLOTS.trailing_zeros())) as usize
}

/// A worker's view of the table: recent lookups and what it heard lately, valid while the
/// table's generation stays the same.
pub struct NeighbourCache {
    generation: u64,
    found: [CacheSlot; CACHE_SLOTS],
    heard: [CacheSlot; CACHE_SLOTS],
}

impl Default for NeighbourCache {
    fn default() -> Self {
        NeighbourCache {
            // No table has this generation yet: the first use fills the cache.
            generation: u64::MAX,
            found: [CacheSlot::default(); CACHE_SLOTS],
            heard: [CacheSlot::default(); CACHE_SLOTS],
        }
    }
}

/// One row of `ctl neighbours`.
#[derive(Clone, Debug)]
pub struct NeighbourRow {
    pub ip: Ip,
    pub at: Neighbour,
    /// Seconds since last heard from; None: from the config.
    pub age: Option<u64>,
}

#[derive(Default)]
struct LearnedTable {
    map: HashMap<Ip, Learned>,
    /// Entries per port.
    per_port: HashMap<PortId, usize>,
}

impl LearnedTable {
    fn retain(&mut self, keep: impl Fn(&Ip, &Learned) -> bool) {
        self.map.retain(|ip, l| keep(ip, l));
        self.per_port.clear();
        for l in self.map.values() {
            *self.per_port.entry(l.at.port).or_default() += 1;
        }
    }
}

struct Tables {
    fixed: HashMap<Ip, Neighbour>,
    learned: LearnedTable,
}

pub struct NeighbourTable {
    /// One lock for both. Workers read through their `NeighbourCache`: a read lock per
    /// routed frame, taken by two workers, measured ~55 % of a routed frame's time.
    tables: RwLock<Tables>,
    /// Bumped after every change of a binding, so that workers' caches drop what they hold.
    generation: AtomicU64,
    /// Seconds since `start`, as of the last `age` (once a second): a clock for the hot
    /// path that costs a load.
    coarse_secs: AtomicU64,
    /// When each unresolved address was last asked for.
    asking: Mutex<HashMap<Ip, Instant>>,
    ageing_secs: u64,
    start: Instant,
}

impl NeighbourTable {
    pub fn new(fixed: HashMap<Ip, Neighbour>, ageing_secs: u64) -> NeighbourTable {
        NeighbourTable {
            tables: RwLock::new(Tables {
                fixed,
                learned: LearnedTable::default(),
            }),
            asking: Mutex::new(HashMap::new()),
            ageing_secs,
            start: Instant::now(),
            generation: AtomicU64::new(0),
            coarse_secs: AtomicU64::new(0),
        }
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Bumped by every change of a binding.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Seconds since the table started, as of the last `age` (about once a second).
    #[inline]
    pub fn coarse_second(&self) -> u64 {
        self.coarse_secs.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    pub fn lookup(&self, ip: Ip) -> Option<Neighbour> {
        let t = self.read();
        t.fixed
            .get(&ip)
            .or_else(|| t.learned.map.get(&ip).map(|l| &l.at))
            .copied()
    }

    /// Puts new configured bindings in force (a port's addresses changed); what was learned
    /// of those addresses is forgotten.
    pub fn set_fixed(&self, fixed: HashMap<Ip, Neighbour>) {
        let mut t = self.write();
        let Tables { fixed: f, learned } = &mut *t;
        learned.retain(|ip, _| !fixed.contains_key(ip));
        *f = fixed;
        drop(t);
        self.changed();
    }

    /// `ip` was heard from at `at`. A fixed binding is never moved; a new entry is taken
    /// only within the bounds. Returns whether the table changed.
    pub fn learn(&self, ip: Ip, at: Neighbour) -> bool {
        let now = self.now();
        {
            // The common case, a known host heard again lately: no write lock.
            let t = self.read();
            if t.fixed.contains_key(&ip)
                || t.learned
                    .map
                    .get(&ip)
                    .is_some_and(|l| l.at == at && now.saturating_sub(l.seen) < 10)
            {
                return false;
            }
        }
        let mut t = self.write();
        if t.fixed.contains_key(&ip) {
            return false;
        }
        let learned = &mut t.learned;
        let of_port = learned.per_port.get(&at.port).copied().unwrap_or(0);
        let moved = match learned.map.get(&ip) {
            Some(old) => old.at.port != at.port,
            None => true,
        };
        if moved && (learned.map.len() >= MAX_LEARNED || of_port >= MAX_LEARNED_PER_PORT) {
            return false;
        }
        if let Some(old) = learned.map.insert(ip, Learned { at, seen: now }) {
            if let Some(n) = learned.per_port.get_mut(&old.at.port) {
                *n -= 1;
            }
        }
        *learned.per_port.entry(at.port).or_default() += 1;
        drop(t);
        self.changed();
        self.asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
        true
    }

    /// Whether to ask for `ip` now: not more than once a second per address, and not for
    /// more than `MAX_ASKING` addresses at once.
    pub fn should_ask(&self, ip: Ip) -> bool {
        let now = Instant::now();
        let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = asking.get_mut(&ip) {
            if now.duration_since(*last).as_millis() < ASK_EVERY_MS {
                return false;
            }
            *last = now;
            return true;
        }
        if asking.len() >= MAX_ASKING {
            asking.retain(|_, t| now.duration_since(*t).as_millis() < ASK_EVERY_MS);
            if asking.len() >= MAX_ASKING {
                return false;
            }
        }
        asking.insert(ip, now);
        true
    }

    /// Forgets learned entries not heard from within the ageing time.
    pub fn age(&self) {
        let now = self.now();
        self.coarse_secs.store(now, Ordering::Relaxed);
        let ageing = self.ageing_secs;
        let mut t = self.write();
        let before = t.learned.map.len();
        t.learned.retain(|_, l| now.saturating_sub(l.seen) < ageing);
        let removed = t.learned.map.len() != before;
        drop(t);
        if removed {
            self.changed();
        }
        let instant = Instant::now();
        self.asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| instant.duration_since(*t).as_secs() < 10);
    }

    /// Forgets what was learned on `port` (its guest went away).
    pub fn forget_port(&self, port: PortId) {
        self.write().learned.retain(|_, l| l.at.port != port);
        self.changed();
    }

    /// Drops what `c` holds if the table changed since it was filled.
    #[inline]
    fn sync(&self, c: &mut NeighbourCache) {
        let g = self.generation();
        if c.generation != g {
            c.found.fill(CacheSlot::default());
            c.heard.fill(CacheSlot::default());
            c.generation = g;
        }
    }

    /// `lookup`, through a worker's cache.
    #[inline]
    pub fn lookup_cached(&self, c: &mut NeighbourCache, ip: Ip) -> Option<Neighbour> {
        self.sync(c);
        let slot = &mut c.found[cache_slot(ip)];
        if slot.valid && slot.ip == ip {
            return slot.at;
        }
        let at = self.lookup(ip);
        *slot = CacheSlot {
            ip,
            at,
            heard: 0,
            valid: true,
        };
        at
    }

    /// `learn`, skipped while this worker heard the same binding within the last seconds
    /// (the table's own entry is refreshed every 10 s, well within the ageing time).
    #[inline]
    pub fn learn_cached(&self, c: &mut NeighbourCache, ip: Ip, at: Neighbour) {
        self.sync(c);
        let now = self.coarse_second();
        let slot = &mut c.heard[cache_slot(ip)];
        if slot.valid && slot.ip == ip && slot.at == Some(at) && now.saturating_sub(slot.heard) < 5
        {
            return;
        }
        // A change bumps the generation: the next sync empties the cache anyway.
        self.learn(ip, at);
        *slot = CacheSlot {
            ip,
            at: Some(at),
            heard: now,
            valid: true,
        };
    }

    pub fn rows(&self) -> Vec<NeighbourRow> {
        let now = self.now();
        let t = self.read();
        let mut rows: Vec<NeighbourRow> = t
            .fixed
            .iter()
            .map(|(ip, at)| NeighbourRow {
                ip: *ip,
                at: *at,
                age: None,
            })
            .collect();
        rows.extend(t.learned.map.iter().map(|(ip, l)| NeighbourRow {
            ip: *ip,
            at: l.at,
            age: Some(now.saturating_sub(l.seen)),
        }));
        rows.sort_by_key(|r| r.ip);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: PortId, last: u8) -> Neighbour {
        Neighbour {
            port,
            mac: MacAddr([2, 0, 0, 0, 0, last]),
            segment: 10,
        }
    }

    #[test]
    fn fixed_bindings_win_and_learning_is_bounded_per_port() {
        let fixed_ip = Ip::v4([10, 0, 1, 5]);
        let t = NeighbourTable::new(HashMap::from([(fixed_ip, at(0, 5))]), 300);
        assert!(!t.learn(fixed_ip, at(1, 66)), "a fixed binding moved");
        assert_eq!(t.lookup(fixed_ip), Some(at(0, 5)));
        for i in 0..MAX_LEARNED_PER_PORT + 10 {
            t.learn(Ip::v4([10, 1, (i >> 8) as u8, i as u8]), at(1, 1));
        }
        let of_1 = t.rows().iter().filter(|r| r.at.port == 1).count();
        assert_eq!(of_1, MAX_LEARNED_PER_PORT);
        // Port 2 still learns.
        assert!(t.learn(Ip::v4([10, 2, 0, 1]), at(2, 2)));
        assert_eq!(t.lookup(Ip::v4([10, 2, 0, 1])), Some(at(2, 2)));
        // A host that moved is found at its new place.
        assert!(t.learn(Ip::v4([10, 2, 0, 1]), at(3, 3)));
        assert_eq!(t.lookup(Ip::v4([10, 2, 0, 1])).unwrap().port, 3);
        t.forget_port(3);
        assert_eq!(t.lookup(Ip::v4([10, 2, 0, 1])), None);
    }

    #[test]
    fn a_workers_cache_follows_every_change_of_the_table() {
        let t = NeighbourTable::new(HashMap::new(), 300);
        let mut c = NeighbourCache::default();
        let ip = Ip::v4([10, 0, 2, 9]);
        assert_eq!(t.lookup_cached(&mut c, ip), None);
        t.learn_cached(&mut c, ip, at(1, 9));
        assert_eq!(t.lookup_cached(&mut c, ip), Some(at(1, 9)));
        // Moved, learned through another worker: this one sees the move.
        t.learn(ip, at(2, 9));
        assert_eq!(t.lookup_cached(&mut c, ip), Some(at(2, 9)));
        // Heard again here at its old place: learned again, not skipped as known.
        t.learn_cached(&mut c, ip, at(1, 9));
        assert_eq!(t.lookup(ip), Some(at(1, 9)));
        assert_eq!(t.lookup_cached(&mut c, ip), Some(at(1, 9)));
        t.forget_port(1);
        assert_eq!(t.lookup_cached(&mut c, ip), None);
        let fixed = HashMap::from([(ip, at(3, 3))]);
        t.set_fixed(fixed);
        assert_eq!(t.lookup_cached(&mut c, ip), Some(at(3, 3)));
    }

    #[test]
    fn an_address_is_asked_for_once_a_second() {
        let t = NeighbourTable::new(HashMap::new(), 300);
        let ip = Ip::v4([10, 0, 2, 9]);
        assert!(t.should_ask(ip));
        assert!(!t.should_ask(ip));
        assert!(t.should_ask(Ip::v4([10, 0, 2, 10])));
        t.learn(ip, at(1, 9));
        assert!(
            t.should_ask(ip),
            "a learned address is asked for afresh when lost"
        );
    }
}
