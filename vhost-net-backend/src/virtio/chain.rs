//! Descriptor chains: walking a chain a guest offered, with every index, address and
//! length checked, into a list of buffers inside guest memory.

use std::fmt;

use vm_memory::{Address, ByteValued, GuestAddress};

use crate::mem::{Mapped, Ram};

pub(crate) const VIRTQ_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub(crate) const VIRTQ_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub(crate) const VIRTQ_DESC_F_INDIRECT: u16 =
    virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
pub(crate) const DESC_SIZE: u64 = 16;

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
    /// An indirect descriptor from a driver that did not negotiate VIRTIO_F_INDIRECT_DESC.
    IndirectNotNegotiated,
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
            ChainError::IndirectNotNegotiated => {
                write!(f, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            }
            ChainError::BadIndirectTable(l) => write!(f, "indirect table length {l} is invalid"),
            ChainError::WrongDirection => write!(f, "buffer has the wrong direction"),
            ChainError::LengthOverflow => write!(f, "chain length overflows"),
            ChainError::TooManySegments => write!(f, "chain has too many buffers"),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct VirtqDesc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
    pub(crate) next: u16,
}

// SAFETY: VirtqDesc is plain old data with no padding (8 + 4 + 2 + 2 bytes).
unsafe impl ByteValued for VirtqDesc {}

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
    /// Whether the driver negotiated VIRTIO_F_INDIRECT_DESC: without it an indirect
    /// descriptor is an error, not a table to follow.
    indirect: bool,
}

impl<'a> DescTable<'a> {
    pub fn new(ram: &'a Ram, addr: GuestAddress, size: u16) -> Self {
        DescTable {
            addr,
            size,
            map: ram.map(addr, usize::from(size) * DESC_SIZE as usize),
            indirect: true,
        }
    }

    /// Whether indirect descriptors may be followed (VIRTIO_F_INDIRECT_DESC negotiated).
    pub fn with_indirect(self, allowed: bool) -> Self {
        DescTable {
            indirect: allowed,
            ..self
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
    let mut budget = MAX_CHAIN_SEGMENTS;
    walk_chain_within(ram, queue_table, head, device_writable, segs, &mut budget)
}

/// `walk_chain` visiting at most `budget` descriptors, which it counts down: one budget
/// for all the chains of one frame bounds a mergeable receiver's chains together, not each.
pub fn walk_chain_within(
    ram: &Ram,
    queue_table: &DescTable<'_>,
    head: u16,
    device_writable: bool,
    segs: &mut Vec<Segment>,
    budget_left: &mut usize,
) -> Result<u32, ChainError> {
    let size = queue_table.size;
    let mut table = queue_table.addr;
    let mut table_size = size;
    let mut index = head;
    let mut budget = size;
    let mut indirect = false;
    let mut total: u32 = 0;
    // Every descriptor visited counts, empty ones too: an indirect table may hold 65535.

    let mut table_map = queue_table.map;
    loop {
        if *budget_left == 0 {
            return Err(ChainError::TooManySegments);
        }
        *budget_left -= 1;
        if index >= table_size {
            return Err(ChainError::IndexOutOfRange(index));
        }
        // A table near the top of the address space must not wrap around.
        let offset = u64::from(index) * DESC_SIZE;
        let Some(desc_addr) = table.checked_add(offset) else {
            return Err(ChainError::OutsideMemory(
                table.raw_value(),
                offset + DESC_SIZE,
            ));
        };
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
            if !queue_table.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{mem, put_desc, ram};
    use vm_memory::GuestMemoryMmap;

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
        // A queue whose table sits at the top of the address space: index 1 would wrap
        // (a panic in debug builds before), and is outside memory.
        let top = DescTable::new(&r, GuestAddress(u64::MAX - 15), 8);
        assert!(matches!(
            walk_chain(&r, &top, 1, false, &mut Vec::new()),
            Err(ChainError::OutsideMemory(..))
        ));
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
        let plain = t.with_indirect(false);
        assert_eq!(
            walk_chain(&r, &plain, 5, false, &mut Vec::new()),
            Err(ChainError::IndirectNotNegotiated)
        );
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
}
