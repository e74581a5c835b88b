//! The consistent hash of a balancer: a table of slots, each naming a healthy backend; a
//! new connection's hash picks the slot. A backend going down gives only its own slots to
//! the others (fewest first); one coming back takes only its share from the fullest. Every
//! healthy backend holds SLOTS/n slots, give or take one, so connections spread evenly.

/// Slots in a table: 256 keeps the spread within 1/256 of even for up to a few dozen
/// backends, and the table small enough to rewrite at once.
pub const SLOTS: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTable {
    /// The backend (its index) of each slot; None when no backend is healthy.
    slots: Vec<Option<usize>>,
    backends: usize,
}

impl SlotTable {
    /// The table of `backends` backends, all healthy.
    pub fn new(backends: usize) -> SlotTable {
        let slots = (0..SLOTS)
            .map(|s| (backends > 0).then_some(s % backends.max(1)))
            .collect();
        SlotTable { slots, backends }
    }

    pub fn slots(&self) -> &[Option<usize>] {
        &self.slots
    }

    /// Slots per backend.
    pub fn counts(&self) -> Vec<usize> {
        let mut n = vec![0; self.backends];
        for b in self.slots.iter().flatten() {
            n[*b] += 1;
        }
        n
    }

    /// Makes the healthy backends (`healthy[i]`) the only ones holding slots, moving as
    /// few slots as it can.
    pub fn set_healthy(&mut self, healthy: &[bool]) {
        let up: Vec<usize> = (0..self.backends)
            .filter(|b| healthy.get(*b).copied().unwrap_or(false))
            .collect();
        if up.is_empty() {
            self.slots.iter_mut().for_each(|s| *s = None);
            return;
        }
        let mut counts = self.counts();
        // Slots of backends that are down (or of none) go to the healthy ones holding
        // fewest.
        for slot in 0..SLOTS {
            if self.slots[slot].is_some_and(|b| up.contains(&b)) {
                continue;
            }
            if let Some(b) = self.slots[slot] {
                counts[b] -= 1;
            }
            let to = *up.iter().min_by_key(|b| counts[**b]).unwrap_or(&up[0]);
            self.slots[slot] = Some(to);
            counts[to] += 1;
        }
        // A backend below its share takes slots from the fullest, one at a time.
        let share = SLOTS / up.len();
        for &b in &up {
            for slot in 0..SLOTS {
                if counts[b] >= share {
                    break;
                }
                let Some(from) = self.slots[slot] else {
                    continue;
                };
                let fullest = up.iter().map(|u| counts[*u]).max().unwrap_or(0);
                if from != b && counts[from] == fullest && counts[from] > share {
                    self.slots[slot] = Some(b);
                    counts[from] -= 1;
                    counts[b] += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(a: &SlotTable, b: &SlotTable) -> Vec<(Option<usize>, Option<usize>)> {
        a.slots()
            .iter()
            .zip(b.slots())
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (*x, *y))
            .collect()
    }

    #[test]
    fn removing_or_adding_a_backend_moves_only_its_share_and_keeps_the_spread_even() {
        let mut t = SlotTable::new(3);
        assert_eq!(t.counts(), vec![86, 85, 85]);
        let before = t.clone();
        t.set_healthy(&[true, false, true]);
        let m = moved(&before, &t);
        assert_eq!(m.len(), 85, "only the failed backend's slots move");
        assert!(m
            .iter()
            .all(|(from, to)| *from == Some(1) && *to != Some(1)));
        assert_eq!(t.counts(), vec![128, 0, 128]);
        // Back again: it takes its share from the others, and nothing moves between them.
        let before = t.clone();
        t.set_healthy(&[true, true, true]);
        let m = moved(&before, &t);
        assert!(m.iter().all(|(_, to)| *to == Some(1)), "{m:?}");
        let c = t.counts();
        assert!(c.iter().all(|n| (85..=86).contains(n)), "{c:?}");
        assert_eq!(m.len(), c[1]);
        // All down: no slot names a backend; one back: it holds them all.
        t.set_healthy(&[false, false, false]);
        assert!(t.slots().iter().all(|s| s.is_none()));
        t.set_healthy(&[false, false, true]);
        assert_eq!(t.counts(), vec![0, 0, 256]);
        // Ten backends, three lost one after another: always even within one slot.
        let mut t = SlotTable::new(10);
        let mut healthy = vec![true; 10];
        for lost in [3, 7, 0] {
            healthy[lost] = false;
            t.set_healthy(&healthy);
            let c: Vec<usize> = t.counts().into_iter().filter(|n| *n > 0).collect();
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "{c:?}");
        }
    }
}
