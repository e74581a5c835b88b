//! The policy stage of the pipeline, between the switch's decision and delivery: which
//! frames a port may send to another. Like the switch it sees a frame's bytes as parsed
//! (`packet::l3`) and port ids only.
//!
//! - `source_guard`: a port sends from its own MAC and addresses only.
//! - `rules`: the ordered allow/deny rules, walked for a flow's first packet.
//! - `conntrack`: the flows allowed, so that their packets and replies pass on a lookup;
//!   each worker keeps the flows it saw last in a cache (`PolicyCache`), so an established
//!   flow costs a cache hit. A rule change bumps the generation: each flow is decided
//!   again at its next packet.
//! - `flow_log`: what was allowed and denied.
//!
//! With no policy configured the stage is one test of a flag per frame.

pub mod conntrack;
pub mod flow_log;
pub mod rate;
pub mod rules;
pub mod source_guard;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};

use crate::config::{Action, ConfigError, SwitchConfig};
use crate::packet::l3::{
    FlowKey, IcmpKind, Ip, IpPacket, L3, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN,
};
use crate::types::{MacAddr, PortId};
use conntrack::{Conn, Conntrack, Dir, Full};
use flow_log::{proto_name, tcp_flags_text, DeniedLog, FlowLog, FlowRecord};
use rate::RateLimiter;
use rules::{count_hit, Decider, PortPolicy, RuleSet};

/// The connection table is swept for expired flows in this many parts, one a second.
const SWEEP_PARTS: usize = 4;

/// Flows each worker remembers (a direct-mapped cache).
const CACHE_SLOTS: usize = 1024;

/// Counters of the policy as a whole.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    /// New flows refused because the table was full, or the port had its share.
    pub table_full: AtomicU64,
    pub port_full: AtomicU64,
    /// Frames from an address or MAC the port does not own.
    pub spoofed: AtomicU64,
}

/// The policy stage's answer for one frame to one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, but over its rule's rate.
    RateLimited,
}

/// A frame as the policy stage decides on it.
#[derive(Clone, Copy)]
pub struct PolicyFrame<'a> {
    pub l3: &'a L3,
    /// Its length in bytes.
    pub len: usize,
    /// It goes to a multicast or broadcast MAC: the rules alone decide, no flow is tracked.
    pub group: bool,
    /// Its flow hash (`packet::flow`, computed at ingress): picks the worker's cache slot,
    /// so that a cached flow costs no hash of its own (the table's, seeded and the same
    /// both ways, was 5 % of a 64 B frame under 10 rules).
    pub hash: u32,
}

struct CachedFlow {
    key: FlowKey,
    conn: Arc<Conn>,
    dir: Dir,
}

/// A worker's view of the policy: the rule set it last saw and the flows it saw last.
pub struct PolicyCache {
    generation: u64,
    /// The rate limiters' clock at the start of the burst.
    rate_now: u64,
    rules: Arc<RuleSet>,
    slots: Box<[Option<CachedFlow>]>,
    /// The last port, MAC and IP source address the anti-spoofing check passed under
    /// `rules`: a burst's frames mostly share them (the check's loads of the port's
    /// entry and its address list were 4 % of a routed 64 B frame under a policy).
    passed_source: Option<(PortId, MacAddr, Ip)>,
    /// What the last verdict's allowing rested on, if it holds for its flow's next
    /// packets (`Policy::repeat`).
    repeatable: Option<Repeatable>,
}

/// An allowing verdict that the next packets of its flow (between the same ports, with
/// the same `packet::signature`) share: the pipeline decides a run of them once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeatable {
    /// No rule is in force: every packet passes.
    NoRules,
    /// The tracked flow in the worker's cache slot `slot` (the connection at address
    /// `conn`, compared, never read), going `dir`: each packet is counted on it.
    Flow { slot: usize, conn: usize, dir: Dir },
}

impl Repeatable {
    fn flow(slot: usize, conn: &Arc<Conn>, dir: Dir) -> Repeatable {
        Repeatable::Flow {
            slot,
            conn: Arc::as_ptr(conn) as usize,
            dir,
        }
    }
}

impl PolicyCache {
    /// What the last verdict's allowing rested on, if its flow's next packets may be
    /// passed by `Policy::repeat`: not under a rate (a port's or the rule's), which
    /// decides by length and time.
    #[inline]
    pub fn repeatable(&self) -> Option<Repeatable> {
        self.repeatable
    }
}

impl Default for PolicyCache {
    fn default() -> Self {
        PolicyCache {
            generation: u64::MAX,
            rate_now: 0,
            rules: Arc::new(RuleSet::default()),
            slots: (0..CACHE_SLOTS).map(|_| None).collect(),
            passed_source: None,
            repeatable: None,
        }
    }
}

pub struct Policy {
    /// The stage runs (rules, or a rate, are configured).
    active: AtomicBool,
    rules: Mutex<Arc<RuleSet>>,
    generation: AtomicU64,
    pub conntrack: Conntrack,
    /// Seconds since start, moved by `tick`: what conntrack's timestamps count in.
    clock: AtomicU32,
    started: Instant,
    started_unix: u64,
    pub counters: PolicyCounters,
    pub denied: DeniedLog,
    full_reported: AtomicU8,
    log: Mutex<Option<FlowLog>>,
    log_interval: u32,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Policy {
    /// The policy of `config`, whose ports are laid out by id (the uplink after them, if
    /// any). Its port table keeps that size: later configs name the same places.
    pub fn new(config: &SwitchConfig) -> Result<Policy, ConfigError> {
        let rules = RuleSet::compile(config)?;
        let ports = rules.ports.len();
        let settings = config.policy.clone().unwrap_or_default();
        if settings.max_flows == 0 || settings.max_flows_per_port == 0 {
            return Err(ConfigError::Policy(
                "max_flows and max_flows_per_port must be at least 1".into(),
            ));
        }
        let log = match &settings.flow_log {
            Some(path) => Some(
                FlowLog::open(path.clone(), settings.flow_log_max_bytes).map_err(|e| {
                    ConfigError::Policy(format!("flow_log {}: {e}", path.display()))
                })?,
            ),
            None => None,
        };
        Ok(Policy {
            active: AtomicBool::new(rules.active),
            rules: Mutex::new(Arc::new(rules)),
            generation: AtomicU64::new(0),
            conntrack: Conntrack::new(ports, settings.max_flows, settings.max_flows_per_port),
            clock: AtomicU32::new(0),
            started: Instant::now(),
            started_unix: unix_now(),
            counters: PolicyCounters::default(),
            denied: DeniedLog::default(),
            full_reported: AtomicU8::new(0),
            log: Mutex::new(log),
            log_interval: settings.flow_log_interval_secs.clamp(1, 86_400) as u32,
        })
    }

    /// Whether the stage runs at all: with no rule and no rate it costs this test.
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `config`'s rules, groups and addresses in force; tracked flows are decided
    /// again at their next packet. An error leaves the running rules as they are.
    pub fn replace(&self, config: &SwitchConfig) -> Result<(), ConfigError> {
        let rules = RuleSet::compile(config)?;
        if rules.ports.len() != self.rules().ports.len() {
            return Err(ConfigError::Policy(
                "the port table's size (max_ports) changes only with a restart".into(),
            ));
        }
        let active = rules.active;
        *self.rules.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
        self.generation.fetch_add(1, Ordering::Release);
        self.active.store(active, Ordering::Relaxed);
        Ok(())
    }

    /// Brings a worker's cache up to the rules in force; once per burst.
    #[inline]
    pub fn refresh(&self, cache: &mut PolicyCache) {
        let g = self.generation.load(Ordering::Acquire);
        if g != cache.generation {
            cache.rules = self.rules();
            cache.generation = g;
            cache.passed_source = None;
        }
        cache.rate_now = (self.started.elapsed().as_nanos() as u64) << rate::SCALE;
    }

    /// Whether port `port`'s rate lets it send a frame of `len` bytes.
    #[inline]
    pub fn tx_allows(&self, cache: &PolicyCache, port: PortId, len: usize) -> bool {
        port_rate_allows(cache, port, len, |p| p.rate_tx.as_ref())
    }

    /// Whether port `port`'s rate lets it receive a frame of `len` bytes.
    #[inline]
    pub fn rx_allows(&self, cache: &PolicyCache, port: PortId, len: usize) -> bool {
        port_rate_allows(cache, port, len, |p| p.rate_rx.as_ref())
    }

    pub fn now(&self) -> u32 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Whether port `src` may send this frame at all (anti-spoofing).
    #[inline]
    pub fn source_allows(
        &self,
        cache: &mut PolicyCache,
        src: PortId,
        mac: MacAddr,
        l3: &L3,
    ) -> bool {
        // What the check decides by, when it is the port, the MAC and the source address
        // alone: an IP packet that claims no neighbour's address, from a specified source
        // (0.0.0.0 passes for a DHCP discover only, `::` for neighbour discovery only).
        let source = match l3 {
            L3::Ip(p)
                if p.nd_target.is_none()
                    && p.key.src != Ip::default()
                    && p.key.src != Ip::v4([0; 4]) =>
            {
                Some((src, mac, p.key.src))
            }
            _ => None,
        };
        if source.is_some() && source == cache.passed_source {
            return true;
        }
        let ok = cache
            .rules
            .ports
            .get(usize::from(src))
            .is_none_or(|p| source_guard::allows(p, mac, l3));
        if ok {
            if source.is_some() {
                cache.passed_source = source;
            }
        } else {
            self.counters.spoofed.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// `verdict`, as a yes or no.
    pub fn allows(
        &self,
        cache: &mut PolicyCache,
        src: PortId,
        dst: PortId,
        f: PolicyFrame<'_>,
        quiet: bool,
    ) -> bool {
        self.verdict(cache, src, dst, f, quiet) == Verdict::Allow
    }

    /// Whether frame `f` from port `src` may go to port `dst`. `quiet`: a copy of a
    /// flooded frame (a refusal is not logged: the copy that reaches the destination's
    /// port once it is learned decides).
    #[inline]
    pub fn verdict(
        &self,
        cache: &mut PolicyCache,
        src: PortId,
        dst: PortId,
        f: PolicyFrame<'_>,
        quiet: bool,
    ) -> Verdict {
        cache.repeatable = None;
        let (verdict, rated) = if !cache.rules.enabled {
            cache.repeatable = Some(Repeatable::NoRules);
            (Verdict::Allow, false)
        } else {
            match self.filter(cache, src, dst, f, quiet) {
                Some(rule) => match rule
                    .and_then(|i| cache.rules.rules.get(i as usize))
                    .and_then(|r| r.rate.as_ref())
                {
                    Some(rate) if !rate.allows(cache.rate_now, f.len) => {
                        (Verdict::RateLimited, true)
                    }
                    rate => (Verdict::Allow, rate.is_some()),
                },
                None => (Verdict::Deny, false),
            }
        };
        // A rate decides by length and time: a verdict under one is not repeated.
        if rated || cache.rules.port_rates {
            cache.repeatable = None;
        }
        verdict
    }

    /// The verdict `r` (from `PolicyCache::repeatable`) again, for the next packet of its
    /// flow, `len` bytes with TCP `tcp_flags` (none of SYN, FIN, RST): counted on the
    /// flow as `verdict` would. None if it no longer holds as it was (the flow ended or
    /// left the cache, the rules changed): `verdict` decides.
    #[inline]
    pub fn repeat(
        &self,
        cache: &PolicyCache,
        r: Repeatable,
        len: usize,
        tcp_flags: u8,
    ) -> Option<Verdict> {
        match r {
            Repeatable::NoRules => (!cache.rules.enabled).then_some(Verdict::Allow),
            Repeatable::Flow { slot, dir, .. } => {
                let f = cache.slots.get(slot)?.as_ref()?;
                if Repeatable::flow(slot, &f.conn, f.dir) != r
                    || !f.conn.alive.load(Ordering::Relaxed)
                    || f.conn.generation.load(Ordering::Relaxed) != cache.generation
                {
                    return None;
                }
                Some(if f.conn.count(dir, len, tcp_flags, self.now()) {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                })
            }
        }
    }

    /// The rules and flows: `Some(rule that allowed it)` or None.
    #[inline]
    fn filter(
        &self,
        cache: &mut PolicyCache,
        src: PortId,
        dst: PortId,
        f: PolicyFrame<'_>,
        quiet: bool,
    ) -> Option<Decider> {
        let (len, group) = (f.len, f.group);
        let p = match f.l3 {
            L3::Arp { .. } => return Some(None),
            L3::BadIp | L3::Other(_) => {
                return (cache.rules.default == Action::Allow).then_some(None)
            }
            L3::Ip(p) => p,
        };
        let rules = &cache.rules;
        let from_outside = rules.ports.get(usize::from(src)).is_some_and(|p| p.uplink);
        match p.icmp {
            Some(IcmpKind::Neighbour) => return Some(None),
            // Never from a guest. From the outside: IPv6's, which hosts need to find their
            // router; IPv4's redirects and advertisements are for the rules to allow.
            Some(IcmpKind::Router) if !from_outside => return None,
            Some(IcmpKind::Router) if !p.key.src.is_v4() => return Some(None),
            Some(IcmpKind::Error) => {
                if let Some(k) = p.related {
                    let h = self.conntrack.hash(&k);
                    if let Some((c, _)) = self.conntrack.lookup(&k, h) {
                        let ports = [c.orig_port, c.reply_port];
                        if ports.contains(&src) && ports.contains(&dst) {
                            return Some(c.rule());
                        }
                    }
                }
            }
            _ => {}
        }
        if p.key.proto == PROTO_UDP && p.key.dport == 67 && p.key.sport == 68 {
            return Some(None);
        }
        // A DHCP server's reply: from the outside only, whatever the rules (a rogue server
        // in a guest would hand its neighbours another gateway).
        if p.key.proto == PROTO_UDP && p.key.sport == 67 && p.key.dport == 68 {
            return from_outside.then_some(None);
        }
        if group || p.later_fragment {
            let (action, rule) = rules.decide(src, dst, &p.key);
            if action == Action::Deny && !quiet {
                self.deny(src, dst, p, len, rule);
            }
            return (action == Action::Allow).then_some(rule);
        }
        self.stateful(cache, src, dst, p, f, quiet)
    }

    #[inline]
    fn stateful(
        &self,
        cache: &mut PolicyCache,
        src: PortId,
        dst: PortId,
        p: &IpPacket,
        f: PolicyFrame<'_>,
        quiet: bool,
    ) -> Option<Decider> {
        let now = self.now();
        let len = f.len;
        let slot = f.hash as usize % CACHE_SLOTS;
        if let Some(f) = &cache.slots[slot] {
            if f.key == p.key
                && f.conn.alive.load(Ordering::Relaxed)
                && f.conn.generation.load(Ordering::Relaxed) == cache.generation
            {
                if !on_path(&f.conn, f.dir, src, dst) {
                    return self.stateless(cache, src, dst, p, len, quiet);
                }
                if !f.conn.reopened_by(f.dir, p.tcp_flags) {
                    let ok = f
                        .conn
                        .count(f.dir, len, p.tcp_flags, now)
                        .then(|| f.conn.rule());
                    if ok.is_some() {
                        cache.repeatable = Some(Repeatable::flow(slot, &f.conn, f.dir));
                    }
                    return ok;
                }
                // A new connection on a closed one's key: that one ends, this one is new.
                let old = f.conn.clone();
                cache.slots[slot] = None;
                self.end(&old, &cache.rules);
            }
        }
        let hash = self.conntrack.hash(&p.key);
        if let Some((conn, dir)) = self.conntrack.lookup(&p.key, hash) {
            if conn.generation.load(Ordering::Relaxed) != cache.generation {
                // The rules changed since it was allowed: decide it again.
                let (action, rule) = cache
                    .rules
                    .decide(conn.orig_port, conn.reply_port, &conn.key);
                if action == Action::Deny {
                    self.end(&conn, &cache.rules);
                    return self.stateless(cache, src, dst, p, len, quiet);
                }
                conn.set_rule(rule);
                conn.generation.store(cache.generation, Ordering::Relaxed);
            }
            if !on_path(&conn, dir, src, dst) {
                return self.stateless(cache, src, dst, p, len, quiet);
            }
            if conn.reopened_by(dir, p.tcp_flags) {
                // As above: ended, and decided below as the new connection it is.
                self.end(&conn, &cache.rules);
            } else {
                let ok = conn.count(dir, len, p.tcp_flags, now).then(|| conn.rule());
                if ok.is_some() {
                    cache.repeatable = Some(Repeatable::flow(slot, &conn, dir));
                }
                cache.slots[slot] = Some(CachedFlow {
                    key: p.key,
                    conn,
                    dir,
                });
                return ok;
            }
        }
        let (action, rule) = cache.rules.decide(src, dst, &p.key);
        if action == Action::Deny {
            if !quiet {
                self.deny(src, dst, p, len, rule);
            }
            return None;
        }
        // A TCP flow begins with a SYN; anything else has no connection to belong to.
        if p.key.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            if !quiet {
                self.deny(src, dst, p, len, rule);
            }
            return None;
        }
        // Unix time from the switch's second clock: a clock read per new flow was 3 %.
        let started = self.started_unix + u64::from(now);
        let conn = Conn::new(p.key, src, dst, rule, cache.generation, started, now);
        match self.conntrack.insert(conn, hash) {
            Ok((conn, dir)) => {
                count_hit(&cache.rules, rule);
                let ok = (on_path(&conn, dir, src, dst) && conn.count(dir, len, p.tcp_flags, now))
                    .then(|| conn.rule());
                if ok.is_some() {
                    cache.repeatable = Some(Repeatable::flow(slot, &conn, dir));
                }
                cache.slots[slot] = Some(CachedFlow {
                    key: p.key,
                    conn,
                    dir,
                });
                ok
            }
            Err(full) => {
                self.full(full, src);
                None
            }
        }
    }

    /// A packet on a tracked flow's key but between other ports: the rules alone decide,
    /// and it starts no flow of its own.
    fn stateless(
        &self,
        cache: &PolicyCache,
        src: PortId,
        dst: PortId,
        p: &IpPacket,
        len: usize,
        quiet: bool,
    ) -> Option<Decider> {
        let (action, rule) = cache.rules.decide(src, dst, &p.key);
        if action == Action::Deny && !quiet {
            self.deny(src, dst, p, len, rule);
        }
        (action == Action::Allow).then_some(rule)
    }

    #[cold]
    fn deny(&self, src: PortId, dst: PortId, p: &IpPacket, len: usize, rule: Decider) {
        self.denied.record(
            src,
            dst,
            &p.key,
            len,
            rule,
            self.started_unix + u64::from(self.now()),
        );
    }

    #[cold]
    fn full(&self, full: Full, src: PortId) {
        let (counter, bit, what) = match full {
            Full::Table => (&self.counters.table_full, 1, "the connection table is full"),
            Full::Port => (
                &self.counters.port_full,
                2,
                "the port has its share of flows",
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Read first: a full table refuses every new flow's frame, and a locked OR on each
        // would bounce the line between workers.
        if self.full_reported.load(Ordering::Relaxed) & bit == 0
            && self.full_reported.fetch_or(bit, Ordering::Relaxed) & bit == 0
        {
            let rules = self.rules();
            warn!(
                "policy: new flows from port {} refused: {what} (max_flows {}, \
                 max_flows_per_port {}); counted, reported once",
                rules.port_name(src),
                self.conntrack.max,
                self.conntrack.max_per_port
            );
        }
    }

    /// Stops tracking `conn`, logs it as ended and adds its traffic to its rule's.
    fn end(&self, conn: &Conn, rules: &RuleSet) {
        if !conn.alive.load(Ordering::Relaxed) {
            return;
        }
        self.conntrack.remove(conn);
        let [a, b] = conn.totals();
        if let Some(r) = conn.rule().and_then(|i| rules.rules.get(i as usize)) {
            r.counters.packets.fetch_add(a.0 + b.0, Ordering::Relaxed);
            r.counters.bytes.fetch_add(a.1 + b.1, Ordering::Relaxed);
        }
        self.log_conn(conn, "end", rules);
    }

    /// Ends every tracked flow matching `filter`; returns how many.
    pub fn flush(&self, filter: impl Fn(&Conn) -> bool) -> usize {
        let rules = self.rules();
        let mut n = 0;
        for c in self.conntrack.all().iter().filter(|c| filter(c)) {
            self.end(c, &rules);
            n += 1;
        }
        n
    }

    /// Once a second: moves the clock, ends expired flows and writes the flow log.
    pub fn tick(&self) {
        let now = self.started.elapsed().as_secs() as u32;
        self.clock.store(now, Ordering::Relaxed);
        if !self.active() && self.conntrack.is_empty() {
            return;
        }
        let rules = self.rules();
        // Each part of the table every `SWEEP_PARTS` seconds: a flow ends up to that much
        // after its timeout (the shortest is 10 s).
        for c in self.conntrack.expired(now, now as usize, SWEEP_PARTS) {
            self.end(&c, &rules);
        }
        if now.is_multiple_of(self.log_interval) {
            self.log_interval_records(&rules);
        }
        if self.full_reported.load(Ordering::Relaxed) != 0
            && self.conntrack.len() * 2 < self.conntrack.max
        {
            self.full_reported.store(0, Ordering::Relaxed);
        }
    }

    fn log_interval_records(&self, rules: &RuleSet) {
        if self.log.lock().map_or(true, |l| l.is_none()) {
            self.denied.take();
            return;
        }
        for c in self.conntrack.all() {
            self.log_conn(&c, "interval", rules);
        }
        let end = unix_now();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(log) = log.as_mut() else { return };
        for ((src, dst, key), d) in self.denied.take() {
            log.write(&self.record(
                "denied",
                (d.first_unix, end),
                (src, dst),
                &key,
                [(d.packets, d.bytes), (0, 0)],
                0,
                ("deny", rules.decider_name(d.rule)),
                rules,
            ));
        }
    }

    /// Logs what `conn` carried since it was last logged (an `interval` record with
    /// nothing new is left out).
    fn log_conn(&self, conn: &Conn, event: &str, rules: &RuleSet) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(log) = log.as_mut() else { return };
        let totals = conn.totals();
        let mut logged = conn.logged.lock().unwrap_or_else(|e| e.into_inner());
        let delta = [0, 1].map(|i| (totals[i].0 - logged[i].0, totals[i].1 - logged[i].1));
        if event == "interval" && delta[0].0 + delta[1].0 == 0 {
            return;
        }
        *logged = totals;
        let flags =
            conn.dirs[0].flags.load(Ordering::Relaxed) | conn.dirs[1].flags.load(Ordering::Relaxed);
        log.write(&self.record(
            event,
            (
                conn.started_unix,
                self.started_unix + u64::from(conn.last_seen()),
            ),
            (conn.orig_port, conn.reply_port),
            &conn.key,
            delta,
            flags,
            ("allow", rules.decider_name(conn.rule())),
            rules,
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn record<'a>(
        &'a self,
        event: &'a str,
        (start, end): (u64, u64),
        (src, dst): (PortId, PortId),
        key: &FlowKey,
        counts: [(u64, u64); 2],
        flags: u8,
        (verdict, rule): (&'a str, &'a str),
        rules: &'a RuleSet,
    ) -> FlowRecord<'a> {
        let groups = |p: PortId| {
            rules
                .ports
                .get(usize::from(p))
                .map_or(Vec::new(), |p| rules.group_names(p.groups))
        };
        FlowRecord {
            event,
            start,
            end: end.max(start),
            src_port: rules.port_name(src),
            dst_port: rules.port_name(dst),
            src_groups: groups(src),
            dst_groups: groups(dst),
            segment: key.zone,
            proto: proto_name(key.proto),
            src: key.src.to_string(),
            dst: key.dst.to_string(),
            sport: key.sport,
            dport: key.dport,
            packets: counts[0].0,
            bytes: counts[0].1,
            packets_back: counts[1].0,
            bytes_back: counts[1].1,
            tcp_flags: tcp_flags_text(flags),
            verdict,
            rule,
        }
    }

    /// Logs a summary at shutdown and writes what the log has not yet shown.
    pub fn finish(&self) {
        if !self.active() {
            return;
        }
        let rules = self.rules();
        for c in self.conntrack.all() {
            self.end(&c, &rules);
        }
        self.log_interval_records(&rules);
        info!(
            "policy: {} spoofed frames, {} flows refused for a full table",
            self.counters.spoofed.load(Ordering::Relaxed),
            self.counters.table_full.load(Ordering::Relaxed)
                + self.counters.port_full.load(Ordering::Relaxed)
        );
    }
}

/// Whether port `port`'s rate in one direction (`rate`) lets a frame of `len` bytes pass.
#[inline]
fn port_rate_allows(
    cache: &PolicyCache,
    port: PortId,
    len: usize,
    rate: impl Fn(&PortPolicy) -> Option<&RateLimiter>,
) -> bool {
    !cache.rules.port_rates
        || cache
            .rules
            .ports
            .get(usize::from(port))
            .and_then(rate)
            .is_none_or(|r| r.allows(cache.rate_now, len))
}

/// Whether a packet going `dir` from `src` to `dst` travels between the flow's ports.
#[inline]
fn on_path(c: &Conn, dir: Dir, src: PortId, dst: PortId) -> bool {
    match dir {
        Dir::Orig => src == c.orig_port && dst == c.reply_port,
        Dir::Reply => src == c.reply_port && dst == c.orig_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortConfig;
    use crate::packet::l3::{Ip, PROTO_ICMP, PROTO_ICMPV6, TCP_FIN, TCP_RST};
    use crate::policy::conntrack::tcp;

    const WEB: PortId = 0;
    const APP: PortId = 1;
    const DB: PortId = 2;

    fn config(extra: &str) -> SwitchConfig {
        let mut c = SwitchConfig::from_toml(&format!(
            "[[rule]]\nname = \"web-app\"\naction = \"allow\"\nfrom = \"web\"\nto = \"app\"\n\
             proto = \"tcp\"\nports = 8080\n{extra}"
        ))
        .unwrap();
        for (i, g) in ["web", "app", "db"].iter().enumerate() {
            c.ports.push(PortConfig {
                name: format!("{g}1"),
                socket: format!("/{g}").into(),
                groups: vec![g.to_string()],
                addresses: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
                ..Default::default()
            });
        }
        c
    }

    fn policy(extra: &str) -> (Policy, PolicyCache) {
        let c = config(extra);
        let p = Policy::new(&c).unwrap();
        let mut cache = PolicyCache::default();
        p.refresh(&mut cache);
        (p, cache)
    }

    fn fr(l3: &L3, len: usize) -> PolicyFrame<'_> {
        PolicyFrame {
            l3,
            len,
            group: false,
            hash: 0,
        }
    }

    fn tcp(src: PortId, dst: PortId, sport: u16, dport: u16, flags: u8) -> L3 {
        L3::Ip(IpPacket {
            key: FlowKey {
                src: Ip::v4([10, 0, 0, src as u8 + 1]),
                dst: Ip::v4([10, 0, 0, dst as u8 + 1]),
                sport,
                dport,
                proto: PROTO_TCP,
                zone: 0,
            },
            tcp_flags: flags,
            icmp: None,
            related: None,
            nd_target: None,
            nd_is_advert: false,
            later_fragment: false,
        })
    }

    #[test]
    fn a_source_passed_before_is_passed_again_for_its_port_mac_and_address_only() {
        let mut cfg = config("");
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        cfg.ports[WEB as usize].mac = Some(mac);
        let p = Policy::new(&cfg).unwrap();
        let mut c = PolicyCache::default();
        p.refresh(&mut c);
        let own = tcp(WEB, APP, 40000, 8080, TCP_SYN);
        let not_own = tcp(APP, WEB, 40000, 8080, TCP_SYN);
        assert!(p.source_allows(&mut c, WEB, mac, &own));
        assert!(p.source_allows(&mut c, WEB, mac, &own), "the same, again");
        assert!(
            !p.source_allows(&mut c, WEB, mac, &not_own),
            "another address"
        );
        assert!(!p.source_allows(&mut c, WEB, MacAddr([2, 0, 0, 0, 0, 9]), &own));
        assert!(!p.source_allows(&mut c, APP, mac, &own), "another port");
        assert!(p.source_allows(&mut c, WEB, mac, &own));
        // The port loses the address: what passed before is refused from the next burst.
        cfg.ports[WEB as usize].addresses = vec!["10.0.0.9".parse().unwrap()];
        p.replace(&cfg).unwrap();
        p.refresh(&mut c);
        assert!(!p.source_allows(&mut c, WEB, mac, &own));
        assert_eq!(p.counters.spoofed.load(Ordering::Relaxed), 4);
    }

    fn udp(src: PortId, dst: PortId, sport: u16, dport: u16) -> L3 {
        match tcp(src, dst, sport, dport, 0) {
            L3::Ip(mut p) => {
                p.key.proto = PROTO_UDP;
                L3::Ip(p)
            }
            other => other,
        }
    }

    #[test]
    fn a_guest_is_no_dhcp_server_and_no_router_whatever_the_rules() {
        let (p, mut c) = policy("[policy]\ndefault = \"allow\"\n");
        let mut pass = |src, dst, l3: L3| p.allows(&mut c, src, dst, fr(&l3, 300), false);
        assert!(pass(WEB, APP, udp(WEB, APP, 68, 67)), "a client's request");
        assert!(
            pass(WEB, APP, udp(WEB, APP, 5353, 53)),
            "the default allows UDP"
        );
        assert!(!pass(WEB, APP, udp(WEB, APP, 67, 68)), "a server's offer");
        let L3::Ip(mut redirect) = tcp(WEB, APP, 0, 0, 0) else {
            unreachable!()
        };
        redirect.key.proto = PROTO_ICMP;
        redirect.icmp = Some(IcmpKind::Router);
        assert!(!pass(WEB, APP, L3::Ip(redirect)), "an ICMP redirect");
    }

    #[test]
    fn the_outside_sends_dhcp_replies_and_router_messages_as_the_rules_say() {
        // The uplink is the port after the three VMs'.
        const UPLINK: PortId = 3;
        let router = |v6: bool| {
            let L3::Ip(mut m) = tcp(UPLINK, WEB, 0, 0, 0) else {
                unreachable!()
            };
            m.key.proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
            if v6 {
                m.key.src = Ip::from_octets([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                m.key.dst = Ip::from_octets([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            }
            m.icmp = Some(IcmpKind::Router);
            L3::Ip(m)
        };
        for (default, redirect_passes) in [("deny", false), ("allow", true)] {
            let (p, mut c) = policy(&format!(
                "[policy]\ndefault = \"{default}\"\n[uplink]\ntap = \"t0\"\n"
            ));
            let mut pass = |src, dst, l3: L3| p.allows(&mut c, src, dst, fr(&l3, 300), false);
            assert!(
                pass(UPLINK, WEB, udp(UPLINK, WEB, 67, 68)),
                "{default}: a DHCP reply"
            );
            assert!(
                pass(UPLINK, WEB, router(true)),
                "{default}: an IPv6 advertisement"
            );
            assert_eq!(
                pass(UPLINK, WEB, router(false)),
                redirect_passes,
                "{default}: an IPv4 redirect"
            );
            // From a guest, neither, whatever the rules.
            assert!(
                !pass(WEB, APP, router(false)),
                "{default}: a guest's redirect"
            );
            assert!(
                !pass(WEB, APP, udp(WEB, APP, 67, 68)),
                "{default}: a guest's offer"
            );
        }
    }

    #[test]
    fn allowed_flows_get_replies_and_nothing_else_passes() {
        let (p, mut c) = policy("");
        let mut pass = |src, dst, l3: L3| p.allows(&mut c, src, dst, fr(&l3, 60), false);
        assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_SYN)));
        assert!(pass(
            APP,
            WEB,
            tcp(APP, WEB, 8080, 40000, TCP_SYN | TCP_ACK)
        ));
        assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_ACK)));
        assert!(pass(APP, WEB, tcp(APP, WEB, 8080, 40000, TCP_ACK)));
        // The reverse as a new connection, another port, a mid-stream packet: denied.
        assert!(!pass(APP, WEB, tcp(APP, WEB, 40001, 8080, TCP_SYN)));
        assert!(!pass(WEB, DB, tcp(WEB, DB, 40002, 8080, TCP_SYN)));
        assert!(!pass(WEB, APP, tcp(WEB, APP, 40003, 8080, TCP_ACK)));
        // A reply forged by a third port, with the flow's addresses: not on the flow's path.
        assert!(!pass(DB, WEB, tcp(APP, WEB, 8080, 40000, TCP_ACK)));
        assert_eq!(p.conntrack.len(), 1);
        let conn = p.conntrack.all().pop().unwrap();
        assert_eq!(conn.state.load(Ordering::Relaxed), tcp::ESTABLISHED);
        assert_eq!(conn.totals()[0].0, 2);
        // Teardown: FINs both ways, then it expires two minutes later.
        assert!(pass(
            WEB,
            APP,
            tcp(WEB, APP, 40000, 8080, TCP_FIN | TCP_ACK)
        ));
        assert!(pass(
            APP,
            WEB,
            tcp(APP, WEB, 8080, 40000, TCP_FIN | TCP_ACK)
        ));
        assert_eq!(conn.state.load(Ordering::Relaxed), tcp::TIME_WAIT);
        assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_RST)));
        assert!(!pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_ACK)));
        assert_eq!(p.rules().rules[0].counters.hits.load(Ordering::Relaxed), 1);
        // Three denied attempts (the forged reply is denied too), aggregated by flow.
        assert_eq!(p.denied.take().len(), 4);
    }

    #[test]
    fn a_syn_on_a_closed_flows_key_ends_it_and_tracks_a_new_connection() {
        let (p, mut c) = policy("");
        let mut pass = |src, dst, l3: L3| p.allows(&mut c, src, dst, fr(&l3, 60), false);
        let handshake = |pass: &mut dyn FnMut(PortId, PortId, L3) -> bool| {
            assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_SYN)));
            assert!(pass(
                APP,
                WEB,
                tcp(APP, WEB, 8080, 40000, TCP_SYN | TCP_ACK)
            ));
            assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_ACK)));
        };
        handshake(&mut pass);
        let first = p.conntrack.all().pop().unwrap();
        // Reset; the client takes the same port again at once.
        assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_RST)));
        assert!(!pass(APP, WEB, tcp(APP, WEB, 8080, 40000, TCP_ACK)));
        handshake(&mut pass);
        let second = p.conntrack.all().pop().unwrap();
        assert!(!first.alive.load(Ordering::Relaxed), "the old one ended");
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.totals()[0].0, 2, "its own counters: SYN, ACK");
        assert_eq!(second.state.load(Ordering::Relaxed), tcp::ESTABLISHED);
        // After FINs both ways (TIME_WAIT) too; still one flow tracked.
        assert!(pass(
            WEB,
            APP,
            tcp(WEB, APP, 40000, 8080, TCP_FIN | TCP_ACK)
        ));
        assert!(pass(
            APP,
            WEB,
            tcp(APP, WEB, 8080, 40000, TCP_FIN | TCP_ACK)
        ));
        handshake(&mut pass);
        assert_eq!(p.conntrack.len(), 1);
        // Only the side that opened it, and as the rules say: app may not open to web.
        assert!(pass(WEB, APP, tcp(WEB, APP, 40000, 8080, TCP_RST)));
        assert!(!pass(APP, WEB, tcp(APP, WEB, 8080, 40000, TCP_SYN)));
        // Ended flows count in their rule's totals.
        assert!(p.rules().rules[0].counters.packets.load(Ordering::Relaxed) >= 5);
    }

    #[test]
    fn a_rule_change_decides_tracked_flows_again() {
        let (p, mut c) = policy("");
        assert!(p.allows(
            &mut c,
            WEB,
            APP,
            fr(&tcp(WEB, APP, 1, 8080, TCP_SYN), 60),
            false
        ));
        // The same file without the rule: the flow's next packet is refused.
        let mut none = config("");
        none.rules.clear();
        none.policy = Some(Default::default());
        p.replace(&none).unwrap();
        p.refresh(&mut c);
        assert!(!p.allows(
            &mut c,
            WEB,
            APP,
            fr(&tcp(WEB, APP, 1, 8080, TCP_ACK), 60),
            false
        ));
        assert!(p.conntrack.is_empty(), "the flow is no longer tracked");
        // A config that does not compile changes nothing.
        let mut bad = config("");
        bad.rules[0].to = crate::config::policy::OneOrMany::One("nowhere".into());
        assert!(p.replace(&bad).is_err());
        assert!(p.rules().rules.is_empty());
    }

    #[test]
    fn related_icmp_errors_pass_for_tracked_flows_only() {
        let (p, mut c) = policy("");
        assert!(p.allows(
            &mut c,
            WEB,
            APP,
            fr(&tcp(WEB, APP, 7, 8080, TCP_SYN), 60),
            false
        ));
        let L3::Ip(syn) = tcp(WEB, APP, 7, 8080, TCP_SYN) else {
            unreachable!()
        };
        let unreachable = |related: FlowKey| {
            L3::Ip(IpPacket {
                key: FlowKey {
                    src: related.dst,
                    dst: related.src,
                    proto: PROTO_ICMP,
                    ..Default::default()
                },
                icmp: Some(IcmpKind::Error),
                related: Some(related),
                ..syn
            })
        };
        assert!(p.allows(&mut c, APP, WEB, fr(&unreachable(syn.key), 90), false));
        let mut other = syn.key;
        other.dport = 22;
        assert!(!p.allows(&mut c, APP, WEB, fr(&unreachable(other), 90), false));
        assert!(!p.allows(&mut c, DB, WEB, fr(&unreachable(syn.key), 90), false));
    }

    #[test]
    fn a_full_table_refuses_new_flows_of_that_port_only() {
        let (p, mut c) = policy(
            "[policy]\nmax_flows = 100\nmax_flows_per_port = 3\n[[rule]]\naction = \"allow\"\n",
        );
        for sport in 0..3 {
            assert!(p.allows(
                &mut c,
                WEB,
                DB,
                fr(&tcp(WEB, DB, sport, 5432, TCP_SYN), 60),
                false
            ));
        }
        assert!(!p.allows(
            &mut c,
            WEB,
            DB,
            fr(&tcp(WEB, DB, 9, 5432, TCP_SYN), 60),
            false
        ));
        assert!(p.allows(
            &mut c,
            APP,
            DB,
            fr(&tcp(APP, DB, 9, 5432, TCP_SYN), 60),
            false
        ));
        assert_eq!(p.counters.port_full.load(Ordering::Relaxed), 1);
        // The tracked ones still pass.
        assert!(p.allows(
            &mut c,
            WEB,
            DB,
            fr(&tcp(WEB, DB, 1, 5432, TCP_ACK), 60),
            false
        ));
    }
}
