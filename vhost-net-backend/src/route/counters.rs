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
        tally.close_run();
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

/// A worker's counts since its last `take`: frames of one route in a row are counted in
/// a run of their own, added to the route's count when another route's frame comes (an
/// indexed add per frame, with its bounds and growth checks, was 1.5 % of a routed 64 B
/// frame).
#[derive(Debug, Default)]
pub struct RouteTally {
    counts: Vec<(u64, u64)>,
    used: bool,
    run_route: RouteId,
    run: (u64, u64),
}

impl RouteTally {
    #[inline]
    pub fn add(&mut self, id: RouteId, len: usize) {
        if id != self.run_route {
            self.close_run();
            self.run_route = id;
        }
        self.run.0 += 1;
        self.run.1 += len as u64;
        self.used = true;
    }

    /// Adds the run to its route's count.
    fn close_run(&mut self) {
        let (packets, bytes) = std::mem::take(&mut self.run);
        if packets == 0 {
            return;
        }
        let id = usize::from(self.run_route);
        if id >= self.counts.len() {
            // Once per route a worker meets: the scratch keeps it.
            self.counts.resize(id + 1, (0, 0));
        }
        self.counts[id].0 += packets;
        self.counts[id].1 += bytes;
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
        t.add(2, 40);
        assert!(t.used());
        c.take(&mut t);
        assert!(!t.used());
        c.take(&mut t);
        assert_eq!((c.get(0), c.get(1), c.get(2)), ((1, 1), (0, 0), (3, 200)));
        // The route of the last run before a take, again after it: counted once each.
        t.add(0, 9);
        c.take(&mut t);
        assert_eq!(c.get(0), (2, 10));
        // A route the counters do not know (the table changed): ignored.
        t.add(7, 5);
        c.take(&mut t);
        assert_eq!(c.get(7), (0, 0));
    }
}
