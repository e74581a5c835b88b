//! The flow hash that keeps a flow on one RX queue.

use crate::types::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};

/// A hash of a frame's flow (MACs, IP addresses, TCP/UDP ports) that picks the destination
/// RX queue, so one flow stays on one queue and in order. Mixes whole words: it runs for
/// every frame.
#[inline]
pub fn flow_hash(frame: &[u8]) -> u32 {
    fn mix(h: u64, v: u64) -> u64 {
        (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
    }
    fn word(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        let n = b.len().min(8);
        w[..n].copy_from_slice(&b[..n]);
        u64::from_le_bytes(w)
    }
    if frame.len() < 14 {
        return mix(0x51_7cc1_b727_220a, word(frame)) as u32;
    }
    let mut h = mix(
        mix(0x51_7cc1_b727_220a, word(&frame[0..8])),
        word(&frame[8..12]),
    );
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (proto, l4) = match ethertype {
        ETHERTYPE_IPV4 if frame.len() >= 34 => {
            h = mix(h, word(&frame[26..34]));
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
            (if fragment { 0 } else { frame[23] }, 14 + ihl)
        }
        ETHERTYPE_IPV6 if frame.len() >= 54 => {
            for chunk in frame[22..54].chunks(8) {
                h = mix(h, word(chunk));
            }
            (frame[20], 54)
        }
        _ => (0, 0),
    };
    if (proto == 6 || proto == 17) && frame.len() >= l4 + 4 {
        h = mix(h, word(&frame[l4..l4 + 4]));
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_follows_the_flow() {
        let mut a = vec![0u8; 60];
        a[12] = 0x08;
        a[14] = 0x45;
        a[23] = 6;
        let base = flow_hash(&a);
        let mut payload_changed = a.clone();
        payload_changed[50] = 9;
        assert_eq!(flow_hash(&payload_changed), base);
        let mut port_changed = a.clone();
        port_changed[35] = 1;
        assert_ne!(flow_hash(&port_changed), base);
        assert_ne!(flow_hash(&a[..5]), 0);
    }
}
