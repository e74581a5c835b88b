//! Packets and bytes the router forwarded by each route: a connected subnet (a segment's,
//! by its index) or a static route (after the segments). Workers tally their burst's
//! routed frames in a `RouteTally` of their own and add it to the shared counters once a
//! burst, so that a routed frame costs no shared write.

use std::sync::atomic::{AtomicU64, Ordering};

/// A route's place: segments first, then static routes, in the router's order.
pub type RouteId = u16;

/// The shared counters, one pair a route.
#[derive(Debug, Default)]
pub struct RouteCounters {
    packets: Box<[AtomicU64]>,
    bytes: Box<[AtomicU64]>,
}

impl RouteCounters {
    pub fn new(routes: usize) -> RouteCounters {
        let zeros = || (0..routes).map(|_| AtomicU64::new(0)).collect();
        RouteCounters {
            packets: zeros(),
            bytes: zeros(),
        }
    }

    /// Adds what `tally` counted and empties it.
    pub fn take(&self, tally: &mut RouteTally) {
        for (id, (packets, bytes)) in tally.counts.iter_mut().enumerate() {
            if *packets == 0 {
                continue;
            }
            if let (Some(p), Some(b)) = (self.packets.get(id), self.bytes.get(id)) {
                p.fetch_add(*packets, Ordering::Relaxed);
                b.fetch_add(*bytes, Ordering::Relaxed);
            }
            (*packets, *bytes) = (0, 0);
        }
        tally.used = false;
    }

    /// Packets and bytes of route `id`.
    pub fn get(&self, id: RouteId) -> (u64, u64) {
        let id = usize::from(id);
        let read = |v: &[AtomicU64]| v.get(id).map_or(0, |c| c.load(Ordering::Relaxed));
        (read(&self.packets), read(&self.bytes))
    }
}

/// A worker's counts since its last `take`.
#[derive(Debug, Default)]
pub struct RouteTally {
    counts: Vec<(u64, u64)>,
    used: bool,
}

impl RouteTally {
    #[inline]
    pub fn add(&mut self, id: RouteId, len: usize) {
        let id = usize::from(id);
        if id >= self.counts.len() {
            // Once per route a worker meets: the scratch keeps it.
            self.counts.resize(id + 1, (0, 0));
        }
        self.counts[id].0 += 1;
        self.counts[id].1 += len as u64;
        self.used = true;
    }

    /// Whether anything was counted since the last `take`.
    #[inline]
    pub fn used(&self) -> bool {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_in_the_shared_counters_and_start_again() {
        let c = RouteCounters::new(3);
        let mut t = RouteTally::default();
        t.add(2, 100);
        t.add(2, 60);
        t.add(0, 1);
        assert!(t.used());
        c.take(&mut t);
        assert!(!t.used());
        c.take(&mut t);
        assert_eq!((c.get(0), c.get(1), c.get(2)), ((1, 1), (0, 0), (2, 160)));
        // A route the counters do not know (the table changed): ignored.
        t.add(7, 5);
        c.take(&mut t);
        assert_eq!(c.get(7), (0, 0));
    }
}
