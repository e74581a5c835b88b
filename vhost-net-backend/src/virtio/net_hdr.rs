//! The virtio-net header and feature bits (virtio 1.2, 5.1.3 and 5.1.6).

/// Virtio-net and ring feature bits (virtio 1.2, section 5.1.3 and 6), as masks.
pub mod features {
    use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
    use virtio_bindings::virtio_net as n;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    const fn bit(b: u32) -> u64 {
        1 << b
    }

    pub const CSUM: u64 = bit(n::VIRTIO_NET_F_CSUM);
    pub const GUEST_CSUM: u64 = bit(n::VIRTIO_NET_F_GUEST_CSUM);
    pub const MTU: u64 = bit(n::VIRTIO_NET_F_MTU);
    pub const MAC: u64 = bit(n::VIRTIO_NET_F_MAC);
    pub const GUEST_TSO4: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO4);
    pub const GUEST_TSO6: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO6);
    pub const GUEST_ECN: u64 = bit(n::VIRTIO_NET_F_GUEST_ECN);
    pub const HOST_TSO4: u64 = bit(n::VIRTIO_NET_F_HOST_TSO4);
    pub const HOST_TSO6: u64 = bit(n::VIRTIO_NET_F_HOST_TSO6);
    pub const HOST_ECN: u64 = bit(n::VIRTIO_NET_F_HOST_ECN);
    pub const MRG_RXBUF: u64 = bit(n::VIRTIO_NET_F_MRG_RXBUF);
    pub const STATUS: u64 = bit(n::VIRTIO_NET_F_STATUS);
    pub const MQ: u64 = bit(n::VIRTIO_NET_F_MQ);
    pub const RING_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
    pub const RING_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
    /// vhost-user: the frontend may negotiate protocol features (VHOST_USER_F_PROTOCOL_FEATURES).
    pub const PROTOCOL_FEATURES: u64 =
        vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
    pub const IN_ORDER: u64 = bit(VIRTIO_F_IN_ORDER);
}

pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 =
    virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 =
    virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 =
    virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_UDP as u8;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 =
    virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_ECN as u8;

/// Length of the virtio-net header for a set of negotiated features: 12 bytes once
/// `num_buffers` is present (VERSION_1 or MRG_RXBUF), 10 for a legacy driver.
pub fn net_hdr_len(features: u64) -> usize {
    if features & (features::VERSION_1 | features::MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// `struct virtio_net_hdr_v1`, decoded from little-endian guest bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    /// Decodes the first 10 or 12 bytes of `buf` (`num_buffers` is 0 for a 10-byte header).
    pub fn parse(buf: &[u8]) -> NetHdr {
        let le = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        NetHdr {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: if buf.len() >= 12 { le(10) } else { 0 },
        }
    }

    pub fn to_bytes(&self) -> [u8; 12] {
        self.to_wire().to_bytes()
    }

    /// The header as written into an RX buffer.
    pub fn to_wire(&self) -> WireHdr {
        let lo = u64::from(self.flags)
            | u64::from(self.gso_type) << 8
            | u64::from(self.hdr_len) << 16
            | u64::from(self.gso_size) << 32
            | u64::from(self.csum_start) << 48;
        let hi = u32::from(self.csum_offset) | u32::from(self.num_buffers) << 16;
        WireHdr { lo, hi }
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }

    /// GSO type without the ECN flag.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !VIRTIO_NET_HDR_GSO_ECN
    }

    pub fn is_gso(&self) -> bool {
        self.gso_kind() != VIRTIO_NET_HDR_GSO_NONE
    }
}

/// A `virtio_net_hdr_v1` as its bytes 0..8 and 8..12, little-endian words. The data path
/// hands headers on in this form: each word is stored and loaded whole, never read back by
/// a load spanning several smaller stores (which cannot be forwarded and so waits for every
/// earlier store to drain, the previous frames' writes into lines other cores hold
/// included: a fifth of the backend's time at 64 B).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireHdr {
    pub(crate) lo: u64,
    pub(crate) hi: u32,
}

impl WireHdr {
    pub fn with_num_buffers(self, n: u16) -> WireHdr {
        WireHdr {
            hi: self.hi & 0xffff | u32::from(n) << 16,
            ..self
        }
    }

    pub fn to_bytes(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.lo.to_le_bytes());
        out[8..].copy_from_slice(&self.hi.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = NetHdr {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN,
            hdr_len: 74,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::parse(&h.to_bytes()), h);
        assert_eq!(NetHdr::parse(&h.to_bytes()[..10]).num_buffers, 0);
        assert!(h.is_gso() && h.needs_csum());
        assert_eq!(h.gso_kind(), VIRTIO_NET_HDR_GSO_TCPV6);
        let nine = NetHdr::parse(&h.to_wire().with_num_buffers(9).to_bytes());
        assert_eq!(
            nine,
            NetHdr {
                num_buffers: 9,
                ..h
            }
        );
        assert_eq!(net_hdr_len(features::VERSION_1), 12);
        assert_eq!(net_hdr_len(0), 10);
    }
}
