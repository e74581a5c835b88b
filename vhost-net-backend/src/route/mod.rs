//! The router between segments: for a frame sent to a gateway (its MAC, or an ARP or
//! neighbour solicitation for its address), decides whether the switch answers it itself,
//! routes it to a port (next hop from the neighbour table) or drops it with an ICMP error.
//! Knows frames' parsed fields and port ids only; the frames it writes come from
//! `packet::build`, and the pipeline delivers them.

pub mod counters;
pub mod dhcp;
pub mod flow_cache;
pub mod neighbour;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SwitchConfig;
use crate::counters::DropReason;
use crate::packet::build::{self, IcmpError};
use crate::packet::l3::{
    IcmpKind, Ip, IpPacket, Prefix, ETHERTYPE_ARP, L3, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};
use crate::packet::meta::FrameMeta;
use crate::packet::rewrite::hop_limit;
use crate::types::{MacAddr, PortId, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN};
use counters::{RouteCounters, RouteId, RouteTally};
use dhcp::{DhcpServer, LeaseRow};
use flow_cache::{FlowOrigin, RouteCache};
use neighbour::{Neighbour, NeighbourCache, NeighbourTable};

/// The policy's zone of every routed segment: they share one address space, so that a
/// routed flow's reply (from another segment) finds its connection. VLAN 4095 is reserved,
/// never a segment.
pub const ROUTED_ZONE: u16 = 4095;
/// ICMP errors the router sends per second, in all (Linux's default is 1000/s per
/// destination; a switch answering for many guests stays lower).
const ICMP_ERRORS_PER_SEC: u32 = 100;

/// A routed segment.
#[derive(Clone, Debug)]
pub struct RoutedSegment {
    pub vlan: u16,
    pub name: String,
    /// Gateway address with the subnet's length.
    pub gateways: Vec<Prefix>,
    /// The MTU its hosts are given (DHCP option 26, the advertisements' MTU option).
    pub mtu: Option<u16>,
    /// Seconds between router advertisements; None: the switch does not advertise here
    /// (no IPv6 gateway, or the uplink's segment).
    pub advert_secs: Option<u32>,
}

impl RoutedSegment {
    /// How the router advertises itself here, if it does.
    fn advert(&self) -> Option<build::Advert<'_>> {
        let secs = self.advert_secs?;
        Some(build::Advert {
            prefixes: &self.gateways,
            mtu: self.mtu,
            // Three intervals, as RFC 4861 6.2.1's default, at most its 9000 s.
            lifetime_secs: (secs * 3).min(9000) as u16,
        })
    }

    fn gateway_for(&self, ip: Ip) -> Option<Ip> {
        self.gateways
            .iter()
            .find(|g| g.addr.is_v4() == ip.is_v4())
            .map(|g| g.addr)
    }
}

/// What the router does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Not for the router: switched within its segment.
    Pass,
    /// Answered: the answer for the sender was appended to `out`.
    Reply,
    /// An echo request to a gateway: the pipeline answers it from the whole frame.
    Echo,
    /// A message to the segment's DHCP server: the pipeline passes the whole frame to
    /// `Router::dhcp`.
    Dhcp,
    /// Routed by `route`: to `to` in `segment`, for the host at `mac`.
    Forward {
        to: PortId,
        mac: MacAddr,
        segment: u16,
        route: RouteId,
    },
    /// The next hop's MAC is not known: the question for it was appended to `out`, to be
    /// flooded in `segment`. The frame is dropped (`NoNeighbour`).
    Resolve { segment: u16 },
    /// Taken in with nothing to send (an ARP reply to the gateway, say).
    Consumed,
    /// Dropped for `reason`; `reply`: an ICMP error for the sender was appended to `out`.
    Drop { reason: DropReason, reply: bool },
}

/// The configured bindings of `config`: a port's MAC with each of its addresses, in the
/// routed segments.
fn fixed_bindings(config: &SwitchConfig, segments: &[RoutedSegment]) -> HashMap<Ip, Neighbour> {
    let mut fixed = HashMap::new();
    for (id, p) in config.ports.iter().enumerate() {
        let Some(mac) = p.mac else { continue };
        if !segments.iter().any(|s| s.vlan == p.segment()) {
            continue;
        }
        for a in &p.addresses {
            let at = Neighbour {
                port: id as PortId,
                mac,
                segment: p.segment(),
            };
            fixed.insert(Ip::from(*a), at);
        }
    }
    fixed
}

/// Each port's first IPv4 address in `subnet`: the DHCP server's static bindings.
fn dhcp_bindings(config: &SwitchConfig, vlan: u16, subnet: &Prefix) -> Vec<(PortId, [u8; 4])> {
    config
        .ports
        .iter()
        .enumerate()
        .filter(|(_, p)| p.segment() == vlan)
        .filter_map(|(id, p)| {
            let a = p.addresses.iter().find_map(|a| match a {
                std::net::IpAddr::V4(v4) if subnet.contains(Ip::from(*a)) => Some(v4.octets()),
                _ => None,
            })?;
            Some((id as PortId, a))
        })
        .collect()
}

/// A rate limit of ICMP errors, for all ports together.
struct IcmpBudget {
    window: Mutex<(Instant, u32)>,
}

impl IcmpBudget {
    fn take(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(w.0).as_secs() >= 1 {
            *w = (now, 0);
        }
        w.1 += 1;
        w.1 <= ICMP_ERRORS_PER_SEC
    }
}

pub struct Router {
    pub mac: MacAddr,
    pub segments: Vec<RoutedSegment>,
    /// Static routes, longest prefix first.
    pub routes: Vec<(Prefix, Ip)>,
    pub neighbours: NeighbourTable,
    /// Bit `v` set: VLAN `v` is routed.
    routed: Box<[u64; 64]>,
    icmp: IcmpBudget,
    /// The DHCP servers of the segments that have one: VLAN, server.
    dhcp: Vec<(u16, DhcpServer)>,
    /// The router's link-local address, where its IPv6 neighbours reach it.
    link_local: Ip,
    /// When each advertising segment gets its next unsolicited advertisement: VLAN, time.
    next_advert: Mutex<Vec<(u16, Instant)>>,
    /// What each route forwarded: the segments' subnets, then `routes` (`static_route`).
    counters: RouteCounters,
}

impl Router {
    /// The router of `config` (checked already), for its ports in config order.
    pub fn new(config: &SwitchConfig) -> Router {
        let uplink = config.uplink.as_ref().map(|u| u.vlan.unwrap_or(0));
        let segments: Vec<RoutedSegment> = config
            .segments
            .iter()
            .map(|s| {
                let gateways = s.gateways().unwrap_or_default();
                let v6 = gateways.iter().any(|g| !g.addr.is_v4());
                RoutedSegment {
                    vlan: s.segment(),
                    name: s
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("vlan{}", s.segment())),
                    gateways,
                    mtu: s.dhcp.as_ref().and_then(|d| d.mtu),
                    advert_secs: (v6 && uplink != Some(s.segment())).then_some(s.ra_interval_secs),
                }
            })
            .collect();
        // The first unsolicited advertisement one interval after the start: a host
        // coming up solicits one, and gets it at once.
        let next_advert = segments
            .iter()
            .filter_map(|s| {
                let secs = s.advert_secs?;
                Some((
                    s.vlan,
                    Instant::now() + Duration::from_secs(u64::from(secs)),
                ))
            })
            .collect();
        let mut routed = Box::new([0u64; 64]);
        for s in &segments {
            routed[usize::from(s.vlan) / 64] |= 1 << (s.vlan % 64);
        }
        let mut routes: Vec<(Prefix, Ip)> = config
            .routes
            .iter()
            .filter_map(|r| Some((r.to.parse().ok()?, Ip::from(r.via))))
            .collect();
        // With the host's side of the uplink set, the host is the default router.
        if let Some(host) = crate::config::north_south::host_prefix(config) {
            let default: Prefix = "0.0.0.0/0".parse().unwrap_or(host);
            if !routes.iter().any(|(p, _)| *p == default) {
                routes.push((default, host.addr));
            }
        }
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len));
        let fixed = fixed_bindings(config, &segments);
        let dhcp = config
            .segments
            .iter()
            .filter_map(|s| {
                let subnet = s.gateway_v4()?;
                Some((s.segment(), DhcpServer::new(subnet, s.dhcp.as_ref()?)))
            })
            .collect();
        let mac = config.router_mac();
        let router = Router {
            link_local: Ip::from_octets(build::link_local(mac.0)),
            next_advert: Mutex::new(next_advert),
            counters: RouteCounters::new(segments.len() + routes.len()),
            mac,
            segments,
            routes,
            neighbours: NeighbourTable::new(fixed, config.mac_ageing_secs),
            routed,
            icmp: IcmpBudget {
                window: Mutex::new((Instant::now(), 0)),
            },
            dhcp,
        };
        router.set_dhcp_bindings(config);
        router
    }

    fn set_dhcp_bindings(&self, config: &SwitchConfig) {
        for (vlan, server) in &self.dhcp {
            let Some(seg) = self.segment(*vlan) else {
                continue;
            };
            if let Some(subnet) = seg.gateways.iter().find(|g| g.addr.is_v4()) {
                server.set_fixed(dhcp_bindings(config, *vlan, subnet));
            }
        }
    }

    /// Takes the ports' addresses of `config` (changed at run time) as the configured
    /// bindings. Segments, routes and the gateway MAC change only with a restart.
    pub fn set_ports(&self, config: &SwitchConfig) {
        self.neighbours
            .set_fixed(fixed_bindings(config, &self.segments));
        self.set_dhcp_bindings(config);
    }

    /// Whether any segment is routed: if not, the router stage costs nothing.
    #[inline]
    pub fn active(&self) -> bool {
        !self.segments.is_empty()
    }

    #[inline]
    pub fn is_routed(&self, segment: u16) -> bool {
        let s = usize::from(segment);
        s < 4096 && self.routed[s / 64] & (1 << (s % 64)) != 0
    }

    /// The policy's zone of a frame in `segment`.
    #[inline]
    pub fn zone(&self, segment: u16) -> u16 {
        if self.is_routed(segment) {
            ROUTED_ZONE
        } else {
            segment
        }
    }

    /// Whether a frame in `segment` may be for the router: sent to its MAC, an ARP or
    /// IPv6 multicast (neighbour solicitations for a gateway) or an IPv4 broadcast (DHCP).
    #[inline]
    pub fn may_want(&self, meta: &FrameMeta, segment: u16) -> bool {
        self.is_routed(segment)
            && (meta.dst == self.mac
                || (meta.dst.is_multicast()
                    && (meta.ethertype == ETHERTYPE_ARP
                        || meta.ethertype == ETHERTYPE_IPV6
                        || (meta.ethertype == ETHERTYPE_IPV4 && meta.dst.0 == [0xff; 6]))))
    }

    fn dhcp_server(&self, segment: u16) -> Option<&DhcpServer> {
        self.dhcp
            .iter()
            .find(|(v, _)| *v == segment)
            .map(|(_, s)| s)
    }

    /// Answers the DHCP message `frame` (whole, untagged) from port `from` in `segment`
    /// (`route` said `Dhcp`): the reply is appended to `out`; false if there is none.
    pub fn dhcp(&self, from: PortId, segment: u16, frame: &[u8], out: &mut Vec<u8>) -> bool {
        self.dhcp_server(segment)
            .is_some_and(|s| s.answer(from, self.mac, frame, out))
    }

    /// The DHCP leases of every segment: the segment's name with each.
    pub fn leases(&self) -> Vec<(String, LeaseRow)> {
        let mut rows = Vec::new();
        for (vlan, server) in &self.dhcp {
            let name = self
                .segment(*vlan)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            rows.extend(server.rows().into_iter().map(|r| (name.clone(), r)));
        }
        rows
    }

    fn segment(&self, vlan: u16) -> Option<&RoutedSegment> {
        self.segments.iter().find(|s| s.vlan == vlan)
    }

    fn is_gateway(&self, ip: Ip) -> bool {
        ip == self.link_local
            || self
                .segments
                .iter()
                .any(|s| s.gateways.iter().any(|g| g.addr == ip))
    }

    /// The unsolicited router advertisements due at `now`, each appended to `out` as a
    /// frame to all nodes: the segment and where its frame is in `out`.
    pub fn adverts_due(&self, now: Instant, out: &mut Vec<u8>) -> Vec<(u16, Range<usize>)> {
        let mut due = Vec::new();
        let mut next = self.next_advert.lock().unwrap_or_else(|e| e.into_inner());
        for (vlan, at) in next.iter_mut().filter(|(_, at)| *at <= now) {
            let Some(seg) = self.segment(*vlan) else {
                continue;
            };
            let (Some(secs), Some(advert)) = (seg.advert_secs, seg.advert()) else {
                continue;
            };
            let start = out.len();
            let (group, group_mac) = build::ALL_NODES;
            build::router_advert(out, self.mac.0, group_mac, group, &advert);
            due.push((seg.vlan, start..out.len()));
            *at = now + Duration::from_secs(u64::from(secs));
        }
        due
    }

    /// Route ids: segment `i`'s subnets are route `i`; static route `i` comes after them.
    fn static_route(&self, i: usize) -> RouteId {
        (self.segments.len() + i) as RouteId
    }

    /// Packets and bytes segment `i`'s subnets forwarded.
    pub fn segment_traffic(&self, i: usize) -> (u64, u64) {
        self.counters.get(i as RouteId)
    }

    /// Packets and bytes static route `i` forwarded.
    pub fn route_traffic(&self, i: usize) -> (u64, u64) {
        self.counters.get(self.static_route(i))
    }

    /// Each route with what it forwarded (packets, bytes): "segment NAME" for a segment's
    /// subnets, "TO via VIA" for a static route.
    pub fn route_counts(&self) -> Vec<(String, u64, u64)> {
        let segments = self.segments.iter().enumerate().map(|(i, s)| {
            let (packets, bytes) = self.segment_traffic(i);
            (format!("segment {}", s.name), packets, bytes)
        });
        let routes = self.routes.iter().enumerate().map(|(i, (to, via))| {
            let (packets, bytes) = self.route_traffic(i);
            (format!("{to} via {via}"), packets, bytes)
        });
        segments.chain(routes).collect()
    }

    /// Adds what a worker's burst routed (`flush`).
    pub fn count_routed(&self, tally: &mut RouteTally) {
        self.counters.take(tally);
    }

    /// The segment whose subnet holds `ip`.
    pub fn segment_holding(&self, ip: Ip) -> Option<&RoutedSegment> {
        self.segment_index_holding(ip).map(|i| &self.segments[i])
    }

    fn segment_index_holding(&self, ip: Ip) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.gateways.iter().any(|g| g.contains(ip)))
    }

    /// The segment whose subnet holds `ip`, and the address to resolve there: `ip` itself,
    /// or the next hop of the longest matching route.
    fn next_hop(&self, ip: Ip) -> Option<(&RoutedSegment, Ip, RouteId)> {
        if let Some(i) = self.segment_index_holding(ip) {
            return Some((&self.segments[i], ip, i as RouteId));
        }
        let i = self
            .routes
            .iter()
            .position(|(p, via)| p.contains(ip) && via.is_v4() == ip.is_v4())?;
        let via = self.routes[i].1;
        self.segment_holding(via)
            .map(|s| (s, via, self.static_route(i)))
    }

    /// The flow of a frame whose forwarding decision a worker may cache (`flow_cache`): an
    /// IP packet sent to the router's MAC with a hop to spare that is no neighbour
    /// discovery.
    #[inline]
    pub fn flow_origin(
        &self,
        from: PortId,
        segment: u16,
        meta: &FrameMeta,
        l3: &L3,
        head: &[u8],
    ) -> Option<FlowOrigin> {
        match l3 {
            L3::Ip(p)
                if meta.dst == self.mac
                    && p.icmp != Some(IcmpKind::Neighbour)
                    && hop_limit(head).is_some_and(|h| h > 1) =>
            {
                Some(FlowOrigin {
                    from,
                    segment,
                    mac: meta.src,
                    src: p.key.src,
                    dst: p.key.dst,
                })
            }
            _ => None,
        }
    }

    /// `flow_origin` read straight from the frame's first bytes, for the frames it is
    /// sure of (TCP, UDP and other non-ICMP IP packets whose headers the head holds), so
    /// that a flow decided before skips the full parse (5 % of a routed 64 B frame in
    /// `perf`); None sends the frame the long way. Where both give one, it is the same.
    #[inline]
    pub fn quick_origin(
        &self,
        from: PortId,
        segment: u16,
        meta: &FrameMeta,
        head: &[u8],
    ) -> Option<FlowOrigin> {
        if meta.dst != self.mac || head.len() < 54 {
            return None;
        }
        let ip = &head[ETH_HLEN..];
        let (src, dst, proto, hops, l4) = match (meta.ethertype, ip[0] >> 4) {
            (ETHERTYPE_IPV4, 4) => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let addrs: [u8; 8] = ip[12..20].try_into().ok()?;
                let (s, d) = addrs.split_at(4);
                (
                    Ip::v4(s.try_into().ok()?),
                    Ip::v4(d.try_into().ok()?),
                    ip[9],
                    ip[8],
                    (ihl >= 20).then_some(ihl)?,
                )
            }
            (ETHERTYPE_IPV6, 6) => (
                Ip::from_octets(ip[8..24].try_into().ok()?),
                Ip::from_octets(ip[24..40].try_into().ok()?),
                ip[6],
                ip[7],
                40,
            ),
            _ => return None,
        };
        // ICMP (neighbour discovery among it) the long way; TCP and UDP with their ports
        // and flags in the head, as the parse wants them.
        let whole = match proto {
            PROTO_ICMP | PROTO_ICMPV6 => false,
            PROTO_TCP | PROTO_UDP => ip.len() >= l4 + 14,
            _ => true,
        };
        (whole && hops > 1).then_some(FlowOrigin {
            from,
            segment,
            mac: meta.src,
            src,
            dst,
        })
    }

    /// Where `origin`'s frames go, if `cache` holds a decision still in force.
    #[inline]
    pub fn cached(&self, origin: &FlowOrigin, cache: &RouteCache) -> Option<(Neighbour, RouteId)> {
        let generation = self.neighbours.generation();
        cache.get(origin, generation, self.neighbours.coarse_second())
    }

    /// `route`, keeping a forwarding decision for `origin` (the frame's, if it may be
    /// cached) in the worker's cache.
    // As `route`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_caching(
        &self,
        from: PortId,
        segment: u16,
        meta: &FrameMeta,
        l3: &L3,
        head: &[u8],
        out: &mut Vec<u8>,
        origin: Option<FlowOrigin>,
        caches: (&mut RouteCache, &mut NeighbourCache),
    ) -> Routing {
        let (decisions, neighbours) = caches;
        // Read before deciding: a change meanwhile leaves the decision stale, never wrong.
        let generation = self.neighbours.generation();
        let second = self.neighbours.coarse_second();
        let routing = self.route(from, segment, meta, l3, head, out, neighbours);
        if let (
            Some(origin),
            Routing::Forward {
                to,
                mac,
                segment,
                route,
            },
        ) = (origin, routing)
        {
            let n = Neighbour {
                port: to,
                mac,
                segment,
            };
            decisions.put(origin, generation, second, (n, route));
        }
        routing
    }

    /// Decides what to do with a frame from port `from` in `segment` (`may_want` said
    /// yes): `head` is its first bytes, `l3` their parse; frames to send are appended to
    /// `out`.
    // The frame as the pipeline parsed it, where answers go, and the worker's cache: each
    // its own borrow of the worker's scratch.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        from: PortId,
        segment: u16,
        meta: &FrameMeta,
        l3: &L3,
        head: &[u8],
        out: &mut Vec<u8>,
        cache: &mut NeighbourCache,
    ) -> Routing {
        let Some(seg) = self.segment(segment) else {
            return Routing::Pass;
        };
        let to_me = meta.dst == self.mac;
        let heard = |cache: &mut NeighbourCache, ip: Ip| {
            if seg.gateways.iter().any(|g| g.contains(ip)) && !self.is_gateway(ip) {
                self.neighbours.learn_cached(
                    cache,
                    ip,
                    Neighbour {
                        port: from,
                        mac: meta.src,
                        segment,
                    },
                );
            }
        };
        match l3 {
            L3::Arp {
                sender_mac,
                sender_ip,
            } => {
                let arp = &head[ETH_HLEN.min(head.len())..];
                let (Some(op), Some(target)) = (arp.get(6..8), arp.get(24..28)) else {
                    return Routing::Pass;
                };
                let target: [u8; 4] = target.try_into().unwrap_or_default();
                // Only what the frame's own source says of itself is learned.
                if *sender_mac == meta.src.0 && *sender_ip != [0; 4] {
                    heard(cache, Ip::v4(*sender_ip));
                }
                let mine = seg.gateway_for(Ip::v4(target)) == Some(Ip::v4(target));
                match op {
                    [0, 1] if mine => {
                        build::arp_reply(out, self.mac.0, target, meta.src.0, *sender_ip);
                        Routing::Reply
                    }
                    [0, 2] if to_me => Routing::Consumed,
                    _ => Routing::Pass,
                }
            }
            L3::Ip(p) => {
                if p.icmp == Some(IcmpKind::Neighbour) {
                    return self
                        .neighbour_discovery(seg, meta, p, head, out, &mut |ip| heard(cache, ip));
                }
                if p.key.proto == PROTO_UDP
                    && p.key.dport == dhcp::SERVER_PORT
                    && self.dhcp_server(segment).is_some()
                    && (!to_me || self.is_gateway(p.key.dst))
                {
                    return Routing::Dhcp;
                }
                if !to_me {
                    return Routing::Pass;
                }
                let src_known = !p.key.src.is_link_local() && p.key.src.0 != 0;
                if src_known {
                    heard(cache, p.key.src);
                }
                let dst = p.key.dst;
                if self.is_gateway(dst) {
                    // The gateway answers pings; it offers no other service yet.
                    return match p.icmp {
                        Some(IcmpKind::EchoRequest) => Routing::Echo,
                        _ => Routing::Consumed,
                    };
                }
                // Never an ICMP error about an ICMP error (RFC 1122 3.2.2).
                let may_tell = p.icmp != Some(IcmpKind::Error);
                let Some((egress, hop, route)) = self.next_hop(dst) else {
                    let e = (IcmpError::NoRoute, DropReason::NoRoute);
                    return self.error(seg, meta, head, out, may_tell, e);
                };
                if hop_limit(head).is_some_and(|h| h <= 1) {
                    let e = (IcmpError::TimeExceeded, DropReason::HopLimit);
                    return self.error(seg, meta, head, out, may_tell, e);
                }
                if let Some(n) = self.neighbours.lookup_cached(cache, hop) {
                    return Routing::Forward {
                        to: n.port,
                        mac: n.mac,
                        segment: n.segment,
                        route,
                    };
                }
                if !self.neighbours.should_ask(hop) {
                    return Routing::Drop {
                        reason: DropReason::NoNeighbour,
                        reply: false,
                    };
                }
                let Some(gw) = egress.gateway_for(hop) else {
                    return Routing::Drop {
                        reason: DropReason::NoRoute,
                        reply: false,
                    };
                };
                let gw_bytes = gw.0.to_be_bytes();
                let hop_bytes = hop.0.to_be_bytes();
                if hop.is_v4() {
                    let v4 = |b: [u8; 16]| -> [u8; 4] { b[12..].try_into().unwrap_or_default() };
                    build::arp_request(out, self.mac.0, v4(gw_bytes), v4(hop_bytes));
                } else {
                    build::neighbour_solicit(out, self.mac.0, gw_bytes, hop_bytes);
                }
                Routing::Resolve {
                    segment: egress.vlan,
                }
            }
            L3::BadIp | L3::Other(_) if to_me => Routing::Consumed,
            _ => Routing::Pass,
        }
    }

    /// A neighbour solicitation for a gateway gets the router's advertisement; an
    /// advertisement to the router is learned. Others pass.
    fn neighbour_discovery(
        &self,
        seg: &RoutedSegment,
        meta: &FrameMeta,
        p: &IpPacket,
        head: &[u8],
        out: &mut Vec<u8>,
        heard: &mut dyn FnMut(Ip),
    ) -> Routing {
        let kind = head.get(ETH_HLEN + 40).copied();
        if kind == Some(133) {
            // A router solicitation: answered where the switch advertises (to the asker,
            // or to all nodes from a host without an address yet); else switched.
            let Some(advert) = seg.advert() else {
                return Routing::Pass;
            };
            let (to_mac, to_ip) = if p.key.src.0 == 0 {
                (build::ALL_NODES.1, build::ALL_NODES.0)
            } else {
                (meta.src.0, p.key.src.0.to_be_bytes())
            };
            build::router_advert(out, self.mac.0, to_mac, to_ip, &advert);
            return Routing::Reply;
        }
        let Some(target) = p.nd_target else {
            return Routing::Pass;
        };
        // Type 135/136 only: MLD is switched as it is. The router's link-local address is
        // its own where it advertises (hosts route through it).
        let mine = seg.gateway_for(target) == Some(target)
            || (target == self.link_local && seg.advert_secs.is_some());
        match kind {
            Some(135) if mine => {
                // A solicitation from :: is duplicate address detection: not answered.
                if p.key.src.0 == 0 {
                    return Routing::Consumed;
                }
                if !p.key.src.is_link_local() {
                    heard(p.key.src);
                }
                build::neighbour_advert(
                    out,
                    self.mac.0,
                    target.0.to_be_bytes(),
                    meta.src.0,
                    p.key.src.0.to_be_bytes(),
                );
                Routing::Reply
            }
            Some(136) => {
                heard(target);
                if meta.dst == self.mac {
                    Routing::Consumed
                } else {
                    Routing::Pass
                }
            }
            _ if meta.dst == self.mac => Routing::Consumed,
            _ => Routing::Pass,
        }
    }

    /// Drops for the error's reason, with its ICMP message to the sender if `may_tell`
    /// and the budget allows.
    fn error(
        &self,
        seg: &RoutedSegment,
        meta: &FrameMeta,
        head: &[u8],
        out: &mut Vec<u8>,
        may_tell: bool,
        (why, reason): (IcmpError, DropReason),
    ) -> Routing {
        let quoted = &head[ETH_HLEN.min(head.len())..];
        let v4 = quoted.first().is_some_and(|b| b >> 4 == 4);
        let from = seg.gateways.iter().find(|g| g.addr.is_v4() == v4);
        let reply = match from {
            Some(g) if may_tell && self.icmp.take() => {
                build::icmp_error(out, self.mac.0, meta.src.0, g.addr, quoted, why)
            }
            _ => false,
        };
        Routing::Drop { reason, reply }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::l3;

    const GW_MAC: MacAddr = crate::config::DEFAULT_ROUTER_MAC;
    const WEB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const APP_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn router() -> Router {
        let c = SwitchConfig::from_toml(
            r#"
[[port]]
name = "web1"
socket = "/w"
vlan = 10
mac = "02:00:00:00:00:01"
addresses = ["10.0.1.5"]
[[port]]
name = "app1"
socket = "/a"
vlan = 20
[[segment]]
vlan = 10
gateway = ["10.0.1.1/24", "fd00:1::1/64"]
[[segment]]
vlan = 20
gateway = ["10.0.2.1/24", "fd00:2::1/64"]
[[route]]
to = "192.168.0.0/16"
via = "10.0.2.254"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        Router::new(&c)
    }

    fn decide(r: &Router, from: PortId, segment: u16, frame: &[u8], out: &mut Vec<u8>) -> Routing {
        let meta = FrameMeta::parse(frame[..14].try_into().unwrap());
        assert!(r.may_want(&meta, segment));
        let parsed = l3::parse(frame, r.zone(segment));
        r.route(
            from,
            segment,
            &meta,
            &parsed,
            &frame[..frame.len().min(128)],
            out,
            &mut NeighbourCache::default(),
        )
    }

    fn udp(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, GW_MAC.0)
            .ipv4(src, dst, ttl)
            .udp(1000, 2000)
            .write(&mut f, &[0; 20])
            .unwrap();
        f
    }

    #[test]
    fn the_quick_origin_is_the_parsed_one_or_none() {
        let r = router();
        let mut frames = Vec::new();
        for ttl in [0u8, 1, 2, 64] {
            frames.push(udp(WEB_MAC, [10, 0, 1, 5], [10, 0, 2, 7], ttl));
        }
        let v6 = |next: u8, l4: &[u8], hops: u8| {
            let mut f = GW_MAC.0.to_vec();
            f.extend_from_slice(&WEB_MAC);
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[next, hops]);
            f.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
            f.extend_from_slice(&[0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
            f.extend_from_slice(l4);
            f
        };
        for (next, kind) in [(17u8, 0u8), (6, 0), (58, 135), (58, 136), (58, 128), (0, 0)] {
            let mut l4 = vec![0u8; 24];
            l4[0] = kind;
            for hops in [1u8, 64] {
                frames.push(v6(next, &l4, hops));
            }
        }
        let mut tcp = Vec::new();
        etherparse::PacketBuilder::ethernet2(WEB_MAC, GW_MAC.0)
            .ipv4([10, 0, 1, 5], [192, 168, 3, 4], 9)
            .tcp(1, 2, 3, 4)
            .write(&mut tcp, &[0; 10])
            .unwrap();
        frames.push(tcp.clone());
        let mut icmp = tcp.clone();
        icmp[14 + 9] = 1;
        frames.push(icmp);
        let mut options = tcp.clone();
        options[14] = 0x46;
        frames.push(options);
        let mut short_ihl = tcp.clone();
        short_ihl[14] = 0x44;
        frames.push(short_ihl);
        let mut wrong_version = tcp.clone();
        wrong_version[14] = 0x65;
        frames.push(wrong_version);
        let mut fragment = tcp.clone();
        fragment[14 + 6] = 0x01;
        frames.push(fragment);
        let mut quick = 0;
        for f in &frames {
            for cut in [f.len(), 60, 54, 40] {
                let head = &f[..cut.min(f.len())];
                let meta = FrameMeta::parse(head[..14].try_into().unwrap());
                let parsed = l3::parse(head, r.zone(10));
                let slow = r.flow_origin(3, 10, &meta, &parsed, head);
                if let Some(o) = r.quick_origin(3, 10, &meta, head) {
                    quick += 1;
                    assert_eq!(Some(o), slow, "{head:02x?}");
                }
            }
        }
        // TCP and UDP of both families with a hop to spare, whole: the quick way.
        assert!(quick >= 6, "{quick}");
    }

    #[test]
    fn the_gateway_answers_arp_and_neighbour_solicitations() {
        let r = router();
        let mut out = Vec::new();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&APP_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&APP_MAC);
        arp.extend_from_slice(&[10, 0, 2, 7, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
        assert_eq!(decide(&r, 1, 20, &arp, &mut out), Routing::Reply);
        assert_eq!(&out[..6], &APP_MAC);
        assert_eq!(&out[14 + 14..14 + 18], &[10, 0, 2, 1]);
        // The asker was learned on its port.
        let n = r.neighbours.lookup(Ip::v4([10, 0, 2, 7])).unwrap();
        assert_eq!((n.port, n.mac.0, n.segment), (1, APP_MAC, 20));
        // A question for another host, or for the gateway of another segment, passes.
        out.clear();
        arp[14 + 24..14 + 28].copy_from_slice(&[10, 0, 2, 9]);
        assert_eq!(decide(&r, 1, 20, &arp, &mut out), Routing::Pass);
        arp[14 + 24..14 + 28].copy_from_slice(&[10, 0, 1, 1]);
        assert_eq!(decide(&r, 1, 20, &arp, &mut out), Routing::Pass);
        assert!(out.is_empty());

        let gw6: [u8; 16] = "fd00:2::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let me6: [u8; 16] = "fd00:2::7".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let (group, group_mac) = build::solicited_node(gw6);
        let mut ns = Vec::new();
        etherparse::PacketBuilder::ethernet2(APP_MAC, group_mac)
            .ipv6(me6, group, 255)
            .icmpv6_raw(135, 0, [0; 4])
            .write(&mut ns, &gw6)
            .unwrap();
        assert_eq!(decide(&r, 1, 20, &ns, &mut out), Routing::Reply);
        assert_eq!(out[14 + 40], 136);
        assert_eq!(&out[14 + 48..14 + 64], &gw6);
        assert!(r.neighbours.lookup(Ip::from_octets(me6)).is_some());
    }

    #[test]
    fn frames_to_the_gateway_are_routed_resolved_or_refused() {
        let r = router();
        let mut out = Vec::new();
        // app1 (learned) -> web1 (configured): routed to port 0 at web1's MAC.
        let f = udp(APP_MAC, [10, 0, 2, 7], [10, 0, 1, 5], 64);
        assert_eq!(
            decide(&r, 1, 20, &f, &mut out),
            Routing::Forward {
                to: 0,
                mac: MacAddr(WEB_MAC),
                segment: 10,
                route: 0,
            }
        );
        // web1 -> 10.0.2.9, unknown: asked for in vlan 20 (once a second).
        let f = udp(WEB_MAC, [10, 0, 1, 5], [10, 0, 2, 9], 64);
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Resolve { segment: 20 }
        );
        assert_eq!(&out[14 + 24..14 + 28], &[10, 0, 2, 9]);
        assert_eq!(&out[14 + 14..14 + 18], &[10, 0, 2, 1]);
        out.clear();
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Drop {
                reason: DropReason::NoNeighbour,
                reply: false
            }
        );
        // Through the static route: its next hop is asked for.
        let f = udp(WEB_MAC, [10, 0, 1, 5], [192, 168, 3, 3], 64);
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Resolve { segment: 20 }
        );
        assert_eq!(&out[14 + 24..14 + 28], &[10, 0, 2, 254]);
        out.clear();
        // Once the next hop is known, the frame goes by the static route: route 2, after
        // the two segments' subnets.
        r.neighbours.learn(
            Ip::v4([10, 0, 2, 254]),
            Neighbour {
                port: 1,
                mac: MacAddr(APP_MAC),
                segment: 20,
            },
        );
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Forward {
                to: 1,
                mac: MacAddr(APP_MAC),
                segment: 20,
                route: 2,
            }
        );
        // No route: dropped with an ICMP error; a hop limit of 1 too.
        let f = udp(WEB_MAC, [10, 0, 1, 5], [172, 16, 0, 1], 64);
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Drop {
                reason: DropReason::NoRoute,
                reply: true
            }
        );
        assert_eq!((out[14 + 20], &out[..6]), (3, &WEB_MAC[..]));
        out.clear();
        let f = udp(WEB_MAC, [10, 0, 1, 5], [10, 0, 2, 7], 1);
        assert_eq!(
            decide(&r, 0, 10, &f, &mut out),
            Routing::Drop {
                reason: DropReason::HopLimit,
                reply: true
            }
        );
        assert_eq!(out[14 + 20], 11);
        // A guest cannot take over a configured binding by speaking for it.
        let f = udp(APP_MAC, [10, 0, 1, 5], [10, 0, 2, 7], 64);
        decide(&r, 1, 10, &f, &mut out);
        assert_eq!(r.neighbours.lookup(Ip::v4([10, 0, 1, 5])).unwrap().port, 0);
        // Only routed segments have a gateway; frames elsewhere are not looked at.
        let meta = FrameMeta::parse(f[..14].try_into().unwrap());
        assert!(!r.may_want(&meta, 30));
        assert_eq!((r.zone(10), r.zone(30)), (ROUTED_ZONE, 30));
    }
}
