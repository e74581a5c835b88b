//! The vocabulary every layer shares: port ids, segments, MAC addresses, Ethernet
//! constants and the frame size limits.

pub use hostnet::MacAddr;

/// A port's index in the port table.
pub type PortId = u16;

/// The segment of a trunk port: it carries every VLAN, tagged.
pub const TRUNK: u16 = u16::MAX;
/// The segment of a free place in the port table: no frame is ever in it.
pub const VACANT: u16 = u16::MAX - 1;

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q: a VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// 802.1ad: a service (outer) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Largest frame a guest or the host may hand over for segmentation: a 64 KiB IP packet
/// plus Ethernet.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN;
