//! A vhost-user frontend that plays a guest's virtio-net driver: it shares memfd-backed
//! memory with the backend over a real Unix socket, lays out split virtqueues in it, and
//! sends and receives frames the way a guest driver does.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_net_backend::virtio::{features as f, net_hdr_len, NetHdr};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub const DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Room for the largest frame a guest sends: 12-byte header plus a 64 KiB TSO frame.
const TX_BUF_SIZE: u64 = 68 * 1024;
const PAGE: u64 = 4096;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("memory: {0}")]
    Memory(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("queue pair {0} does not exist")]
    NoQueue(u16),
    #[error("no free descriptors on queue {0}")]
    QueueFull(usize),
    #[error("frame of {0} bytes does not fit a buffer")]
    TooBig(usize),
}

pub type Result<T> = std::result::Result<T, FrontendError>;

/// What the driver asks for; the backend's offer is intersected with `features`.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    pub features: u64,
    pub queue_pairs: u16,
    pub queue_size: u16,
    /// Size of each RX buffer the driver posts.
    pub rx_buf_size: u32,
    /// Re-post RX buffers as frames are received (a running driver does).
    pub auto_repost: bool,
    /// The driver polls its rings and asks for no interrupts (benchmarks).
    pub polling: bool,
    /// Back guest memory with 2 MiB pages, as a tuned VM does (`memory-backend-memfd,hugetlb=on`);
    /// falls back to normal pages where the host has none reserved.
    pub hugepages: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            features: ALL_FEATURES,
            queue_pairs: 1,
            queue_size: 256,
            rx_buf_size: 2048,
            auto_repost: true,
            polling: false,
            hugepages: false,
        }
    }
}

/// Everything the backend can offer.
pub const ALL_FEATURES: u64 =
    vhost_net_backend::vhost_user::backend::BASE_FEATURES | f::MTU | f::MAC;

/// A driver with no offloads: VERSION_1 and protocol features only.
pub const PLAIN_FEATURES: u64 = f::VERSION_1 | f::PROTOCOL_FEATURES;

/// A descriptor written verbatim, for tests of malformed chains.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: RawNext,
}

#[derive(Clone, Copy, Debug)]
pub enum RawNext {
    /// The descriptor at this position of the list.
    Pos(usize),
    /// This exact index (possibly out of range).
    Index(u16),
}

/// A received frame.
#[derive(Clone, Debug)]
pub struct RxFrame {
    pub hdr: NetHdr,
    pub frame: Vec<u8>,
    pub buffers: u16,
}

struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    bufs: GuestAddress,
    buf_size: u64,
    kick: EventFd,
    /// Kicks `publish_idx` sent: the ones the backend asked for.
    kicks: u64,
    call: EventFd,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Descriptor indices of each in-flight chain, by head.
    chains: Vec<Vec<u16>>,
    /// Benchmark path: `tx_burst` writes a counter into each prepared frame before
    /// publishing it.
    stamp: Option<Stamp>,
}

/// A counter (u32, big-endian) `tx_burst` writes at `offset` of each prepared frame: a new
/// flow per frame, or one of `cycle` in turn.
#[derive(Clone, Copy)]
struct Stamp {
    offset: usize,
    count: u32,
    cycle: Option<u32>,
}

impl DriverQueue {
    fn buf(&self, i: u16) -> GuestAddress {
        GuestAddress(self.bufs.0 + u64::from(i) * self.buf_size)
    }
}

/// One virtio-net device as a guest driver sees it.
pub struct VirtioNetDevice {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    /// Where the rings and buffers end: guest memory from here on (and the first page)
    /// is never handed to the backend.
    layout_end: u64,
    mem_size: u64,
    /// Whether guest memory ended up on 2 MiB pages.
    pub on_hugepages: bool,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    hdr_len: usize,
    queues: Vec<DriverQueue>,
    opts: DeviceOptions,
}

/// The backend is what is under test: a used index past the chains in flight would make
/// this driver take back chains it never offered, and post stale buffers again.
fn check_used_index(q: usize, avail_idx: u16, last_used: u16, published: u16) {
    let in_flight = avail_idx.wrapping_sub(last_used);
    assert!(
        published.wrapping_sub(last_used) <= in_flight,
        "queue {q}: the backend published used index {published} with only {in_flight} chains in flight after {last_used}"
    );
}

/// A used entry's head, checked to lie in the ring (else it would name foreign buffers).
fn check_used_head(q: usize, id: u32, size: u16) -> u16 {
    assert!(
        id < u32::from(size),
        "queue {q}: the backend returned head {id} of a {size}-entry ring"
    );
    id as u16
}

/// Guest memory: a memfd of `size` bytes (a multiple of 2 MiB), on 2 MiB pages when asked and
/// the host has them. Returns the file and whether it is on huge pages.
fn memfd(size: u64, hugepages: bool) -> Result<(File, bool)> {
    let create = |flags: libc::c_uint| -> Result<File> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vnet-guest".as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok(file)
    };
    if hugepages {
        let file = create(libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)?;
        // ftruncate succeeds without reserving pages; fallocate fails here if the pool is short,
        // instead of a SIGBUS at first touch.
        // SAFETY: fallocate on an fd we own, with a range inside its length.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) } == 0 {
            return Ok((file, true));
        }
    }
    Ok((create(libc::MFD_CLOEXEC)?, false))
}

/// Guest memory of `size` bytes at guest address 0 in a new memfd (on 2 MiB pages if
/// asked and the host has them), and its region as a memory table describes it; whether
/// it is on 2 MiB pages.
fn guest_memory(
    size: u64,
    hugepages: bool,
) -> Result<(GuestMemoryMmap, VhostUserMemoryRegionInfo, bool)> {
    let (file, hugepages) = memfd(size, hugepages)?;
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
        .map_err(|e| FrontendError::Memory(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| FrontendError::Memory("region".into()))?;
    let info = VhostUserMemoryRegionInfo::from_guest_region(&region)?;
    let mem = GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| FrontendError::Memory(e.to_string()))?;
    Ok((mem, info, hugepages))
}

impl VirtioNetDevice {
    /// Connects to a backend socket and brings the device up: negotiation, memory table,
    /// every queue set up and enabled. RX queues start empty.
    pub fn connect(path: impl AsRef<Path>, opts: DeviceOptions) -> Result<Self> {
        let nq = usize::from(opts.queue_pairs) * 2;
        let frontend = Frontend::connect(path, nq as u64)?;
        Self::set_up(frontend, opts)
    }

    /// As QEMU with `server=on`: waits up to `within` on `listener` for the backend to
    /// connect (a port in client mode), then brings the device up as `connect` does.
    pub fn accept(
        listener: &std::os::unix::net::UnixListener,
        opts: DeviceOptions,
        within: Duration,
    ) -> Result<Self> {
        let nq = usize::from(opts.queue_pairs) * 2;
        let end = Instant::now() + within;
        listener.set_nonblocking(true)?;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        Self::set_up(Frontend::from_stream(stream, nq as u64), opts)
    }

    fn set_up(mut frontend: Frontend, opts: DeviceOptions) -> Result<Self> {
        let nq = usize::from(opts.queue_pairs) * 2;
        let qsize = u64::from(opts.queue_size);
        let ring_bytes = (16 * qsize).next_multiple_of(PAGE)
            + (6 + 2 * qsize).next_multiple_of(PAGE)
            + (6 + 8 * qsize).next_multiple_of(PAGE);
        let rx_buf = u64::from(opts.rx_buf_size).next_multiple_of(64);
        let per_pair = 2 * ring_bytes + qsize * (rx_buf + TX_BUF_SIZE);
        let mem_size = (PAGE + per_pair * opts.queue_pairs as u64).next_multiple_of(2 << 20);

        let (mem, info, hugepages) = guest_memory(mem_size, opts.hugepages)?;
        let host_base = info.userspace_addr;

        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let features = offered & opts.features;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & f::PROTOCOL_FEATURES != 0 {
            let pf = frontend.get_protocol_features()?;
            protocol_features =
                pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend.set_protocol_features(protocol_features)?;
        }
        frontend.set_features(features)?;
        frontend.set_mem_table(&[info])?;

        let mut queues = Vec::with_capacity(nq);
        let mut next = PAGE;
        for i in 0..nq {
            let desc = GuestAddress(next);
            next += (16 * qsize).next_multiple_of(PAGE);
            let avail = GuestAddress(next);
            next += (6 + 2 * qsize).next_multiple_of(PAGE);
            let used = GuestAddress(next);
            next += (6 + 8 * qsize).next_multiple_of(PAGE);
            let buf_size = if i % 2 == 0 { rx_buf } else { TX_BUF_SIZE };
            let bufs = GuestAddress(next);
            next += qsize * buf_size;
            let q = DriverQueue {
                size: opts.queue_size,
                desc,
                avail,
                used,
                bufs,
                buf_size,
                kick: EventFd::new(EFD_NONBLOCK)?,
                kicks: 0,
                call: EventFd::new(EFD_NONBLOCK)?,
                avail_idx: 0,
                last_used: 0,
                free: (0..opts.queue_size).rev().collect(),
                chains: vec![Vec::new(); usize::from(opts.queue_size)],
                stamp: None,
            };
            frontend.set_vring_num(i, opts.queue_size)?;
            frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: host_base + desc.0,
                    used_ring_addr: host_base + used.0,
                    avail_ring_addr: host_base + avail.0,
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(i, 0)?;
            frontend.set_vring_call(i, &q.call)?;
            frontend.set_vring_kick(i, &q.kick)?;
            queues.push(q);
        }
        if features & f::PROTOCOL_FEATURES != 0 {
            for i in 0..nq {
                frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(VirtioNetDevice {
            frontend,
            mem,
            mem_size,
            layout_end: next,
            on_hugepages: hugepages,
            features,
            protocol_features,
            hdr_len: net_hdr_len(features),
            queues,
            opts,
        })
    }

    /// `connect`, tried again for up to 10 s while the socket is not there yet or the
    /// backend is still closing the port's previous connection.
    pub fn connect_retry(path: impl AsRef<Path>, opts: DeviceOptions) -> VirtioNetDevice {
        let path = path.as_ref();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match VirtioNetDevice::connect(path, opts.clone()) {
                Ok(d) => return d,
                Err(e) if Instant::now() > end => {
                    panic!("cannot connect to {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Gives the device up (RESET_OWNER), as a frontend may at any time.
    pub fn reset_owner(&mut self) -> Result<()> {
        self.frontend.reset_owner()?;
        Ok(())
    }

    /// Moves guest memory to a new memfd at the same guest addresses (a new mapping, as
    /// when a VM's memory is rebuilt) with the same contents, and sends the backend the new
    /// table (SET_MEM_TABLE), returning once the backend has taken it. Everything written
    /// from now on lands in the new memory only.
    pub fn remap_memory(&mut self) -> Result<()> {
        let (mem, info, _) = guest_memory(self.mem_size, false)?;
        let mut bytes = vec![0u8; self.mem_size as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(0))
            .map_err(|e| FrontendError::Memory(e.to_string()))?;
        mem.write_slice(&bytes, GuestAddress(0))
            .map_err(|e| FrontendError::Memory(e.to_string()))?;
        self.frontend.set_mem_table(&[info])?;
        self.mem = mem;
        // As QEMU waits for the reply: from here on the backend uses the new table.
        self.sync()
    }

    /// Gives queue `q` another interrupt eventfd (SET_VRING_CALL), as a frontend may at any
    /// time: a hostile one, one that nobody reads or that is kept full.
    pub fn replace_call(&mut self, q: usize, call: EventFd) -> Result<()> {
        self.frontend.set_vring_call(q, &call)?;
        self.queues[q].call = call;
        Ok(())
    }

    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Size of the shared guest memory; addresses at or past it are outside.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// Waits until the backend has handled every message sent so far (a request with a
    /// reply; messages are handled in order). SET_VRING_ENABLE, like QEMU sends it, has none.
    pub fn sync(&mut self) -> Result<()> {
        self.frontend.get_features()?;
        Ok(())
    }

    /// Enables or disables one vring (QEMU does this as the guest changes queue pairs).
    pub fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<()> {
        Ok(self.frontend.set_vring_enable(queue, enable)?)
    }

    fn queue(&mut self, index: usize) -> Result<&mut DriverQueue> {
        let pairs = self.opts.queue_pairs;
        self.queues
            .get_mut(index)
            .ok_or(FrontendError::NoQueue((index / 2) as u16 % pairs.max(1)))
    }

    fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.queues[q].desc.0 + u64::from(i) * 16);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, at)
            .expect("descriptor table is in memory");
    }

    /// Makes the chain at `head` available and kicks the queue if the backend asks for it.
    fn publish(&mut self, q: usize, head: u16) -> Result<()> {
        let (avail, size, idx) = {
            let dq = &self.queues[q];
            (dq.avail, dq.size, dq.avail_idx)
        };
        let slot = GuestAddress(avail.0 + 4 + u64::from(idx % size) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        self.publish_idx(q, idx.wrapping_add(1));
        Ok(())
    }

    /// Breaks the ring protocol on purpose (hostile-driver tests): makes `head` available
    /// on TX queue `qp` as is (it may be out of range), and/or moves the avail index by
    /// `extra` more entries than were written.
    pub fn publish_bogus(&mut self, qp: u16, head: u16, extra: u16) -> Result<()> {
        let q = usize::from(qp) * 2 + 1;
        self.queue(q)?;
        let (avail, size, idx) = {
            let dq = &self.queues[q];
            (dq.avail, dq.size, dq.avail_idx)
        };
        let slot = GuestAddress(avail.0 + 4 + u64::from(idx % size) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        fence(Ordering::Release);
        let idx = idx.wrapping_add(1).wrapping_add(extra);
        self.mem
            .store(idx.to_le(), GuestAddress(avail.0 + 2), Ordering::Release)
            .unwrap();
        self.queues[q].avail_idx = idx;
        fence(Ordering::SeqCst);
        self.queues[q].kick.write(1)?;
        Ok(())
    }

    fn take_descs(&mut self, q: usize, n: usize) -> Result<Vec<u16>> {
        if self.queues[q].free.len() < n {
            self.reclaim_tx(q);
        }
        let dq = self.queue(q)?;
        if dq.free.len() < n {
            return Err(FrontendError::QueueFull(q));
        }
        let at = dq.free.len() - n;
        Ok(dq.free.split_off(at))
    }

    /// Frees the descriptors of TX chains the backend has returned.
    pub fn reclaim_tx(&mut self, q: usize) -> usize {
        let mut n = 0;
        while let Some((head, _)) = self.pop_used(q) {
            let dq = &mut self.queues[q];
            let slot = usize::from(head) % dq.chains.len();
            let chain = std::mem::take(&mut dq.chains[slot]);
            dq.free.extend(chain);
            n += 1;
        }
        n
    }

    fn pop_used(&mut self, q: usize) -> Option<(u16, u32)> {
        let dq = &self.queues[q];
        let used_idx: u16 = self
            .mem
            .load(GuestAddress(dq.used.0 + 2), Ordering::Acquire)
            .ok()?;
        let used_idx = u16::from_le(used_idx);
        if used_idx == dq.last_used {
            return None;
        }
        check_used_index(q, dq.avail_idx, dq.last_used, used_idx);
        let elem = GuestAddress(dq.used.0 + 4 + u64::from(dq.last_used % dq.size) * 8);
        let id: u32 = self.mem.read_obj(elem).ok()?;
        let id = check_used_head(q, u32::from_le(id), dq.size);
        let len: u32 = self.mem.read_obj(GuestAddress(elem.0 + 4)).ok()?;
        let dq = &mut self.queues[q];
        dq.last_used = dq.last_used.wrapping_add(1);
        if self.opts.polling {
            return Some((id, u32::from_le(len)));
        }
        // Ask for an interrupt at the next used entry (EVENT_IDX used_event).
        let used_event = GuestAddress(dq.avail.0 + 4 + 2 * u64::from(dq.size));
        let last = dq.last_used;
        let _ = self.mem.write_obj(last.to_le(), used_event);
        Some((id, u32::from_le(len)))
    }

    /// Sends one frame on queue pair `qp` as a single descriptor holding header and frame.
    pub fn send(&mut self, qp: u16, hdr: &NetHdr, frame: &[u8]) -> Result<()> {
        let h = hdr.to_bytes();
        self.send_pieces(qp, &[&h[..self.hdr_len], frame], false)
    }

    /// Sends `frames` on queue pair `qp`, each as one descriptor with a default header,
    /// made available together (one index update, at most one kick): the backend takes
    /// them in one burst, as a guest's driver publishes a batch of its queue.
    pub fn send_burst(&mut self, qp: u16, frames: &[&[u8]]) -> Result<()> {
        let q = usize::from(qp) * 2 + 1;
        self.queue(q)?;
        let h = NetHdr::default().to_bytes();
        let descs = self.take_descs(q, frames.len())?;
        let (avail, size, old) = {
            let dq = &self.queues[q];
            (dq.avail, dq.size, dq.avail_idx)
        };
        for (k, (frame, &d)) in frames.iter().zip(&descs).enumerate() {
            let mut bytes = h[..self.hdr_len].to_vec();
            bytes.extend_from_slice(frame);
            if bytes.len() as u64 > TX_BUF_SIZE {
                return Err(FrontendError::TooBig(bytes.len()));
            }
            let addr = self.queues[q].buf(d);
            self.mem.write_slice(&bytes, addr).unwrap();
            self.write_desc(q, d, addr.0, bytes.len() as u32, 0, 0);
            self.queues[q].chains[usize::from(d)] = vec![d];
            let slot = GuestAddress(avail.0 + 4 + u64::from(old.wrapping_add(k as u16) % size) * 2);
            self.mem.write_obj(d.to_le(), slot).unwrap();
        }
        self.publish_idx(q, old.wrapping_add(frames.len() as u16));
        Ok(())
    }

    /// Sends a frame split over several descriptors (`pieces` concatenated), directly or
    /// through an indirect table.
    pub fn send_pieces(&mut self, qp: u16, pieces: &[&[u8]], indirect: bool) -> Result<()> {
        let q = usize::from(qp) * 2 + 1;
        self.queue(q)?;
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if indirect {
            let descs = self.take_descs(q, 1)?;
            let head = descs[0];
            let base = self.queues[q].buf(head).0;
            if total as u64 + PAGE > TX_BUF_SIZE || pieces.len() > 256 {
                return Err(FrontendError::TooBig(total));
            }
            let mut data = base + PAGE;
            let mut table = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                self.mem.write_slice(p, GuestAddress(data)).unwrap();
                let last = i + 1 == pieces.len();
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&data.to_le_bytes());
                d[8..12].copy_from_slice(&(p.len() as u32).to_le_bytes());
                let flags = if last { 0 } else { DESC_F_NEXT };
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
                table.extend_from_slice(&d);
                data += p.len() as u64;
            }
            self.mem.write_slice(&table, GuestAddress(base)).unwrap();
            self.write_desc(q, head, base, table.len() as u32, DESC_F_INDIRECT, 0);
            self.queues[q].chains[usize::from(head)] = descs;
            return self.publish(q, head);
        }
        let descs = self.take_descs(q, pieces.len())?;
        for (i, p) in pieces.iter().enumerate() {
            if p.len() as u64 > TX_BUF_SIZE {
                return Err(FrontendError::TooBig(p.len()));
            }
            let addr = self.queues[q].buf(descs[i]);
            self.mem.write_slice(p, addr).unwrap();
            let last = i + 1 == pieces.len();
            let next = if last { 0 } else { descs[i + 1] };
            let flags = if last { 0 } else { DESC_F_NEXT };
            self.write_desc(q, descs[i], addr.0, p.len() as u32, flags, next);
        }
        let head = descs[0];
        self.queues[q].chains[usize::from(head)] = descs;
        self.publish(q, head)
    }

    /// Writes the given descriptors verbatim into free slots of TX queue `qp` and makes the
    /// first one available: for malformed chains.
    pub fn send_raw(&mut self, qp: u16, descs: &[RawDesc]) -> Result<()> {
        let q = usize::from(qp) * 2 + 1;
        self.queue(q)?;
        let slots = self.take_descs(q, descs.len())?;
        self.publish_raw(q, slots, descs)
    }

    /// Writes `descs` into `slots` (`RawNext::Pos` resolved to slots) and publishes the chain.
    fn publish_raw(&mut self, q: usize, slots: Vec<u16>, descs: &[RawDesc]) -> Result<()> {
        for (i, d) in descs.iter().enumerate() {
            let next = match d.next {
                RawNext::Pos(p) => slots[p],
                RawNext::Index(n) => n,
            };
            self.write_desc(q, slots[i], d.addr, d.len, d.flags, next);
        }
        let head = slots[0];
        self.queues[q].chains[usize::from(head)] = slots;
        self.publish(q, head)
    }

    /// Benchmark path: writes `hdr` + `frame` into every TX buffer of `qp` once, with one
    /// descriptor per buffer, so that sending is only publishing heads.
    pub fn tx_fill(&mut self, qp: u16, hdr: &NetHdr, frame: &[u8]) -> Result<()> {
        let q = usize::from(qp) * 2 + 1;
        self.queue(q)?;
        let mut bytes = hdr.to_bytes()[..self.hdr_len].to_vec();
        bytes.extend_from_slice(frame);
        if bytes.len() as u64 + 63 * 64 > TX_BUF_SIZE {
            return Err(FrontendError::TooBig(bytes.len()));
        }
        for i in 0..self.queues[q].size {
            // Staggered by a cache line per buffer, as a guest's scattered skbs are: at a
            // fixed 68 KiB stride every frame would fall into the same few cache sets.
            let addr = GuestAddress(self.queues[q].buf(i).0 + u64::from(i % 64) * 64);
            self.mem.write_slice(&bytes, addr).unwrap();
            self.write_desc(q, i, addr.0, bytes.len() as u32, 0, 0);
            self.queues[q].chains[usize::from(i)] = vec![i];
        }
        Ok(())
    }

    /// Benchmark path: from now on `tx_burst` on `qp` writes a counter at byte `offset` of
    /// each frame `tx_fill` prepared (for UDP over IPv4, 34: its two ports), so every frame
    /// is a flow of its own; or, with `cycle`, the counter modulo it: that many flows, their
    /// frames in turn.
    pub fn stamp_tx(&mut self, qp: u16, offset: usize, cycle: Option<u32>) {
        let q = usize::from(qp) * 2 + 1;
        self.queues[q].stamp = Some(Stamp {
            offset: self.hdr_len + offset,
            count: 0,
            cycle,
        });
    }

    /// Benchmark path: publishes up to `max` prepared frames on `qp` with one index update
    /// and at most one kick (only if the backend asked for it). Returns how many.
    pub fn tx_burst(&mut self, qp: u16, max: usize) -> usize {
        let q = usize::from(qp) * 2 + 1;
        // Reclaim: prepared chains are single descriptors, head = slot.
        let mut free = std::mem::take(&mut self.queues[q].free);
        self.drain_used(q, |head, _| free.push(head));
        let n = max.min(free.len());
        let (avail, size, old) = {
            let dq = &self.queues[q];
            (self.host(dq.avail), dq.size, dq.avail_idx)
        };
        for k in 0..n {
            let head = free.pop().expect("counted");
            if let Some(stamp) = self.queues[q].stamp {
                // Where `tx_fill` put this slot's frame.
                let frame = self.queues[q].buf(head).0 + u64::from(head % 64) * 64;
                let value = stamp.cycle.map_or(stamp.count, |n| stamp.count % n);
                let at = GuestAddress(frame + stamp.offset as u64);
                let _ = self.mem.write_obj(value.to_be(), at);
                self.queues[q].stamp = Some(Stamp {
                    count: stamp.count.wrapping_add(1),
                    ..stamp
                });
            }
            let slot = 4 + 2 * usize::from(old.wrapping_add(k as u16) % size);
            // SAFETY: an avail ring entry inside our own mapping, laid out by `connect`.
            unsafe { std::ptr::write_volatile(avail.add(slot).cast::<u16>(), head.to_le()) };
        }
        self.queues[q].free = free;
        if n > 0 {
            self.publish_idx(q, old.wrapping_add(n as u16));
        }
        n
    }

    /// The host address of a ring laid out in our own memory.
    fn host(&self, ring: GuestAddress) -> *mut u8 {
        self.mem
            .get_host_address(ring)
            .expect("rings lie inside guest memory")
    }

    /// Benchmark path: every used entry of queue `q` published so far, with one read of the
    /// used index and no per-entry memory lookups (a driver reads its rings in place).
    fn drain_used(&mut self, q: usize, mut f: impl FnMut(u16, u32)) {
        let (used, size, mut last) = {
            let dq = &self.queues[q];
            (self.host(dq.used), dq.size, dq.last_used)
        };
        // SAFETY: the used ring lies inside our own mapping, laid out by `connect`, suitably
        // aligned (page + 2 for the index, page + 4 + 8k for entries); the backend writes it
        // concurrently, hence the atomic index load and the volatile entry reads after it.
        let published = unsafe { (*used.add(2).cast::<AtomicU16>()).load(Ordering::Acquire) };
        let published = u16::from_le(published);
        check_used_index(q, self.queues[q].avail_idx, last, published);
        while last != published {
            let slot = 4 + 8 * usize::from(last % size);
            // SAFETY: as above.
            let (id, len) = unsafe {
                (
                    std::ptr::read_volatile(used.add(slot).cast::<u32>()),
                    std::ptr::read_volatile(used.add(slot + 4).cast::<u32>()),
                )
            };
            f(
                check_used_head(q, u32::from_le(id), size),
                u32::from_le(len),
            );
            last = last.wrapping_add(1);
        }
        self.queues[q].last_used = last;
        if !self.opts.polling {
            let used_event = GuestAddress(self.queues[q].avail.0 + 4 + 2 * u64::from(size));
            let _ = self.mem.write_obj(last.to_le(), used_event);
        }
    }

    /// Stores a new avail index and kicks if the backend wants it (EVENT_IDX avail_event or
    /// the NO_NOTIFY flag).
    fn publish_idx(&mut self, q: usize, new: u16) {
        let (avail, used, size, old) = {
            let dq = &self.queues[q];
            (dq.avail, dq.used, dq.size, dq.avail_idx)
        };
        fence(Ordering::Release);
        self.mem
            .store(new.to_le(), GuestAddress(avail.0 + 2), Ordering::Release)
            .unwrap();
        self.queues[q].avail_idx = new;
        fence(Ordering::SeqCst);
        let kick = if self.features & f::RING_EVENT_IDX != 0 {
            let event: u16 = self
                .mem
                .load(
                    GuestAddress(used.0 + 4 + 8 * u64::from(size)),
                    Ordering::Acquire,
                )
                .unwrap_or(0);
            new.wrapping_sub(u16::from_le(event)).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self
                .mem
                .load(GuestAddress(used.0), Ordering::Acquire)
                .unwrap_or(0);
            u16::from_le(flags) & 1 == 0
        };
        if kick {
            let _ = self.queues[q].kick.write(1);
            self.queues[q].kicks += 1;
        }
    }

    /// Benchmark path: takes every received buffer off `qp`'s RX queue and posts it again
    /// (one index update). Returns (frames, frame bytes); RX buffers must be large enough
    /// for one frame each (no MRG_RXBUF).
    pub fn rx_drain(&mut self, qp: u16) -> (u64, u64) {
        let q = usize::from(qp) * 2;
        let (mut frames, mut bytes) = (0u64, 0u64);
        let (avail, size, mut idx) = {
            let dq = &self.queues[q];
            (self.host(dq.avail), dq.size, dq.avail_idx)
        };
        let hdr_len = self.hdr_len as u64;
        self.drain_used(q, |head, len| {
            frames += 1;
            bytes += u64::from(len).saturating_sub(hdr_len);
            let slot = 4 + 2 * usize::from(idx % size);
            // SAFETY: an avail ring entry inside our own mapping, laid out by `connect`.
            unsafe { std::ptr::write_volatile(avail.add(slot).cast::<u16>(), head.to_le()) };
            idx = idx.wrapping_add(1);
        });
        if frames > 0 {
            self.publish_idx(q, idx);
        }
        (frames, bytes)
    }

    /// Kicks sent on queue `q` (RX queues even, TX odd) after new buffers were made
    /// available, as the backend asked for them (EVENT_IDX's avail_event or NO_NOTIFY).
    pub fn kicks(&self, q: usize) -> u64 {
        self.queues[q].kicks
    }

    /// Address of a TX data buffer the test may fill and point raw descriptors at.
    pub fn scratch_addr(&mut self, qp: u16) -> u64 {
        // The last TX buffer of the queue: take_descs hands out low indices first.
        let q = usize::from(qp) * 2 + 1;
        let dq = &self.queues[q];
        dq.buf(dq.size - 1).0
    }

    /// The guest memory no ring or buffer uses (the first page, and everything after the
    /// last buffer): the backend has no business writing there.
    fn unused(&self) -> [(u64, u64); 2] {
        [(0, PAGE), (self.layout_end, self.mem_size)]
    }

    /// Fills the unused guest memory with `pattern`.
    pub fn fill_unused(&self, pattern: u8) {
        for (start, end) in self.unused() {
            let fill = vec![pattern; (end - start) as usize];
            self.write_mem(start, &fill);
        }
    }

    /// The first address of unused guest memory that no longer holds `pattern`, if any.
    pub fn unused_changed(&self, pattern: u8) -> Option<u64> {
        for (start, end) in self.unused() {
            let mut buf = vec![0u8; (end - start) as usize];
            self.mem.read_slice(&mut buf, GuestAddress(start)).ok()?;
            if let Some(i) = buf.iter().position(|b| *b != pattern) {
                return Some(start + i as u64);
            }
        }
        None
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Waits until every TX chain sent on `qp` came back from the backend.
    pub fn wait_tx_done(&mut self, qp: u16, timeout: Duration) -> bool {
        let q = usize::from(qp) * 2 + 1;
        let end = Instant::now() + timeout;
        loop {
            self.reclaim_tx(q);
            let dq = &self.queues[q];
            if dq.free.len() == usize::from(dq.size) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Posts `n` RX buffers of `rx_buf_size` bytes, each one writable descriptor.
    pub fn post_rx(&mut self, qp: u16, n: usize) -> Result<()> {
        let q = usize::from(qp) * 2;
        self.queue(q)?;
        for _ in 0..n {
            let slot = {
                let dq = &mut self.queues[q];
                dq.free.pop().ok_or(FrontendError::QueueFull(q))?
            };
            self.post_rx_slot(q, slot)?;
        }
        Ok(())
    }

    fn post_rx_slot(&mut self, q: usize, slot: u16) -> Result<()> {
        let addr = self.queues[q].buf(slot);
        let len = self.opts.rx_buf_size;
        self.write_desc(q, slot, addr.0, len, DESC_F_WRITE, 0);
        self.queues[q].chains[usize::from(slot)] = vec![slot];
        self.publish(q, slot)
    }

    /// Posts one raw RX chain (for malformed RX buffer tests).
    pub fn post_rx_raw(&mut self, qp: u16, descs: &[RawDesc]) -> Result<()> {
        let q = usize::from(qp) * 2;
        let slots = {
            let dq = self.queue(q)?;
            if dq.free.len() < descs.len() {
                return Err(FrontendError::QueueFull(q));
            }
            let at = dq.free.len() - descs.len();
            dq.free.split_off(at)
        };
        self.publish_raw(q, slots, descs)
    }

    /// Receives one frame from RX queue pair `qp`, gathering mergeable buffers.
    pub fn recv(&mut self, qp: u16, timeout: Duration) -> Option<RxFrame> {
        let q = usize::from(qp) * 2;
        self.queues.get(q)?;
        let end = Instant::now() + timeout;
        let mut first = None;
        let mut data = Vec::new();
        let mut want = 1u16;
        let mut got = 0u16;
        loop {
            while got < want {
                let Some((head, len)) = self.pop_used(q) else {
                    break;
                };
                let addr = self.queues[q].buf(head);
                let mut buf = vec![0u8; len as usize];
                if len as u64 <= self.queues[q].buf_size {
                    self.mem.read_slice(&mut buf, addr).ok()?;
                }
                if first.is_none() {
                    if buf.len() < self.hdr_len {
                        // Returned unused (a frame the backend dropped): not a frame.
                        self.recycle_rx(q, head);
                        continue;
                    }
                    let hdr = NetHdr::parse(&buf[..self.hdr_len]);
                    if self.features & f::MRG_RXBUF != 0 {
                        want = hdr.num_buffers.max(1);
                    }
                    first = Some(hdr);
                    data.extend_from_slice(&buf[self.hdr_len..]);
                } else {
                    data.extend_from_slice(&buf);
                }
                got += 1;
                self.recycle_rx(q, head);
            }
            if let Some(hdr) = first.filter(|_| got >= want) {
                return Some(RxFrame {
                    hdr,
                    frame: data,
                    buffers: got,
                });
            }
            if Instant::now() > end {
                return None;
            }
            self.wait_call(q, Duration::from_millis(2));
        }
    }

    fn recycle_rx(&mut self, q: usize, head: u16) {
        let chain = std::mem::take(&mut self.queues[q].chains[usize::from(head)]);
        if self.opts.auto_repost && chain.len() == 1 {
            let _ = self.post_rx_slot(q, head);
        } else {
            self.queues[q].free.extend(chain);
        }
    }

    /// Collects every frame that arrives within `window`.
    pub fn recv_all(&mut self, qp: u16, window: Duration) -> Vec<RxFrame> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(fr) = self.recv(qp, end.saturating_duration_since(Instant::now())) {
            out.push(fr);
        }
        out
    }

    /// Whether the backend interrupted queue pair `qp`'s RX queue within `timeout` (the
    /// interrupt is taken).
    pub fn rx_interrupted(&mut self, qp: u16, timeout: Duration) -> bool {
        self.wait_call(usize::from(qp) * 2, timeout)
    }

    /// Waits up to `timeout` for queue `q`'s interrupt and takes it; whether it came.
    fn wait_call(&self, q: usize, timeout: Duration) -> bool {
        let fd = self.queues[q].call.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } == 1;
        // Non-blocking: takes the interrupt if there is one.
        let _ = self.queues[q].call.read();
        ready
    }
}
