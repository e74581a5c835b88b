//! A frame as the pipeline hands it to an endpoint: checked, its first bytes copied, the
//! rest still in the sender's memory (or in a local buffer, from the tap).

use crate::mem::Ram;
use crate::types::ETH_HLEN;
use crate::virtio::chain::Segment;
use crate::virtio::copy::{Cursor, FrameSource};
use crate::virtio::NetHdr;

/// Most bytes of the next frame fetched ahead of its copy.
pub(crate) const PREFETCH_BODY: usize = 1536;

/// Most bytes of a frame's start kept in `Frame::head`.
pub const MAX_HEAD: usize = 128;

/// A frame that passed the sender's checks, ready to be switched.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    pub hdr: NetHdr,
    pub src: FrameSource<'a>,
    /// The frame's first bytes (at least its Ethernet header) as checked and switched:
    /// delivered from this copy, so a guest rewriting its buffer meanwhile cannot change
    /// what the decision was made on. A small frame is all here, and goes out in one write.
    pub head: &'a [u8],
    pub hash: u32,
    /// The VLAN segment the frame belongs to.
    pub segment: u16,
}

impl<'a> Frame<'a> {
    #[inline]
    pub fn eth(&self) -> &'a [u8; ETH_HLEN] {
        self.head[..ETH_HLEN]
            .try_into()
            .expect("a frame's head holds its Ethernet header")
    }
}

/// A frame of a TX burst, checked and waiting to be switched with the rest of the burst.
pub struct TxFrame {
    pub hdr: NetHdr,
    /// Its buffers: `segs[first..end]` of the burst's buffers.
    pub first: usize,
    pub end: usize,
    /// Where the frame starts, after the virtio header, and its length.
    pub start: Cursor,
    pub len: usize,
    /// The virtio header (`hdr_len` bytes) and the frame's first `head_len` bytes, as read.
    pub peeked: [u8; 12 + MAX_HEAD],
    pub hdr_len: usize,
    pub head_len: usize,
    pub hash: u32,
}

impl TxFrame {
    /// Starts fetching the frame's bytes beyond its head (up to an MTU's worth: the
    /// hardware prefetcher follows a longer copy by itself), which the driver's core wrote
    /// last: while one frame is copied, the next one's arrive.
    #[inline]
    pub fn prefetch_body(&self, ram: &Ram, segs: &[Segment]) {
        let mut left = self.len.saturating_sub(self.head_len).min(PREFETCH_BODY);
        let mut skip = self.head_len + self.hdr_len;
        for seg in &segs[self.first..self.end] {
            let seg_len = seg.len as usize;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            if let Some(m) = ram.map(seg.addr, seg_len) {
                for off in (skip..skip + n).step_by(64) {
                    m.prefetch(off);
                }
            }
            left -= n;
            skip = 0;
            if left == 0 {
                break;
            }
        }
    }

    /// The frame's Ethernet header (ingress checked that the head holds one).
    #[inline]
    pub fn eth(&self) -> &[u8; ETH_HLEN] {
        self.head()[..ETH_HLEN]
            .try_into()
            .expect("a checked frame's head holds its Ethernet header")
    }

    #[inline]
    pub fn head(&self) -> &[u8] {
        &self.peeked[self.hdr_len..self.hdr_len + self.head_len]
    }

    /// `MAX_HEAD` bytes from the head on, as a block: copied at a fixed size, inline (a
    /// copy of the head's own length was a call to memmove, 5 % of a routed frame).
    #[inline]
    pub fn head_block(&self) -> &[u8; MAX_HEAD] {
        self.peeked[self.hdr_len..]
            .first_chunk()
            .expect("a header is at most 12 bytes")
    }

    #[inline]
    pub fn frame<'a>(&'a self, ram: &'a Ram, segs: &'a [Segment], segment: u16) -> Frame<'a> {
        Frame {
            hdr: self.hdr,
            src: FrameSource::Guest {
                mem: ram,
                segs: &segs[self.first..self.end],
                start: self.start,
                len: self.len,
            },
            head: self.head(),
            hash: self.hash,
            segment,
        }
    }
}
