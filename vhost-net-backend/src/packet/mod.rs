//! Packet logic: pure functions on a frame's bytes and its virtio-net header. No guest
//! memory, no I/O.

pub mod build;
pub mod flow;
pub mod ingress;
pub mod l3;
pub mod meta;
pub mod offload;
pub mod rewrite;
pub mod signature;
pub mod vlan;
