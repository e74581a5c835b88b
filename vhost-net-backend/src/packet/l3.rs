//! What the policy sees of a frame above Ethernet: its flow key (addresses, protocol,
//! ports), TCP flags, ICMP type, the flow an ICMP error is about, and ARP and neighbour
//! discovery fields, parsed from the checked copy of the frame's first bytes.

use std::net::{IpAddr, Ipv6Addr};

use crate::types::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN};

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 or IPv6 address as one 128-bit number (IPv4 mapped, `::ffff:a.b.c.d`): one
/// compare and one hash for both families. A number, not 16 bytes: built in registers,
/// it is read back whole (bytes written one by one and read as words stalled the policy
/// stage, 10 ns a frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ip(pub u128);

impl Ip {
    #[inline]
    pub fn v4(b: [u8; 4]) -> Ip {
        Ip(0xffff_u128 << 32 | u128::from(u32::from_be_bytes(b)))
    }

    #[inline]
    pub fn from_octets(b: [u8; 16]) -> Ip {
        Ip(u128::from_be_bytes(b))
    }

    #[inline]
    pub fn is_v4(&self) -> bool {
        self.0 >> 32 == 0xffff
    }

    /// In fe80::/10.
    pub fn is_link_local(&self) -> bool {
        self.0 >> 118 == 0xfe80 >> 6
    }

    pub fn addr(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for Ip {
    fn from(a: IpAddr) -> Ip {
        match a {
            IpAddr::V4(v4) => Ip::v4(v4.octets()),
            IpAddr::V6(v6) => Ip(v6.to_bits()),
        }
    }
}

/// An address prefix: `10.0.1.0/24`, `fd00:1::/64` (IPv4 as mapped: its length counts 96
/// more bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: Ip,
    pub len: u8,
}

impl Prefix {
    /// The bits of the prefix (an IPv4 one's low 32 bits are its netmask).
    #[inline]
    pub fn mask(&self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0)
    }

    /// The prefix's first address, its host bits cleared.
    pub fn network(&self) -> Ip {
        Ip(self.addr.0 & self.mask())
    }

    #[inline]
    pub fn contains(&self, a: Ip) -> bool {
        let mask = self.mask();
        a.0 & mask == self.addr.0 & mask
    }

    /// Whether the two share an address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The length as written for its family (`/24`, not `/120`).
    pub fn family_len(&self) -> u8 {
        if self.addr.is_v4() {
            self.len.saturating_sub(96)
        } else {
            self.len
        }
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    /// `ADDR/LEN`, or `ADDR` alone for a host.
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address or prefix"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            None => max,
            Some(l) => l
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("'{s}': prefix length must be 0..={max}"))?,
        };
        Ok(Prefix {
            addr: Ip::from(ip),
            len: if ip.is_ipv4() { len + 96 } else { len },
        })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.family_len())
    }
}

impl std::fmt::Display for Ip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// A flow as the policy matches and tracks it. For an ICMP echo request the source port
/// is the echo identifier, for a reply the destination port; other ICMP has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub src: Ip,
    pub dst: Ip,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The segment: addresses may repeat in another one.
    pub zone: u16,
}

impl FlowKey {
    #[inline]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            zone: self.zone,
        }
    }

    /// The key as the words a hash mixes: the two addresses' halves, then the rest.
    #[inline]
    pub fn words(&self) -> [u64; 5] {
        [
            self.src.0 as u64,
            (self.src.0 >> 64) as u64,
            self.dst.0 as u64,
            (self.dst.0 >> 64) as u64,
            u64::from(self.sport)
                | u64::from(self.dport) << 16
                | u64::from(self.proto) << 32
                | u64::from(self.zone) << 40,
        ]
    }
}

impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for w in self.words() {
            state.write_u64(w);
        }
    }
}

/// ICMP message kinds the policy treats apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    EchoRequest,
    EchoReply,
    /// Destination unreachable, time exceeded, parameter problem (packet too big for
    /// IPv6): about the flow in `Packet::related`.
    Error,
    /// Router solicitation, neighbour solicitation and advertisement, MLD: what hosts of a
    /// segment need to find each other.
    Neighbour,
    /// Router advertisement and redirect: only a router (the outside) may send them.
    Router,
    Other,
}

/// An IP packet's fields the policy uses.
#[derive(Clone, Copy, Debug)]
pub struct IpPacket {
    pub key: FlowKey,
    pub tcp_flags: u8,
    pub icmp: Option<IcmpKind>,
    /// For an ICMP error, the flow of the packet it quotes, as that packet travelled.
    pub related: Option<FlowKey>,
    /// For a neighbour solicitation or advertisement, the address it is about.
    pub nd_target: Option<Ip>,
    /// A neighbour advertisement (its target is the address claimed).
    pub nd_is_advert: bool,
    /// A fragment after the first: no ports to match.
    pub later_fragment: bool,
}

/// A frame as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub enum L3 {
    Ip(IpPacket),
    Arp {
        sender_mac: [u8; 6],
        sender_ip: [u8; 4],
    },
    /// IP too short or malformed to parse: never allowed by a rule.
    BadIp,
    /// Another ethertype.
    Other(u16),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses `head`, a frame's first bytes from its Ethernet header on (untagged: ingress
/// took any tag off), in segment `zone`.
#[inline]
pub fn parse(head: &[u8], zone: u16) -> L3 {
    let Some(ethertype) = be16(head, 12) else {
        return L3::BadIp;
    };
    let l3 = &head[ETH_HLEN.min(head.len())..];
    match ethertype {
        ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => match parse_ip(l3, zone, true) {
            Some(p) => L3::Ip(p),
            None => L3::BadIp,
        },
        ETHERTYPE_ARP => match (l3.get(8..14), l3.get(14..18)) {
            (Some(mac), Some(ip)) if l3.len() >= 28 => L3::Arp {
                sender_mac: mac.try_into().unwrap_or_default(),
                sender_ip: ip.try_into().unwrap_or_default(),
            },
            _ => L3::BadIp,
        },
        other => L3::Other(other),
    }
}

/// The key of the packet an ICMP error quotes. Out of line and cold: it keeps `parse_ip`
/// from calling itself, so that it is inlined where frames are parsed and its result
/// built in place (returned through memory it stalled the reads after it, 4 ns a frame).
#[cold]
#[inline(never)]
fn quoted_key(q: &[u8], zone: u16) -> Option<FlowKey> {
    parse_ip(q, zone, false).map(|p| p.key)
}

/// Parses an IP packet from `b`; `outer`: look into ICMP errors for the quoted packet.
#[inline]
fn parse_ip(b: &[u8], zone: u16, outer: bool) -> Option<IpPacket> {
    let version = b.first()? >> 4;
    let (src, dst, proto, l4, later_fragment) = match version {
        4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if ihl < 20 || b.len() < 20 {
                return None;
            }
            let frag = be16(b, 6)?;
            let src = Ip::v4(b[12..16].try_into().ok()?);
            let dst = Ip::v4(b[16..20].try_into().ok()?);
            (src, dst, b[9], b.get(ihl..), frag & 0x1fff != 0)
        }
        6 => {
            if b.len() < 40 {
                return None;
            }
            let src = Ip::from_octets(b[8..24].try_into().ok()?);
            let dst = Ip::from_octets(b[24..40].try_into().ok()?);
            // Extension headers are not walked: such a packet has no ports to match.
            (src, dst, b[6], b.get(40..), false)
        }
        _ => return None,
    };
    let mut p = IpPacket {
        key: FlowKey {
            src,
            dst,
            sport: 0,
            dport: 0,
            proto,
            zone,
        },
        tcp_flags: 0,
        icmp: None,
        related: None,
        nd_target: None,
        nd_is_advert: false,
        later_fragment,
    };
    if later_fragment {
        return Some(p);
    }
    // A first fragment or whole packet too short for its ports is malformed: in an
    // outer packet refuse it (a quoted one may be cut short, but not its ports).
    let l4 = l4.unwrap_or(&[]);
    match proto {
        PROTO_TCP | PROTO_UDP => {
            p.key.sport = be16(l4, 0)?;
            p.key.dport = be16(l4, 2)?;
            if proto == PROTO_TCP && outer {
                p.tcp_flags = *l4.get(13)?;
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let kind = *l4.first()?;
            let v6 = proto == PROTO_ICMPV6;
            let icmp = match (v6, kind) {
                (false, 8) | (true, 128) => IcmpKind::EchoRequest,
                (false, 0) | (true, 129) => IcmpKind::EchoReply,
                (false, 3 | 11 | 12) | (true, 1..=4) => IcmpKind::Error,
                (true, 130..=133 | 135 | 136 | 143) => IcmpKind::Neighbour,
                // Router advertisements and redirects, both families.
                (true, 134 | 137) | (false, 5 | 9) => IcmpKind::Router,
                _ => IcmpKind::Other,
            };
            p.icmp = Some(icmp);
            match icmp {
                // The identifier on the requester's side: a reply has the reversed key
                // of its request, a request the other way round does not.
                IcmpKind::EchoRequest => p.key.sport = be16(l4, 4)?,
                IcmpKind::EchoReply => p.key.dport = be16(l4, 4)?,
                IcmpKind::Error if outer => {
                    p.related = l4.get(8..).and_then(|q| quoted_key(q, zone));
                    p.related.as_ref()?;
                }
                IcmpKind::Neighbour if kind == 135 || kind == 136 => {
                    p.nd_target = Some(Ip::from_octets(l4.get(8..24)?.try_into().ok()?));
                    p.nd_is_advert = kind == 136;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn parses_tcp_udp_and_icmp_keys() {
        let tcp = eth(
            ETHERTYPE_IPV4,
            &ipv4(
                PROTO_TCP,
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                &[
                    0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, TCP_SYN,
                ],
            ),
        );
        let L3::Ip(p) = parse(&tcp, 7) else {
            panic!("not parsed as IP")
        };
        assert_eq!(p.key.src.to_string(), "10.0.0.1");
        assert_eq!((p.key.sport, p.key.dport, p.key.zone), (12345, 8080, 7));
        assert_eq!(p.tcp_flags, TCP_SYN);
        assert_eq!(p.key.reversed().reversed(), p.key);
        assert_ne!(p.key.words(), p.key.reversed().words());

        let echo = eth(
            ETHERTYPE_IPV4,
            &ipv4(
                PROTO_ICMP,
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                &[8, 0, 0, 0, 0, 9, 0, 1],
            ),
        );
        let L3::Ip(e) = parse(&echo, 0) else { panic!() };
        assert_eq!(e.icmp, Some(IcmpKind::EchoRequest));
        assert_eq!((e.key.sport, e.key.dport), (9, 0));

        // A redirect (5) and a router advertisement (9): what only the outside may send.
        for kind in [5u8, 9] {
            let icmp = [kind, 0, 0, 0, 10, 0, 0, 1];
            let f = eth(
                ETHERTYPE_IPV4,
                &ipv4(PROTO_ICMP, [10, 0, 0, 1], [10, 0, 0, 2], &icmp),
            );
            let L3::Ip(r) = parse(&f, 0) else { panic!() };
            assert_eq!(r.icmp, Some(IcmpKind::Router), "type {kind}");
        }

        // Port unreachable quoting the UDP packet 10.0.0.1:53000 -> 10.0.0.2:53.
        let quoted = ipv4(
            PROTO_UDP,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            &[0xcf, 0x08, 0, 53],
        );
        let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&quoted);
        let err = eth(
            ETHERTYPE_IPV4,
            &ipv4(PROTO_ICMP, [10, 0, 0, 2], [10, 0, 0, 1], &l4),
        );
        let L3::Ip(e) = parse(&err, 0) else { panic!() };
        assert_eq!(e.icmp, Some(IcmpKind::Error));
        let r = e.related.unwrap();
        assert_eq!((r.src, r.dport, r.proto), (Ip::v4([10, 0, 0, 1]), 53, 17));

        // Too short for its ports: malformed, not a portless packet.
        let cut = eth(ETHERTYPE_IPV4, &ipv4(PROTO_TCP, [1; 4], [2; 4], &[0, 1]));
        assert!(matches!(parse(&cut, 0), L3::BadIp));
        assert!(matches!(
            parse(&eth(0x88cc, &[0; 30]), 0),
            L3::Other(0x88cc)
        ));
    }

    #[test]
    fn parses_ipv6_neighbour_discovery_and_arp() {
        let mut ip6 = vec![0x60, 0, 0, 0, 0, 32, PROTO_ICMPV6, 255];
        ip6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip6.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2]);
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        ip6.extend_from_slice(&ns);
        let L3::Ip(p) = parse(&eth(ETHERTYPE_IPV6, &ip6), 0) else {
            panic!()
        };
        assert_eq!(p.icmp, Some(IcmpKind::Neighbour));
        assert_eq!(p.nd_target.unwrap().to_string(), "fd00::2");
        assert!(!p.key.src.is_v4());

        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1];
        arp.extend_from_slice(&[0; 10]);
        let L3::Arp {
            sender_mac,
            sender_ip,
        } = parse(&eth(ETHERTYPE_ARP, &arp), 0)
        else {
            panic!()
        };
        assert_eq!((sender_mac[5], sender_ip), (1, [10, 0, 0, 1]));
    }
}
