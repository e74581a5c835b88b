//! One guest's memory as the data path touches it, and the only place where guest addresses
//! become host pointers: each region's guest range and host
//! address, collected when a burst starts. Every access is checked against these ranges;
//! with the few regions a vhost-user guest has, a lookup is a short scan, where vm-memory's
//! generic accessors cost a search and several layers per access (the largest single item
//! in profiles of 64-byte forwarding, at a dozen accesses per frame).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{
    Address, ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileSlice,
};

/// Guest memory as mapped by the backend (no dirty-page bitmap).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Host mapping of guest bytes.
pub type GuestSlice<'a> = VolatileSlice<'a, <() as vm_memory::bitmap::WithBitmapSlice<'a>>::S>;

/// Regions one SET_MEM_TABLE can carry (the `vhost` crate's limit of attached file
/// descriptors; QEMU sends at most 8 without CONFIGURE_MEM_SLOTS, which is not offered).
pub const MAX_REGIONS: usize = 32;

#[derive(Clone, Copy, Default)]
struct Region {
    start: u64,
    /// One past the last byte.
    end: u64,
    /// Host address of `start`.
    host: usize,
}

/// Checked access to one guest's memory; keeps that memory mapped while it lives.
pub struct Ram {
    mem: Arc<GuestMemory>,
    regions: [Region; MAX_REGIONS],
    count: usize,
}

impl Ram {
    pub fn new(mem: Arc<GuestMemory>) -> Ram {
        let mut regions = [Region::default(); MAX_REGIONS];
        let mut count = 0;
        for r in mem.iter().take(MAX_REGIONS) {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let start = r.start_addr().raw_value();
            let Some(end) = start.checked_add(r.len()) else {
                continue;
            };
            regions[count] = Region {
                start,
                end,
                host: host as usize,
            };
            count += 1;
        }
        Ram {
            mem,
            regions,
            count,
        }
    }

    /// The memory itself, for the queue methods of `virtio-queue`.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn region(&self, addr: u64) -> Option<&Region> {
        self.regions[..self.count]
            .iter()
            .find(|r| r.start <= addr && addr < r.end)
    }

    /// Host address of `addr` and how many bytes from it lie in the same region.
    fn host(&self, addr: u64) -> Option<(*mut u8, u64)> {
        let r = self.region(addr)?;
        let host = (r.host + (addr - r.start) as usize) as *mut u8;
        Some((host, r.end - addr))
    }

    /// The mapping of `len` bytes at `addr`, cut at the end of its region.
    pub fn region_slice(&self, addr: GuestAddress, len: usize) -> Option<GuestSlice<'_>> {
        let (host, room) = self.host(addr.raw_value())?;
        let len = (len as u64).min(room) as usize;
        // SAFETY: `host..host+len` lies inside a region of `self.mem`, which stays mapped
        // while `self` (and so the returned borrow) lives; guest memory is only ever
        // accessed through volatile slices or raw copies here, as in vm-memory.
        Some(unsafe { VolatileSlice::new(host, len) })
    }

    /// The mapping of all `len` bytes at `addr`, if they lie in one region.
    pub fn slice(&self, addr: GuestAddress, len: usize) -> Option<GuestSlice<'_>> {
        let s = self.region_slice(addr, len)?;
        (s.len() == len).then_some(s)
    }

    /// `len` bytes at `addr`, if they lie in one region, for reads and writes of fixed-layout
    /// values (descriptor tables, used rings).
    pub fn map(&self, addr: GuestAddress, len: usize) -> Option<Mapped<'_>> {
        let (host, room) = self.host(addr.raw_value())?;
        (len as u64 <= room).then_some(Mapped {
            host: host as usize,
            len,
            _ram: PhantomData,
        })
    }

    /// Starts fetching the cache line of `addr` into this core's cache, so a later access
    /// does not wait for it (the driver's core wrote it last). Nothing outside memory.
    pub fn prefetch(&self, addr: GuestAddress) {
        if let Some((host, _)) = self.host(addr.raw_value()) {
            prefetch(host);
        }
    }

    /// Whether `len` bytes from `addr` are all guest memory (possibly across adjacent
    /// regions).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut cur = addr;
        while cur < end {
            match self.region(cur) {
                Some(r) => cur = r.end,
                None => return false,
            }
        }
        true
    }

    fn atomic_u16(&self, addr: GuestAddress) -> Option<&AtomicU16> {
        let (host, room) = self.host(addr.raw_value())?;
        if room < 2 || !(host as usize).is_multiple_of(2) {
            return None;
        }
        // SAFETY: two aligned bytes inside a mapped region, alive as long as `self`.
        Some(unsafe { AtomicU16::from_ptr(host.cast()) })
    }

    /// Loads a little-endian u16 (ring indexes and flags).
    pub fn load_u16(&self, addr: GuestAddress, order: Ordering) -> Option<u16> {
        self.atomic_u16(addr).map(|a| u16::from_le(a.load(order)))
    }

    /// Stores a little-endian u16.
    pub fn store_u16(&self, addr: GuestAddress, value: u16, order: Ordering) -> Option<()> {
        self.atomic_u16(addr).map(|a| a.store(value.to_le(), order))
    }

    /// Writes `bytes` at `addr`, across adjacent regions if need be.
    pub fn write(&self, addr: GuestAddress, bytes: &[u8]) -> Option<()> {
        // All or nothing: no partial write into memory that ends in a gap.
        if !self.contains(addr.raw_value(), bytes.len() as u64) {
            return None;
        }
        let mut done = 0;
        while done < bytes.len() {
            let at = addr.checked_add(done as u64)?;
            let s = self.region_slice(at, bytes.len() - done)?;
            let n = s.len();
            s.copy_from(&bytes[done..done + n]);
            done += n;
        }
        Some(())
    }

    /// Reads `out.len()` bytes at `addr`, across adjacent regions if need be.
    pub fn read(&self, addr: GuestAddress, out: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < out.len() {
            let at = addr.checked_add(done as u64)?;
            let s = self.region_slice(at, out.len() - done)?;
            done += s.copy_to(&mut out[done..]);
        }
        Some(())
    }
}

fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and changes no memory.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
}

/// A range of guest memory inside one region, mapped while its `Ram` lives.
#[derive(Clone, Copy)]
pub struct Mapped<'a> {
    host: usize,
    len: usize,
    _ram: PhantomData<&'a Ram>,
}

impl Mapped<'_> {
    /// The host address of a `T` at `offset`, if it lies inside and is aligned for `T`.
    fn at<T: ByteValued>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(std::mem::size_of::<T>())?;
        let ptr = self.host.checked_add(offset)?;
        (end <= self.len && ptr.is_multiple_of(std::mem::align_of::<T>())).then_some(ptr as *mut T)
    }

    /// Reads the `T` at `offset` (None when outside or misaligned).
    pub fn read<T: ByteValued>(&self, offset: usize) -> Option<T> {
        // SAFETY: inside a mapped region and aligned (checked by `at`); any bit pattern is a
        // valid `T` (ByteValued); volatile, as the guest may write it meanwhile.
        self.at::<T>(offset).map(|p| unsafe { p.read_volatile() })
    }

    /// `Ram::prefetch` for the byte at `offset`.
    pub fn prefetch(&self, offset: usize) {
        if offset < self.len {
            prefetch((self.host + offset) as *const u8);
        }
    }

    /// Writes `value` at `offset` (None when outside or misaligned).
    pub fn write<T: ByteValued>(&self, offset: usize, value: T) -> Option<()> {
        // SAFETY: as for `read`.
        self.at::<T>(offset)
            .map(|p| unsafe { p.write_volatile(value) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn checks_every_access_against_the_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x8000), 0x1000),
        ])
        .unwrap();
        mem.write_obj(0xbeefu16, GuestAddress(0x1ffe)).unwrap();
        let ram = Ram::new(Arc::new(mem));
        assert_eq!(
            ram.load_u16(GuestAddress(0x1ffe), Ordering::Relaxed),
            Some(0xbeef)
        );
        // Misaligned, straddling or outside: refused, never read.
        assert_eq!(ram.load_u16(GuestAddress(0x1fff), Ordering::Relaxed), None);
        assert_eq!(ram.load_u16(GuestAddress(0x2000), Ordering::Relaxed), None);
        assert!(ram
            .store_u16(GuestAddress(0x9000), 1, Ordering::Relaxed)
            .is_none());
        // Adjacent regions form one range; a gap does not.
        assert!(ram.contains(0xff0, 0x20));
        assert!(ram.contains(0, 0x2000));
        assert!(!ram.contains(0x1ff0, 0x20));
        assert!(!ram.contains(u64::MAX - 1, 4));
        assert!(ram.contains(0x8000, 0));
        // A slice is cut at its region's end; a whole one must fit.
        assert_eq!(
            ram.region_slice(GuestAddress(0xff0), 0x100).unwrap().len(),
            0x10
        );
        assert!(ram.slice(GuestAddress(0xff0), 0x100).is_none());
        assert!(ram.write(GuestAddress(0x8ffc), &[1, 2, 3, 4]).is_some());
        let mut back = [0u8; 4];
        assert!(ram.read(GuestAddress(0x8ffc), &mut back).is_some());
        assert_eq!(back, [1, 2, 3, 4]);
        assert!(ram.write(GuestAddress(0x8ffd), &[1, 2, 3, 4]).is_none());
        assert!(ram.read(GuestAddress(0x8ffc), &mut back).is_some());
        assert_eq!(back, [1, 2, 3, 4], "a refused write writes nothing");
        // Adjacent regions are read and written across their border; a gap is refused.
        assert!(ram.write(GuestAddress(0xffe), &[5, 6, 7, 8]).is_some());
        assert!(ram.read(GuestAddress(0xffe), &mut back).is_some());
        assert_eq!(back, [5, 6, 7, 8]);
        assert!(ram.read(GuestAddress(0x1ffe), &mut back).is_none());
        // A mapping reads and writes aligned values inside it only.
        let m = ram.map(GuestAddress(0x8ff0), 16).unwrap();
        assert_eq!(m.read::<u32>(12), Some(0x0403_0201));
        assert!(m.write(8, 7u64).is_some());
        assert_eq!(m.read::<u64>(8), Some(7));
        assert_eq!(m.read::<u32>(14), None);
        assert_eq!(m.read::<u64>(12), None);
        assert!(ram.map(GuestAddress(0x8ff0), 17).is_none());
    }
}
