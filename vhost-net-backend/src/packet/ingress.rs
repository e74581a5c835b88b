//! The one check every frame passes on its way into the switch, whichever kind of port it
//! came from (a guest's TX ring, or the tap once its trunk tag is taken off).

use crate::counters::DropReason;
use crate::packet::offload::parse_tcp;
use crate::types::{ETHERTYPE_QINQ, ETHERTYPE_VLAN, ETH_HLEN, MAX_GSO_FRAME};
use crate::virtio::{
    features as f, NetHdr, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Smallest MSS accepted for segmentation (Linux's `tcp_min_snd_mss` default is 48).
pub const MIN_GSO_SIZE: usize = 48;

/// What a port may hand the switch.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest frame (Ethernet header included) forwarded as it is.
    pub max_frame_len: usize,
    /// The offloads it may ask for, as virtio-net feature bits: CSUM, HOST_TSO4,
    /// HOST_TSO6, HOST_ECN (a guest: what it negotiated; the tap: what was turned on).
    pub offloads: u64,
}

/// Checks a frame of `frame_len` bytes whose first bytes are `head` (at least its Ethernet
/// header, as the switch will see it) and whose virtio-net header is `hdr`.
#[inline]
pub fn check(
    hdr: &NetHdr,
    head: &[u8],
    frame_len: usize,
    limits: Limits,
) -> Result<(), DropReason> {
    if head.len() < ETH_HLEN {
        return Err(DropReason::Malformed);
    }
    let ethertype = u16::from_be_bytes([head[12], head[13]]);
    if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        // Untagged frames only (a trunk's tag is off by now): a tag could hop segments.
        return Err(DropReason::VlanMismatch);
    }
    if head[6] & 1 != 0 {
        // A multicast source address.
        return Err(DropReason::Malformed);
    }
    if hdr.is_gso() {
        let needed = match hdr.gso_kind() {
            VIRTIO_NET_HDR_GSO_TCPV4 => f::HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => f::HOST_TSO6,
            _ => return Err(DropReason::BadOffload),
        } | if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
            f::HOST_ECN
        } else {
            0
        };
        // The MSS bounds the work of segmenting and the size of each segment.
        let mss = usize::from(hdr.gso_size);
        if limits.offloads & needed != needed
            || mss < MIN_GSO_SIZE
            || mss + ETH_HLEN > limits.max_frame_len
        {
            return Err(DropReason::BadOffload);
        }
        if frame_len > MAX_GSO_FRAME {
            return Err(DropReason::Oversize);
        }
        // Each segment is its headers plus the MSS, and must fit the MTU too. (Headers
        // that reach past the checked head are bounded when the frame is segmented.)
        if let Ok(t) = parse_tcp(head) {
            if t.payload + mss > limits.max_frame_len {
                return Err(DropReason::BadOffload);
            }
        }
    } else if frame_len > limits.max_frame_len {
        return Err(DropReason::Oversize);
    }
    // A checksum starts at or after the L3 header: filled in by software, it must not
    // rewrite the Ethernet header the switch decided on.
    if hdr.needs_csum()
        && (limits.offloads & f::CSUM == 0
            || usize::from(hdr.csum_start) < ETH_HLEN
            || usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2 > frame_len)
    {
        return Err(DropReason::BadOffload);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_NET_HDR_F_NEEDS_CSUM;

    const ALL: Limits = Limits {
        max_frame_len: 1514,
        offloads: f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN,
    };

    fn frame(ethertype: u16) -> Vec<u8> {
        let mut b = vec![0u8; 60];
        b[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        b[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        b[12..14].copy_from_slice(&ethertype.to_be_bytes());
        b
    }

    #[test]
    fn tagged_frames_and_multicast_sources_are_refused() {
        let plain = NetHdr::default();
        assert_eq!(check(&plain, &frame(0x0800), 60, ALL), Ok(()));
        for tag in [ETHERTYPE_VLAN, ETHERTYPE_QINQ] {
            assert_eq!(
                check(&plain, &frame(tag), 60, ALL),
                Err(DropReason::VlanMismatch)
            );
        }
        let mut m = frame(0x0800);
        m[6] = 1;
        assert_eq!(check(&plain, &m, 60, ALL), Err(DropReason::Malformed));
        assert_eq!(
            check(&plain, &frame(0x0800)[..13], 13, ALL),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            check(&plain, &frame(0x0800), 1515, ALL),
            Err(DropReason::Oversize)
        );
    }

    #[test]
    fn offloads_only_as_allowed_and_within_bounds() {
        let f = frame(0x0800);
        let tso = NetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        assert_eq!(check(&tso, &f, 65000, ALL), Ok(()));
        let none = Limits { offloads: 0, ..ALL };
        assert_eq!(check(&tso, &f, 65000, none), Err(DropReason::BadOffload));
        for mss in [MIN_GSO_SIZE as u16 - 1, 1501] {
            let h = NetHdr {
                gso_size: mss,
                ..tso
            };
            assert_eq!(
                check(&h, &f, 65000, ALL),
                Err(DropReason::BadOffload),
                "{mss}"
            );
        }
        assert_eq!(
            check(&tso, &f, MAX_GSO_FRAME + 1, ALL),
            Err(DropReason::Oversize)
        );
        let udp = NetHdr { gso_type: 3, ..tso };
        assert_eq!(check(&udp, &f, 9000, ALL), Err(DropReason::BadOffload));
        let csum = NetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(check(&csum, &f, 60, ALL), Ok(()));
        // A checksum over (and written into) the Ethernet header: never.
        for (start, offset) in [(0u16, 6u16), (4, 2), (13, 40)] {
            let h = NetHdr {
                csum_start: start,
                csum_offset: offset,
                ..csum
            };
            assert_eq!(
                check(&h, &f, 60, ALL),
                Err(DropReason::BadOffload),
                "{start}"
            );
        }
        assert_eq!(check(&csum, &f, 51, ALL), Err(DropReason::BadOffload));
        assert_eq!(check(&csum, &f, 60, none), Err(DropReason::BadOffload));
    }

    #[test]
    fn segments_with_their_headers_must_fit_the_mtu() {
        // IPv4 + TCP with 40 bytes of options: 14 + 20 + 60 = 94 bytes of headers.
        let mut f = frame(0x0800);
        f.resize(128, 0);
        f[14] = 0x45;
        f[23] = 6;
        f[14 + 20 + 12] = 15 << 4;
        let tso = |mss| NetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: mss,
            ..Default::default()
        };
        assert_eq!(check(&tso(1420), &f, 60000, ALL), Ok(()));
        assert_eq!(
            check(&tso(1421), &f, 60000, ALL),
            Err(DropReason::BadOffload),
            "94 + 1421 bytes is over 1514"
        );
        // Without options the MSS may be 1460.
        f[14 + 20 + 12] = 5 << 4;
        assert_eq!(check(&tso(1460), &f, 60000, ALL), Ok(()));
        assert_eq!(
            check(&tso(1461), &f, 60000, ALL),
            Err(DropReason::BadOffload)
        );
    }
}
