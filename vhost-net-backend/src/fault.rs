//! Panics caught where they would spread, and the faults tests inject to check it.
//!
//! A panic in the datapath is a bug, but the guest or frontend that triggered it must not
//! take other ports down with it. The one thing a panic can spread through is a lock it
//! unwinds through: vhost-user-backend unwraps its vring locks, so a ring poisoned while
//! a frame was written into it would panic every later sender to that port. Code that
//! holds another port's ring therefore runs under `contain`, which catches the panic
//! before the guard is dropped (a lock is poisoned only by a guard dropped while
//! unwinding). Catching costs nothing on the way that does not panic.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(feature = "fault-injection")]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicU64, Ordering};

use log::error;

/// How many panics were caught; the first few are logged.
static CAUGHT: AtomicU64 = AtomicU64::new(0);
const LOGGED: u64 = 10;

fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs `f`; a panic in it is logged (the first few) and returned as None.
#[inline(always)]
pub fn contain<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            caught(what, payload.as_ref());
            None
        }
    }
}

#[cold]
fn caught(what: &str, payload: &(dyn Any + Send)) {
    let n = CAUGHT.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOGGED {
        error!(
            "BUG: panic {what}: {}; contained, please report it{}",
            message(payload),
            if n == LOGGED {
                " (the next ones are only counted)"
            } else {
                ""
            }
        );
    }
}

/// Panics caught so far.
pub fn caught_count() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// Tests: a port id + 1 whose deliveries panic, and one whose TX worker panics (0: none).
/// Compiled in only with the `fault-injection` feature, which the tests turn on.
#[cfg(feature = "fault-injection")]
pub static PANIC_DELIVERING_TO: AtomicU32 = AtomicU32::new(0);
#[cfg(feature = "fault-injection")]
pub static PANIC_IN_TX_OF: AtomicU32 = AtomicU32::new(0);

/// Panics if a test asked deliveries to `port` to.
#[inline(always)]
pub fn inject_delivery(port: u16) {
    #[cfg(feature = "fault-injection")]
    if PANIC_DELIVERING_TO.load(Ordering::Relaxed) == u32::from(port) + 1 {
        panic!("injected fault delivering to port {port}");
    }
    let _ = port;
}

/// Panics if a test asked `port`'s TX worker to.
#[inline(always)]
pub fn inject_tx(port: u16) {
    #[cfg(feature = "fault-injection")]
    if PANIC_IN_TX_OF.load(Ordering::Relaxed) == u32::from(port) + 1 {
        panic!("injected fault in the TX worker of port {port}");
    }
    let _ = port;
}
