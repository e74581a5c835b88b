//! What the decisions see of a frame: its metadata, parsed once from the checked copy of
//! its first bytes (so a guest rewriting its buffer cannot change what was decided on).

use crate::types::MacAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameMeta {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
}

impl FrameMeta {
    /// From a frame's first bytes: at least its Ethernet header, as ingress checked.
    #[inline]
    pub fn parse(head: &[u8; 14]) -> FrameMeta {
        let mut dst = MacAddr::default();
        let mut src = MacAddr::default();
        dst.0.copy_from_slice(&head[0..6]);
        src.0.copy_from_slice(&head[6..12]);
        FrameMeta {
            dst,
            src,
            ethertype: u16::from_be_bytes([head[12], head[13]]),
        }
    }
}
