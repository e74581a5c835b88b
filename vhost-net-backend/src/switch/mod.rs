//! The switch's decisions: where a frame goes, from its MAC addresses, its segment and the
//! port it came in on. Knows frames' metadata and port ids only: no guest memory, rings or
//! file descriptors.

mod cache;
mod forward;
pub mod mac_table;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use cache::DecisionCache;
use cache::{CachedDecision, DECISION_SLOTS};
pub use forward::Forward;
pub use mac_table::{MacTable, MAC_PER_PORT_LIMIT, MAC_TABLE_CAPACITY};

use crate::types::{MacAddr, PortId, TRUNK};

/// What the switch knows of a port.
#[derive(Clone, Copy, Debug)]
pub struct PortProfile {
    /// Its VLAN segment, or `TRUNK`.
    pub segment: u16,
    /// A MAC configured on it (`mac=`): only this port may send from it.
    pub mac: Option<MacAddr>,
    /// Port security: at most this many source MACs (`mac` among them).
    pub max_macs: Option<u16>,
}

/// What the switch knows of every port, by id; replaced whole when ports change.
struct Profiles {
    /// Each port's segment (`VACANT` for a free place).
    segments: Vec<u16>,
    /// Each port's configured MAC and source-MAC limit.
    security: Vec<(Option<MacAddr>, Option<u16>)>,
    /// MACs configured on ports (`mac=`): only that port may send from them.
    pinned: HashMap<MacAddr, PortId>,
}

impl Profiles {
    fn new(ports: &[PortProfile]) -> Profiles {
        Profiles {
            segments: ports.iter().map(|p| p.segment).collect(),
            security: ports.iter().map(|p| (p.mac, p.max_macs)).collect(),
            pinned: ports
                .iter()
                .enumerate()
                .filter_map(|(id, p)| Some((p.mac?, id as PortId)))
                .collect(),
        }
    }
}

pub struct Switch {
    profiles: ArcSwap<Profiles>,
    pub macs: MacTable,
}

impl Switch {
    pub fn new(ports: &[PortProfile], mac_ageing_secs: u64) -> Switch {
        Switch {
            profiles: ArcSwap::from_pointee(Profiles::new(ports)),
            macs: MacTable::new(mac_ageing_secs),
        }
    }

    /// Puts the ports' new profiles in force (a port added or deleted). The caller then
    /// makes the MAC table forget the ports that changed, which also drops every worker's
    /// cached decisions.
    pub fn set_ports(&self, ports: &[PortProfile]) {
        self.profiles.store(Arc::new(Profiles::new(ports)));
    }

    /// `decide`, answered from `cache` when the same decision was made since the MAC table
    /// last changed.
    pub fn decide_cached(
        &self,
        cache: &mut DecisionCache,
        src: PortId,
        segment: u16,
        src_mac: MacAddr,
        dst_mac: MacAddr,
    ) -> Forward {
        // Read before deciding: a change made meanwhile leaves this entry stale, not wrong.
        let version = self.macs.version();
        let slot = &mut cache.slots[usize::from(src_mac.0[5] ^ dst_mac.0[5]) % DECISION_SLOTS];
        if let Some(c) = slot {
            if c.version == version
                && c.src == src
                && c.segment == segment
                && c.src_mac == src_mac
                && c.dst_mac == dst_mac
            {
                return c.forward;
            }
        }
        let forward = self.decide(src, segment, src_mac, dst_mac);
        *slot = Some(CachedDecision {
            version,
            src,
            segment,
            src_mac,
            dst_mac,
            forward,
        });
        forward
    }

    /// Learns the source and decides where a frame from `src`, in `segment`, goes.
    pub fn decide(&self, src: PortId, segment: u16, src_mac: MacAddr, dst_mac: MacAddr) -> Forward {
        let profiles = self.profiles.load();
        if profiles.pinned.get(&src_mac).is_some_and(|p| *p != src) {
            return Forward::Spoofed;
        }
        if let Some(&(mac, Some(most))) = profiles.security.get(usize::from(src)) {
            // A new source MAC on a port that has used up its share: refused, not learned.
            // Its configured MAC always passes and takes one of the places.
            let reserved = usize::from(mac.is_some_and(|m| !self.macs.holds(segment, m, src)));
            if Some(src_mac) != mac
                && !self.macs.holds(segment, src_mac, src)
                && self.macs.count_of(src) + reserved >= usize::from(most)
            {
                return Forward::Spoofed;
            }
        }
        let dst = (!dst_mac.is_multicast()).then_some(dst_mac);
        let mut found = self.macs.learn_and_lookup(segment, src_mac, src, dst);
        if dst.is_none() {
            return Forward::Flood;
        }
        if found.is_none() {
            // A MAC configured on a port lives there: no flood to find it (which would
            // show a VM's frames to every other port of the segment until it answered).
            found = profiles.pinned.get(&dst_mac).copied().filter(|p| {
                profiles
                    .segments
                    .get(usize::from(*p))
                    .is_some_and(|s| *s == segment || *s == TRUNK)
            });
        }
        match found {
            Some(p) if p == src => Forward::Local,
            Some(p) => Forward::To(p),
            None => Forward::Flood,
        }
    }

    /// The ports a flooded frame from `src` in `segment` reaches: that segment's ports and
    /// any trunk, never back to the source.
    pub fn flood_targets(&self, src: PortId, segment: u16) -> impl Iterator<Item = PortId> {
        let profiles = self.profiles.load();
        (0..profiles.segments.len())
            .filter(move |id| {
                let s = profiles.segments[*id];
                *id != usize::from(src) && (s == segment || s == TRUNK)
            })
            .map(|id| id as PortId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAC_AGEING_SECS;

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
    }

    fn switch(vlans: &[Option<u16>]) -> Switch {
        let ports: Vec<PortProfile> = vlans
            .iter()
            .map(|v| PortProfile {
                segment: v.unwrap_or(0),
                mac: None,
                max_macs: None,
            })
            .collect();
        Switch::new(&ports, 10)
    }

    #[test]
    fn learns_floods_and_never_hairpins() {
        let s = switch(&[None, None, None]);
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::Flood);
        let targets: Vec<_> = s.flood_targets(0, 0).collect();
        assert_eq!(targets, vec![1, 2]);
        assert_eq!(s.decide(1, 0, mac(2), mac(1)), Forward::To(0));
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::To(1));
        assert_eq!(s.decide(0, 0, mac(1), MacAddr([0xff; 6])), Forward::Flood);
        assert_eq!(s.decide(0, 0, mac(3), mac(1)), Forward::Local);
        // A station that moves is learned at its new port.
        assert_eq!(s.decide(2, 0, mac(2), mac(1)), Forward::To(0));
        assert_eq!(s.macs.lookup(0, mac(2)), Some(2));
        s.macs.forget_port(2);
        assert_eq!(s.macs.lookup(0, mac(2)), None);
    }

    #[test]
    fn cached_decisions_follow_every_table_change() {
        let s = switch(&[None, None, None]);
        let mut c = DecisionCache::default();
        // Port 0's frames from mac(1) to mac(2), decided through the cache.
        let mut one_to_two = |segment| s.decide_cached(&mut c, 0, segment, mac(1), mac(2));
        assert_eq!(one_to_two(0), Forward::Flood);
        assert_eq!(one_to_two(0), Forward::Flood);
        // mac(2) learned on port 1: the cached flood is stale.
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        // Moved to port 2.
        s.decide(2, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(2));
        // Same MACs in another segment: not the cached answer.
        assert_eq!(one_to_two(5), Forward::Flood);
        s.macs.forget_port(2);
        assert_eq!(one_to_two(0), Forward::Flood);
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(one_to_two(0), Forward::To(1));
        // Aged out (ageing is 10 s here): the clock moving invalidates the cache too.
        s.macs.tick(11);
        assert_eq!(one_to_two(0), Forward::Flood);
        // Another source port with the same MACs: not the cached answer either.
        let mut c2 = DecisionCache::default();
        s.decide(1, 0, mac(2), mac(1));
        assert_eq!(
            s.decide_cached(&mut c2, 0, 0, mac(1), mac(2)),
            Forward::To(1)
        );
        assert_eq!(
            s.decide_cached(&mut c2, 1, 0, mac(1), mac(2)),
            Forward::Local
        );
    }

    #[test]
    fn vlans_are_separate_segments() {
        let s = switch(&[Some(10), Some(10), Some(20)]);
        let t: Vec<_> = s.flood_targets(0, 10).collect();
        assert_eq!(t, vec![1]);
        assert_eq!(s.flood_targets(2, 20).count(), 0);
        s.decide(2, 20, mac(9), mac(1));
        // Learned on VLAN 20 only: VLAN 10 still floods for it.
        assert_eq!(s.decide(0, 10, mac(1), mac(9)), Forward::Flood);
    }

    #[test]
    fn configured_macs_are_pinned_and_ports_are_bounded() {
        let s = Switch::new(
            &(0..3)
                .map(|i| PortProfile {
                    segment: 0,
                    mac: (i == 0).then_some(mac(1)),
                    max_macs: None,
                })
                .collect::<Vec<_>>(),
            DEFAULT_MAC_AGEING_SECS,
        );
        assert_eq!(
            s.decide(2, 0, mac(5), mac(1)),
            Forward::To(0),
            "a configured MAC is found without a flood"
        );
        assert_eq!(s.decide(1, 0, mac(1), mac(2)), Forward::Spoofed);
        assert_eq!(s.decide(0, 0, mac(1), mac(2)), Forward::Flood);
        assert_eq!(s.macs.lookup(0, mac(1)), Some(0));
        for i in 0..(MAC_PER_PORT_LIMIT + 50) as u32 {
            let b = i.to_be_bytes();
            s.macs.learn(0, MacAddr([2, 9, b[0], b[1], b[2], b[3]]), 1);
        }
        assert_eq!(
            s.macs.len(),
            2 + MAC_PER_PORT_LIMIT,
            "mac(1), mac(5) and the limit"
        );
        s.macs.learn(0, mac(7), 2);
        assert_eq!(s.macs.lookup(0, mac(7)), Some(2), "other ports still learn");
        s.macs.forget_port(1);
        s.macs.learn(0, mac(8), 1);
        assert_eq!(
            s.macs.lookup(0, mac(8)),
            Some(1),
            "forgetting frees the port's share"
        );
    }

    #[test]
    fn port_security_limits_the_macs_a_port_may_send_from() {
        let profile = |mac, max_macs| PortProfile {
            segment: 0,
            mac,
            max_macs,
        };
        let s = Switch::new(
            &[
                profile(None, Some(2)),
                profile(Some(mac(9)), Some(1)),
                profile(None, None),
            ],
            10,
        );
        // Port 0: its first two MACs, then no more, until one is forgotten.
        assert_eq!(s.decide(0, 0, mac(1), mac(7)), Forward::Flood);
        assert_eq!(s.decide(0, 0, mac(2), mac(7)), Forward::Flood);
        assert_eq!(s.decide(0, 0, mac(3), mac(7)), Forward::Spoofed);
        assert_eq!(s.decide(0, 0, mac(1), mac(7)), Forward::Flood);
        assert_eq!(s.macs.lookup(0, mac(3)), None, "not learned");
        s.macs.forget_port(0);
        assert_eq!(s.decide(0, 0, mac(3), mac(7)), Forward::Flood);
        // Port 1: only its configured MAC, even before it has sent from it.
        assert_eq!(s.decide(1, 0, mac(4), mac(7)), Forward::Spoofed);
        assert_eq!(s.decide(1, 0, mac(9), mac(7)), Forward::Flood);
        assert_eq!(s.decide(1, 0, mac(4), mac(7)), Forward::Spoofed);
        // Port 2: no limit.
        for i in 20..40 {
            assert_eq!(s.decide(2, 0, mac(i), mac(7)), Forward::Flood);
        }
    }
}
