//! The threads that serve VM ports' queue pairs: by default a thread for each queue pair
//! a guest starts (started at its ring's first watch, so pairs offered and never used cost
//! no thread), or, with `--workers N`, N threads each serving the pairs of many ports, as
//! OVS's PMD threads serve rx queues, so that 50 ports of 16 pairs are not 800 threads.
//! vhost-user-backend starts no threads of its own: a ring's kick descriptor is watched by
//! its pair's thread's epoll (`vring::Vring::watch_kicks`).
//!
//! A shared thread takes one TX burst of each pair with work in turn, so a guest that never
//! stops sending holds it for a burst at a time, not for as long as it sends; a pair with
//! chains left stays on the thread's ready list with the guest's kicks off, as it would with
//! a thread of its own. A pair's thread of its own empties the ring in one turn.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{error, info};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cpu_set;
use crate::datapath::vm_tx::Turn;
use crate::vhost_user::backend::Port;
use crate::vring::Vring;

/// The token of a thread's own wake-up eventfd (shutdown); rings' tokens are a pair's id
/// shifted left by one, the low bit set for the TX ring.
const WAKE: u64 = u64::MAX;
/// Events taken from the epoll at once.
const EVENTS: usize = 64;
/// While pairs have work, rounds of their bursts between two looks for kicks of the
/// others (a syscall each). One worker for 4 senders at 64 B (`vnet-bench --case "8 ports"`):
/// 0.95-0.96 of a thread per pair looking every round, 0.97-0.98 every 4th.
const LOOK_EVERY: u32 = 4;

/// A queue pair of one connection, as a thread serves it.
struct Pair {
    port: Port,
    index: usize,
    rx: Vring,
    tx: Vring,
}

impl Pair {
    /// One turn of its TX ring; true while it has work left (`Port::serve_tx`).
    fn serve_tx(&self, turn: Turn) -> bool {
        self.port.alive() && self.port.serve_tx(self.index, &self.tx, turn)
    }
}

struct Thread {
    name: String,
    epoll: Arc<Epoll>,
    /// The pairs this thread serves, by id (never reused: an event read just before a
    /// pair left finds nothing).
    pairs: Mutex<HashMap<u64, Arc<Pair>>>,
    wake: EventFd,
    stop: AtomicBool,
    /// One burst of a pair at a time (shared), or until its ring is empty (its own).
    turn: Turn,
    cpus: Vec<usize>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Thread {
    fn new(name: String, turn: Turn, cpus: Vec<usize>) -> io::Result<Arc<Thread>> {
        let thread = Thread {
            name,
            epoll: Arc::new(Epoll::new()?),
            pairs: Mutex::new(HashMap::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            turn,
            cpus,
            handle: Mutex::new(None),
        };
        thread.epoll.ctl(
            ControlOperation::Add,
            thread.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(Arc::new(thread))
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Pair>>> {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the thread unless it runs (or was stopped); true if it started now.
    fn start(self: &Arc<Self>) -> io::Result<bool> {
        let mut handle = self.handle();
        if handle.is_some() || self.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let t = self.clone();
        *handle = Some(
            std::thread::Builder::new()
                .name(self.name.clone())
                .spawn(move || t.run())?,
        );
        Ok(true)
    }

    /// Stops the thread (a burst under way ends first) and waits for it; true if it ran.
    fn stop(&self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let handle = self.handle().take();
        let ran = handle.is_some();
        if let Some(h) = handle {
            let _ = h.join();
        }
        ran
    }

    fn run(&self) {
        cpu_set::pin(&self.cpus);
        let mut events = [EpollEvent::default(); EVENTS];
        // Pairs whose TX ring had chains left (or is polled): one burst each per round.
        let mut ready: Vec<Arc<Pair>> = Vec::new();
        let mut rounds = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            rounds = rounds.wrapping_add(1);
            if ready.is_empty() || rounds.is_multiple_of(LOOK_EVERY) {
                // Idle, wait for a kick; busy, look without waiting.
                let timeout = if ready.is_empty() { -1 } else { 0 };
                let n = match self.epoll.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!("{}: epoll failed, this worker stops: {e}", self.name);
                        return;
                    }
                };
                for event in &events[..n] {
                    self.kicked(event.data(), &mut ready);
                }
            }
            ready.retain(|pair| pair.serve_tx(self.turn));
        }
    }

    /// A kick reported as `token`: a TX ring's pair joins `ready`, an RX ring's kicks are
    /// turned off.
    fn kicked(&self, token: u64, ready: &mut Vec<Arc<Pair>>) {
        if token == WAKE {
            let _ = self.wake.read();
            return;
        }
        let Some(pair) = self.pairs().get(&(token >> 1)).cloned() else {
            return;
        };
        if token & 1 == 1 {
            pair.tx.consume_kick();
            if !ready.iter().any(|p| Arc::ptr_eq(p, &pair)) {
                ready.push(pair);
            }
        } else {
            pair.rx.consume_kick();
            pair.port.quiet_rx_kicks(&pair.rx);
        }
    }
}

/// The threads of their own that queue pairs run against the CPUs they may run on. A
/// guest that polls its rings (a DPDK application: its driver keeps the kicks off and the
/// ring never empty) keeps its pair's thread running, so when such threads outnumber the
/// CPUs, the others wait a scheduler slice at a time (DPDK's testpmd as the frontend, two
/// ports' threads on one CPU: 0.52-0.69 of the rate of one worker serving both in turn).
struct Crowding {
    cpus: usize,
    running: AtomicUsize,
    /// Said once each time the threads come to outnumber the CPUs.
    said: AtomicBool,
}

impl Crowding {
    fn started(&self) {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        if running > self.cpus && !self.said.swap(true, Ordering::SeqCst) {
            let cpus = self.cpus;
            // Info, not a warning: guests whose drivers wait for interrupts (Linux's
            // virtio-net) leave their threads asleep between bursts and lose nothing.
            info!(
                "{running} queue pairs have a thread each on {cpus} CPU(s): a guest that polls \
                 its rings keeps its pair's thread busy and the others wait for the CPU; \
                 --workers {cpus} lets {cpus} thread(s) serve every pair a burst at a time"
            );
        }
    }

    fn stopped(&self) {
        let running = self.running.fetch_sub(1, Ordering::SeqCst) - 1;
        if running <= self.cpus {
            self.said.store(false, Ordering::SeqCst);
        }
    }
}

/// The threads serving every VM port's queue pairs.
pub struct WorkerPool {
    /// `--workers N`: N threads, running from the start. Empty: a thread per pair.
    shared: Vec<Arc<Thread>>,
    cpus: Vec<usize>,
    next_id: AtomicU64,
    crowding: Arc<Crowding>,
}

impl WorkerPool {
    /// `workers` shared threads, thread i pinned to the i-th CPU of `cpus` round the list
    /// (as OVS places PMD threads on its mask's cores); 0: a thread per queue pair, each
    /// free to run on any of `cpus` (empty: any CPU).
    pub fn start(workers: usize, cpus: &[usize]) -> io::Result<WorkerPool> {
        let usable = if cpus.is_empty() {
            cpu_set::of_this_thread().len()
        } else {
            cpus.len()
        };
        let mut pool = WorkerPool {
            shared: Vec::new(),
            cpus: cpus.to_vec(),
            next_id: AtomicU64::new(0),
            crowding: Arc::new(Crowding {
                cpus: usable.max(1),
                running: AtomicUsize::new(0),
                said: AtomicBool::new(false),
            }),
        };
        for i in 0..workers {
            let pinned = cpus.get(i % cpus.len().max(1)).copied();
            let thread = Thread::new(
                format!("vnet-worker-{i}"),
                Turn::OneBurst,
                pinned.into_iter().collect(),
            )?;
            // Those started before a failure are stopped by the pool's drop.
            pool.shared.push(thread.clone());
            thread.start()?;
        }
        if workers > 0 {
            info!("worker pool: {workers} threads serve every port's queue pairs");
        }
        Ok(pool)
    }

    /// Serves `port`'s queue pairs (`rings`, by index: pair i is 2i RX and 2i + 1 TX) until
    /// the attachment returned is dropped.
    pub fn attach(&self, port: &Port, rings: &[Vring]) -> io::Result<Attachment> {
        let mut held = Attachment {
            pairs: Vec::new(),
            crowding: self.crowding.clone(),
        };
        for (index, pair) in rings.chunks_exact(2).enumerate() {
            let (thread, own) = match self.shared.iter().min_by_key(|t| t.pairs().len()) {
                Some(t) => (t.clone(), false),
                None => {
                    // Linux shows 15 bytes of a thread's name: the pair's number first.
                    let name = format!("q{index}-{}", port.port().name);
                    (
                        Thread::new(name, Turn::UntilEmpty, self.cpus.clone())?,
                        true,
                    )
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let entry = Arc::new(Pair {
                port: port.clone(),
                index,
                rx: pair[0].clone(),
                tx: pair[1].clone(),
            });
            thread.pairs().insert(id, entry.clone());
            held.pairs.push((thread.clone(), id, own));
            let starter = thread.clone();
            let crowding = own.then(|| self.crowding.clone());
            let on_watched: crate::vring::OnWatched = Arc::new(move || match starter.start() {
                Ok(true) => {
                    if let Some(c) = &crowding {
                        c.started();
                    }
                }
                Ok(false) => {}
                Err(e) => error!("{}: cannot start its thread: {e}", starter.name),
            });
            let name = &port.port().name;
            entry.rx.watch_kicks(
                thread.epoll.clone(),
                id << 1,
                format!("port {name}: RX queue {index}"),
                on_watched.clone(),
            );
            entry.tx.watch_kicks(
                thread.epoll.clone(),
                id << 1 | 1,
                format!("port {name}: TX queue {index}"),
                on_watched,
            );
        }
        Ok(held)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for t in &self.shared {
            t.stop();
        }
    }
}

/// A connection's queue pairs on their threads; dropped, they leave (their kicks no longer
/// watched, threads of their own stopped, a burst under way ended first).
pub struct Attachment {
    /// (thread, pair id, whether the thread is the pair's own)
    pairs: Vec<(Arc<Thread>, u64, bool)>,
    crowding: Arc<Crowding>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for (thread, id, own) in &self.pairs {
            if let Some(pair) = thread.pairs().remove(id) {
                // A thread of the pair's own stops only once its burst ends, and a guest
                // that keeps sending never lets it: the connection ends first.
                pair.port.retire();
                pair.rx.unwatch_kicks();
                pair.tx.unwatch_kicks();
            }
            if *own && thread.stop() {
                self.crowding.stopped();
            }
        }
    }
}
