//! Rate limits: a token bucket in bits/s and one in packets/s, each with a burst, kept as
//! the generic cell rate algorithm (one timestamp per bucket, moved by compare-and-swap),
//! so workers of several ports can share one without a lock. Frame bytes are Ethernet
//! frame bytes (header included, no preamble or FCS).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::policy::RateConfig;

/// One bucket of `per_sec` units a second, at most `burst` units' time ahead of the clock.
#[derive(Debug)]
struct Cell {
    per_sec: u64,
    /// Scaled nanoseconds.
    burst: u64,
    /// When the bucket is full again ("theoretical arrival time"), scaled ns.
    tat: AtomicU64,
}

/// Clock fractions of a nanosecond: 2^8 of them, so 2^64 lasts 833 days.
pub const SCALE: u32 = 8;

impl Cell {
    fn new(per_sec: u64, burst_units: u64) -> Cell {
        Cell {
            per_sec: per_sec.max(1),
            burst: Self::cost_of(per_sec.max(1), burst_units.max(1)),
            tat: AtomicU64::new(0),
        }
    }

    /// The time `units` take at the rate, scaled; computed whole per frame, so no
    /// rounding of a per-unit cost adds up (a 64 KiB frame at 100 Gbit/s is exact).
    fn cost_of(per_sec: u64, units: u64) -> u64 {
        ((u128::from(units) * (1_000_000_000u128 << SCALE)) / u128::from(per_sec))
            .min(u128::from(u64::MAX / 4)) as u64
    }

    /// Takes `units` at scaled time `now`; false if the bucket has not enough.
    #[inline]
    fn take(&self, now: u64, units: u64) -> bool {
        let cost = Self::cost_of(self.per_sec, units);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start.saturating_add(cost) > now.saturating_add(self.burst) {
                return false;
            }
            match self.tat.compare_exchange_weak(
                tat,
                start + cost,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

/// A rate limit: a frame passes if both buckets it has hold enough.
#[derive(Debug)]
pub struct RateLimiter {
    bits: Option<Cell>,
    packets: Option<Cell>,
}

impl RateLimiter {
    pub fn new(c: &RateConfig) -> RateLimiter {
        RateLimiter {
            // The floor: the switch takes frames in batches (up to 128 a kick), all at
            // one clock reading; a bucket smaller than the time between batches passes
            // one bucketful per batch, not the rate (3 kB at 20 Mbit/s measured 0.58).
            bits: c.bits_per_sec.map(|r| {
                let floor = (r / 100).max(65536 * 8);
                Cell::new(
                    r,
                    c.burst_bytes.map_or(0, |b| b.saturating_mul(8)).max(floor),
                )
            }),
            packets: c
                .packets_per_sec
                .map(|r| Cell::new(r, c.burst_packets.unwrap_or(0).max((r / 100).max(32)))),
        }
    }

    /// Whether a frame of `len` bytes may pass at `now` (scaled ns, `Policy::rate_clock`).
    /// A frame refused by the packet bucket takes nothing from the bit bucket.
    #[inline]
    pub fn allows(&self, now: u64, len: usize) -> bool {
        self.packets.as_ref().is_none_or(|c| c.take(now, 1))
            && self
                .bits
                .as_ref()
                .is_none_or(|c| c.take(now, len as u64 * 8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_rate_and_its_burst_and_no_more() {
        let l = RateLimiter::new(&RateConfig {
            bits_per_sec: Some(8_000_000),
            burst_bytes: Some(100_000),
            ..Default::default()
        });
        // 1 MB/s with a 100 kB burst, on a clock we move: 100 frames of 1000 B at once,
        // then one per millisecond.
        let ms = |t: u64| (t * 1_000_000) << SCALE;
        let passed = (0..200).filter(|_| l.allows(ms(0), 1000)).count();
        assert_eq!(passed, 100);
        let mut n = 0;
        for t in 1..=1000 {
            for _ in 0..5 {
                n += usize::from(l.allows(ms(t), 1000));
            }
        }
        assert_eq!(n, 1000, "one per millisecond");

        // 1000 packets/s: the burst is raised to its floor of 32 packets.
        let p = RateLimiter::new(&RateConfig {
            packets_per_sec: Some(1000),
            burst_packets: Some(1),
            ..Default::default()
        });
        let n: usize = (0..100)
            .map(|t| (0..40).filter(|_| p.allows(ms(t), 9000)).count())
            .sum();
        assert_eq!(n, 32 + 99);
    }

    #[test]
    fn bad_rates_are_refused_by_the_config() {
        assert!(RateConfig::default().check().is_err());
        let zero = RateConfig {
            bits_per_sec: Some(0),
            ..Default::default()
        };
        assert!(zero.check().unwrap_err().contains("passes nothing"));
        let burst_only = RateConfig {
            packets_per_sec: Some(5),
            burst_bytes: Some(5),
            ..Default::default()
        };
        assert!(burst_only.check().is_err());
    }
}
