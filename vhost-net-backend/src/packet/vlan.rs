//! 802.1Q tags on the tap trunk: taken off frames from the host, put on frames to it, with
//! the virtio-net header's offsets moved to match.

use crate::counters::DropReason;
use crate::types::{ETHERTYPE_VLAN, ETH_HLEN};
use crate::virtio::{NetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM};

const TAG_LEN: u16 = 4;

/// Takes the 802.1Q tag off the frame at `buf[start..]` (moving its MAC addresses 4 bytes
/// on) and moves `hdr`'s offsets back to match. Returns the VLAN id and where the untagged
/// frame now starts.
pub fn pop_tag(buf: &mut [u8], start: usize, hdr: &mut NetHdr) -> Result<(u16, usize), DropReason> {
    if buf.len() < start + ETH_HLEN + usize::from(TAG_LEN) {
        return Err(DropReason::Malformed);
    }
    let vid = u16::from_be_bytes([buf[start + 14], buf[start + 15]]) & 0x0fff;
    buf.copy_within(start..start + 12, start + 4);
    if hdr.needs_csum() {
        hdr.csum_start = hdr
            .csum_start
            .checked_sub(TAG_LEN)
            .ok_or(DropReason::BadOffload)?;
    }
    hdr.hdr_len = hdr.hdr_len.saturating_sub(TAG_LEN);
    Ok((vid, start + usize::from(TAG_LEN)))
}

/// `eth` with an 802.1Q tag for `vid` put in, into `out`; returns the length used (18).
pub fn push_tag(eth: &[u8; ETH_HLEN], vid: u16, out: &mut [u8; 18]) -> usize {
    out[..12].copy_from_slice(&eth[..12]);
    out[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    out[14..16].copy_from_slice(&(vid & 0x0fff).to_be_bytes());
    out[16..18].copy_from_slice(&eth[12..14]);
    18
}

/// The header a receiver gets for a frame passed on with its offloads: only the checksum
/// and GSO requests, rebuilt field by field (a sender's DATA_VALID or stray bits are not
/// passed on), with the offsets moved by `shift` bytes (a tag put in before them). None if
/// an offset would no longer fit.
#[inline]
pub fn passed_header(hdr: &NetHdr, shift: u16) -> Option<NetHdr> {
    let mut out = NetHdr::default();
    if hdr.needs_csum() {
        out.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        // A sender's offset near 64 KiB must not wrap once a tag moves it.
        out.csum_start = hdr.csum_start.checked_add(shift)?;
        out.csum_offset = hdr.csum_offset;
    }
    if hdr.is_gso() {
        out.gso_type = hdr.gso_type;
        out.gso_size = hdr.gso_size;
        out.hdr_len = hdr.hdr_len.saturating_add(shift);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_comes_off_and_goes_on_with_the_offsets() {
        let eth: [u8; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x08, 0x00];
        let mut tagged = [0u8; 18];
        assert_eq!(push_tag(&eth, 0x1234, &mut tagged), 18);
        assert_eq!(&tagged[12..16], &[0x81, 0x00, 0x02, 0x34]);
        let mut buf = tagged.to_vec();
        buf.extend_from_slice(&[0u8; 40]);
        let mut hdr = NetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 38,
            hdr_len: 58,
            gso_type: crate::virtio::VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        let (vid, start) = pop_tag(&mut buf, 0, &mut hdr).unwrap();
        assert_eq!((vid, start), (0x234, 4));
        assert_eq!(&buf[start..start + 14], &eth);
        assert_eq!((hdr.csum_start, hdr.hdr_len), (34, 54));
        let back = passed_header(&hdr, 4).unwrap();
        assert_eq!((back.csum_start, back.hdr_len), (38, 58));
        let near_top = NetHdr {
            csum_start: u16::MAX - 1,
            ..hdr
        };
        assert_eq!(passed_header(&near_top, 4), None);
        let mut bad = NetHdr {
            csum_start: 2,
            ..hdr
        };
        let mut buf = tagged.to_vec();
        assert_eq!(pop_tag(&mut buf, 0, &mut bad), Err(DropReason::BadOffload));
        assert_eq!(
            pop_tag(&mut tagged.to_vec()[..17], 0, &mut hdr.clone()),
            Err(DropReason::Malformed)
        );
    }
}
