//! Kernel-side networking for QEMU/KVM guests: a drop-in for `qemu-bridge-helper` with
//! per-bridge port settings (VLAN, MTU, isolation, rate limits), and the network modes
//! (NAT, bridged, internal, host-only, segments with default-deny rules between them).
//!
//! Modules: `acl` (the helper's ACL file), `tap` (tap devices), `netlink` (links, bridge
//! ports and VLANs, addresses), `nft` (nftables JSON), `port` (attaching a tap to a bridge), `privilege` (what the helper does
//! first when it runs with more privilege than its caller).

pub mod acl;
pub mod launch;
pub mod made;
pub mod net;
pub use hostnet::netlink;
pub mod nft;
pub mod port;
pub mod privilege;
pub use hostnet::tap;
