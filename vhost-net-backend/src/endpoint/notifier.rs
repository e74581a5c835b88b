//! A VM port's interrupts, raised on a thread of its own.
//!
//! Raising an interrupt is a write to an eventfd the frontend gave us (a ring's "call"
//! descriptor). The frontend shares that descriptor's open file, so it can make it blocking
//! again after we made it non-blocking, and fill its counter: the next write then blocks
//! until the frontend reads, that is for ever. Written by the worker of the port that
//! delivered a frame, that would stop another port. So workers only note which ring needs
//! an interrupt and ring a doorbell of ours; the port's notifier thread writes the call
//! descriptors, with no lock held, and if one blocks, only this port's interrupts wait. A
//! blocked notifier is freed at the end of the connection by a signal (the write returns
//! EINTR).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vmm_sys_util::eventfd::EventFd;

use crate::vring::Vring;

/// The signal that interrupts a notifier blocked in a write; its handler does nothing and
/// is installed without SA_RESTART, so the write fails with EINTR. SIGURG: ignored by
/// default, so a stray one harms nothing.
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn ignore(_: libc::c_int) {}

fn install_wake_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // is async-signal-safe (it does nothing); sigaction only reads `action`.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut());
        }
    });
}

pub struct Notifier {
    /// Bit i: vring i has used entries to signal.
    pending: AtomicU64,
    /// Ours, never given to a frontend: workers ring it, the notifier thread waits on it.
    /// Made by the first connection's thread (so that making a port cannot fail).
    doorbell: OnceLock<EventFd>,
    /// The current connection's vrings, by index, as its workers published them.
    vrings: Mutex<Vec<Option<Vring>>>,
    stop: AtomicBool,
}

impl Notifier {
    pub fn new(vrings: usize) -> Notifier {
        Notifier {
            pending: AtomicU64::new(0),
            doorbell: OnceLock::new(),
            vrings: Mutex::new(vec![None; vrings]),
            stop: AtomicBool::new(false),
        }
    }

    fn doorbell(&self) -> Option<&EventFd> {
        self.doorbell.get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Vring>>> {
        self.vrings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Vring `index` of the current connection.
    pub fn set_vring(&self, index: usize, vring: Vring) {
        if let Some(slot) = self.lock().get_mut(index) {
            *slot = Some(vring);
        }
    }

    /// Forgets the connection's vrings (at its end).
    pub fn clear(&self) {
        self.lock().fill(None);
    }

    /// Asks for an interrupt on vring `index`. Never blocks: an atomic, and a write to our
    /// own non-full eventfd when nothing was pending.
    #[inline]
    pub fn ring(&self, index: usize) {
        let bit = 1u64 << (index % 64);
        if self.pending.fetch_or(bit, Ordering::AcqRel) == 0 {
            if let Some(d) = self.doorbell() {
                let _ = d.write(1);
            }
        }
    }

    /// The notifier thread's loop, until `stop`.
    fn run(&self) {
        let Some(doorbell) = self.doorbell() else {
            return;
        };
        loop {
            let _ = doorbell.read();
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut bits = self.pending.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                // A copy of the call descriptor, taken under the ring's lock and written
                // without it: a write that blocks holds nothing a sender needs.
                let call = {
                    let vrings = self.lock();
                    vrings.get(i).and_then(Option::as_ref).and_then(|v| {
                        v.get_ref()
                            .get_call()
                            .as_ref()
                            .and_then(|c| c.try_clone().ok())
                    })
                };
                if let Some(call) = call {
                    let _ = call.notify();
                }
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
    }
}

/// A connection's notifier thread: stopped when dropped.
pub struct NotifierThread {
    notifier: std::sync::Arc<Notifier>,
    thread: Option<JoinHandle<()>>,
}

impl NotifierThread {
    pub fn spawn(notifier: std::sync::Arc<Notifier>, name: &str) -> std::io::Result<Self> {
        install_wake_handler();
        if notifier.doorbell().is_none() {
            let _ = notifier.doorbell.set(EventFd::new(0)?);
        }
        notifier.stop.store(false, Ordering::SeqCst);
        let n = notifier.clone();
        let thread = std::thread::Builder::new()
            .name(format!("notify-{name}"))
            .spawn(move || n.run())?;
        Ok(NotifierThread {
            notifier,
            thread: Some(thread),
        })
    }
}

impl Drop for NotifierThread {
    /// Stops the thread, interrupting a write that blocks, and waits for it (at most a
    /// second: a thread still blocked then is left behind, holding nothing).
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.notifier.stop.store(true, Ordering::SeqCst);
        if let Some(d) = self.notifier.doorbell() {
            let _ = d.write(1);
        }
        let end = Instant::now() + Duration::from_secs(1);
        while !thread.is_finished() && Instant::now() < end {
            // SAFETY: the thread is not joined yet (we hold its handle), so its pthread_t
            // is valid; the signal's handler does nothing and is installed.
            unsafe {
                libc::pthread_kill(thread.as_pthread_t(), WAKE_SIGNAL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}
