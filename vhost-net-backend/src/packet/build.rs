//! Frames the switch writes itself as the router of its segments: answers and questions of
//! ARP and neighbour discovery, ICMP echo replies and ICMP errors. Pure functions on bytes;
//! each appends one whole frame (Ethernet header on) to `out`.

use super::l3::{Ip, ETHERTYPE_ARP, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP};
use super::offload::{checksum_add, checksum_fold};
use crate::types::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN};

/// Bytes of the offending packet an ICMPv4 error quotes beyond its header (RFC 792 asks
/// for 8; Linux sends as much as fits in 576, which a 128-byte head never reaches).
const ICMP_QUOTE_MAX: usize = 96;

/// Why an ICMP error is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// The hop limit ran out here (v4 type 11, v6 type 3).
    TimeExceeded,
    /// No route to the destination (v4 type 3 code 0, v6 type 1 code 0).
    NoRoute,
}

fn eth(out: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

fn arp(out: &mut Vec<u8>, op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) {
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&sha);
    out.extend_from_slice(&spa);
    out.extend_from_slice(&tha);
    out.extend_from_slice(&tpa);
}

/// "`ip` is at `mac`", to the host that asked.
pub fn arp_reply(out: &mut Vec<u8>, mac: [u8; 6], ip: [u8; 4], to_mac: [u8; 6], to_ip: [u8; 4]) {
    eth(out, to_mac, mac, ETHERTYPE_ARP);
    arp(out, 2, mac, ip, to_mac, to_ip);
}

/// "Who has `target`?", broadcast from the gateway `ip`.
pub fn arp_request(out: &mut Vec<u8>, mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) {
    eth(out, [0xff; 6], mac, ETHERTYPE_ARP);
    arp(out, 1, mac, ip, [0; 6], target);
}

/// One end of a UDP exchange: MAC, IPv4 address, port.
pub type UdpEnd = ([u8; 6], [u8; 4], u16);

/// A UDP datagram over IPv4 carrying `payload`, checksummed.
pub fn udp4(out: &mut Vec<u8>, src: UdpEnd, dst: UdpEnd, payload: &[u8]) {
    eth(out, dst.0, src.0, ETHERTYPE_IPV4);
    ipv4(out, src.1, dst.1, PROTO_UDP, 8 + payload.len());
    let at = out.len();
    let len = (8 + payload.len()) as u16;
    out.extend_from_slice(&src.2.to_be_bytes());
    out.extend_from_slice(&dst.2.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.1);
    pseudo[4..8].copy_from_slice(&dst.1);
    pseudo[9] = PROTO_UDP;
    pseudo[10..].copy_from_slice(&len.to_be_bytes());
    let sum = !checksum_fold(checksum_add(checksum_add(0, &pseudo), &out[at..]));
    // 0 means "no checksum" in UDP over IPv4 (RFC 768).
    let sum = if sum == 0 { 0xffff } else { sum };
    out[at + 6..at + 8].copy_from_slice(&sum.to_be_bytes());
}

/// An IPv4 header for `payload_len` bytes of `proto`, checksummed.
fn ipv4(out: &mut Vec<u8>, src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize) {
    let at = out.len();
    let total = (20 + payload_len) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    let sum = !checksum_fold(checksum_add(0, &out[at..at + 20]));
    out[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
}

/// An IPv6 header for `payload_len` bytes of `next`, with hop limit `hops`.
fn ipv6(out: &mut Vec<u8>, src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize, hops: u8) {
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    out.extend_from_slice(&[next, hops]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
}

/// Writes the ICMPv6 checksum of the message at `icmp..` of `frame`, whose IPv6 header
/// starts at `ip`.
fn icmpv6_checksum(frame: &mut [u8], ip: usize, icmp: usize) {
    frame[icmp + 2..icmp + 4].fill(0);
    let len = frame.len() - icmp;
    let mut sum = checksum_add(0, &frame[ip + 8..ip + 40]);
    sum = sum.wrapping_add(len as u32) + u32::from(PROTO_ICMPV6);
    sum = checksum_add(sum, &frame[icmp..]);
    frame[icmp + 2..icmp + 4].copy_from_slice(&(!checksum_fold(sum)).to_be_bytes());
}

fn icmpv4_checksum(frame: &mut [u8], icmp: usize) {
    frame[icmp + 2..icmp + 4].fill(0);
    let sum = !checksum_fold(checksum_add(0, &frame[icmp..]));
    frame[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
}

/// The solicited-node multicast address of `target` and its Ethernet group.
pub fn solicited_node(target: [u8; 16]) -> ([u8; 16], [u8; 6]) {
    let mut ip = [0u8; 16];
    ip[..2].copy_from_slice(&[0xff, 0x02]);
    ip[11..13].copy_from_slice(&[0x01, 0xff]);
    ip[13..].copy_from_slice(&target[13..]);
    (ip, [0x33, 0x33, 0xff, target[13], target[14], target[15]])
}

/// A solicited neighbour advertisement from a router: "`ip` is at `mac`".
pub fn neighbour_advert(
    out: &mut Vec<u8>,
    mac: [u8; 6],
    ip: [u8; 16],
    to_mac: [u8; 6],
    to_ip: [u8; 16],
) {
    let start = out.len();
    eth(out, to_mac, mac, ETHERTYPE_IPV6);
    ipv6(out, ip, to_ip, PROTO_ICMPV6, 32, 255);
    let icmp = out.len();
    // Router, solicited, override; the target; its link-layer address option.
    out.extend_from_slice(&[136, 0, 0, 0, 0xe0, 0, 0, 0]);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&[2, 1]);
    out.extend_from_slice(&mac);
    icmpv6_checksum(&mut out[start..], ETH_HLEN, icmp - start);
}

/// The link-local address of an interface with `mac` (modified EUI-64, RFC 4291).
pub fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut ip = [0u8; 16];
    ip[0..2].copy_from_slice(&[0xfe, 0x80]);
    ip[8..11].copy_from_slice(&[mac[0] ^ 0x02, mac[1], mac[2]]);
    ip[11..13].copy_from_slice(&[0xff, 0xfe]);
    ip[13..16].copy_from_slice(&mac[3..6]);
    ip
}

/// The all-nodes group, ff02::1, and its MAC.
pub const ALL_NODES: ([u8; 16], [u8; 6]) = (
    [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0x33, 0x33, 0, 0, 0, 1],
);

/// What a router advertisement says (RFC 4861 4.2).
#[derive(Clone, Copy, Debug)]
pub struct Advert<'a> {
    /// The segment's IPv6 subnets: on-link, and autonomous (SLAAC) where /64.
    pub prefixes: &'a [super::l3::Prefix],
    /// The segment's MTU, if the switch sets one.
    pub mtu: Option<u16>,
    /// How long hosts may use the router as their default, in seconds.
    pub lifetime_secs: u16,
}

/// A router advertisement from the router at `mac` (from its link-local address) to
/// `to_mac`/`to_ip` (a host that solicited it, or `ALL_NODES`).
pub fn router_advert(
    out: &mut Vec<u8>,
    mac: [u8; 6],
    to_mac: [u8; 6],
    to_ip: [u8; 16],
    a: &Advert<'_>,
) {
    let start = out.len();
    let v6: Vec<&super::l3::Prefix> = a.prefixes.iter().filter(|p| !p.addr.is_v4()).collect();
    let len = 16 + 8 + 8 * usize::from(a.mtu.is_some()) + 32 * v6.len();
    eth(out, to_mac, mac, ETHERTYPE_IPV6);
    ipv6(out, link_local(mac), to_ip, PROTO_ICMPV6, len, 255);
    let icmp = out.len();
    // Type 134; current hop limit 64; no managed or other-config flag (no DHCPv6);
    // router lifetime; reachable time and retransmission timer unspecified.
    out.extend_from_slice(&[134, 0, 0, 0, 64, 0]);
    out.extend_from_slice(&a.lifetime_secs.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    // Source link-layer address.
    out.extend_from_slice(&[1, 1]);
    out.extend_from_slice(&mac);
    if let Some(mtu) = a.mtu {
        out.extend_from_slice(&[5, 1, 0, 0]);
        out.extend_from_slice(&u32::from(mtu).to_be_bytes());
    }
    for p in v6 {
        // On-link; autonomous only for a /64, the length SLAAC takes (RFC 4862 5.5.3).
        let flags = if p.len == 64 { 0xc0 } else { 0x80 };
        out.extend_from_slice(&[3, 4, p.len, flags]);
        // Valid 30 days, preferred 7 (radvd's defaults), reserved.
        out.extend_from_slice(&2_592_000u32.to_be_bytes());
        out.extend_from_slice(&604_800u32.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&p.network().0.to_be_bytes());
    }
    icmpv6_checksum(&mut out[start..], ETH_HLEN, icmp - start);
}

/// "Who has `target`?", to its solicited-node group, from the gateway `ip`.
pub fn neighbour_solicit(out: &mut Vec<u8>, mac: [u8; 6], ip: [u8; 16], target: [u8; 16]) {
    let start = out.len();
    let (group, group_mac) = solicited_node(target);
    eth(out, group_mac, mac, ETHERTYPE_IPV6);
    ipv6(out, ip, group, PROTO_ICMPV6, 32, 255);
    let icmp = out.len();
    out.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&target);
    out.extend_from_slice(&[1, 1]);
    out.extend_from_slice(&mac);
    icmpv6_checksum(&mut out[start..], ETH_HLEN, icmp - start);
}

/// Turns `frame`, a whole ICMP or ICMPv6 echo request addressed to the switch, into its
/// reply from the switch's `mac`, in place. False if it is not one that can be answered
/// (truncated, lengths that disagree, IPv4 options).
pub fn echo_reply(frame: &mut [u8], mac: [u8; 6]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let ethertype = u16::from_be_bytes([ethertype[0], ethertype[1]]);
    let asker: [u8; 6] = frame[6..12].try_into().unwrap_or_default();
    let ip = ETH_HLEN;
    match ethertype {
        ETHERTYPE_IPV4 => {
            if frame.len() < ip + 28 || frame[ip] != 0x45 || frame[ip + 9] != PROTO_ICMP {
                return false;
            }
            let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
            if total < 28 || ip + total > frame.len() || frame[ip + 20] != 8 {
                return false;
            }
            let (a, b) = frame[ip + 12..ip + 20].split_at_mut(4);
            a.swap_with_slice(b);
            frame[ip + 8] = 64;
            frame[ip + 10..ip + 12].fill(0);
            let sum = !checksum_fold(checksum_add(0, &frame[ip..ip + 20]));
            frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
            frame[ip + 20] = 0;
            icmpv4_checksum(&mut frame[..ip + total], ip + 20);
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < ip + 48 || frame[ip + 6] != PROTO_ICMPV6 {
                return false;
            }
            let payload = usize::from(u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]));
            if payload < 8 || ip + 40 + payload > frame.len() || frame[ip + 40] != 128 {
                return false;
            }
            let (a, b) = frame[ip + 8..ip + 40].split_at_mut(16);
            a.swap_with_slice(b);
            frame[ip + 7] = 64;
            frame[ip + 40] = 129;
            icmpv6_checksum(&mut frame[..ip + 40 + payload], ip, ip + 40);
        }
        _ => return false,
    }
    frame[..6].copy_from_slice(&asker);
    frame[6..12].copy_from_slice(&mac);
    true
}

/// An ICMP error from the router address `from` about `quoted` (the offending packet from
/// its IP header on, as much of it as the switch holds), to `to_mac`. False if `quoted`
/// is not an IP packet of the family of `from`.
pub fn icmp_error(
    out: &mut Vec<u8>,
    mac: [u8; 6],
    to_mac: [u8; 6],
    from: Ip,
    quoted: &[u8],
    why: IcmpError,
) -> bool {
    let start = out.len();
    if from.is_v4() {
        if quoted.len() < 20 || quoted[0] >> 4 != 4 {
            return false;
        }
        let q = &quoted[..quoted.len().min(20 + ICMP_QUOTE_MAX)];
        let to: [u8; 4] = quoted[12..16].try_into().unwrap_or_default();
        let src = (from.0 as u32).to_be_bytes();
        eth(out, to_mac, mac, ETHERTYPE_IPV4);
        ipv4(out, src, to, PROTO_ICMP, 8 + q.len());
        let icmp = out.len();
        let (kind, code) = match why {
            IcmpError::TimeExceeded => (11, 0),
            IcmpError::NoRoute => (3, 0),
        };
        out.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(q);
        icmpv4_checksum(&mut out[start..], icmp - start);
    } else {
        if quoted.len() < 40 || quoted[0] >> 4 != 6 {
            return false;
        }
        // IPv6 errors quote as much as fits in the minimum MTU (1280); a head is less.
        let to: [u8; 16] = quoted[8..24].try_into().unwrap_or_default();
        eth(out, to_mac, mac, ETHERTYPE_IPV6);
        ipv6(
            out,
            from.0.to_be_bytes(),
            to,
            PROTO_ICMPV6,
            8 + quoted.len(),
            64,
        );
        let icmp = out.len();
        let kind = match why {
            IcmpError::TimeExceeded => 3,
            IcmpError::NoRoute => 1,
        };
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(quoted);
        icmpv6_checksum(&mut out[start..], ETH_HLEN, icmp - start);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};

    const MAC: [u8; 6] = [2, 0x76, 0x6e, 0, 0, 1];
    const GUEST: [u8; 6] = [2, 0, 0, 0, 0, 7];

    #[test]
    fn advertisements_mask_their_prefixes_and_offer_slaac_for_a_64_only() {
        assert_eq!(
            std::net::Ipv6Addr::from(link_local([0x52, 0x54, 0, 0x12, 0x34, 0x56])).to_string(),
            "fe80::5054:ff:fe12:3456"
        );
        let prefixes: Vec<super::super::l3::Prefix> = ["10.0.1.1/24", "fd00:1:2:ffff::1/60"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let mut out = Vec::new();
        let a = Advert {
            prefixes: &prefixes,
            mtu: None,
            lifetime_secs: 0,
        };
        router_advert(&mut out, MAC, ALL_NODES.1, ALL_NODES.0, &a);
        let p = SlicedPacket::from_ethernet(&out).unwrap();
        let Some(TransportSlice::Icmpv6(i)) = &p.transport else {
            panic!("not ICMPv6")
        };
        assert!(i.is_checksum_valid(link_local(MAC), ALL_NODES.0));
        assert!(matches!(i.icmp_type(), Icmpv6Type::RouterAdvertisement(_)));
        // After the 8 bytes of timers: the MAC (8), then the one IPv6 prefix (32), no MTU.
        let opts = &i.payload()[8..];
        assert_eq!(opts.len(), 8 + 32);
        assert_eq!(&opts[..8], &[1, 1, 2, 0x76, 0x6e, 0, 0, 1]);
        let info = &opts[8..];
        assert_eq!(&info[..4], &[3, 4, 60, 0x80], "on-link only: not a /64");
        let prefix: std::net::Ipv6Addr = "fd00:1:2:fff0::".parse().unwrap();
        assert_eq!(&info[16..], &prefix.octets());
    }

    #[test]
    fn arp_answers_and_questions_are_well_formed() {
        let mut out = Vec::new();
        arp_reply(&mut out, MAC, [10, 0, 1, 1], GUEST, [10, 0, 1, 7]);
        let a = etherparse::ArpPacketSlice::from_slice(&out[14..]).unwrap();
        assert_eq!(a.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!(a.sender_hw_addr(), MAC);
        assert_eq!(a.sender_protocol_addr(), [10, 0, 1, 1]);
        assert_eq!(a.target_protocol_addr(), [10, 0, 1, 7]);
        assert_eq!(&out[..6], &GUEST);
        out.clear();
        arp_request(&mut out, MAC, [10, 0, 1, 1], [10, 0, 1, 9]);
        let a = etherparse::ArpPacketSlice::from_slice(&out[14..]).unwrap();
        assert_eq!(a.operation(), etherparse::ArpOperation::REQUEST);
        assert_eq!(a.target_protocol_addr(), [10, 0, 1, 9]);
        assert_eq!(&out[..6], &[0xff; 6]);
    }

    fn icmpv6_of(frame: &[u8]) -> Icmpv6Type {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(TransportSlice::Icmpv6(i)) = p.transport else {
            panic!("not ICMPv6")
        };
        let Some(NetSlice::Ipv6(ip)) = p.net else {
            panic!("not IPv6")
        };
        let h = ip.header();
        let sum = i
            .icmp_type()
            .calc_checksum(h.source(), h.destination(), i.payload())
            .unwrap();
        assert_eq!(sum, i.checksum(), "ICMPv6 checksum");
        i.icmp_type()
    }

    #[test]
    fn neighbour_discovery_messages_carry_valid_checksums() {
        let gw: [u8; 16] = "fd00:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let guest: [u8; 16] = "fd00:1::7".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mut out = Vec::new();
        neighbour_advert(&mut out, MAC, gw, GUEST, guest);
        assert!(matches!(
            icmpv6_of(&out),
            Icmpv6Type::NeighborAdvertisement(_)
        ));
        assert_eq!(&out[14 + 48..14 + 64], &gw);
        out.clear();
        neighbour_solicit(&mut out, MAC, gw, guest);
        assert!(matches!(icmpv6_of(&out), Icmpv6Type::NeighborSolicitation));
        assert_eq!(&out[..6], &[0x33, 0x33, 0xff, 0, 0, 7]);
    }

    #[test]
    fn echo_requests_are_answered_in_place_on_both_families() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, MAC)
            .ipv4([10, 0, 1, 7], [10, 0, 1, 1], 5)
            .icmpv4_echo_request(9, 3)
            .write(&mut f, &[0xab; 40])
            .unwrap();
        assert!(echo_reply(&mut f, MAC));
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [10, 0, 1, 1]);
        assert_eq!(ip.header().destination(), [10, 0, 1, 7]);
        assert_eq!(
            ip.header().header_checksum(),
            ip.header().to_header().calc_header_checksum()
        );
        let Some(TransportSlice::Icmpv4(i)) = &p.transport else {
            panic!()
        };
        assert!(matches!(i.icmp_type(), Icmpv4Type::EchoReply(_)));
        assert_eq!(i.icmp_type().calc_checksum(i.payload()), i.checksum());
        assert_eq!(&f[..6], &GUEST);

        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 5)
            .icmpv6_echo_request(9, 3)
            .write(&mut f, &[0xab; 40])
            .unwrap();
        assert!(echo_reply(&mut f, MAC));
        assert!(matches!(icmpv6_of(&f), Icmpv6Type::EchoReply(_)));
        // A truncated request is not answered.
        let mut short = f[..60].to_vec();
        short[14 + 40] = 128;
        assert!(!echo_reply(&mut short, MAC));
    }

    #[test]
    fn icmp_errors_quote_the_packet_and_verify() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, MAC)
            .ipv4([10, 0, 1, 7], [10, 0, 2, 9], 1)
            .udp(5000, 53)
            .write(&mut f, &[1; 200])
            .unwrap();
        let mut out = Vec::new();
        let gw = Ip::v4([10, 0, 1, 1]);
        assert!(icmp_error(
            &mut out,
            MAC,
            GUEST,
            gw,
            &f[14..128],
            IcmpError::TimeExceeded
        ));
        let p = SlicedPacket::from_ethernet(&out).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        assert_eq!(ip.header().destination(), [10, 0, 1, 7]);
        assert_eq!(
            ip.header().header_checksum(),
            ip.header().to_header().calc_header_checksum()
        );
        let Some(TransportSlice::Icmpv4(i)) = &p.transport else {
            panic!()
        };
        assert!(matches!(i.icmp_type(), Icmpv4Type::TimeExceeded(_)));
        assert_eq!(i.icmp_type().calc_checksum(i.payload()), i.checksum());
        assert_eq!(&i.payload()[..20], &f[14..34]);
        drop(p);

        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(GUEST, MAC)
            .ipv6([0xfd; 16], [0xfe; 16], 1)
            .udp(5000, 53)
            .write(&mut f, &[1; 10])
            .unwrap();
        out.clear();
        let gw6 = Ip::from_octets([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(icmp_error(
            &mut out,
            MAC,
            GUEST,
            gw6,
            &f[14..],
            IcmpError::NoRoute
        ));
        assert!(matches!(
            icmpv6_of(&out),
            Icmpv6Type::DestinationUnreachable(_)
        ));
        // The family must match.
        assert!(!icmp_error(
            &mut out,
            MAC,
            GUEST,
            gw,
            &f[14..],
            IcmpError::NoRoute
        ));
    }
}
