//! Active TCP health checks from the switch: every `interval_ms`, a connect to each
//! backend's service port (through the host's route to its subnet, as a client from
//! outside would come), given `timeout_ms`; a backend that fails `fall` in a row leaves
//! the slot table, one that passes `rise` in a row comes back. Each change is logged and
//! put in force in the host's NAT at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use socket2::{Domain, Protocol, Socket, Type};

use super::Balancer;
use crate::config::OnDown;
use crate::host_side::{HostSide, CHECK_MARK};

/// One check: a TCP connection to `to` within `timeout`, marked with `CHECK_MARK` so that
/// the host's guard, which lets no other connection of the host into the guests, lets it
/// through.
fn check(to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_mark(CHECK_MARK)?;
    s.connect_timeout(&to.into(), timeout)
}

/// One round of checks, the backends checked side by side.
fn check_all(b: &Balancer) -> Vec<Result<(), String>> {
    let timeout = Duration::from_millis(b.config.timeout_ms);
    let port = b.config.port;
    thread::scope(|s| {
        let checks: Vec<_> = b
            .config
            .backends
            .iter()
            .map(|a| {
                let to = SocketAddr::from((*a, port));
                s.spawn(move || check(to, timeout).map_err(|e| e.to_string()))
            })
            .collect();
        checks
            .into_iter()
            .map(|c| c.join().unwrap_or_else(|_| Err("check panicked".into())))
            .collect()
    })
}

/// Checks `b`'s backends until `stop`, applying each change to `host`.
pub fn spawn(
    b: Arc<Balancer>,
    host: Arc<HostSide>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("health-{}", b.config.name))
        .spawn(move || {
            let interval = Duration::from_millis(b.config.interval_ms);
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let results = check_all(&b);
                let changed = b.record(&results);
                // In force first, so that what the log says holds when it is read.
                if !changed.is_empty() {
                    if let Err(e) = host.set_balancer(&b.config, &b.slot_addresses()) {
                        warn!(
                            "balancer {}: cannot update the host's NAT: {e}",
                            b.config.name
                        );
                    }
                }
                for (address, up) in changed {
                    let why = results
                        .iter()
                        .zip(&b.config.backends)
                        .find(|(_, a)| **a == address)
                        .and_then(|(r, _)| r.as_ref().err().cloned());
                    if up {
                        info!("balancer {}: backend {address} is up", b.config.name);
                    } else {
                        let open = match b.config.on_down {
                            OnDown::Keep => "its open ones are left to finish",
                            OnDown::Reset => "its open ones are reset at their next packet",
                        };
                        warn!(
                            "balancer {}: backend {address} is down ({} checks failed, last: {}); \
                             it gets no new connections, {open}",
                            b.config.name,
                            b.config.fall,
                            why.unwrap_or_default()
                        );
                    }
                }
                // Sleep out the interval in steps, so that a stop is seen soon.
                while started.elapsed() < interval && !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50).min(interval));
                }
            }
        })
}
