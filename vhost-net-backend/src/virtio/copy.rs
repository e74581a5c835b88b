//! Copying frames between guest memories: reading a frame from a sender's buffers,
//! writing it into a receiver's, with no copy in between.

use vm_memory::Address;

use crate::mem::{GuestSlice, Ram};
use crate::virtio::chain::Segment;
use crate::virtio::net_hdr::WireHdr;

/// The host mappings of `len` guest bytes from `start`, one piece per buffer and region;
/// `Err(())` where a piece cannot be mapped (the walk stops there).
pub struct GuestSlices<'a> {
    mem: &'a Ram,
    segs: &'a [Segment],
    cur: Cursor,
    left: usize,
}

impl<'a> GuestSlices<'a> {
    pub fn new(mem: &'a Ram, segs: &'a [Segment], start: Cursor, len: usize) -> Self {
        GuestSlices {
            mem,
            segs,
            cur: start,
            left: len,
        }
    }
}

impl<'a> Iterator for GuestSlices<'a> {
    type Item = Result<GuestSlice<'a>, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let piece = self.segs.get(self.cur.seg).and_then(|s| {
            let addr = s.addr.unchecked_add(self.cur.off as u64);
            self.mem
                .region_slice(addr, (s.len as usize - self.cur.off).min(self.left))
        });
        let Some(slice) = piece else {
            self.left = 0;
            return Some(Err(()));
        };
        self.cur.advance(self.segs, slice.len());
        self.left -= slice.len();
        Some(Ok(slice))
    }
}

/// A read position inside a list of guest segments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    seg: usize,
    off: usize,
}

impl Cursor {
    /// Skips `n` bytes; returns false if the segments end first.
    pub fn advance(&mut self, segs: &[Segment], mut n: usize) -> bool {
        while n > 0 {
            let Some(s) = segs.get(self.seg) else {
                return false;
            };
            let left = s.len as usize - self.off;
            if n < left {
                self.off += n;
                return true;
            }
            n -= left;
            self.seg += 1;
            self.off = 0;
        }
        true
    }
}

/// Where frame bytes come from: a guest's TX buffers, or a local buffer (after software
/// offload work).
#[derive(Clone, Copy)]
pub enum FrameSource<'a> {
    Guest {
        mem: &'a Ram,
        segs: &'a [Segment],
        start: Cursor,
        len: usize,
    },
    Local(&'a [u8]),
}

impl<'a> FrameSource<'a> {
    pub fn len(&self) -> usize {
        match self {
            FrameSource::Guest { len, .. } => *len,
            FrameSource::Local(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same frame without its first `n` bytes.
    pub fn skip(&self, n: usize) -> FrameSource<'a> {
        match *self {
            FrameSource::Local(b) => FrameSource::Local(&b[n.min(b.len())..]),
            FrameSource::Guest {
                mem,
                segs,
                mut start,
                len,
            } => {
                let n = n.min(len);
                start.advance(segs, n);
                FrameSource::Guest {
                    mem,
                    segs,
                    start,
                    len: len - n,
                }
            }
        }
    }

    /// Copies the first `out.len()` bytes (or fewer) into `out`; returns how many.
    pub fn peek(&self, out: &mut [u8]) -> usize {
        match *self {
            FrameSource::Local(b) => {
                let n = b.len().min(out.len());
                out[..n].copy_from_slice(&b[..n]);
                n
            }
            FrameSource::Guest {
                mem,
                segs,
                start,
                len,
            } => {
                let mut done = 0;
                for slice in GuestSlices::new(mem, segs, start, len.min(out.len())) {
                    let Ok(slice) = slice else { break };
                    done += slice.copy_to(&mut out[done..done + slice.len()]);
                }
                done
            }
        }
    }
}

/// Stores the first `len` bytes (10 or 12) of `hdr` at the start of `dst`, each word with
/// one store; false (nothing stored) for any other length or too short a `dst`.
fn store_net_hdr(dst: &GuestSlice<'_>, hdr: WireHdr, len: usize) -> bool {
    if !(len == 10 || len == 12) || dst.len() < len {
        return false;
    }
    let guard = dst.ptr_guard_mut();
    let p = guard.as_ptr();
    // SAFETY: `dst` maps at least `len` (10 or 12) bytes of guest memory, kept mapped by
    // `guard`; unaligned stores through raw pointers, no reference made (as vm-memory's own
    // bulk copies). Volatile byte arrays would be stored a byte at a time.
    unsafe {
        p.cast::<u64>().write_unaligned(hdr.lo.to_le());
        if len == 12 {
            p.add(8).cast::<u32>().write_unaligned(hdr.hi.to_le());
        } else {
            p.add(8)
                .cast::<u16>()
                .write_unaligned((hdr.hi as u16).to_le());
        }
    }
    true
}

/// Writes the header's first `hdr_len` bytes, `head` and `rest` (the frame's first bytes
/// as checked, and the rest of it in the sender's memory) into the buffer `seg`, if they
/// fit it and it lies in one region; None otherwise (nothing written).
///
/// The path of frames that go from one buffer into one buffer: no `GuestWriter`, whose
/// position, kept in memory between its calls, was read back by wider loads than had
/// stored it. Such a load cannot be forwarded from the store buffer and waits for every
/// earlier store to drain, the previous frames' writes into guest memory included.
#[inline(always)]
pub fn write_frame_whole(
    ram: &Ram,
    seg: Segment,
    hdr: WireHdr,
    hdr_len: usize,
    head: &[u8],
    rest: Option<GuestSlice<'_>>,
) -> Option<()> {
    let rest_len = rest.as_ref().map_or(0, |r| r.len());
    let need = hdr_len + head.len() + rest_len;
    if (seg.len as usize) < need {
        return None;
    }
    // Every piece looked up before the first byte is written.
    let dst = ram.slice(seg.addr, need)?;
    let head_dst = dst.subslice(hdr_len, head.len()).ok()?;
    let rest_dst = dst.offset(hdr_len + head.len()).ok()?;
    if !store_net_hdr(&dst, hdr, hdr_len) {
        return None;
    }
    head_dst.copy_from(head);
    if let Some(rest) = rest {
        rest.copy_to_volatile_slice(rest_dst);
    }
    Some(())
}

/// Writes into a destination guest's RX buffers, front to back.
pub struct GuestWriter<'a> {
    mem: &'a Ram,
    segs: &'a [Segment],
    cur: Cursor,
    /// The host mapping of the rest of the current buffer (up to its region's end), kept
    /// between writes: a virtio header, an Ethernet header and a payload cost one lookup.
    mapped: Option<GuestSlice<'a>>,
    written: usize,
}

impl<'a> GuestWriter<'a> {
    pub fn new(mem: &'a Ram, segs: &'a [Segment]) -> Self {
        GuestWriter {
            mem,
            segs,
            cur: Cursor::default(),
            mapped: None,
            written: 0,
        }
    }

    pub fn written(&self) -> usize {
        self.written
    }

    /// The next writable slice of at most `max` bytes (`max` > 0).
    fn next_slice(&mut self, max: usize) -> Option<GuestSlice<'a>> {
        let rest = match self.mapped.take() {
            Some(m) if !m.is_empty() => m,
            _ => {
                let s = self.segs.get(self.cur.seg)?;
                let addr = s.addr.unchecked_add(self.cur.off as u64);
                self.mem.region_slice(addr, s.len as usize - self.cur.off)?
            }
        };
        let n = rest.len().min(max);
        let now = rest.subslice(0, n).ok()?;
        // What is left of this mapping; at its end (the buffer's or a region's) the next
        // write looks the rest up again.
        self.mapped = if n < rest.len() {
            Some(rest.offset(n).ok()?)
        } else {
            None
        };
        self.cur.advance(self.segs, n);
        self.written += n;
        Some(now)
    }

    /// Writes the first `len` bytes (10 or 12) of `hdr`.
    pub fn write_net_hdr(&mut self, hdr: WireHdr, len: usize) -> bool {
        if !(len == 10 || len == 12) {
            return false;
        }
        let Some(dst) = self.next_slice(len) else {
            return false;
        };
        if dst.len() < len {
            // Split across buffers or regions: rare, so bytes through memory are fine.
            let bytes = hdr.to_bytes();
            let n = dst.len();
            dst.copy_from(&bytes[..n]);
            return self.write(&bytes[n..len]);
        }
        store_net_hdr(&dst, hdr, len)
    }

    /// Writes all of `buf`; returns false if the buffers are too small.
    pub fn write(&mut self, mut buf: &[u8]) -> bool {
        while !buf.is_empty() {
            let Some(dst) = self.next_slice(buf.len()) else {
                return false;
            };
            let n = dst.len();
            dst.copy_from(&buf[..n]);
            buf = &buf[n..];
        }
        true
    }

    /// Copies `src` in, straight from the source guest's memory when it is one: this is the
    /// single copy on the VM-to-VM path.
    pub fn copy_from(&mut self, src: FrameSource<'_>) -> bool {
        match src {
            FrameSource::Local(b) => self.write(b),
            FrameSource::Guest {
                mem,
                segs,
                start,
                len,
            } => {
                for piece in GuestSlices::new(mem, segs, start, len) {
                    let Ok(mut piece) = piece else {
                        return false;
                    };
                    while !piece.is_empty() {
                        let Some(dst) = self.next_slice(piece.len()) else {
                            return false;
                        };
                        let n = dst.len();
                        let (Ok(part), Ok(rest)) = (piece.subslice(0, n), piece.offset(n)) else {
                            return false;
                        };
                        part.copy_to_volatile_slice(dst);
                        piece = rest;
                    }
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{mem, ram};
    use crate::virtio::NetHdr;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_frame_is_written_into_one_buffer_whole_or_not_at_all() {
        let m = mem();
        let r = ram(&m);
        let hdr = NetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 6,
            num_buffers: 1,
            ..NetHdr::default()
        };
        let frame: Vec<u8> = (0..60u8).collect();
        for hdr_len in [12, 10] {
            m.write_slice(&[0xee; 80], GuestAddress(0x100)).unwrap();
            let seg = Segment {
                addr: GuestAddress(0x100),
                len: 72,
            };
            assert!(write_frame_whole(&r, seg, hdr.to_wire(), hdr_len, &frame, None).is_some());
            let mut out = [0u8; 80];
            m.read_slice(&mut out, GuestAddress(0x100)).unwrap();
            assert_eq!(out[..hdr_len], hdr.to_bytes()[..hdr_len]);
            assert_eq!(out[hdr_len..hdr_len + 60], frame[..]);
            // Nothing beyond the frame is touched.
            assert!(out[hdr_len + 60..].iter().all(|&b| b == 0xee));
        }
        // A frame's head from its checked copy, its rest from the sender's memory.
        let src = mem();
        let body: Vec<u8> = (0..1400u32).map(|i| (i * 13) as u8).collect();
        src.write_slice(&body, GuestAddress(0x5000)).unwrap();
        let src_ram = ram(&src);
        let rest = src_ram.slice(GuestAddress(0x5000), body.len());
        let seg = Segment {
            addr: GuestAddress(0x2000),
            len: 2048,
        };
        assert!(write_frame_whole(&r, seg, hdr.to_wire(), 12, &frame, rest).is_some());
        let mut out = vec![0u8; 12 + 60 + 1400];
        m.read_slice(&mut out, GuestAddress(0x2000)).unwrap();
        assert_eq!(out[..12], hdr.to_bytes());
        assert_eq!(out[12..72], frame[..]);
        assert_eq!(out[72..], body[..]);
        let short = Segment { len: 1471, ..seg };
        assert!(write_frame_whole(&r, short, hdr.to_wire(), 12, &frame, rest).is_none());

        // Too small a buffer, or one crossing into the next region: nothing written.
        let small = Segment {
            addr: GuestAddress(0x400),
            len: 71,
        };
        assert!(write_frame_whole(&r, small, hdr.to_wire(), 12, &frame, None).is_none());
        let crossing = Segment {
            addr: GuestAddress(0xffe0),
            len: 72,
        };
        assert!(write_frame_whole(&r, crossing, hdr.to_wire(), 12, &frame, None).is_none());
        // A header length no driver negotiates: nothing written either.
        let fits = Segment { len: 2048, ..small };
        assert!(write_frame_whole(&r, fits, hdr.to_wire(), 8, &frame, None).is_none());
        let mut out = [0u8; 72];
        m.read_slice(&mut out, GuestAddress(0x400)).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        m.read_slice(&mut out, GuestAddress(0xffe0)).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn copies_across_segments_and_regions() {
        let src_mem = mem();
        let dst_mem = mem();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        src_mem
            .write_slice(&data[..300], GuestAddress(0xfe00))
            .unwrap();
        src_mem
            .write_slice(&data[300..], GuestAddress(0x100))
            .unwrap();
        let src_segs = [
            Segment {
                addr: GuestAddress(0xfe00),
                len: 300,
            },
            Segment {
                addr: GuestAddress(0x100),
                len: 700,
            },
        ];
        let dst_segs = [
            Segment {
                addr: GuestAddress(0x8000),
                len: 10,
            },
            Segment {
                addr: GuestAddress(0xff80),
                len: 2000,
            },
        ];
        let src_ram = ram(&src_mem);
        let mut start = Cursor::default();
        assert!(start.advance(&src_segs, 4));
        let src = FrameSource::Guest {
            mem: &src_ram,
            segs: &src_segs,
            start,
            len: 996,
        };
        let mut peek = [0u8; 400];
        assert_eq!(src.peek(&mut peek), 400);
        assert_eq!(&peek[..], &data[4..404]);
        let dst_ram = ram(&dst_mem);
        let mut w = GuestWriter::new(&dst_ram, &dst_segs);
        assert!(w.write(&[1, 2]));
        assert!(w.copy_from(src));
        assert_eq!(w.written(), 998);
        let mut out = vec![0u8; 998];
        dst_mem
            .read_slice(&mut out[..10], GuestAddress(0x8000))
            .unwrap();
        dst_mem
            .read_slice(&mut out[10..], GuestAddress(0xff80))
            .unwrap();
        assert_eq!(&out[..2], &[1, 2]);
        assert_eq!(&out[2..], &data[4..]);
        // Too small a destination is reported, not overrun.
        let mut w = GuestWriter::new(&dst_ram, &dst_segs[..1]);
        assert!(!w.copy_from(src));
    }
}
