//! The virtio device side of a port: the net header, descriptor chains, the split rings
//! and copies between guest memories. Nothing here knows about switching.

pub mod chain;
pub mod copy;
pub mod net_hdr;
pub mod ring;

pub use net_hdr::*;

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::mem::{GuestMemory, Ram};
    use crate::virtio::chain::VirtqDesc;

    /// A view of `m` for the data path; writes through `m` stay visible to it.
    pub fn ram(m: &GuestMemory) -> Ram {
        Ram::new(Arc::new(m.clone()))
    }

    pub fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    pub fn put_desc(
        mem: &GuestMemory,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = VirtqDesc {
            addr: addr.to_le(),
            len: len.to_le(),
            flags: flags.to_le(),
            next: next.to_le(),
        };
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
}
