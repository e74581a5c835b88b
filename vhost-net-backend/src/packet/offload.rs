//! Software offloads for destinations that did not negotiate them: finishing a partial
//! checksum, and cutting a TSO frame into MSS-sized TCP segments with correct IPv4/IPv6 and
//! TCP headers. Works on local buffers only; no allocation.

use thiserror::Error;

use crate::virtio::{NetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6};

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("checksum start {start} + offset {offset} lies outside the {len}-byte frame")]
    ChecksumOutOfFrame {
        start: usize,
        offset: usize,
        len: usize,
    },
    #[error("GSO frame is not TCP over IPv4/IPv6 matching its gso_type {0}")]
    NotTcp(u8),
    #[error("GSO frame headers are truncated or malformed")]
    BadHeaders,
    #[error("gso_size 0")]
    ZeroMss,
    #[error("segment of {0} bytes would exceed the output buffer")]
    SegmentTooLarge(usize),
}

/// Adds `data` to a ones'-complement running sum (RFC 1071), 16 bits at a time.
pub fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early so the sum never overflows, whatever the length.
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

pub fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum the way a NIC does for CHECKSUM_PARTIAL: the field at
/// `csum_start + csum_offset` already holds the pseudo-header sum.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), OffloadError> {
    let field = csum_start.checked_add(csum_offset);
    let err = OffloadError::ChecksumOutOfFrame {
        start: csum_start,
        offset: csum_offset,
        len: frame.len(),
    };
    let field = match field {
        Some(f) if f + 2 <= frame.len() => f,
        _ => return Err(err),
    };
    let sum = !checksum_fold(checksum_add(0, &frame[csum_start..]));
    // UDP uses 0 for "no checksum"; a computed 0 is sent as 0xffff (RFC 768).
    let sum = if sum == 0 && csum_offset == 6 {
        0xffff
    } else {
        sum
    };
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Where the headers of a TCP frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrame {
    pub l3: usize,
    pub l4: usize,
    pub payload: usize,
    pub ipv6: bool,
}

/// Locates the IPv4/IPv6 and TCP headers of an (untagged or single-tagged) Ethernet frame.
pub fn parse_tcp(frame: &[u8]) -> Result<TcpFrame, OffloadError> {
    let bad = OffloadError::BadHeaders;
    if frame.len() < ETH_HLEN {
        return Err(bad);
    }
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 {
        if frame.len() < ETH_HLEN + 4 {
            return Err(bad);
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 += 4;
    }
    let (l4, ipv6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*frame.get(l3).ok_or(bad.clone())? & 0x0f) * 4;
            if frame[l3] >> 4 != 4 || ihl < 20 || frame.len() < l3 + ihl {
                return Err(bad);
            }
            if frame[l3 + 9] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp(VIRTIO_NET_HDR_GSO_TCPV4));
            }
            (l3 + ihl, false)
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < l3 + 40 || frame[l3] >> 4 != 6 {
                return Err(bad);
            }
            // Extension headers are not segmented; Linux does not send them with TSO either.
            if frame[l3 + 6] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp(VIRTIO_NET_HDR_GSO_TCPV6));
            }
            (l3 + 40, true)
        }
        _ => return Err(bad),
    };
    if frame.len() < l4 + 20 {
        return Err(bad);
    }
    let doff = usize::from(frame[l4 + 12] >> 4) * 4;
    if doff < 20 || frame.len() < l4 + doff {
        return Err(bad);
    }
    Ok(TcpFrame {
        l3,
        l4,
        payload: l4 + doff,
        ipv6,
    })
}

fn pseudo_header_sum(seg: &[u8], t: &TcpFrame, l4_len: usize) -> u32 {
    let mut sum = if t.ipv6 {
        checksum_add(0, &seg[t.l3 + 8..t.l3 + 40])
    } else {
        checksum_add(0, &seg[t.l3 + 12..t.l3 + 20])
    };
    sum = sum.wrapping_add(u32::from(IPPROTO_TCP));
    sum.wrapping_add(l4_len as u32)
}

/// Recomputes the IPv4 header checksum and the full TCP checksum of a finished segment.
fn finish_segment(seg: &mut [u8], t: &TcpFrame) {
    let l4_len = seg.len() - t.l4;
    if !t.ipv6 {
        let ihl = t.l4 - t.l3;
        seg[t.l3 + 10..t.l3 + 12].fill(0);
        let c = !checksum_fold(checksum_add(0, &seg[t.l3..t.l3 + ihl]));
        seg[t.l3 + 10..t.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    seg[t.l4 + 16..t.l4 + 18].fill(0);
    let sum = checksum_add(pseudo_header_sum(seg, t, l4_len), &seg[t.l4..]);
    let c = !checksum_fold(sum);
    seg[t.l4 + 16..t.l4 + 18].copy_from_slice(&c.to_be_bytes());
}

/// Segments a TSO frame (as described by `hdr`) into frames of at most `gso_size` payload
/// bytes, building each in `out` and handing it to `emit`. Each segment has its IP length,
/// IPv4 id and header checksum, TCP sequence number, flags and checksum set as a NIC would.
pub fn segment_tcp<E>(
    frame: &[u8],
    hdr: &NetHdr,
    out: &mut [u8],
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<Result<usize, E>, OffloadError> {
    let t = parse_tcp(frame)?;
    let want = match hdr.gso_kind() {
        VIRTIO_NET_HDR_GSO_TCPV4 => false,
        VIRTIO_NET_HDR_GSO_TCPV6 => true,
        k => return Err(OffloadError::NotTcp(k)),
    };
    if want != t.ipv6 {
        return Err(OffloadError::NotTcp(hdr.gso_kind()));
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::ZeroMss);
    }
    let headers = &frame[..t.payload];
    let payload = &frame[t.payload..];
    if headers.len() + mss.min(payload.len()) > out.len() {
        return Err(OffloadError::SegmentTooLarge(headers.len() + mss));
    }
    let seq0 = u32::from_be_bytes([
        frame[t.l4 + 4],
        frame[t.l4 + 5],
        frame[t.l4 + 6],
        frame[t.l4 + 7],
    ]);
    let id0 = u16::from_be_bytes([frame[t.l3 + 4], frame[t.l3 + 5]]);
    let flags0 = frame[t.l4 + 13];
    let count = payload.len().div_ceil(mss).max(1);

    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let len = headers.len() + chunk.len();
        let seg = &mut out[..len];
        seg[..headers.len()].copy_from_slice(headers);
        seg[headers.len()..].copy_from_slice(chunk);

        if t.ipv6 {
            let plen = (len - t.l3 - 40) as u16;
            seg[t.l3 + 4..t.l3 + 6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tot = (len - t.l3) as u16;
            seg[t.l3 + 2..t.l3 + 4].copy_from_slice(&tot.to_be_bytes());
            seg[t.l3 + 4..t.l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[t.l4 + 4..t.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[t.l4 + 13] = flags;
        finish_segment(seg, &t);
        if let Err(e) = emit(seg) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_NET_HDR_F_NEEDS_CSUM;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_frame(ipv6: bool, payload: &[u8], fin: bool) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let b = if ipv6 {
            b.ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            b.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        };
        let mut b = b.tcp(40000, 5201, 1_000_000, 65535).ack(77).psh().cwr();
        if fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn checksum_matches_etherparse() {
        let frame = tcp_frame(false, &[0x5a; 333], false);
        let t = parse_tcp(&frame).unwrap();
        let mut partial = frame.clone();
        // Replace the checksum with the pseudo-header sum, as a guest with CSUM does.
        let l4_len = frame.len() - t.l4;
        let pseudo = checksum_fold(pseudo_header_sum(&frame, &t, l4_len));
        partial[t.l4 + 16..t.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut partial, t.l4, 16).unwrap();
        assert_eq!(partial, frame);
        assert!(complete_checksum(&mut partial, t.l4, 5000).is_err());
        assert!(complete_checksum(&mut partial, usize::MAX, 16).is_err());
    }

    fn check_segments(ipv6: bool) {
        let payload: Vec<u8> = (0..60000u32).map(|i| (i % 251) as u8).collect();
        let frame = tcp_frame(ipv6, &payload, true);
        let hdr = NetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if ipv6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            },
            gso_size: 1448,
            ..Default::default()
        };
        let mut out = vec![0u8; 2000];
        let mut got = Vec::new();
        let mut segs = 0;
        let n = segment_tcp(&frame, &hdr, &mut out, |seg| -> Result<(), ()> {
            let p = SlicedPacket::from_ethernet(seg).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = p.transport else {
                panic!("not tcp")
            };
            let h = tcp.to_header();
            let want = match p.net.unwrap() {
                NetSlice::Ipv4(ip) => {
                    let iph = ip.header().to_header();
                    assert_eq!(iph.header_checksum, iph.calc_header_checksum());
                    assert_eq!(usize::from(iph.total_len), seg.len() - 14);
                    h.calc_checksum_ipv4(&iph, tcp.payload()).unwrap()
                }
                NetSlice::Ipv6(ip) => {
                    let iph = ip.header().to_header();
                    assert_eq!(usize::from(iph.payload_length), seg.len() - 54);
                    h.calc_checksum_ipv6(&iph, tcp.payload()).unwrap()
                }
                _ => panic!("no ip"),
            };
            assert_eq!(tcp.checksum(), want);
            assert_eq!(tcp.sequence_number(), 1_000_000 + got.len() as u32);
            assert!(tcp.payload().len() <= 1448);
            assert_eq!(tcp.cwr(), segs == 0);
            got.extend_from_slice(tcp.payload());
            segs += 1;
            let last = got.len() == payload.len();
            assert_eq!(tcp.fin(), last);
            assert_eq!(tcp.psh(), last);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(n, 60000usize.div_ceil(1448));
        assert_eq!(got, payload);
    }

    #[test]
    fn segments_ipv4_and_ipv6() {
        check_segments(false);
        check_segments(true);
    }

    #[test]
    fn rejects_bad_gso_frames() {
        let frame = tcp_frame(false, &[1; 100], false);
        let mut out = vec![0u8; 2000];
        let mut hdr = NetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
            gso_size: 10,
            ..Default::default()
        };
        let emit = |_: &[u8]| -> Result<(), ()> { Ok(()) };
        assert!(matches!(
            segment_tcp(&frame, &hdr, &mut out, emit),
            Err(OffloadError::NotTcp(_))
        ));
        hdr.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
        hdr.gso_size = 0;
        assert_eq!(
            segment_tcp(&frame, &hdr, &mut out, emit).unwrap_err(),
            OffloadError::ZeroMss
        );
        hdr.gso_size = 10;
        assert_eq!(
            segment_tcp(&frame[..40], &hdr, &mut out, emit).unwrap_err(),
            OffloadError::BadHeaders
        );
        assert!(segment_tcp(&frame, &hdr, &mut out[..20], emit).is_err());
    }
}
