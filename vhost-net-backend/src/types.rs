//! The vocabulary every layer shares: port ids, segments, MAC addresses, Ethernet
//! constants and the frame size limits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A port's index in the port table.
pub type PortId = u16;

/// The segment of a trunk port: it carries every VLAN, tagged.
pub const TRUNK: u16 = u16::MAX;

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

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("'{s}' is not a MAC address like 52:54:00:12:34:56"));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("'{s}' is not a MAC address like 52:54:00:12:34:56"))?;
        }
        Ok(MacAddr(out))
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
