//! A VM port's ring as vhost-user-backend keeps it, plus where its kicks are watched: the
//! epoll of the worker thread its queue pair was given (`vhost_user::worker_pool`).
//!
//! vhost-user-backend registers a ring's kick descriptor only with threads it starts for
//! one connection, and we start ours. A worker must hear of every change of a ring's kick
//! descriptor, enabled state and started state, which only this type sees (the handler
//! calls it on the protocol thread); it then adds the kick descriptor to the worker's
//! epoll, or removes it, before the old descriptor is closed (QEMU keeps its copy of the
//! eventfd open, so an entry for a descriptor closed only on our side would stay in the
//! epoll and fire).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::mem::GuestMemory;

type Mem = GuestMemoryAtomic<GuestMemory>;

/// Called each time a ring's kick descriptor is added to its watching epoll: the thread
/// waiting on that epoll is started then, not before (a queue pair the guest never starts
/// costs no thread).
pub type OnWatched = Arc<dyn Fn() + Send + Sync>;

/// The epoll that watches a ring's kicks, and what it reports them as.
struct Watch {
    epoll: Arc<Epoll>,
    token: u64,
    /// The port and queue, for the log.
    label: String,
    /// The kick descriptor added to `epoll`, if one is.
    added: Option<RawFd>,
    on_watched: OnWatched,
}

impl Watch {
    fn remove(&mut self) {
        if let Some(fd) = self.added.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::IN, self.token),
            );
        }
    }
}

/// A queue of a VM port: the ring, its eventfds and its lock (vhost-user-backend's), and
/// the watch of its kicks, once a worker is given it.
#[derive(Clone)]
pub struct Vring {
    ring: VringRwLock<Mem>,
    watch: Arc<Mutex<Option<Watch>>>,
    /// Started and enabled, as last changed: read for every destination of every burst
    /// (`RxEndpoint::open`), where the ring's lock would cost one lock a queue offered.
    usable: Arc<AtomicBool>,
    /// Whether a start at the used index was logged: once a connection, however often a
    /// frontend restarts the ring.
    resume_said: Arc<AtomicBool>,
}

thread_local! {
    /// The rings made on this thread since `collect` began.
    static MADE: RefCell<Option<Vec<Vring>>> = const { RefCell::new(None) };
}

/// Runs `make` (which builds one connection's protocol handler) and returns what it made
/// with the rings it made, in the order made: vhost-user-backend (0.24) makes a handler's
/// rings in `new`, on the calling thread, by index, and hands them out only to the threads
/// it starts. The caller checks the count against the rings it asked for.
pub fn collect<R>(make: impl FnOnce() -> R) -> (R, Vec<Vring>) {
    MADE.with(|m| *m.borrow_mut() = Some(Vec::new()));
    let made = make();
    let rings = MADE.with(|m| m.borrow_mut().take()).unwrap_or_default();
    (made, rings)
}

impl Vring {
    fn watch(&self) -> std::sync::MutexGuard<'_, Option<Watch>> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has `epoll` report this ring's kicks as `token` from now on, while the ring is
    /// started and enabled (at once if it is, and a kick is waiting); `on_watched` runs
    /// each time the kick descriptor is added. `label` names the ring in the log.
    pub fn watch_kicks(&self, epoll: Arc<Epoll>, token: u64, label: String, on_watched: OnWatched) {
        let mut watch = self.watch();
        if let Some(old) = watch.as_mut() {
            old.remove();
        }
        *watch = Some(Watch {
            epoll,
            token,
            label,
            added: None,
            on_watched,
        });
        self.update(&mut watch);
    }

    /// Stops reporting this ring's kicks anywhere.
    pub fn unwatch_kicks(&self) {
        if let Some(mut old) = self.watch().take() {
            old.remove();
        }
    }

    /// A ring of `size` entries at `desc`, `avail` and `used`, started and enabled, as a
    /// frontend would have set it up (for tests and fuzzing, which have no frontend).
    pub fn started(
        mem: Mem,
        size: u16,
        (desc, avail, used): (u64, u64, u64),
        event_idx: bool,
    ) -> Result<Vring, VirtQueError> {
        let v = Vring::new(mem, size.max(1))?;
        v.set_queue_size(size);
        v.set_queue_info(desc, avail, used)?;
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        Ok(v)
    }

    /// Whether the guest has started and enabled the ring (a hint: a write still checks
    /// under the ring's lock).
    #[inline]
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Starts the ring where its used index stands (read from the ring at SET_VRING_ADDR)
    /// when the frontend's base (SET_VRING_BASE) says otherwise. DPDK's virtio-user ports
    /// say 0 when they take a restarted switch back in server mode, with their rings as
    /// they were: from 0, the switch would see more chains announced than the ring holds
    /// and drop the connection, for good. A frontend that kept its rings gets from the
    /// used index on: chains it made available and never got back are taken again (a frame
    /// sent twice, a buffer filled anew), as DPDK's vhost library does. With QEMU the two
    /// agree: the switch hands back every chain before it answers GET_VRING_BASE.
    fn resume_at_used_index(&self, label: &str) {
        let mut state = self.ring.get_mut();
        let queue = state.get_queue_mut();
        let (base, used) = (queue.next_avail(), queue.next_used());
        if base == used {
            return;
        }
        queue.set_next_avail(used);
        if !self.resume_said.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{label}: the frontend starts the ring at {base} but its used index is at \
                 {used}: continuing from {used} (frames in flight may be sent again)"
            );
        }
    }

    /// Consumes a waiting kick, if there is one (the descriptor is non-blocking).
    pub fn consume_kick(&self) {
        if let Some(kick) = self.ring.get_ref().get_kick() {
            let _ = kick.consume();
        }
    }

    /// Adds the kick descriptor to the watching epoll if the ring is started and enabled,
    /// removes it otherwise. Level-triggered: a kick that came while the ring was not
    /// watched is reported once it is.
    fn update(&self, watch: &mut Option<Watch>) {
        let state = self.ring.get_ref();
        let usable = state.is_enabled() && state.get_queue().ready();
        self.usable.store(usable, Ordering::Release);
        let Some(w) = watch.as_mut() else {
            return;
        };
        let kick = state.get_kick().as_ref().map(|k| k.as_raw_fd());
        match (usable, kick) {
            (true, Some(fd)) if w.added == Some(fd) => {}
            (true, Some(fd)) => {
                w.remove();
                let added = w.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, w.token),
                );
                match added {
                    Ok(()) => {
                        w.added = Some(fd);
                        (w.on_watched)();
                    }
                    Err(e) => log::warn!("cannot watch a ring's kicks: {e}"),
                }
            }
            _ => w.remove(),
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for Vring {
    type G = <VringRwLock<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for Vring {
    type G = <VringRwLock<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for Vring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let vring = Vring {
            ring: VringRwLock::new(mem, max_queue_size)?,
            watch: Arc::new(Mutex::new(None)),
            usable: Arc::new(AtomicBool::new(false)),
            resume_said: Arc::new(AtomicBool::new(false)),
        };
        MADE.with(|m| {
            if let Some(made) = m.borrow_mut().as_mut() {
                made.push(vring.clone());
            }
        });
        Ok(vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.ring.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.ring.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.ring.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.ring.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.ring.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.ring.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.ring.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        let mut watch = self.watch();
        self.ring.set_enabled(enabled);
        self.update(&mut watch);
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.ring.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.ring.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.ring.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.ring.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.ring.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.ring.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.ring.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        let mut watch = self.watch();
        if ready {
            self.resume_at_used_index(watch.as_ref().map_or("a ring", |w| w.label.as_str()));
        }
        self.ring.set_queue_ready(ready);
        if ready {
            // Looked at once when started, as if kicked: a frontend that kept its rings
            // across a switch restart may have filled one already, with the used ring's
            // NO_NOTIFY flag as the switch before left it, and then never kicks (DPDK's
            // PMD: its TX ring full, both ways stalled for good).
            if let Some(kick) = self.ring.get_ref().get_kick() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: an 8-byte write from a live buffer to the ring's kick descriptor,
                // which the ring owns while its state is borrowed; an eventfd (all that
                // vhost-user sends) adds the value, anything else fails harmlessly.
                unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            }
        }
        self.update(&mut watch);
    }

    fn set_kick(&self, file: Option<File>) {
        // Out of the epoll before the old descriptor is closed (see the module's doc).
        let mut watch = self.watch();
        if let Some(w) = watch.as_mut() {
            w.remove();
        }
        self.ring.set_kick(file);
        self.update(&mut watch);
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.ring.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.ring.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.ring.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn ring() -> Vring {
        Vring::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 256).unwrap()
    }

    fn reported(epoll: &Epoll) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 4];
        let n = epoll.wait(0, &mut events).unwrap();
        events[..n].iter().map(|e| e.data()).collect()
    }

    fn kick_file(fd: &EventFd) -> File {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor is a fresh duplicate that nothing else owns.
        unsafe { File::from_raw_fd(fd.try_clone().unwrap().into_raw_fd()) }
    }

    #[test]
    fn a_ring_starts_at_its_used_index_when_the_frontends_base_says_otherwise_and_is_looked_at() {
        let v = ring();
        // What SET_VRING_ADDR read from the ring, and what DPDK's PMD sends after the
        // switch restarted under it.
        v.set_queue_next_used(700);
        v.set_queue_next_avail(0);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        v.set_kick(Some(kick_file(&kick)));
        v.set_queue_ready(true);
        assert_eq!(v.queue_next_avail(), 700);
        // Looked at once, as if kicked: the frontend may not kick a full ring.
        assert_eq!(kick.read().unwrap(), 1);
        // A base that agrees is kept.
        v.set_queue_ready(false);
        v.set_queue_next_used(5);
        v.set_queue_next_avail(5);
        v.set_queue_ready(true);
        assert_eq!(v.queue_next_avail(), 5);
    }

    #[test]
    fn collect_returns_the_rings_made_in_order() {
        let (_, made) = collect(|| (ring(), ring(), ring()));
        assert_eq!(made.len(), 3);
        let (_, none) = collect(|| ());
        assert!(none.is_empty());
        // Outside `collect`, nothing is kept.
        let _ = ring();
        let (_, again) = collect(|| ());
        assert!(again.is_empty());
    }

    #[test]
    fn kicks_are_reported_only_while_the_ring_is_started_and_enabled() {
        let epoll = Arc::new(Epoll::new().unwrap());
        let v = ring();
        let watched = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = watched.clone();
        v.watch_kicks(
            epoll.clone(),
            7,
            "port p: TX queue 0".into(),
            Arc::new(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        );
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        v.set_kick(Some(kick_file(&kick)));
        kick.write(1).unwrap();
        // Not started, not enabled.
        assert!(reported(&epoll).is_empty());
        v.set_queue_ready(true);
        assert!(reported(&epoll).is_empty());
        assert_eq!(watched.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(!v.usable());
        // A kick that came before is reported once the ring is enabled.
        v.set_enabled(true);
        assert_eq!(reported(&epoll), vec![7]);
        assert_eq!(watched.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(v.usable());
        v.consume_kick();
        assert!(reported(&epoll).is_empty());
        // A new kick descriptor replaces the old one: the old one's kicks are not heard
        // although its other end (QEMU's) is still open.
        let kick2 = EventFd::new(EFD_NONBLOCK).unwrap();
        v.set_kick(Some(kick_file(&kick2)));
        kick.write(1).unwrap();
        assert!(reported(&epoll).is_empty());
        kick2.write(1).unwrap();
        assert_eq!(reported(&epoll), vec![7]);
        v.consume_kick();
        // Stopped (GET_VRING_BASE) or unwatched: not reported.
        v.set_queue_ready(false);
        assert!(!v.usable());
        kick2.write(1).unwrap();
        assert!(reported(&epoll).is_empty());
        v.set_queue_ready(true);
        assert_eq!(reported(&epoll), vec![7]);
        v.unwatch_kicks();
        assert!(reported(&epoll).is_empty());
    }
}
