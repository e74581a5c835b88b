//! A TCP or UDP frame's signature: the bytes of its head that the switch, the router and
//! the policy decide on, as words. Two frames with one signature, from one port in one
//! segment, are decided alike, so the pipeline decides a burst's run of one flow once.

use crate::types::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};

use super::l3::{PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN};

/// MACs, ethertype, IP version, traffic class, flow label, fragment bits, hop limit,
/// protocol, addresses, ports and TCP flags; not the lengths, identification or checksum,
/// which change from packet to packet and which no decision reads.
#[derive(Clone, Copy, Debug, Eq)]
pub struct Signature {
    words: [u64; 8],
    tcp_flags: u8,
}

impl PartialEq for Signature {
    /// Word by word, without a branch: the derived compare called `memcmp`, 10 % of a
    /// 64 B frame's profile.
    #[inline]
    fn eq(&self, other: &Signature) -> bool {
        let mut diff = u64::from(self.tcp_flags ^ other.tcp_flags);
        for (a, b) in self.words.iter().zip(&other.words) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

#[inline]
fn word(head: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&head[at..at + 8]);
    u64::from_le_bytes(w)
}

impl Signature {
    /// The signature of the frame whose first bytes (untagged) are `head`: None for a
    /// frame that is not a whole TCP or UDP packet with its headers in `head` (IPv4 with
    /// options, fragments, ICMP, ARP: the long way), or that opens or closes a TCP
    /// connection (SYN, FIN, RST change the connection's state: each is decided alone).
    #[inline]
    pub fn of(head: &[u8]) -> Option<Signature> {
        if head.len() < 14 {
            return None;
        }
        let ethertype = u16::from_be_bytes([head[12], head[13]]);
        let (words, proto, l4) = match ethertype {
            // Bytes 14, 15 (version, header length, TOS) and 20, 21 (fragment bits);
            // 22, 23 (TTL, protocol) and 26.. (addresses, then the ports).
            ETHERTYPE_IPV4 if head.len() >= 54 && head[14] == 0x45 => {
                let fragment = u16::from_be_bytes([head[20], head[21]]) & 0x3fff != 0;
                if fragment {
                    return None;
                }
                (
                    [
                        word(head, 0),
                        word(head, 6),
                        word(head, 14) & 0xffff_0000_0000_ffff,
                        word(head, 22) & 0xffff_ffff_0000_ffff,
                        word(head, 30),
                        0,
                        0,
                        0,
                    ],
                    head[23],
                    34,
                )
            }
            // Bytes 14..18 (version, class, flow label), 20, 21 (next header, hop limit),
            // 22..54 (addresses), 54..58 (ports). Extension headers: the long way.
            ETHERTYPE_IPV6 if head.len() >= 68 && head[14] >> 4 == 6 => (
                [
                    word(head, 0),
                    word(head, 6),
                    word(head, 14) & 0xffff_0000_ffff_ffff,
                    word(head, 22),
                    word(head, 30),
                    word(head, 38),
                    word(head, 46),
                    word(head, 54) & 0xffff_ffff,
                ],
                head[20],
                54,
            ),
            _ => return None,
        };
        let tcp_flags = match proto {
            PROTO_UDP => 0,
            PROTO_TCP => head[l4 + 13],
            _ => return None,
        };
        if tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            return None;
        }
        Some(Signature { words, tcp_flags })
    }

    /// The packet's TCP flags (none of SYN, FIN, RST); 0 for UDP.
    #[inline]
    pub fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::l3::TCP_ACK;

    fn ipv4(proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&50u16.to_be_bytes());
        f[18..20].copy_from_slice(&7u16.to_be_bytes());
        f[20] = 0x40; // DF
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 0, 1, 5]);
        f[30..34].copy_from_slice(&[10, 0, 2, 5]);
        f[34..36].copy_from_slice(&1000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        if proto == PROTO_TCP {
            f[47] = TCP_ACK;
        }
        f
    }

    fn ipv6() -> Vec<u8> {
        let mut f = vec![0u8; 80];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&26u16.to_be_bytes());
        f[20] = PROTO_UDP;
        f[21] = 64;
        f[22] = 0xfd;
        f[37] = 5;
        f[38] = 0xfd;
        f[53] = 6;
        f[54..56].copy_from_slice(&1000u16.to_be_bytes());
        f[56..58].copy_from_slice(&53u16.to_be_bytes());
        f
    }

    #[test]
    fn what_changes_per_packet_leaves_the_signature_alone() {
        for base in [ipv4(PROTO_TCP), ipv4(PROTO_UDP), ipv6()] {
            let sig = Signature::of(&base).expect("a TCP or UDP packet");
            let mut other = base.clone();
            let v4 = base[12..14] == ETHERTYPE_IPV4.to_be_bytes();
            let per_packet: &[usize] = if v4 {
                // Total length, identification, checksum, the payload.
                &[16, 17, 18, 19, 24, 25, 60, 63]
            } else {
                // Payload length, the payload.
                &[18, 19, 60, 79]
            };
            for &at in per_packet {
                other[at] ^= 0x5a;
            }
            assert_eq!(Signature::of(&other), Some(sig));
        }
    }

    #[test]
    fn every_byte_a_decision_reads_changes_the_signature() {
        let cases: [(Vec<u8>, &[usize]); 3] = [
            // MACs, ethertype low byte, TOS, TTL, protocol, addresses, ports, TCP flags.
            (
                ipv4(PROTO_TCP),
                &[0, 5, 6, 11, 15, 22, 26, 29, 30, 33, 34, 35, 36, 37],
            ),
            (ipv4(PROTO_UDP), &[0, 11, 15, 22, 26, 33, 34, 37]),
            // Class and flow label, hop limit, both addresses' ends, ports.
            (ipv6(), &[15, 16, 17, 21, 22, 37, 38, 53, 54, 57]),
        ];
        for (base, bytes) in cases {
            let sig = Signature::of(&base).unwrap();
            for &at in bytes {
                let mut other = base.clone();
                other[at] ^= 0x08;
                assert_ne!(Signature::of(&other), Some(sig), "byte {at}");
            }
        }
        let mut ack_psh = ipv4(PROTO_TCP);
        ack_psh[47] |= 0x08;
        assert_ne!(Signature::of(&ack_psh), Signature::of(&ipv4(PROTO_TCP)));
    }

    #[test]
    fn frames_decided_alone_have_none() {
        let mut options = ipv4(PROTO_UDP);
        options[14] = 0x46;
        let mut fragment = ipv4(PROTO_UDP);
        fragment[21] = 1;
        let mut more_fragments = ipv4(PROTO_UDP);
        more_fragments[20] = 0x20;
        let icmp = ipv4(1);
        let mut extension = ipv6();
        extension[20] = 0; // hop-by-hop options
        let mut not_v6 = ipv6();
        not_v6[14] = 0x40;
        let mut arp = ipv4(PROTO_UDP);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let short = ipv4(PROTO_UDP)[..53].to_vec();
        let mut cases = vec![
            options,
            fragment,
            more_fragments,
            icmp,
            extension,
            not_v6,
            arp,
            short,
        ];
        for flag in [TCP_SYN, TCP_FIN, TCP_RST] {
            let mut f = ipv4(PROTO_TCP);
            f[47] |= flag;
            cases.push(f);
        }
        for (n, f) in cases.iter().enumerate() {
            assert_eq!(Signature::of(f), None, "case {n}");
        }
    }
}
