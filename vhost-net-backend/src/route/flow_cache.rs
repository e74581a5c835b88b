//! A worker's cache of the router's forwarding decisions: an IP packet to the router's MAC
//! from the same port, MAC and address to the same address goes where the last one went,
//! as long as the neighbour table is unchanged and within the same coarse second (so that
//! the sender is heard, and its neighbour entry refreshed, at least once a second). A hit
//! skips the segment, gateway, route and neighbour lookups: 19 % of a routed 64 B frame's
//! profile before.

use crate::packet::l3::Ip;
use crate::types::{MacAddr, PortId};

use super::counters::RouteId;
use super::neighbour::Neighbour;

const SLOTS: usize = 256;

/// What identifies a routed flow to the router.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOrigin {
    pub from: PortId,
    pub segment: u16,
    pub mac: MacAddr,
    pub src: Ip,
    pub dst: Ip,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    origin: FlowOrigin,
    /// The neighbour table's generation and the coarse second it was decided in.
    generation: u64,
    second: u64,
    to: Option<(Neighbour, RouteId)>,
}

/// Direct-mapped by a hash of the addresses and the port.
pub struct RouteCache {
    slots: Box<[Slot; SLOTS]>,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            slots: Box::new([Slot::default(); SLOTS]),
        }
    }
}

#[inline]
fn slot_of(o: &FlowOrigin) -> usize {
    let x = (o.src.0 as u64)
        ^ ((o.src.0 >> 64) as u64)
        ^ (o.dst.0 as u64).rotate_left(17)
        ^ ((o.dst.0 >> 64) as u64)
        ^ u64::from(o.from) << 48;
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

impl RouteCache {
    /// The decision for `o` taken at `generation` and `second`, if it is still held.
    #[inline]
    pub fn get(
        &self,
        o: &FlowOrigin,
        generation: u64,
        second: u64,
    ) -> Option<(Neighbour, RouteId)> {
        let s = &self.slots[slot_of(o)];
        if s.generation == generation && s.second == second && s.origin == *o {
            s.to
        } else {
            None
        }
    }

    /// Keeps the decision for `o`, taken at `generation` and `second` (both read before it
    /// was taken: a change meanwhile leaves it stale, never wrong).
    #[inline]
    pub fn put(&mut self, o: FlowOrigin, generation: u64, second: u64, to: (Neighbour, RouteId)) {
        self.slots[slot_of(&o)] = Slot {
            origin: o,
            generation,
            second,
            to: Some(to),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_holds_for_its_flow_generation_and_second_only() {
        let o = FlowOrigin {
            from: 1,
            segment: 10,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            src: Ip::v4([10, 0, 1, 5]),
            dst: Ip::v4([10, 0, 2, 5]),
        };
        let to = (
            Neighbour {
                port: 2,
                mac: MacAddr([2, 0, 0, 0, 0, 2]),
                segment: 20,
            },
            1,
        );
        let mut c = RouteCache::default();
        assert_eq!(c.get(&o, 0, 0), None, "an empty slot matches nothing");
        c.put(o, 3, 7, to);
        assert_eq!(c.get(&o, 3, 7), Some(to));
        assert_eq!(c.get(&o, 4, 7), None, "the neighbour table changed");
        assert_eq!(c.get(&o, 3, 8), None, "a new second: heard again");
        for other in [
            FlowOrigin { from: 3, ..o },
            FlowOrigin { segment: 11, ..o },
            FlowOrigin {
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                ..o
            },
            FlowOrigin {
                src: Ip::v4([10, 0, 1, 6]),
                ..o
            },
            FlowOrigin {
                dst: Ip::v4([10, 0, 2, 6]),
                ..o
            },
        ] {
            assert_eq!(c.get(&other, 3, 7), None, "{other:?}");
        }
    }
}
