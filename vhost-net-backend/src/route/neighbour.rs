//! The router's neighbour table: which port and MAC an address of a routed segment is at.
//! Bindings from the config (a port's `mac` and `addresses`) are fixed: learning never
//! moves them. Others are learned from ARP, neighbour discovery and packets sent to the
//! gateway, bounded per port and in all so that one guest cannot push out another's, and
//! forgotten after the MAC ageing time.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
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

/// Hashes an address in two multiplies, seeded per process (guests choose addresses):
/// SipHash took half of a routed frame's time, two lookups a frame (measured with perf,
/// 64 B routed at 4 Mpps).
#[derive(Clone, Copy)]
pub struct IpHash([u64; 2]);

impl IpHash {
    fn random() -> IpHash {
        let r = std::collections::hash_map::RandomState::new();
        IpHash([r.hash_one(1u8), r.hash_one(2u8)])
    }
}

impl BuildHasher for IpHash {
    type Hasher = IpHasher;
    fn build_hasher(&self) -> IpHasher {
        IpHasher {
            seeds: self.0,
            h: 0,
        }
    }
}

pub struct IpHasher {
    seeds: [u64; 2],
    h: u64,
}

fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

impl Hasher for IpHasher {
    fn finish(&self) -> u64 {
        self.h
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.h = mum(self.h ^ v ^ self.seeds[0], 0x9e37_79b9_7f4a_7c15);
    }
    fn write_u128(&mut self, v: u128) {
        let [s0, s1] = self.seeds;
        self.h = mum(
            mum((v as u64) ^ s0, 0xa076_1d64_78bd_642f) ^ ((v >> 64) as u64) ^ s1,
            0xe703_7ed1_a0b4_28db,
        );
    }
}

type IpMap<V> = HashMap<Ip, V, IpHash>;

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

/// One row of `ctl neighbours`.
#[derive(Clone, Debug)]
pub struct NeighbourRow {
    pub ip: Ip,
    pub at: Neighbour,
    /// Seconds since last heard from; None: from the config.
    pub age: Option<u64>,
}

struct LearnedTable {
    map: IpMap<Learned>,
    /// Entries per port.
    per_port: HashMap<PortId, usize>,
}

impl LearnedTable {
    fn retain(&mut self, keep: impl Fn(&Learned) -> bool) {
        self.map.retain(|_, l| keep(l));
        self.per_port.clear();
        for l in self.map.values() {
            *self.per_port.entry(l.at.port).or_default() += 1;
        }
    }
}

struct Tables {
    fixed: IpMap<Neighbour>,
    learned: LearnedTable,
}

pub struct NeighbourTable {
    /// One lock for both: a routed frame's lookup takes one uncontended read lock.
    tables: RwLock<Tables>,
    /// When each unresolved address was last asked for.
    asking: Mutex<HashMap<Ip, Instant>>,
    ageing_secs: u64,
    start: Instant,
}

impl NeighbourTable {
    pub fn new(fixed: HashMap<Ip, Neighbour>, ageing_secs: u64) -> NeighbourTable {
        let hash = IpHash::random();
        let mut fixed_map = IpMap::with_hasher(hash);
        fixed_map.extend(fixed);
        NeighbourTable {
            tables: RwLock::new(Tables {
                fixed: fixed_map,
                learned: LearnedTable {
                    map: IpMap::with_hasher(hash),
                    per_port: HashMap::new(),
                },
            }),
            asking: Mutex::new(HashMap::new()),
            ageing_secs,
            start: Instant::now(),
        }
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
        learned.map.retain(|ip, _| !fixed.contains_key(ip));
        // Recounts per port.
        learned.retain(|_| true);
        f.clear();
        f.extend(fixed);
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
        let ageing = self.ageing_secs;
        self.write()
            .learned
            .retain(|l| now.saturating_sub(l.seen) < ageing);
        let instant = Instant::now();
        self.asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| instant.duration_since(*t).as_secs() < 10);
    }

    /// Forgets what was learned on `port` (its guest went away).
    pub fn forget_port(&self, port: PortId) {
        self.write().learned.retain(|l| l.at.port != port);
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
