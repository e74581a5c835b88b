//! Frames for tests, built with `etherparse` (independent of the switch's own parsing).

use etherparse::PacketBuilder;
use vhost_net_backend::packet::offload::{checksum_add, checksum_fold, parse_tcp};
use vhost_net_backend::virtio::{
    NetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

pub const BROADCAST: [u8; 6] = [0xff; 6];

pub fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0, 0, n]
}

/// A UDP/IPv4 frame of exactly `len` bytes (at least 42) with a patterned payload.
pub fn udp_frame(src: [u8; 6], dst: [u8; 6], len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len.saturating_sub(42))
        .map(|i| (i % 253) as u8)
        .collect();
    let mut out = Vec::with_capacity(len);
    PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 0, 0, src[5]], [10, 0, 0, dst[5]], 64)
        .udp(5000, 6000)
        .write(&mut out, &payload)
        .unwrap();
    out
}

/// A TCP frame carrying `payload_len` bytes, checksummed in full.
pub fn tcp_frame(src: [u8; 6], dst: [u8; 6], ipv6: bool, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
    let b = PacketBuilder::ethernet2(src, dst);
    let b = if ipv6 {
        b.ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, src[5]],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst[5]],
            64,
        )
    } else {
        b.ipv4([10, 0, 0, src[5]], [10, 0, 0, dst[5]], 64)
    };
    let mut out = Vec::new();
    b.tcp(40000, 5201, 7_000_000, 64000)
        .ack(1)
        .psh()
        .write(&mut out, &payload)
        .unwrap();
    out
}

/// Turns a fully checksummed TCP frame into what a guest with CSUM/TSO hands its NIC: the
/// TCP checksum field holds the pseudo-header sum only, and the header says what to finish.
pub fn as_partial_tcp(frame: &mut [u8], gso_size: u16) -> NetHdr {
    let t = parse_tcp(frame).unwrap();
    let l4_len = frame.len() - t.l4;
    let mut sum = if t.ipv6 {
        checksum_add(0, &frame[t.l3 + 8..t.l3 + 40])
    } else {
        checksum_add(0, &frame[t.l3 + 12..t.l3 + 20])
    };
    sum = sum.wrapping_add(6).wrapping_add(l4_len as u32);
    let pseudo = checksum_fold(sum);
    frame[t.l4 + 16..t.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let gso_type = match (gso_size, t.ipv6) {
        (0, _) => 0,
        (_, false) => VIRTIO_NET_HDR_GSO_TCPV4,
        (_, true) => VIRTIO_NET_HDR_GSO_TCPV6,
    };
    NetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: t.payload as u16,
        gso_size,
        csum_start: t.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    }
}
