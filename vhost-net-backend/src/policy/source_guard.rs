//! Anti-spoofing: a port sends only from its MAC and, when configured, from its own IPv4
//! and IPv6 addresses, and claims no other in ARP or neighbour discovery.

use crate::packet::l3::{IcmpKind, Ip, IpPacket, L3, PROTO_UDP};
use crate::types::MacAddr;

use super::rules::PortPolicy;

fn owned_v6(port: &PortPolicy, ip: &Ip) -> bool {
    port.v6.is_empty() || ip.is_link_local() || port.v6.contains(ip)
}

/// DHCP's first packets come from 0.0.0.0, client port to server port.
fn dhcp_discover(p: &IpPacket) -> bool {
    p.key.proto == PROTO_UDP && p.key.sport == 68 && p.key.dport == 67
}

/// Whether `port` may send a frame from `src_mac` with these contents.
#[inline]
pub fn allows(port: &PortPolicy, src_mac: MacAddr, l3: &L3) -> bool {
    if port.mac.is_some_and(|m| m != src_mac) {
        return false;
    }
    match l3 {
        L3::Arp {
            sender_mac,
            sender_ip,
        } => {
            *sender_mac == src_mac.0
                && (port.v4.is_empty()
                    || *sender_ip == [0; 4]
                    || port.v4.contains(&Ip::v4(*sender_ip)))
        }
        L3::Ip(p) if p.key.src.is_v4() => {
            port.v4.is_empty()
                || port.v4.contains(&p.key.src)
                || (p.key.src == Ip::v4([0; 4]) && dhcp_discover(p))
        }
        L3::Ip(p) => {
            let unspecified = p.key.src == Ip::default();
            let src_ok =
                owned_v6(port, &p.key.src) || (unspecified && p.icmp == Some(IcmpKind::Neighbour));
            // An advertisement, or a duplicate-address probe, names the address claimed;
            // a solicitation from a configured address only asks.
            let claim_ok = match p.nd_target {
                Some(t) if p.nd_is_advert || unspecified => owned_v6(port, &t),
                _ => true,
            };
            src_ok && claim_ok
        }
        L3::BadIp | L3::Other(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::l3::{FlowKey, PROTO_ICMPV6, PROTO_TCP};

    fn port() -> PortPolicy {
        PortPolicy {
            mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            v4: vec![Ip::v4([10, 0, 0, 1])],
            v6: vec!["fd00::1".parse::<std::net::IpAddr>().unwrap().into()],
            ..Default::default()
        }
    }

    fn ip(src: Ip, dst: Ip, proto: u8, sport: u16, dport: u16) -> IpPacket {
        IpPacket {
            key: FlowKey {
                src,
                dst,
                sport,
                dport,
                proto,
                zone: 0,
            },
            tcp_flags: 0,
            icmp: None,
            related: None,
            nd_target: None,
            nd_is_advert: false,
            later_fragment: false,
        }
    }

    fn v6(s: &str) -> Ip {
        s.parse::<std::net::IpAddr>().unwrap().into()
    }

    #[test]
    fn only_own_addresses_pass() {
        let p = port();
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let other_mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let own = ip(
            Ip::v4([10, 0, 0, 1]),
            Ip::v4([10, 0, 0, 2]),
            PROTO_TCP,
            1,
            80,
        );
        assert!(allows(&p, mac, &L3::Ip(own)));
        assert!(!allows(&p, other_mac, &L3::Ip(own)), "another MAC");
        let spoofed = ip(
            Ip::v4([10, 0, 0, 7]),
            Ip::v4([10, 0, 0, 2]),
            PROTO_TCP,
            1,
            80,
        );
        assert!(!allows(&p, mac, &L3::Ip(spoofed)));
        let discover = ip(Ip::v4([0; 4]), Ip::v4([255; 4]), PROTO_UDP, 68, 67);
        assert!(allows(&p, mac, &L3::Ip(discover)));
        let zero_tcp = ip(Ip::v4([0; 4]), Ip::v4([255; 4]), PROTO_TCP, 68, 67);
        assert!(!allows(&p, mac, &L3::Ip(zero_tcp)));

        let arp = |sender_mac: MacAddr, ip: [u8; 4]| L3::Arp {
            sender_mac: sender_mac.0,
            sender_ip: ip,
        };
        assert!(allows(&p, mac, &arp(mac, [10, 0, 0, 1])));
        assert!(allows(&p, mac, &arp(mac, [0; 4])), "an ARP probe");
        assert!(
            !allows(&p, mac, &arp(mac, [10, 0, 0, 2])),
            "claims another's IP"
        );
        assert!(!allows(&p, mac, &arp(other_mac, [10, 0, 0, 1])));

        let own6 = ip(v6("fd00::1"), v6("fd00::2"), PROTO_TCP, 1, 80);
        assert!(allows(&p, mac, &L3::Ip(own6)));
        let ll = ip(v6("fe80::1"), v6("fd00::2"), PROTO_TCP, 1, 80);
        assert!(allows(&p, mac, &L3::Ip(ll)));
        let other6 = ip(v6("fd00::7"), v6("fd00::2"), PROTO_TCP, 1, 80);
        assert!(!allows(&p, mac, &L3::Ip(other6)));

        let mut na = ip(v6("fe80::1"), v6("ff02::1"), PROTO_ICMPV6, 0, 0);
        na.icmp = Some(IcmpKind::Neighbour);
        na.nd_is_advert = true;
        na.nd_target = Some(v6("fd00::1"));
        assert!(allows(&p, mac, &L3::Ip(na)));
        na.nd_target = Some(v6("fd00::2"));
        assert!(
            !allows(&p, mac, &L3::Ip(na)),
            "advertises another's address"
        );
        let mut ns = na;
        ns.nd_is_advert = false;
        ns.key.dst = v6("ff02::1:ff00:2");
        assert!(allows(&p, mac, &L3::Ip(ns)), "asking for another's address");
        ns.key.src = Ip::default();
        assert!(
            !allows(&p, mac, &L3::Ip(ns)),
            "a DAD probe for another's address"
        );
        ns.nd_target = Some(v6("fd00::1"));
        assert!(allows(&p, mac, &L3::Ip(ns)), "a DAD probe for its own");

        // Nothing configured: anything goes.
        let open = PortPolicy::default();
        assert!(allows(&open, other_mac, &L3::Ip(spoofed)));
    }
}
