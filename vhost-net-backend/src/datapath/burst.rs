//! THE pipeline. Every frame that entered the switch (checked by `packet::ingress` in the
//! driver that took it in) goes through here, a burst at a time:
//!
//! decision (`switch`; `route` for frames to a gateway) -> policy -> delivery
//! (`endpoint`) -> notification flush.
//!
//! It is the only place where a decision meets a delivery. Frames of a VM's TX burst that
//! go to one VM's RX queue one after another are written under one lock of it (a run).
//! A burst's frames mostly belong to a few flows: a frame with the signature of a frame of
//! its flow decided before it in the burst (`packet::signature`: all that the switch, the
//! router and the policy read of it; up to `SHARED_FLOWS` flows kept at once) takes
//! that decision, its policy verdict repeated and counted (`Policy::repeat`), without the
//! parse, the lookups and the rule checks (under a policy, routed: 0.69 of plain L2's rate
//! at 64 B before, 0.90 after, by `perf` shares).

use std::cell::OnceCell;

use crate::counters::DropReason;
use crate::endpoint::frame::{Frame, TxFrame, MAX_HEAD};
use crate::endpoint::vm::{RxScratch, VmPort};
use crate::endpoint::{Endpoint, SwitchPort};
use crate::mem::Ram;
use crate::packet::build;
use crate::packet::l3::{self, L3};
use crate::packet::meta::FrameMeta;
use crate::packet::rewrite;
use crate::packet::signature::Signature;
use crate::policy::{PolicyCache, PolicyFrame, Repeatable, Verdict};
use crate::route::counters::{RouteId, RouteTally};
use crate::route::flow_cache::{FlowOrigin, RouteCache};
use crate::route::neighbour::{Neighbour, NeighbourCache};
use crate::route::Routing;
use crate::switch::{DecisionCache, Forward};
use crate::types::{MacAddr, PortId};
use crate::virtio::chain::Segment;
use crate::virtio::copy::FrameSource;
use crate::virtio::NetHdr;

use super::Datapath;

/// Frames taken in at once from one port.
#[derive(Clone, Copy)]
pub enum Burst<'a> {
    /// Frames still in a guest's TX buffers: its memory, the burst's buffers, the frames.
    Guest {
        ram: &'a Ram,
        segs: &'a [Segment],
        frames: &'a [TxFrame],
    },
    /// One frame in a local buffer (from the tap).
    Local(Frame<'a>),
}

impl<'a> Burst<'a> {
    fn len(&self) -> usize {
        match self {
            Burst::Guest { frames, .. } => frames.len(),
            Burst::Local(_) => 1,
        }
    }

    /// The Ethernet header of frame `i` and its segment (`segment`, that of the port it
    /// came in on, unless a local frame knows its own).
    #[inline]
    fn eth(&self, i: usize, segment: u16) -> (&'a [u8; 14], u16) {
        match *self {
            Burst::Guest { frames, .. } => (frames[i].eth(), segment),
            Burst::Local(f) => (f.eth(), f.segment),
        }
    }

    /// Frame `i`'s first bytes (up to `MAX_HEAD`, from its Ethernet header on) and its
    /// length, for the policy.
    #[inline]
    fn head(&self, i: usize) -> (&'a [u8], usize) {
        match *self {
            Burst::Guest { frames, .. } => (frames[i].head(), frames[i].len),
            Burst::Local(f) => match f.src {
                FrameSource::Local(b) => (&b[..b.len().min(MAX_HEAD)], b.len()),
                src => (f.head, src.len()),
            },
        }
    }

    /// Frame `i`'s flow hash.
    #[inline]
    fn hash(&self, i: usize) -> u32 {
        match *self {
            Burst::Guest { frames, .. } => frames[i].hash,
            Burst::Local(f) => f.hash,
        }
    }

    /// Frame `i`, from a port in `segment` (a local frame knows its own).
    #[inline]
    fn frame(&self, i: usize, segment: u16) -> Frame<'a> {
        match *self {
            Burst::Guest { ram, segs, frames } => frames[i].frame(ram, segs, segment),
            Burst::Local(f) => f,
        }
    }
}

/// A worker's buffers and caches for the pipeline, allocated once.
#[derive(Default)]
pub struct Scratch {
    rx: RxScratch,
    decisions: DecisionCache,
    /// The decision for each frame of a burst.
    forwards: Vec<Forward>,
    policy: PolicyCache,
    made: Made,
    /// A DHCP message, copied whole out of the guest for the server to read.
    request: Vec<u8>,
    neighbours: NeighbourCache,
    route_decisions: RouteCache,
    /// The burst's last routed flow and where it went: the frames of a burst mostly
    /// belong to one flow, whose decision holds for the burst (the route cache's hash and
    /// probe were 5 % of a routed 64 B frame).
    last_route: Option<(FlowOrigin, Neighbour, RouteId)>,
    /// What the burst routed, by route, until `flush` adds it up.
    routes: RouteTally,
    /// The route of the frame being decided, counted once the policy lets it go.
    pending_route: Option<RouteId>,
    /// The heads of a run of routed frames, as rewritten for their next hop.
    routed_heads: Vec<[u8; MAX_HEAD]>,
    /// The MACs of the burst's next hops, by `Forward::Routed`'s `hop`.
    next_hops: Vec<MacAddr>,
}

/// Flows of a burst whose decisions are kept for their next frames: a guest's burst of
/// several connections interleaves their frames.
const SHARED_FLOWS: usize = 4;

/// The switch's and the router's state versions, read before a decision: a decision taken
/// before another frame of the burst changed either (a MAC learned or moved, a neighbour
/// learned) is not shared.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Versions {
    macs: u64,
    neighbours: u64,
}

impl Versions {
    #[inline]
    fn now(dp: &Datapath) -> Versions {
        Versions {
            macs: dp.switch.macs.version(),
            neighbours: dp.router.neighbours.generation(),
        }
    }
}

/// A frame decided the long way whose decision the next frames of its flow in the burst
/// share: those with its signature, from its segment.
struct Decided {
    /// The frame's number in the burst and its flow hash, compared first: a frame of
    /// another flow (every frame, with a new connection each) costs one compare, not a
    /// signature (about 4 % of the new-connection case when each frame's was read).
    at: usize,
    hash: u32,
    segment: u16,
    /// Its signature, read when a frame first might share it (None: none may).
    signature: OnceCell<Option<Signature>>,
    forward: Forward,
    route: Option<RouteId>,
    /// The policy's verdict, to repeat (None: no policy).
    policy: Option<Repeatable>,
    /// What the decision was taken on.
    versions: Versions,
}

impl Decided {
    /// Frame `at`'s decision `forward` (from a port in `segment`, with flow hash `hash`),
    /// if the frames of its flow may share it: to one port (switched or routed) and, under
    /// a policy, allowed by a verdict that holds for the flow's next packets.
    #[inline]
    fn of(
        at: usize,
        hash: u32,
        segment: u16,
        forward: Forward,
        route: Option<RouteId>,
        policy: Option<&PolicyCache>,
        versions: Versions,
    ) -> Option<Decided> {
        if !matches!(forward, Forward::To(_) | Forward::Routed { .. }) {
            return None;
        }
        let policy = match policy {
            Some(cache) => Some(cache.repeatable()?),
            None => None,
        };
        Some(Decided {
            at,
            hash,
            segment,
            signature: OnceCell::new(),
            forward,
            route,
            policy,
            versions,
        })
    }

    /// Whether frame `i` of `burst` (from a port in `segment`) is of this flow, as its
    /// decisions see it; its signature if so. `last` is the burst's last frame decided the
    /// long way: one after this flow's may have changed what its decision was taken on.
    #[inline]
    fn shared_by(
        &self,
        dp: &Datapath,
        burst: Burst<'_>,
        i: usize,
        segment: u16,
        last: usize,
    ) -> Option<Signature> {
        if self.hash != burst.hash(i) || self.segment != segment {
            return None;
        }
        if self.at != last && Versions::now(dp) != self.versions {
            return None;
        }
        let ours = (*self
            .signature
            .get_or_init(|| Signature::of(burst.head(self.at).0)))?;
        (Signature::of(burst.head(i).0) == Some(ours)).then_some(ours)
    }
}

/// The number of next hop `mac` in `hops`: the last one again for a frame of the same flow.
#[inline]
fn hop_number(hops: &mut Vec<MacAddr>, mac: MacAddr) -> u16 {
    if hops.last() != Some(&mac) {
        hops.push(mac);
    }
    (hops.len() - 1) as u16
}

/// The largest DHCP message the server reads (RFC 2131's clients may ask for up to 1500
/// byte replies; their requests are smaller).
const MAX_DHCP_FRAME: usize = 1514;

/// Frames the router wrote for a burst (answers, questions), one after another, and where
/// each is.
#[derive(Default)]
struct Made {
    bytes: Vec<u8>,
    at: Vec<(usize, usize)>,
}

impl Made {
    fn clear(&mut self) {
        self.bytes.clear();
        self.at.clear();
    }

    /// Frame `n`, as a frame in `segment`.
    fn frame(&self, n: u16, segment: u16) -> Frame<'_> {
        let (start, len) = self.at[usize::from(n)];
        let bytes = &self.bytes[start..start + len];
        Frame {
            hdr: NetHdr::default(),
            src: FrameSource::Local(bytes),
            head: &bytes[..len.min(MAX_HEAD)],
            hash: 0,
            segment,
        }
    }

    /// Notes the frame appended from `start` on; its number.
    fn note(&mut self, start: usize) -> u16 {
        self.at.push((start, self.bytes.len() - start));
        (self.at.len() - 1) as u16
    }
}

/// Decides and delivers a burst of frames that came in on `from`. The queues written are
/// interrupted by `flush`, which the caller runs once it holds nothing another port needs.
pub fn run(dp: &Datapath, from: &SwitchPort, burst: Burst<'_>, s: &mut Scratch) {
    s.forwards.clear();
    s.made.clear();
    s.next_hops.clear();
    s.last_route = None;
    let ports = dp.ports.load();
    let policy = dp.policy.active();
    let routing = dp.router.active();
    let router_mac = dp.router.mac.0;
    if policy {
        dp.policy.refresh(&mut s.policy);
    }
    // Without a policy or a router, a frame's decision is the MAC table's cached one and
    // there is nothing to share.
    let share = policy || routing;
    let mut decided: [Option<Decided>; SHARED_FLOWS] = Default::default();
    // The slot the next new flow takes (the oldest: flows are taken in turn).
    let mut next_slot = 0;
    let mut last_long = 0;
    for i in 0..burst.len() {
        let (eth, segment) = burst.eth(i, from.segment);
        let (head, len) = burst.head(i);
        let hash = burst.hash(i);
        // Any slot, not one chosen by hash: four flows hashed into four slots collided in
        // most bursts, and colliding flows took each other's place at every frame.
        let slot = decided
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| d.hash == hash));
        if let Some(d) = slot.and_then(|k| decided[k].as_ref()) {
            if let Some(signature) = d.shared_by(dp, burst, i, segment, last_long) {
                if let Some(forward) = decided_again(dp, d, signature, len, s) {
                    s.forwards.push(forward);
                    continue;
                }
            }
        }
        last_long = i;
        let versions = if share {
            Versions::now(dp)
        } else {
            Versions::default()
        };
        let meta = FrameMeta::parse(eth);
        let to_router = routing && dp.router.may_want(&meta, segment);
        // Parsed where it is used, not kept per frame: a copy of it measured 5 % of the
        // time at 64 B. A flooded frame is parsed again; without a policy, a frame for the
        // router is parsed only when `quick_route` cannot place it.
        let parsed = if policy {
            l3::parse(head, dp.router.zone(segment))
        } else {
            L3::Other(0)
        };
        if policy {
            // Checked before the switch learns the source, or the router its address.
            if !dp
                .policy
                .source_allows(&mut s.policy, from.id, meta.src, &parsed)
            {
                s.forwards.push(Forward::SpoofedIp);
                continue;
            }
            if !dp.policy.tx_allows(&s.policy, from.id, len) {
                s.forwards.push(Forward::RateLimited);
                continue;
            }
        }
        let forward =
            dp.switch
                .decide_cached(&mut s.decisions, from.id, segment, meta.src, meta.dst);
        // A routed flow decided before is found from its addresses alone (`quick_route`),
        // with the policy too: from the parse's fields, the route cache's probe waited on
        // the stores that wrote them (`route` was 11 % of a routed 64 B frame).
        let forward = match forward {
            Forward::Spoofed => forward,
            _ if to_router => match quick_route(dp, from, burst, i, &meta, s) {
                Some(routed) => routed,
                None if policy => route(dp, from, burst, i, &meta, &parsed, s).unwrap_or(forward),
                None => {
                    let parsed = l3::parse(head, dp.router.zone(segment));
                    route(dp, from, burst, i, &meta, &parsed, s).unwrap_or(forward)
                }
            },
            _ => forward,
        };
        let f = PolicyFrame {
            l3: &parsed,
            len,
            group: meta.dst.is_multicast(),
            hash,
        };
        let forward = match forward {
            Forward::To(p) if policy => police(dp, &mut s.policy, from.id, p, f, false),
            Forward::Routed { to, .. } if policy => {
                match police(dp, &mut s.policy, from.id, to, f, false) {
                    Forward::To(_) => forward,
                    refused => refused,
                }
            }
            f => f,
        };
        // A route counts what it forwarded: not what the policy refused.
        let route = s.pending_route.take();
        if let Some(route) = route {
            if matches!(forward, Forward::Routed { .. }) {
                s.routes.add(route, len);
            }
        }
        if share {
            let d = Decided::of(
                i,
                hash,
                segment,
                forward,
                route,
                policy.then_some(&s.policy),
                versions,
            );
            match (slot, d) {
                // Its flow's slot: the new decision, or none if this one may not be shared.
                (Some(k), d) => decided[k] = d,
                (None, Some(d)) => {
                    decided[next_slot] = Some(d);
                    next_slot = (next_slot + 1) % SHARED_FLOWS;
                }
                (None, None) => {}
            }
        }
        s.forwards.push(forward);
    }
    if from.capture.active() {
        // What the port sent, as it sent it (dropped or not, as tcpdump on its NIC).
        for i in 0..burst.len() {
            from.capture.record(&burst.frame(i, from.segment));
        }
    }
    let mut i = 0;
    while i < burst.len() {
        let frame = burst.frame(i, from.segment);
        s.rx.next_frame();
        match s.forwards[i] {
            Forward::Local => {}
            Forward::Spoofed => from.counters.count_drop(DropReason::SpoofedMac),
            Forward::Denied => from.counters.count_drop(DropReason::PolicyDenied),
            Forward::SpoofedIp => from.counters.count_drop(DropReason::SpoofedIp),
            Forward::RateLimited => from.counters.count_drop(DropReason::RateLimited),
            Forward::Dropped => {}
            Forward::To(p) => {
                let dst = &ports[usize::from(p)];
                if let (Some(vm), Burst::Guest { ram, segs, frames }) = (dst.as_vm(), burst) {
                    let run = s.forwards[i..]
                        .iter()
                        .take_while(|f| **f == Forward::To(p))
                        .count();
                    let done =
                        s.rx.deliver_run(vm, ram, segs, &frames[i..i + run], None, from.segment);
                    if dst.capture.active() {
                        for j in i..i + done {
                            dst.capture.record(&burst.frame(j, from.segment));
                        }
                    }
                    if done > 0 {
                        i += done;
                        continue;
                    }
                }
                deliver(from, dst, &frame, &mut s.rx);
            }
            Forward::Flood => {
                let (head, len) = burst.head(i);
                let parsed = if policy {
                    l3::parse(head, dp.router.zone(frame.segment))
                } else {
                    L3::Other(0)
                };
                let f = PolicyFrame {
                    l3: &parsed,
                    len,
                    group: frame.eth()[0] & 1 != 0,
                    hash: frame.hash,
                };
                for p in dp.switch.flood_targets(from.id, frame.segment) {
                    if policy && police(dp, &mut s.policy, from.id, p, f, true) != Forward::To(p) {
                        continue;
                    }
                    deliver_flooded(from, &ports[usize::from(p)], &frame, &mut s.rx);
                }
            }
            Forward::Routed { to, segment, hop } => {
                let mac = s.next_hops[usize::from(hop)];
                let dst = &ports[usize::from(to)];
                if let (Some(vm), Burst::Guest { ram, segs, frames }) = (dst.as_vm(), burst) {
                    // As a switched run, under one lock of the receiver's queue: a routed
                    // frame delivered alone cost 2.4x a switched one at 64 B (146 ns/60).
                    let run = s.forwards[i..]
                        .iter()
                        .take_while(|f| **f == s.forwards[i])
                        .count();
                    let frames = &frames[i..i + run];
                    if s.routed_heads.len() < run {
                        s.routed_heads.resize(run, [0; MAX_HEAD]);
                    }
                    for (t, h) in frames.iter().zip(&mut s.routed_heads) {
                        *h = *t.head_block();
                        // The hop limit was checked on the same bytes: this cannot fail.
                        let _ = rewrite::route(t.head(), &mut h[..t.head_len], mac.0, router_mac);
                    }
                    let heads = &s.routed_heads[..run];
                    let done =
                        s.rx.deliver_run(vm, ram, segs, frames, Some(heads), segment);
                    if dst.capture.active() {
                        for (t, h) in frames.iter().zip(heads).take(done) {
                            let f = t.frame(ram, segs, segment);
                            dst.capture.record(&Frame {
                                head: &h[..t.head_len],
                                ..f
                            });
                        }
                    }
                    if done > 0 {
                        i += done;
                        continue;
                    }
                }
                let (head, _) = burst.head(i);
                let mut rewritten = [0u8; MAX_HEAD];
                let h = &mut rewritten[..head.len()];
                h.copy_from_slice(head);
                // The hop limit was checked on the same bytes: this cannot fail.
                if rewrite::route(head, h, mac.0, router_mac).is_ok() {
                    let routed = Frame {
                        head: h,
                        segment,
                        ..frame
                    };
                    deliver(from, dst, &routed, &mut s.rx);
                }
            }
            Forward::Answer(n) => {
                let answer = s.made.frame(n, frame.segment);
                deliver(from, from, &answer, &mut s.rx);
            }
            Forward::Ask { n, segment } => {
                let question = s.made.frame(n, segment);
                for p in dp.switch.flood_targets(from.id, segment) {
                    deliver(from, &ports[usize::from(p)], &question, &mut s.rx);
                }
            }
        }
        i += 1;
    }
}

/// A frame of `d`'s flow (`signature`), `len` bytes long, decided as `d` was, its policy
/// verdict repeated and counted; None if that verdict no longer holds (the frame is
/// decided the long way).
#[inline]
fn decided_again(
    dp: &Datapath,
    d: &Decided,
    signature: Signature,
    len: usize,
    s: &mut Scratch,
) -> Option<Forward> {
    if let Some(r) = d.policy {
        if dp.policy.repeat(&s.policy, r, len, signature.tcp_flags())? == Verdict::Deny {
            return Some(Forward::Denied);
        }
    }
    if let Some(route) = d.route {
        s.routes.add(route, len);
    }
    Some(d.forward)
}

/// Frame `i`'s route if its flow was decided before, found from its addresses alone
/// (`Router::quick_origin`); None: `route` decides, after a full parse.
#[inline]
fn quick_route(
    dp: &Datapath,
    from: &SwitchPort,
    burst: Burst<'_>,
    i: usize,
    meta: &FrameMeta,
    s: &mut Scratch,
) -> Option<Forward> {
    let (head, _) = burst.head(i);
    let (_, segment) = burst.eth(i, from.segment);
    let origin = dp.router.quick_origin(from.id, segment, meta, head)?;
    let (n, route) = match s.last_route {
        Some((o, n, route)) if o == origin => (n, route),
        _ => {
            let (n, route) = dp.router.cached(&origin, &s.route_decisions)?;
            s.last_route = Some((origin, n, route));
            (n, route)
        }
    };
    s.pending_route = Some(route);
    Some(Forward::Routed {
        to: n.port,
        segment: n.segment,
        hop: hop_number(&mut s.next_hops, n.mac),
    })
}

/// The router stage for frame `i` of `burst` (sent to a gateway's MAC, or an ARP or IPv6
/// multicast in a routed segment): None if it is not for the router after all.
fn route(
    dp: &Datapath,
    from: &SwitchPort,
    burst: Burst<'_>,
    i: usize,
    meta: &FrameMeta,
    parsed: &L3,
    s: &mut Scratch,
) -> Option<Forward> {
    let (head, _) = burst.head(i);
    let (_, segment) = burst.eth(i, from.segment);
    let origin = dp.router.flow_origin(from.id, segment, meta, parsed, head);
    if let Some(o) = &origin {
        // Decided here from the cache's fields: through a `Routing` on the stack, their
        // loads waited on the stores that had just written it (6 % of a routed frame).
        if let Some((n, route)) = dp.router.cached(o, &s.route_decisions) {
            s.pending_route = Some(route);
            return Some(Forward::Routed {
                to: n.port,
                segment: n.segment,
                hop: hop_number(&mut s.next_hops, n.mac),
            });
        }
    }
    let made = &mut s.made;
    let start = made.bytes.len();
    let routing = dp.router.route_caching(
        from.id,
        segment,
        meta,
        parsed,
        head,
        &mut made.bytes,
        origin,
        (&mut s.route_decisions, &mut s.neighbours),
    );
    Some(match routing {
        Routing::Pass => return None,
        Routing::Reply => Forward::Answer(made.note(start)),
        Routing::Echo => {
            // Answered from the whole frame, its checked head over what the guest holds.
            let frame = burst.frame(i, segment);
            let len = frame.src.len();
            made.bytes.resize(start + len, 0);
            frame.src.peek(&mut made.bytes[start..]);
            made.bytes[start..start + head.len()].copy_from_slice(head);
            if build::echo_reply(&mut made.bytes[start..], dp.router.mac.0) {
                Forward::Answer(made.note(start))
            } else {
                made.bytes.truncate(start);
                from.counters.count_drop(DropReason::Malformed);
                Forward::Dropped
            }
        }
        Routing::Dhcp => {
            let frame = burst.frame(i, segment);
            let len = frame.src.len();
            if len > MAX_DHCP_FRAME {
                return Some(Forward::Dropped);
            }
            s.request.resize(len, 0);
            frame.src.peek(&mut s.request);
            s.request[..head.len()].copy_from_slice(head);
            if dp
                .router
                .dhcp(from.id, segment, &s.request, &mut made.bytes)
            {
                Forward::Answer(made.note(start))
            } else {
                Forward::Dropped
            }
        }
        Routing::Forward {
            to,
            mac,
            segment,
            route,
        } => {
            s.pending_route = Some(route);
            Forward::Routed {
                to,
                segment,
                hop: hop_number(&mut s.next_hops, mac),
            }
        }
        Routing::Resolve { segment } => {
            from.counters.count_drop(DropReason::NoNeighbour);
            Forward::Ask {
                n: made.note(start),
                segment,
            }
        }
        Routing::Consumed => Forward::Dropped,
        Routing::Drop { reason, reply } => {
            from.counters.count_drop(reason);
            if reply {
                Forward::Answer(made.note(start))
            } else {
                Forward::Dropped
            }
        }
    })
}

/// The policy stage for frame `f` from port `from` to port `to`: `To(to)` if it passes.
/// `quiet`: a flooded copy.
#[inline]
fn police(
    dp: &Datapath,
    cache: &mut PolicyCache,
    from: PortId,
    to: PortId,
    f: PolicyFrame<'_>,
    quiet: bool,
) -> Forward {
    match dp.policy.verdict(cache, from, to, f, quiet) {
        Verdict::Allow if dp.policy.rx_allows(cache, to, f.len) => Forward::To(to),
        Verdict::Allow => {
            // Over the receiver's rate: counted there.
            if let Some(p) = dp.ports.load().get(usize::from(to)) {
                p.counters.count_drop(DropReason::RateLimited);
            }
            Forward::Dropped
        }
        Verdict::Deny => Forward::Denied,
        Verdict::RateLimited => Forward::RateLimited,
    }
}

/// Delivers one frame to `dst`, whatever kind of port it is.
#[inline]
fn deliver(from: &SwitchPort, dst: &SwitchPort, frame: &Frame<'_>, rx: &mut RxScratch) {
    if dst.capture.active() {
        dst.capture.record(frame);
    }
    match &dst.endpoint {
        Endpoint::Vm(vm) => {
            let vm = VmPort {
                id: dst.id,
                name: &dst.name,
                counters: &dst.counters,
                vm,
            };
            rx.deliver(&from.counters, vm, frame)
        }
        Endpoint::Tap(tap) => {
            match tap.send(frame.hash, &frame.hdr, frame.src, frame.head, frame.segment) {
                Ok(()) => dst.counters.queue(0).add_rx(1, frame.src.len() as u64),
                Err(reason) => dst.counters.count_drop(reason),
            }
        }
        // Deleted since the decision: nobody to count it for.
        Endpoint::Vacant => {}
    }
}

/// One copy of a flooded frame: as `deliver`, but a VM gets a TSO frame only if it takes
/// it whole (`RxScratch::deliver_flooded`); the tap always does.
fn deliver_flooded(from: &SwitchPort, dst: &SwitchPort, frame: &Frame<'_>, rx: &mut RxScratch) {
    match dst.as_vm() {
        Some(vm) => {
            if dst.capture.active() {
                dst.capture.record(frame);
            }
            rx.deliver_flooded(&from.counters, vm, frame)
        }
        None => deliver(from, dst, frame, rx),
    }
}

/// Sends `bytes`, a frame the switch made (a router advertisement), as `from` to every VM
/// port of `segment`, then interrupts the queues written.
pub fn flood_made(dp: &Datapath, from: &SwitchPort, segment: u16, bytes: &[u8], s: &mut Scratch) {
    let frame = Frame {
        hdr: NetHdr::default(),
        src: FrameSource::Local(bytes),
        head: &bytes[..bytes.len().min(MAX_HEAD)],
        hash: 0,
        segment,
    };
    let ports = dp.ports.load();
    for p in dp.switch.flood_targets(from.id, segment) {
        if let Some(dst) = ports.get(usize::from(p)).filter(|d| d.as_vm().is_some()) {
            deliver_flooded(from, dst, &frame, &mut s.rx);
        }
    }
    drop(ports);
    flush(dp, s);
}

/// The pipeline's last stage: interrupts each RX queue written since the last flush once,
/// if its driver wants it. Call it with no lock held that another port needs.
pub fn flush(dp: &Datapath, s: &mut Scratch) {
    if s.routes.used() {
        dp.router.count_routed(&mut s.routes);
    }
    let ports = dp.ports.load();
    s.rx.flush(|id| ports.get(usize::from(id)).and_then(|p| p.as_vm()));
}
