//! The worker pool (`--workers N`): N threads, each serving the queue pairs of many ports,
//! as OVS's PMD threads serve rx queues, so that 50 ports with 16 queue pairs each are not
//! 800 threads. A connection's pairs go to the threads with the fewest pairs; a pair the
//! guest never starts costs an entry in a map and nothing else (its kicks are watched only
//! once the ring is started and enabled, `vring::Vring`).
//!
//! A thread takes one TX burst of each pair with work in turn, so a guest that never stops
//! sending holds its thread for a burst at a time, not for as long as it sends; a pair
//! with chains left stays on the thread's ready list with the guest's kicks off, as it
//! would with a thread of its own.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A queue pair of one connection, as a pool thread serves it.
struct Pair {
    port: Port,
    index: usize,
    rx: Vring,
    tx: Vring,
}

impl Pair {
    fn serve(&self, tx: bool) -> bool {
        self.port
            .serve_ring(self.index, tx, (&self.rx, &self.tx), Turn::OneBurst)
    }
}

struct Thread {
    epoll: Arc<Epoll>,
    /// The pairs this thread serves, by id (never reused: an event read just before a
    /// pair left finds nothing).
    pairs: Mutex<HashMap<u64, Arc<Pair>>>,
    wake: EventFd,
    stop: AtomicBool,
}

impl Thread {
    fn pairs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Pair>>> {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, cpus: &[usize]) {
        cpu_set::pin(cpus);
        let mut events = [EpollEvent::default(); EVENTS];
        // Pairs whose TX ring had chains left (or is polled): one burst each per round.
        let mut ready: Vec<Arc<Pair>> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = if ready.is_empty() { -1 } else { 0 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("worker pool: epoll failed, this worker stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == WAKE {
                    let _ = self.wake.read();
                    continue;
                }
                let Some(pair) = self.pairs().get(&(token >> 1)).cloned() else {
                    continue;
                };
                let tx = token & 1 == 1;
                if tx {
                    pair.tx.consume_kick();
                    if !ready.iter().any(|p| Arc::ptr_eq(p, &pair)) {
                        ready.push(pair);
                    }
                } else {
                    pair.rx.consume_kick();
                    pair.serve(false);
                }
            }
            ready.retain(|pair| pair.port.alive() && pair.serve(true));
        }
    }
}

/// The pool's threads.
pub struct WorkerPool {
    threads: Vec<Arc<Thread>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl WorkerPool {
    /// Starts `workers` threads, each pinned to `cpus` (empty: any): thread i to the i-th
    /// CPU of the list, round the list, as OVS places PMD threads on its mask's cores.
    pub fn start(workers: usize, cpus: &[usize]) -> io::Result<Arc<WorkerPool>> {
        // Threads started before a failure are stopped by the pool's drop.
        let mut pool = WorkerPool {
            threads: Vec::new(),
            handles: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        };
        for i in 0..workers {
            let thread = Arc::new(Thread {
                epoll: Arc::new(Epoll::new()?),
                pairs: Mutex::new(HashMap::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
                stop: AtomicBool::new(false),
            });
            thread.epoll.ctl(
                ControlOperation::Add,
                thread.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE),
            )?;
            let pinned: Vec<usize> = cpus
                .get(i % cpus.len().max(1))
                .copied()
                .into_iter()
                .collect();
            let t = thread.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vnet-worker-{i}"))
                .spawn(move || t.run(&pinned))?;
            pool.threads.push(thread);
            pool.handles
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
        info!("worker pool: {workers} threads");
        Ok(Arc::new(pool))
    }

    /// Serves `port`'s queue pairs (`rings`, by index: pair i is 2i RX and 2i + 1 TX) until
    /// the attachment returned is dropped.
    pub fn attach(self: &Arc<Self>, port: &Port, rings: &[Vring]) -> Attachment {
        let mut held = Vec::new();
        for (index, pair) in rings.chunks_exact(2).enumerate() {
            let Some((t, thread)) = self
                .threads
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| t.pairs().len())
            else {
                break;
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let entry = Arc::new(Pair {
                port: port.clone(),
                index,
                rx: pair[0].clone(),
                tx: pair[1].clone(),
            });
            thread.pairs().insert(id, entry.clone());
            entry.rx.watch_kicks(thread.epoll.clone(), id << 1);
            entry.tx.watch_kicks(thread.epoll.clone(), id << 1 | 1);
            held.push((t, id));
        }
        Attachment {
            pool: self.clone(),
            held,
        }
    }

    /// Queue pairs served by each thread, in thread order.
    pub fn loads(&self) -> Vec<usize> {
        self.threads.iter().map(|t| t.pairs().len()).collect()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for t in &self.threads {
            t.stop.store(true, Ordering::Relaxed);
            let _ = t.wake.write(1);
        }
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

/// A connection's queue pairs on the pool's threads; dropped, they leave the pool (their
/// kicks no longer watched) and a burst under way ends at its next step (the connection
/// retired first).
pub struct Attachment {
    pool: Arc<WorkerPool>,
    /// (thread, pair id)
    held: Vec<(usize, u64)>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for &(t, id) in &self.held {
            let thread = &self.pool.threads[t];
            if let Some(pair) = thread.pairs().remove(&id) {
                pair.rx.unwatch_kicks();
                pair.tx.unwatch_kicks();
            }
        }
    }
}
