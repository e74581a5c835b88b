//! Connection tracking: the flows the rules allowed, so that their later packets and their
//! replies pass without a rule walk. Bounded in total and per port: when a port has opened
//! its share, its new flows are refused (and counted), never another port's evicted.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hashbrown::hash_table::{Entry, HashTable};

use crate::packet::l3::{
    FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use crate::types::PortId;

use super::rules::Decider;

const SHARDS: usize = 64;

/// Which way a packet goes along its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// As the first packet did.
    Orig = 0,
    Reply = 1,
}

/// TCP states, as far as timeouts need them.
pub mod tcp {
    pub const SYN_SENT: u8 = 0;
    pub const SYN_RECV: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    pub const FIN_WAIT: u8 = 3;
    pub const TIME_WAIT: u8 = 4;
    pub const CLOSE: u8 = 5;
    /// Not TCP.
    pub const NONE: u8 = 255;

    pub fn name(s: u8) -> &'static str {
        match s {
            SYN_SENT => "syn_sent",
            SYN_RECV => "syn_recv",
            ESTABLISHED => "established",
            FIN_WAIT => "fin_wait",
            TIME_WAIT => "time_wait",
            CLOSE => "close",
            _ => "",
        }
    }
}

/// Seconds a connection lives without packets, as Linux conntrack's defaults.
pub fn timeout_secs(proto: u8, state: u8, replied: bool) -> u32 {
    match (proto, state) {
        (PROTO_TCP, tcp::SYN_SENT) => 120,
        (PROTO_TCP, tcp::SYN_RECV) => 60,
        (PROTO_TCP, tcp::ESTABLISHED) => 432_000,
        (PROTO_TCP, tcp::FIN_WAIT | tcp::TIME_WAIT) => 120,
        (PROTO_TCP, _) => 10,
        (PROTO_ICMP | PROTO_ICMPV6, _) => 30,
        _ if replied => 120,
        _ => 30,
    }
}

/// One direction's counters. Each direction is counted by the worker of the port that
/// sends it, so the two never share a cache line: the gap after them keeps the next
/// direction's more than 63 bytes on. A gap, not `repr(align(64))`: a 64-aligned `Conn`
/// was a `memalign` per new flow, whose split-off chunks cost their frees and
/// consolidation (8 % of vnet-bench's new-connection case in `perf`).
#[derive(Debug, Default)]
#[repr(C)]
pub struct DirCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Switch clock seconds of the last packet.
    pub last_seen: AtomicU32,
    /// TCP flags seen, ORed.
    pub flags: AtomicU8,
    _gap: [u64; 8],
}

/// A tracked connection.
#[derive(Debug)]
pub struct Conn {
    /// Its first packet's key.
    pub key: FlowKey,
    /// The port that opened it and the port it was allowed to.
    pub orig_port: PortId,
    pub reply_port: PortId,
    /// The rule that allowed it (`NO_RULE`: the default); a later rule set may decide
    /// it by another.
    rule: AtomicU32,
    /// The rule set generation that allowed it: a later one decides it again.
    pub generation: AtomicU64,
    /// Unix time it started, for the flow log.
    pub started_unix: u64,
    pub state: AtomicU8,
    /// Cleared when it is removed: cached references see it.
    pub alive: AtomicBool,
    pub dirs: [DirCounters; 2],
    /// Packets and bytes each way already reported in the flow log.
    pub logged: Mutex<[(u64, u64); 2]>,
}

const NO_RULE: u32 = u32::MAX;

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: FlowKey,
        orig_port: PortId,
        reply_port: PortId,
        rule: Decider,
        generation: u64,
        started_unix: u64,
        now: u32,
    ) -> Conn {
        let c = Conn {
            key,
            orig_port,
            reply_port,
            rule: AtomicU32::new(rule.unwrap_or(NO_RULE)),
            generation: AtomicU64::new(generation),
            started_unix,
            state: AtomicU8::new(if key.proto == PROTO_TCP {
                tcp::SYN_SENT
            } else {
                tcp::NONE
            }),
            alive: AtomicBool::new(true),
            dirs: Default::default(),
            logged: Mutex::new([(0, 0); 2]),
        };
        c.dirs[0].last_seen.store(now, Ordering::Relaxed);
        c
    }

    #[inline]
    pub fn rule(&self) -> Decider {
        let r = self.rule.load(Ordering::Relaxed);
        (r != NO_RULE).then_some(r)
    }

    pub fn set_rule(&self, rule: Decider) {
        self.rule.store(rule.unwrap_or(NO_RULE), Ordering::Relaxed);
    }

    /// Counts a packet of `len` bytes going `dir` at clock `now`, with TCP flags `flags`,
    /// and moves the TCP state. Returns false if the packet may not pass (a TCP flow in
    /// a state where it makes no sense, e.g. data after RST).
    #[inline]
    pub fn count(&self, dir: Dir, len: usize, flags: u8, now: u32) -> bool {
        let d = &self.dirs[dir as usize];
        // Each direction is counted by the worker of the queue its flow hashes to: a load
        // and a store, not a locked add (two of those cost 8 % at 64 B). Two workers
        // counting one direction at once (a flow moving queues) may lose a count.
        d.packets
            .store(d.packets.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        d.bytes.store(
            d.bytes.load(Ordering::Relaxed) + len as u64,
            Ordering::Relaxed,
        );
        if d.last_seen.load(Ordering::Relaxed) != now {
            d.last_seen.store(now, Ordering::Relaxed);
        }
        if self.key.proto != PROTO_TCP {
            return true;
        }
        if flags & !d.flags.load(Ordering::Relaxed) != 0 {
            d.flags.fetch_or(flags, Ordering::Relaxed);
        }
        let state = self.state.load(Ordering::Relaxed);
        if state == tcp::ESTABLISHED && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            return true;
        }
        let next = if flags & TCP_RST != 0 {
            tcp::CLOSE
        } else {
            match (state, dir) {
                (tcp::SYN_SENT, Dir::Reply) if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
                    tcp::SYN_RECV
                }
                (tcp::SYN_RECV, Dir::Orig) if flags & TCP_ACK != 0 && flags & TCP_SYN == 0 => {
                    tcp::ESTABLISHED
                }
                (tcp::ESTABLISHED, _) if flags & TCP_FIN != 0 => tcp::FIN_WAIT,
                (tcp::FIN_WAIT, _) if self.fin_both_ways() => tcp::TIME_WAIT,
                (s, _) => s,
            }
        };
        if next != state {
            self.state.store(next, Ordering::Relaxed);
        }
        // A closed connection passes its last RST and FINs, not new data.
        next != tcp::CLOSE || flags & (TCP_RST | TCP_FIN) != 0
    }

    /// Whether a packet going `dir` with TCP `flags` opens a new connection on this closed
    /// one's key: a SYN from the side that opened it, once it was reset or closed (a
    /// client takes its port again at once after a reset). The policy then ends this one
    /// and tracks a new one, as Linux conntrack does; refused, the SYN waited out this
    /// one's timeout (10 s after a reset, 120 s after FINs): 52 of 7,171 connections
    /// through the balancer in vnet-bench took a second's retry.
    #[inline]
    pub fn reopened_by(&self, dir: Dir, flags: u8) -> bool {
        self.key.proto == PROTO_TCP
            && dir == Dir::Orig
            && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && matches!(
                self.state.load(Ordering::Relaxed),
                tcp::CLOSE | tcp::TIME_WAIT
            )
    }

    fn fin_both_ways(&self) -> bool {
        self.dirs
            .iter()
            .all(|d| d.flags.load(Ordering::Relaxed) & TCP_FIN != 0)
    }

    pub fn last_seen(&self) -> u32 {
        self.dirs
            .iter()
            .map(|d| d.last_seen.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    pub fn replied(&self) -> bool {
        self.dirs[1].packets.load(Ordering::Relaxed) > 0
    }

    pub fn expires_at(&self) -> u32 {
        self.last_seen().saturating_add(timeout_secs(
            self.key.proto,
            self.state.load(Ordering::Relaxed),
            self.replied(),
        ))
    }

    pub fn totals(&self) -> [(u64, u64); 2] {
        let t = |d: &DirCounters| {
            (
                d.packets.load(Ordering::Relaxed),
                d.bytes.load(Ordering::Relaxed),
            )
        };
        [t(&self.dirs[0]), t(&self.dirs[1])]
    }
}

#[inline(always)]
fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Per-process seeds of the flow hash, so that guests cannot work out colliding keys
/// offline.
#[derive(Clone, Copy)]
struct Seeds([u64; 6]);

impl Seeds {
    fn random() -> Seeds {
        let r = std::collections::hash_map::RandomState::new();
        Seeds([0u64, 1, 2, 3, 4, 5].map(|i| r.hash_one(i)))
    }

    /// Each word of the key with its own seed through a 64x64->128 multiply folded:
    /// independent of one another they run side by side, then one more mixes them. It
    /// runs for every frame the policy sees: a chained hash took 6 ns a key.
    #[inline]
    fn hash(&self, key: &FlowKey) -> u64 {
        let [a, b, c, d, e] = key.words();
        let s = &self.0;
        let h = mum(a ^ s[0], 0xa076_1d64_78bd_642f)
            ^ mum(b ^ s[1], 0xe703_7ed1_a0b4_28db)
            ^ mum(c ^ s[2], 0x8ebc_6af0_9c88_c6e3)
            ^ mum(d ^ s[3], 0x5899_65cc_7537_4cc3)
            ^ mum(e ^ s[4], 0x1d8e_4e27_c47d_124f);
        mum(h ^ s[5], 0x9e37_79b9_7f4a_7c15)
    }
}

/// A shard of the table: the connections alone, found by their key's hash and compared by
/// the key they hold. A slot is a pointer (8 bytes), where one holding the key and hash
/// took 80: a table sized for two million flows is 36 MiB, not 335, and a new flow's insert
/// touches a fresh cache line (and, in a cold table, page) less.
type Shard = HashTable<Arc<Conn>>;

/// Why a new connection was not tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    Table,
    Port,
}

/// The shard of a flow with `hash`: bits 32-37. Not the top bits, which hashbrown keeps
/// in each slot's control byte to tell keys apart: with the shard taken from them, the
/// keys of a shard shared six of those seven bits, so a lookup compared the key of half
/// the slots it probed (`lookup` was 60 % of vnet-bench's new-connection case once the
/// table held a million flows, 0.4 M/s). Not the low bits either, which pick the bucket.
#[inline]
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    seeds: Seeds,
    count: AtomicUsize,
    per_port: Box<[AtomicUsize]>,
    pub max: usize,
    pub max_per_port: usize,
}

impl Conntrack {
    pub fn new(ports: usize, max: usize, max_per_port: usize) -> Conntrack {
        let seeds = Seeds::random();
        Conntrack {
            // Sized for the whole table up front: growing a shard rehashes it under its
            // lock, on the path of new flows.
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashTable::with_capacity(max / SHARDS)))
                .collect(),
            seeds,
            count: AtomicUsize::new(0),
            per_port: (0..ports).map(|_| AtomicUsize::new(0)).collect(),
            max,
            max_per_port,
        }
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The seeded hash of `key`'s flow (either direction): picks its shard and the
    /// workers' cache slot.
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.seeds.hash(&canonical(key))
    }

    #[inline]
    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard_of(hash)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, key: &FlowKey, hash: u64) -> Option<(Arc<Conn>, Dir)> {
        let k = canonical(key);
        let conn = self
            .shard(hash)
            .find(hash, |c| canonical(&c.key) == k)
            .cloned()?;
        let dir = if conn.key == *key {
            Dir::Orig
        } else {
            Dir::Reply
        };
        Some((conn, dir))
    }

    /// Tracks `conn`; `hash` is `Conntrack::hash` of its key, which the caller computed for
    /// its lookup (not again here: the seeded hash is a part of every new flow's cost).
    /// Another worker may have tracked the same flow meanwhile: that one is returned instead.
    pub fn insert(&self, conn: Conn, hash: u64) -> Result<(Arc<Conn>, Dir), Full> {
        let port = usize::from(conn.orig_port);
        let per_port = self.per_port.get(port).ok_or(Full::Port)?;
        if per_port.load(Ordering::Relaxed) >= self.max_per_port {
            return Err(Full::Port);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(Full::Table);
        }
        let key = conn.key;
        let k = canonical(&key);
        let conn = Arc::new(conn);
        {
            let seeds = self.seeds;
            let mut s = self.shard(hash);
            match s.entry(
                hash,
                |c| canonical(&c.key) == k,
                |c| seeds.hash(&canonical(&c.key)),
            ) {
                Entry::Occupied(found) => {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                    let found = found.get().clone();
                    let dir = if found.key == key {
                        Dir::Orig
                    } else {
                        Dir::Reply
                    };
                    return Ok((found, dir));
                }
                Entry::Vacant(v) => {
                    v.insert(conn.clone());
                }
            }
        }
        per_port.fetch_add(1, Ordering::Relaxed);
        Ok((conn, Dir::Orig))
    }

    /// Stops tracking `conn`.
    pub fn remove(&self, conn: &Conn) {
        if !conn.alive.swap(false, Ordering::Relaxed) {
            return;
        }
        let hash = self.hash(&conn.key);
        if let Ok(found) = self
            .shard(hash)
            .find_entry(hash, |c| std::ptr::eq(&**c, conn))
        {
            found.remove();
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = self.per_port.get(usize::from(conn.orig_port)) {
            p.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Every tracked connection.
    pub fn all(&self) -> Vec<Arc<Conn>> {
        let mut out = Vec::with_capacity(self.len());
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(s.iter().cloned());
        }
        out
    }

    /// What expired by clock `now` in part `part` of `parts` of the table (still tracked:
    /// the caller ends each). A shard at a time, and only the expired taken out: a sweep
    /// of a full table holds up no worker for long (sweeping all two million entries each
    /// second took 4 % of the core the workers shared).
    pub fn expired(&self, now: u32, part: usize, parts: usize) -> Vec<Arc<Conn>> {
        let mut out = Vec::new();
        for s in self
            .shards
            .iter()
            .skip(part % parts.max(1))
            .step_by(parts.max(1))
        {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(s.iter().filter(|c| c.expires_at() <= now).cloned());
        }
        out
    }
}

/// One key for both directions of a flow: the lower address (and port) as the source.
#[inline]
fn canonical(k: &FlowKey) -> FlowKey {
    if (k.src, k.sport) <= (k.dst, k.dport) {
        *k
    } else {
        k.reversed()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::packet::l3::Ip;

    pub(crate) fn conn(orig_port: PortId, sport: u16, proto: u8, now: u32) -> Conn {
        let key = FlowKey {
            src: Ip::v4([10, 0, 0, 1]),
            dst: Ip::v4([10, 0, 0, 2]),
            sport,
            dport: 80,
            proto,
            zone: 0,
        };
        Conn::new(key, orig_port, 9, Some(0), 0, 0, now)
    }

    fn track(ct: &Conntrack, c: Conn) -> Result<(Arc<Conn>, Dir), Full> {
        let hash = ct.hash(&c.key);
        ct.insert(c, hash)
    }

    #[test]
    fn finds_both_directions_and_bounds_each_port() {
        let ct = Conntrack::new(3, 5, 3);
        let (c, dir) = track(&ct, conn(0, 1000, 17, 0)).unwrap();
        assert_eq!(dir, Dir::Orig);
        let reply = c.key.reversed();
        let (found, dir) = ct.lookup(&reply, ct.hash(&reply)).unwrap();
        assert!(Arc::ptr_eq(&found, &c) && dir == Dir::Reply);
        // The same flow again: the tracked one, not a second entry.
        let (again, _) = track(&ct, conn(0, 1000, 17, 0)).unwrap();
        assert!(Arc::ptr_eq(&again, &c));
        assert_eq!(ct.len(), 1);
        track(&ct, conn(0, 1001, 17, 0)).unwrap();
        track(&ct, conn(0, 1002, 17, 0)).unwrap();
        assert_eq!(track(&ct, conn(0, 1003, 17, 0)).unwrap_err(), Full::Port);
        track(&ct, conn(1, 1004, 17, 0)).unwrap();
        track(&ct, conn(1, 1005, 17, 0)).unwrap();
        assert_eq!(track(&ct, conn(2, 1006, 17, 0)).unwrap_err(), Full::Table);
        ct.remove(&c);
        assert!(!c.alive.load(Ordering::Relaxed));
        assert!(ct.lookup(&reply, ct.hash(&reply)).is_none());
        track(&ct, conn(0, 1003, 17, 0)).unwrap();
        assert_eq!(ct.len(), 5);
    }

    #[test]
    fn the_two_directions_never_share_a_cache_line_wherever_a_conn_lands() {
        // malloc's 16-byte alignment, not memalign's: the gap keeps them apart.
        assert!(std::mem::align_of::<Arc<Conn>>() <= 16);
        assert!(std::mem::align_of::<Conn>() <= 16);
        let c = conn(0, 1000, 17, 0);
        let counted = std::mem::offset_of!(DirCounters, flags) + 1;
        let first_last_byte = &c.dirs[0] as *const DirCounters as usize + counted - 1;
        let second = &c.dirs[1] as *const DirCounters as usize;
        assert!(
            second - first_last_byte > 63,
            "{} bytes apart",
            second - first_last_byte
        );
    }

    #[test]
    fn a_shard_leaves_the_table_its_hash_bits() {
        // hashbrown picks the bucket from the low bits and tells keys apart in a probe by
        // the top seven: within one shard, both must still vary.
        let ct = Conntrack::new(1, 1, 1);
        let (mut top, mut low) = (HashSet::new(), HashSet::new());
        for sport in 0..20_000 {
            let h = ct.hash(&conn(0, sport, 17, 0).key);
            if shard_of(h) == 0 {
                top.insert(h >> 57);
                low.insert(h & 0x3ff);
            }
        }
        assert!(top.len() > 100, "{} of 128 control bytes", top.len());
        assert!(low.len() > 200, "{} of 1024 buckets", low.len());
    }

    #[test]
    fn expires_by_protocol_and_tcp_state() {
        let ct = Conntrack::new(1, 100, 100);
        let (udp, _) = track(&ct, conn(0, 1, 17, 0)).unwrap();
        let (tcp_c, _) = track(&ct, conn(0, 2, PROTO_TCP, 0)).unwrap();
        // The handshake, then data: established lives for days.
        assert!(tcp_c.count(Dir::Orig, 60, TCP_SYN, 0));
        assert!(tcp_c.count(Dir::Reply, 60, TCP_SYN | TCP_ACK, 0));
        assert!(tcp_c.count(Dir::Orig, 60, TCP_ACK, 0));
        assert_eq!(tcp_c.state.load(Ordering::Relaxed), tcp::ESTABLISHED);
        assert!(ct.expired(29, 0, 1).is_empty());
        let ended = ct.expired(30, 0, 1);
        assert!(ended.len() == 1 && Arc::ptr_eq(&ended[0], &udp));
        ct.remove(&udp);
        assert!(ct.expired(400_000, 0, 1).is_empty());
        // RST closes it: ten seconds, and no more data through.
        assert!(tcp_c.count(Dir::Reply, 60, TCP_RST, 100));
        assert!(!tcp_c.count(Dir::Orig, 60, TCP_ACK, 100));
        // Swept in parts: found in one of them.
        let ended: Vec<_> = (0..4).flat_map(|part| ct.expired(110, part, 4)).collect();
        assert_eq!(ended.len(), 1);
        ct.remove(&ended[0]);
        assert!(ct.is_empty());
        let [orig, reply] = tcp_c.totals();
        assert_eq!((orig.0, reply.0, reply.1), (3, 2, 120));
    }

    #[test]
    fn only_a_syn_of_the_opening_side_reopens_a_closed_flow() {
        let ct = Conntrack::new(1, 100, 100);
        let (c, _) = track(&ct, conn(0, 2, PROTO_TCP, 0)).unwrap();
        assert!(c.count(Dir::Orig, 60, TCP_SYN, 0));
        assert!(
            !c.reopened_by(Dir::Orig, TCP_SYN),
            "open: a retransmitted SYN"
        );
        assert!(c.count(Dir::Reply, 60, TCP_SYN | TCP_ACK, 0));
        assert!(c.count(Dir::Orig, 60, TCP_ACK, 0));
        assert!(c.count(Dir::Orig, 60, TCP_RST, 1));
        assert!(c.reopened_by(Dir::Orig, TCP_SYN));
        assert!(!c.reopened_by(Dir::Reply, TCP_SYN));
        assert!(!c.reopened_by(Dir::Orig, TCP_SYN | TCP_ACK));
        assert!(!c.reopened_by(Dir::Orig, TCP_ACK));
        let (udp, _) = track(&ct, conn(0, 3, 17, 0)).unwrap();
        assert!(!udp.reopened_by(Dir::Orig, TCP_SYN));
    }
}
