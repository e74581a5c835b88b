//! The `VhostUserBackend` of one VM port for one frontend connection: features and
//! protocol features offered, memory and queues taken in, its rings published to the other
//! ports, and each queue pair's work on a kick (`quiet_rx_kicks`, `serve_tx`), done by the
//! thread the worker pool gives the pair (vhost-user-backend starts none).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use crate::counters::DropReason;
use crate::datapath::vm_tx::{Turn, TxQueue, Worker};
use crate::datapath::Datapath;
use crate::endpoint::vm::VmEndpoint;
use crate::endpoint::{Endpoint, SwitchPort};
use crate::fault;
use crate::mem::GuestMemory;
use crate::virtio::features as f;
use crate::vring::Vring;

/// Largest queue size offered (QEMU accepts up to 1024 for vhost-user).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Features every port offers; all of them are honoured for every destination, in software
/// where the destination lacks an offload.
pub const BASE_FEATURES: u64 = f::VERSION_1
    | f::MRG_RXBUF
    | f::RING_EVENT_IDX
    | f::RING_INDIRECT_DESC
    | f::IN_ORDER
    | f::CSUM
    | f::GUEST_CSUM
    | f::HOST_TSO4
    | f::HOST_TSO6
    | f::HOST_ECN
    | f::GUEST_TSO4
    | f::GUEST_TSO6
    | f::GUEST_ECN
    | f::MQ
    | f::PROTOCOL_FEATURES;

struct PortInner {
    dp: Arc<Datapath>,
    port: Arc<SwitchPort>,
    vm: Arc<VmEndpoint>,
    /// Each queue pair's burst state, made at its first kick (a pair never started
    /// costs none).
    workers: Vec<Mutex<Option<Worker>>>,
    /// False once the connection ended: old workers still draining must not touch the
    /// port's shared state, which may already belong to the next connection.
    alive: AtomicBool,
}

/// The `VhostUserBackend` of one port for one frontend connection.
#[derive(Clone)]
pub struct Port(Arc<PortInner>);

impl Port {
    /// The backend of `port`; None if it is not a VM port.
    pub fn new(dp: Arc<Datapath>, port: Arc<SwitchPort>) -> Option<Port> {
        let Endpoint::Vm(vm) = &port.endpoint else {
            return None;
        };
        let vm = vm.clone();
        let workers = (0..port.queue_pairs).map(|_| Mutex::new(None)).collect();
        Some(Port(Arc::new(PortInner {
            dp,
            port,
            vm,
            workers,
            alive: AtomicBool::new(true),
        })))
    }

    /// Marks the connection as ended; its workers stop at their next step.
    pub fn retire(&self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }

    /// Whether the connection is still on.
    pub fn alive(&self) -> bool {
        self.0.alive.load(Ordering::Relaxed)
    }

    /// The switch port served.
    pub fn port(&self) -> &Arc<SwitchPort> {
        &self.0.port
    }

    /// Makes the connection's rings (`vrings`, by index: pair i is 2i RX and 2i + 1 TX)
    /// known to the other ports and to the notifier. Before the protocol starts: a ring is
    /// written only once its guest has started and enabled it, which each write checks.
    pub fn publish(&self, vrings: &[Vring]) {
        let inner = self.inner();
        let mut ep = inner.vm.rx_write();
        for (i, pair) in vrings.chunks(2).enumerate() {
            if let Some(slot) = ep.queues.get_mut(i) {
                *slot = Some(pair[0].clone());
            }
            for (k, ring) in pair.iter().enumerate() {
                inner.vm.notifier.set_vring(2 * i + k, ring.clone());
            }
        }
    }

    /// What a kick of an RX ring says: new buffers. Frames are never queued for them, so
    /// the driver need not kick at all: its kicks are turned off for good. Without
    /// EVENT_IDX it kicks until the used ring's NO_NOTIFY flag says otherwise (with it,
    /// after the first kick, only when its index passes an avail_event never moved on),
    /// each kick a wake-up of a worker.
    pub fn quiet_rx_kicks(&self, rx_ring: &Vring) {
        if let Some(mem) = self.inner().vm.rx_read().mem.clone() {
            use virtio_queue::QueueT;
            use vm_memory::GuestAddressSpace;
            let _ = rx_ring
                .get_mut()
                .get_queue_mut()
                .disable_notification(&*mem.memory());
        }
    }

    /// Takes what the guest transmitted on queue pair `pair`'s TX ring: all of it, or one
    /// burst (`turn`). True when the caller should call again (`TxQueue::process`).
    pub fn serve_tx(&self, pair: usize, tx_ring: &Vring, turn: Turn) -> bool {
        let inner = self.inner();
        let Some(worker) = inner.workers.get(pair) else {
            return false;
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let worker = worker.get_or_insert_with(Worker::new);
        let queue = TxQueue {
            dp: &inner.dp,
            port: &inner.port,
            vm: &inner.vm,
            alive: &inner.alive,
            vring_index: 2 * pair + 1,
        };
        // A panic here (a bug) costs this port only: its half-done burst is dropped, its
        // connection reset (its own ring may be poisoned; the guest starts over), and the
        // worker thread, which serves other pairs too, goes on.
        let again = fault::contain("in a TX worker", || {
            fault::inject_tx(inner.port.id);
            queue.process(tx_ring, worker, turn)
        });
        match again {
            Some(again) => again,
            None => {
                inner.port.counters.count_drop(DropReason::InternalError);
                *worker = Worker::new();
                inner.vm.reset_connection();
                false
            }
        }
    }

    fn inner(&self) -> &PortInner {
        &self.0
    }

    /// The VM port this serves.
    pub fn vm(&self) -> &Arc<VmEndpoint> {
        &self.0.vm
    }
}

impl VhostUserBackend for Port {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner().port.queue_pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = BASE_FEATURES;
        if self.inner().dp.mtu.is_some() {
            features |= f::MTU;
        }
        if self.inner().port.mac.is_some() {
            features |= f::MAC;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        let mut rx = self.inner().vm.rx_write();
        rx.features = features;
        rx.features_acked = true;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's virtio-net keeps its own config space (mac=, host_mtu=) and
        // warns about backends that offer it.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.inner().vm.rx_write().features_acked = false;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each queue knows whether EVENT_IDX is on; the workers ask it.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        self.inner().vm.rx_write().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // No threads of vhost-user-backend's: the worker pool serves the rings.
        Vec::new()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Called only on vhost-user-backend's threads, of which there are none.
        Ok(())
    }
}
