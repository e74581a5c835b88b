//! The split virtqueue's rings as the data path uses them: the avail ring read, the used
//! ring written and published, interrupts decided (virtio 1.2, 2.7). The only file that
//! knows the rings' layout.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::QueueT;
use vm_memory::{Address, ByteValued, GuestAddress};

use crate::mem::Ram;

/// `struct virtq_used_elem`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct UsedElem {
    id: u32,
    len: u32,
}

// SAFETY: plain old data with no padding (4 + 4 bytes).
unsafe impl ByteValued for UsedElem {}

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

const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

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

/// The avail index `queue`'s driver published, if it is at most a ring's worth ahead of
/// what was taken; more would mean the driver broke the ring protocol.
pub fn checked_avail_idx(ram: &Ram, queue: &virtio_queue::Queue) -> Option<u16> {
    let avail = avail_idx(ram, GuestAddress(queue.avail_ring()))?;
    (avail.wrapping_sub(queue.next_avail()) <= queue.size()).then_some(avail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{mem, ram};
    use vm_memory::{Bytes, GuestAddress};

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
}
