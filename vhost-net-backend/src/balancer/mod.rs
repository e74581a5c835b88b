//! Load balancers for the uplink's forwards: each spreads new connections over its healthy
//! backends through a slot table (`slots`), which the host's NAT applies (`host_side`);
//! `health` checks the backends from the switch and moves slots when one goes down or
//! comes back.

pub mod health;
pub mod slots;

use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::config::BalancerConfig;
use slots::SlotTable;

/// A backend as the health checks see it.
#[derive(Clone, Debug)]
struct Backend {
    address: Ipv4Addr,
    up: bool,
    /// Checks in a row that disagreed with `up`.
    streak: u32,
    passed: u64,
    failed: u64,
    last_error: Option<String>,
}

/// One backend of `ctl balancers`.
#[derive(Clone, Debug)]
pub struct BackendRow {
    pub address: Ipv4Addr,
    pub up: bool,
    pub slots: usize,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub last_error: Option<String>,
}

struct State {
    backends: Vec<Backend>,
    slots: SlotTable,
}

pub struct Balancer {
    pub config: BalancerConfig,
    state: Mutex<State>,
}

impl Balancer {
    /// A balancer whose backends are all taken as healthy until checks say otherwise, so
    /// that the service is there from the start.
    pub fn new(config: &BalancerConfig) -> Balancer {
        let backends = config
            .backends
            .iter()
            .map(|a| Backend {
                address: *a,
                up: true,
                streak: 0,
                passed: 0,
                failed: 0,
                last_error: None,
            })
            .collect();
        Balancer {
            config: config.clone(),
            state: Mutex::new(State {
                backends,
                slots: SlotTable::new(config.backends.len()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend address of every slot.
    pub fn slot_addresses(&self) -> Vec<Option<Ipv4Addr>> {
        let s = self.state();
        s.slots
            .slots()
            .iter()
            .map(|b| b.map(|i| s.backends[i].address))
            .collect()
    }

    /// Takes a round of checks (one result per backend, in order): the backends whose
    /// state changed, with it. The slot table follows.
    pub fn record(&self, results: &[Result<(), String>]) -> Vec<(Ipv4Addr, bool)> {
        let (rise, fall) = (self.config.rise, self.config.fall);
        let mut s = self.state();
        let mut changed = Vec::new();
        for (b, r) in s.backends.iter_mut().zip(results) {
            let ok = r.is_ok();
            match r {
                Ok(()) => b.passed += 1,
                Err(e) => {
                    b.failed += 1;
                    b.last_error = Some(e.clone());
                }
            }
            if ok == b.up {
                b.streak = 0;
                continue;
            }
            b.streak += 1;
            if b.streak >= if b.up { fall } else { rise } {
                b.up = ok;
                b.streak = 0;
                changed.push((b.address, ok));
            }
        }
        if !changed.is_empty() {
            let healthy: Vec<bool> = s.backends.iter().map(|b| b.up).collect();
            s.slots.set_healthy(&healthy);
        }
        changed
    }

    pub fn rows(&self) -> Vec<BackendRow> {
        let s = self.state();
        let counts = s.slots.counts();
        s.backends
            .iter()
            .zip(counts)
            .map(|(b, slots)| BackendRow {
                address: b.address,
                up: b.up,
                slots,
                checks_passed: b.passed,
                checks_failed: b.failed,
                last_error: b.last_error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_goes_down_after_fall_failures_and_up_after_rise_passes() {
        let config = BalancerConfig {
            name: "web".into(),
            port: 80,
            backends: vec![Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 11)],
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 3,
            fall: 2,
            on_down: Default::default(),
        };
        let b = Balancer::new(&config);
        let ok = || Ok(());
        let bad = || Err("connection refused".to_string());
        assert!(
            b.record(&[ok(), bad()]).is_empty(),
            "one failure is not enough"
        );
        assert!(
            b.record(&[ok(), ok()]).is_empty(),
            "a pass resets the count"
        );
        assert!(b.record(&[ok(), bad()]).is_empty());
        assert_eq!(b.record(&[ok(), bad()]), vec![(config.backends[1], false)]);
        assert!(b
            .slot_addresses()
            .iter()
            .all(|a| *a == Some(config.backends[0])));
        let rows = b.rows();
        assert_eq!(
            (rows[1].up, rows[1].slots, rows[1].checks_failed),
            (false, 0, 3)
        );
        assert_eq!(rows[1].last_error.as_deref(), Some("connection refused"));
        assert!(b.record(&[ok(), ok()]).is_empty());
        assert!(b.record(&[ok(), ok()]).is_empty());
        assert_eq!(b.record(&[ok(), ok()]), vec![(config.backends[1], true)]);
        assert_eq!(b.rows()[1].slots, 128);
    }
}
