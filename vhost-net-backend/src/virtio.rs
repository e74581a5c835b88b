//! Virtio-net building blocks: feature bits, the `virtio_net_hdr`, descriptor chain walking
//! with full validation of guest-provided values, and copying between guest memories.
//!
//! Nothing here knows about switching; `port` drives these pieces.

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::ram::{Mapped, Ram};

/// Guest memory as mapped by the backend (no dirty-page bitmap).
pub type GuestMemory = GuestMemoryMmap<()>;

/// Virtio-net and ring feature bits (virtio 1.2, section 5.1.3 and 6).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const MQ: u64 = 1 << 22;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: the frontend may negotiate protocol features.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

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
    lo: u64,
    hi: u32,
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

/// One guest buffer of a descriptor chain, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What is wrong with a descriptor chain a guest offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index (or the head) is not below the table size.
    IndexOutOfRange(u16),
    /// The chain visits more descriptors than its table holds: a loop.
    Loop,
    /// The descriptor table itself, or a buffer, is not inside guest memory.
    OutsideMemory(u64, u64),
    /// An indirect descriptor inside an indirect table, or with NEXT set.
    NestedIndirect,
    /// An indirect table whose length is zero or not a multiple of 16.
    BadIndirectTable(u32),
    /// A device-writable buffer in a TX chain, or a read-only one in an RX chain.
    WrongDirection,
    /// The buffers add up to more than 4 GiB.
    LengthOverflow,
    /// More buffers than the backend is prepared to track for one chain.
    TooManySegments,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::IndexOutOfRange(i) => write!(f, "descriptor index {i} out of range"),
            ChainError::Loop => write!(f, "descriptor chain loops"),
            ChainError::OutsideMemory(a, l) => {
                write!(f, "buffer {a:#x}+{l:#x} is outside guest memory")
            }
            ChainError::NestedIndirect => write!(f, "nested or chained indirect descriptor"),
            ChainError::BadIndirectTable(l) => write!(f, "indirect table length {l} is invalid"),
            ChainError::WrongDirection => write!(f, "buffer has the wrong direction"),
            ChainError::LengthOverflow => write!(f, "chain length overflows"),
            ChainError::TooManySegments => write!(f, "chain has too many buffers"),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct VirtqDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: VirtqDesc is plain old data with no padding (8 + 4 + 2 + 2 bytes).
unsafe impl ByteValued for VirtqDesc {}

/// `struct virtq_used_elem`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct UsedElem {
    id: u32,
    len: u32,
}

// SAFETY: plain old data with no padding (4 + 4 bytes).
unsafe impl ByteValued for UsedElem {}

/// Most buffers one chain may have; Linux uses at most MAX_SKB_FRAGS + 2 for TX and one per
/// page of a big RX buffer, so this leaves ample room while bounding per-frame work.
pub const MAX_CHAIN_SEGMENTS: usize = 1024;

/// A queue's descriptor table with its host mapping, looked up once and walked for every
/// chain of a burst.
#[derive(Clone, Copy)]
pub struct DescTable<'a> {
    addr: GuestAddress,
    size: u16,
    map: Option<Mapped<'a>>,
}

impl<'a> DescTable<'a> {
    pub fn new(ram: &'a Ram, addr: GuestAddress, size: u16) -> Self {
        DescTable {
            addr,
            size,
            map: ram.map(addr, usize::from(size) * DESC_SIZE as usize),
        }
    }

    /// The buffer of descriptor `index` if it is a whole chain of one buffer inside guest
    /// memory, device-writable or not as asked (RX chains as drivers post them for
    /// mergeable buffers, small TX frames); None for anything else, `walk_chain` then has
    /// the final word. The same checks as `walk_chain`'s, without its loop.
    pub fn lone(&self, ram: &Ram, index: u16, device_writable: bool) -> Option<Segment> {
        let desc: VirtqDesc = self.map?.read(usize::from(index) * DESC_SIZE as usize)?;
        let (addr, len) = (u64::from_le(desc.addr), u32::from_le(desc.len));
        let want = if device_writable {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        let lone = u16::from_le(desc.flags) == want;
        (lone && len > 0 && ram.contains(addr, u64::from(len))).then_some(Segment {
            addr: GuestAddress(addr),
            len,
        })
    }

    /// Starts fetching descriptor `index` (a chain's head), ahead of its walk.
    pub fn prefetch(&self, index: u16) {
        if let Some(m) = self.map {
            m.prefetch(usize::from(index) * DESC_SIZE as usize);
        }
    }
}

/// Walks the chain starting at `head` in the queue's descriptor table, following indirect
/// tables, and appends its buffers to `segs`. Every index, address and length comes from
/// the guest and is checked. Returns the total length of the buffers.
pub fn walk_chain(
    ram: &Ram,
    queue_table: &DescTable<'_>,
    head: u16,
    device_writable: bool,
    segs: &mut Vec<Segment>,
) -> Result<u32, ChainError> {
    let size = queue_table.size;
    let mut table = queue_table.addr;
    let mut table_size = size;
    let mut index = head;
    let mut budget = size;
    let mut indirect = false;
    let mut total: u32 = 0;
    // Every descriptor visited counts, empty ones too: an indirect table may hold 65535.
    let mut visits = 0usize;

    let mut table_map = queue_table.map;
    loop {
        visits += 1;
        if visits > MAX_CHAIN_SEGMENTS {
            return Err(ChainError::TooManySegments);
        }
        if index >= table_size {
            return Err(ChainError::IndexOutOfRange(index));
        }
        let desc_addr = table.unchecked_add(u64::from(index) * DESC_SIZE);
        let outside = ChainError::OutsideMemory(desc_addr.raw_value(), DESC_SIZE);
        let offset = usize::from(index) * DESC_SIZE as usize;
        let desc: VirtqDesc = match table_map.and_then(|m| m.read(offset)) {
            Some(d) => d,
            // A table crossing regions or misaligned: the general path.
            None => {
                let mut d = VirtqDesc::default();
                ram.read(desc_addr, d.as_mut_slice()).ok_or(outside)?;
                d
            }
        };
        let (addr, len, flags) = (
            u64::from_le(desc.addr),
            u32::from_le(desc.len),
            u16::from_le(desc.flags),
        );

        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if indirect || flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || u64::from(len) / DESC_SIZE > 65535 {
                return Err(ChainError::BadIndirectTable(len));
            }
            check_range(ram, addr, u64::from(len))?;
            table = GuestAddress(addr);
            table_size = (u64::from(len) / DESC_SIZE) as u16;
            table_map = ram.map(table, len as usize);
            budget = table_size;
            index = 0;
            indirect = true;
            continue;
        }

        if (flags & VIRTQ_DESC_F_WRITE != 0) != device_writable {
            return Err(ChainError::WrongDirection);
        }
        if len > 0 {
            check_range(ram, addr, u64::from(len))?;
            total = total.checked_add(len).ok_or(ChainError::LengthOverflow)?;
            segs.push(Segment {
                addr: GuestAddress(addr),
                len,
            });
        }

        budget -= 1;
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(total);
        }
        if budget == 0 {
            return Err(ChainError::Loop);
        }
        index = u16::from_le(desc.next);
    }
}

fn check_range(ram: &Ram, addr: u64, len: u64) -> Result<(), ChainError> {
    // Buffers may span adjacent regions.
    if ram.contains(addr, len) {
        Ok(())
    } else {
        Err(ChainError::OutsideMemory(addr, len))
    }
}

/// Writes finished chains `(head, used length)` into the used ring from `next_used` on,
/// without publishing them; returns the new `next_used`. `publish_used` makes everything
/// written so far visible with one index store.
pub fn write_used(
    ram: &Ram,
    used_ring: GuestAddress,
    size: u16,
    next_used: u16,
    elems: impl Iterator<Item = (u16, u32)>,
) -> Option<u16> {
    let mut idx = next_used;
    // The ring mapped once; one crossing regions (or misaligned) is written entry by entry.
    let ring = ram.map(used_ring, 4 + 8 * usize::from(size));
    for (head, len) in elems {
        let elem = UsedElem {
            id: u32::from(head).to_le(),
            len: len.to_le(),
        };
        let offset = 4 + 8 * usize::from(ring_slot(idx, size));
        match ring.and_then(|r| r.write(offset, elem)) {
            Some(()) => {}
            None => ram.write(used_ring.checked_add(offset as u64)?, elem.as_slice())?,
        }
        idx = idx.wrapping_add(1);
    }
    Some(idx)
}

/// Stores the used index: the driver sees every entry before it. One store per burst: the
/// driver polls this cache line, and every store takes it away from the driver's core.
pub fn publish_used(ram: &Ram, used_ring: GuestAddress, next_used: u16) -> Option<()> {
    ram.store_u16(used_ring.checked_add(2)?, next_used, Ordering::Release)
}

/// `write_used` and `publish_used` in one: the entries appear together.
pub fn push_used(
    ram: &Ram,
    used_ring: GuestAddress,
    size: u16,
    next_used: u16,
    elems: impl Iterator<Item = (u16, u32)>,
) -> Option<u16> {
    let idx = write_used(ram, used_ring, size, next_used, elems)?;
    publish_used(ram, used_ring, idx)?;
    Some(idx)
}

/// Whether the driver wants an interrupt for used entries `old..new` (EVENT_IDX's
/// `used_event`, or the NO_INTERRUPT flag without it). When in doubt, yes.
pub fn needs_interrupt(
    ram: &Ram,
    avail_ring: GuestAddress,
    size: u16,
    event_idx: bool,
    old: u16,
    new: u16,
) -> bool {
    fence(Ordering::SeqCst);
    if event_idx {
        let at = avail_ring.checked_add(4 + 2 * u64::from(size));
        match at.and_then(|a| ram.load_u16(a, Ordering::Acquire)) {
            Some(used_event) => {
                new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
            }
            None => true,
        }
    } else {
        match ram.load_u16(avail_ring, Ordering::Acquire) {
            Some(flags) => flags & VRING_AVAIL_F_NO_INTERRUPT == 0,
            None => true,
        }
    }
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The ring slot of free-running index `index`. Split rings have a power-of-two size
/// (virtio-queue refuses others), so this is a mask, not a division per access.
fn ring_slot(index: u16, size: u16) -> u16 {
    if size.is_power_of_two() {
        index & (size - 1)
    } else {
        index % size.max(1)
    }
}

/// Reads the head of avail ring entry `index` (the caller has already read an avail index
/// covering it with Acquire, so the entry is published).
pub fn avail_head(ram: &Ram, avail_ring: GuestAddress, size: u16, index: u16) -> Option<u16> {
    let at = avail_ring.checked_add(4 + 2 * u64::from(ring_slot(index, size)))?;
    ram.load_u16(at, Ordering::Relaxed)
}

/// The avail index a driver published, read with Acquire so the entries it covers are seen.
pub fn avail_idx(ram: &Ram, avail_ring: GuestAddress) -> Option<u16> {
    ram.load_u16(avail_ring.checked_add(2)?, Ordering::Acquire)
}

/// Host mapping of guest bytes.
pub type GuestSlice<'a> = VolatileSlice<'a, <() as vm_memory::bitmap::WithBitmapSlice<'a>>::S>;

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
    use std::sync::Arc;
    use vm_memory::Bytes;

    /// A view of `m` for the data path; writes through `m` stay visible to it.
    fn ram(m: &GuestMemory) -> Ram {
        Ram::new(Arc::new(m.clone()))
    }

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn put_desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = VirtqDesc {
            addr: addr.to_le(),
            len: len.to_le(),
            flags: flags.to_le(),
            next: next.to_le(),
        };
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

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

    #[test]
    fn walks_direct_and_indirect_chains() {
        let m = mem();
        put_desc(&m, 0, 0, 0x1000, 100, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&m, 0, 1, 0x2000, 200, VIRTQ_DESC_F_NEXT, 2);
        put_desc(&m, 0, 2, 0x3000, 3 * 16, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&m, 0x3000, 0, 0xff00, 0x200, VIRTQ_DESC_F_NEXT, 1); // spans both regions
        put_desc(&m, 0x3000, 1, 0x5000, 0, VIRTQ_DESC_F_NEXT, 2); // empty buffers are skipped
        put_desc(&m, 0x3000, 2, 0x6000, 50, 0, 0);
        let mut segs = Vec::new();
        let r = ram(&m);
        let t = DescTable::new(&r, GuestAddress(0), 8);
        let total = walk_chain(&r, &t, 0, false, &mut segs).unwrap();
        assert_eq!(total, 100 + 200 + 0x200 + 50);
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[2].addr, GuestAddress(0xff00));

        // A table that crosses from one region into the next is read descriptor by
        // descriptor.
        put_desc(&m, 0xfff0, 0, 0x1000, 10, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&m, 0xfff0, 1, 0x2000, 20, 0, 0);
        let t = DescTable::new(&r, GuestAddress(0xfff0), 2);
        segs.clear();
        assert_eq!(walk_chain(&r, &t, 0, false, &mut segs), Ok(30));
        assert_eq!(segs.len(), 2);
    }

    #[test]
    fn rejects_hostile_chains() {
        let m = mem();
        let r = ram(&m);
        let t = DescTable::new(&r, GuestAddress(0), 8);
        let walk = |head| walk_chain(&r, &t, head, false, &mut Vec::new());
        // A loop: 0 -> 1 -> 0.
        put_desc(&m, 0, 0, 0x1000, 10, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&m, 0, 1, 0x1000, 10, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(0), Err(ChainError::Loop));
        // Outside memory, and an address that wraps.
        put_desc(&m, 0, 2, 0x1f000, 0x2000, 0, 0);
        assert_eq!(walk(2), Err(ChainError::OutsideMemory(0x1f000, 0x2000)));
        put_desc(&m, 0, 2, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(walk(2), Err(ChainError::OutsideMemory(..))));
        // Next index beyond the table, and a head beyond the table.
        put_desc(&m, 0, 3, 0x1000, 10, VIRTQ_DESC_F_NEXT, 9);
        assert_eq!(walk(3), Err(ChainError::IndexOutOfRange(9)));
        assert_eq!(walk(8), Err(ChainError::IndexOutOfRange(8)));
        // Writable buffer in a TX chain.
        put_desc(&m, 0, 4, 0x1000, 10, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(walk(4), Err(ChainError::WrongDirection));
        // Lengths that overflow 32 bits.
        put_desc(&m, 0x4000, 0, 0x1000, 0xffff_0000, VIRTQ_DESC_F_NEXT, 1);
        let big = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0001_0000)]);
        if let Ok(big) = big {
            put_desc(&big, 0, 0, 0x1000, 0xffff_0000, VIRTQ_DESC_F_NEXT, 1);
            put_desc(&big, 0, 1, 0x1000, 0xffff_0000, 0, 0);
            let big = ram(&big);
            assert_eq!(
                walk_chain(
                    &big,
                    &DescTable::new(&big, GuestAddress(0), 8),
                    0,
                    false,
                    &mut Vec::new()
                ),
                Err(ChainError::LengthOverflow)
            );
        }
        // Indirect tables: bad length, nested, chained.
        put_desc(&m, 0, 5, 0x3000, 20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(5), Err(ChainError::BadIndirectTable(20)));
        put_desc(
            &m,
            0,
            5,
            0x3000,
            16,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            0,
        );
        assert_eq!(walk(5), Err(ChainError::NestedIndirect));
        put_desc(&m, 0, 5, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&m, 0x3000, 0, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(5), Err(ChainError::NestedIndirect));
        // A loop inside an indirect table.
        put_desc(&m, 0x3000, 0, 0x1000, 10, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(5), Err(ChainError::Loop));
        // A huge indirect table of empty buffers: bounded, not walked to the end.
        for i in 0..2000u16 {
            put_desc(&m, 0x8000, i, 0, 0, VIRTQ_DESC_F_NEXT, i + 1);
        }
        put_desc(&m, 0, 6, 0x8000, 2000 * 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(6), Err(ChainError::TooManySegments));
    }

    #[test]
    fn used_entries_appear_together_and_interrupts_follow_used_event() {
        let m = mem();
        let used = GuestAddress(0x2000);
        let avail = GuestAddress(0x1000);
        let next = push_used(&ram(&m), used, 4, 3, [(7u16, 100u32), (2, 50)].into_iter()).unwrap();
        assert_eq!(next, 5);
        let idx: u16 = m.read_obj(GuestAddress(0x2002)).unwrap();
        assert_eq!(idx, 5);
        let e: [u32; 2] = m.read_obj(GuestAddress(0x2000 + 4 + 8 * 3)).unwrap();
        assert_eq!(e, [7, 100]);
        let e: [u32; 2] = m.read_obj(GuestAddress(0x2000 + 4)).unwrap(); // wrapped to slot 0
        assert_eq!(e, [2, 50]);
        // used_event sits after the 4 avail entries.
        m.write_obj(3u16, GuestAddress(0x1000 + 4 + 8)).unwrap();
        assert!(needs_interrupt(&ram(&m), avail, 4, true, 3, 5));
        m.write_obj(9u16, GuestAddress(0x1000 + 4 + 8)).unwrap();
        assert!(!needs_interrupt(&ram(&m), avail, 4, true, 3, 5));
        m.write_obj(1u16, avail).unwrap(); // NO_INTERRUPT
        assert!(!needs_interrupt(&ram(&m), avail, 4, false, 3, 5));
        m.write_obj(0u16, avail).unwrap();
        assert!(needs_interrupt(&ram(&m), avail, 4, false, 3, 5));
    }

    #[test]
    fn only_a_chain_of_one_buffer_takes_the_short_path() {
        let m = mem();
        let r = ram(&m);
        let t = DescTable::new(&r, GuestAddress(0), 8);
        let w = VIRTQ_DESC_F_WRITE;
        put_desc(&m, 0, 0, 0x1000, 2048, w, 0);
        put_desc(&m, 0, 1, 0x1000, 2048, w | VIRTQ_DESC_F_NEXT, 0);
        put_desc(&m, 0, 2, 0x3000, 16, w | VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&m, 0, 3, 0x1000, 2048, 0, 0);
        put_desc(&m, 0, 4, 0x1000, 0, w, 0);
        put_desc(&m, 0, 5, 0x1f800, 0x1000, w, 0);
        put_desc(&m, 0, 6, 0xff00, 0x200, w, 0);
        let seg = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        assert_eq!(t.lone(&r, 0, true), Some(seg(0x1000, 2048)));
        // Chained, indirect, read-only, empty, outside memory.
        for i in 1..=5 {
            assert_eq!(t.lone(&r, i, true), None);
        }
        // Across adjacent regions is still guest memory.
        assert_eq!(t.lone(&r, 6, true), Some(seg(0xff00, 0x200)));
        assert_eq!(t.lone(&r, 8, true), None);
        // A TX chain asks for a device-readable buffer.
        assert_eq!(t.lone(&r, 3, false), Some(seg(0x1000, 2048)));
        assert_eq!(t.lone(&r, 0, false), None);
    }

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
