//! Relays vhost-user messages between a frontend (QEMU) and the protocol handler.
//!
//! QEMU's virtio-net enables queue pairs with SET_VRING_ENABLE as soon as the guest driver
//! picks them, which is before the device starts and sends SET_FEATURES. The `vhost` crate's
//! request handler refuses SET_VRING_ENABLE until PROTOCOL_FEATURES has been acked and drops
//! the connection, so no QEMU guest could ever start. Until SET_FEATURES passes, this relay
//! answers those requests itself and remembers them; right after SET_FEATURES it replays the
//! last state of each ring (QEMU 7.2 does not enable the rings again when it starts the
//! device). It also refuses a memory table whose regions run past the end of their files
//! (see `check_mem_table`). Every other message, with its file descriptors, passes through
//! unchanged. Only the control channel goes through here: rings, kicks and memory are shared
//! directly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use libc::iovec;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
/// Larger than any vhost-user message (the memory table with 8 regions is 264 bytes).
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_RESET_OWNER: u32 = 4;
const REQ_SET_MEM_TABLE: u32 = 5;
const REQ_GET_PROTOCOL_FEATURES: u32 = 15;
const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
const REQ_SET_VRING_NUM: u32 = 8;
const REQ_SET_VRING_ADDR: u32 = 9;
const REQ_SET_VRING_BASE: u32 = 10;
const REQ_GET_VRING_BASE: u32 = 11;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_SET_VRING_CALL: u32 = 13;
const REQ_SET_VRING_ERR: u32 = 14;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_ADD_MEM_REG: u32 = 37;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One vhost-user message: header, payload and the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<File>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    // SAFETY: the iovec points into `hdr`, which outlives the call; received fds are written
    // into `raw_fds` and owned by us from here on.
    let (got, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the kernel handed us these descriptors; nothing else owns them.
    let fds: Vec<File> = raw_fds[..nfds]
        .iter()
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    reader.read_exact(&mut hdr[got..])?;
    let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let flags = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(invalid(format!(
            "vhost-user message {request} claims a {size}-byte payload"
        )));
    }
    let mut payload = vec![0u8; size];
    reader.read_exact(&mut payload)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

pub fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HDR_LEN + msg.payload.len());
    buf.extend_from_slice(&msg.request.to_le_bytes());
    buf.extend_from_slice(&msg.flags.to_le_bytes());
    buf.extend_from_slice(&(msg.payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&msg.payload);
    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = sock
        .send_with_fds(&[&buf[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut writer = sock;
    writer.write_all(&buf[sent..])
}

/// What to do with a message from the frontend.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Answer it here (with an ack if it asked for one) and do not forward it.
    Absorb {
        ack: bool,
    },
    /// Close the connection: the message would harm the whole process.
    Refuse(String),
    /// Close the connection, as the frontend asked for (RESET_OWNER): not a fault.
    End(String),
    /// A ring of a queue pair the port does not offer: the guest wants more queue pairs
    /// than the port's `queues`. Closed, as Refuse, with its own message.
    TooManyQueues(String),
}

/// Bytes of one SET_MEM_TABLE region: guest address, size, user address, file offset.
const MEM_REGION_LEN: usize = 32;

/// Checks that each region of a SET_MEM_TABLE backed by a regular file is on tmpfs or
/// hugetlbfs (memfd, /dev/shm, hugetlbfs) and lies inside that file. A mapping past a file's end is made without complaint,
/// and the first access there (a ring, a buffer the guest points at) kills the process with
/// SIGBUS: every port, not only this one. A table malformed otherwise is forwarded for the
/// protocol handler to refuse; other kinds of files (a DAX device) have no size to check.
/// This catches a wrong table, not a frontend that shrinks its file afterwards (it keeps
/// the descriptor); stopping that would take sealed memfds or recovering from SIGBUS.
pub fn check_mem_table(msg: &Message) -> Result<(), String> {
    let p = &msg.payload;
    let u64_at = |at: usize| {
        p.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    for (i, file) in msg.fds.iter().enumerate() {
        let at = 8 + i * MEM_REGION_LEN;
        let (Some(size), Some(offset)) = (u64_at(at + 8), u64_at(at + 24)) else {
            break;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        if let Err(fs) = memory_filesystem(file) {
            return Err(format!(
                "memory region {i} is a file on {fs}: a fault there (a slow or gone server, a \
                 full disk) would block or kill the switch's workers, every port's; give the \
                 guest memory-backend-memfd, or memory-backend-file on /dev/shm or hugetlbfs"
            ));
        }
        if offset.checked_add(size).is_none_or(|end| end > meta.len()) {
            return Err(format!(
                "memory region {i} maps {size} bytes at offset {offset} of a {}-byte file, \
                 past its end (is the guest's memory backend smaller than its size=?)",
                meta.len()
            ));
        }
    }
    Ok(())
}

/// Guest memory must live where QEMU puts it: memfd (tmpfs or hugetlbfs inside), /dev/shm
/// (tmpfs) or hugetlbfs. Their pages are in memory or reserved; a file on a disk or network
/// filesystem can fault in ways (I/O, a full disk, a server gone) that block or kill the
/// worker touching it. Err names the filesystem otherwise.
fn memory_filesystem(file: &File) -> Result<(), String> {
    // SAFETY: fstatfs fills the zeroed struct we pass for a descriptor `file` owns.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(format!(
            "a filesystem fstatfs fails on ({})",
            io::Error::last_os_error()
        ));
    }
    filesystem_kind(st.f_type)
}

fn filesystem_kind(magic: libc::__fsword_t) -> Result<(), String> {
    match magic {
        libc::TMPFS_MAGIC | libc::HUGETLBFS_MAGIC => Ok(()),
        libc::NFS_SUPER_MAGIC => Err("NFS".into()),
        libc::FUSE_SUPER_MAGIC => Err("FUSE".into()),
        m => Err(format!(
            "a filesystem of type {m:#x}, not tmpfs or hugetlbfs"
        )),
    }
}

/// Checks that a kick, call or error descriptor is an eventfd and makes it non-blocking.
/// The workers write interrupts (and read kicks) under locks other ports need: a
/// descriptor that blocks (a pipe nobody reads, a blocking eventfd kept full) would stall
/// every sender to this port. The flag is on the open file, which the frontend shares and
/// could clear again; what a frontend does then stalls only the workers writing to it
/// while it does.
fn take_eventfd(file: &File) -> Result<(), String> {
    let fd = file.as_raw_fd();
    let kind = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if kind != "anon_inode:[eventfd]" {
        return Err(format!(
            "a ring's kick, call or error descriptor must be an eventfd, not {kind:?}"
        ));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(format!(
            "cannot make the eventfd non-blocking: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// vhost-user's bit in the virtio feature word: the frontend speaks protocol features.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The ring a per-ring request is about: the index leads `vhost_vring_state` and
/// `vhost_vring_addr`; KICK, CALL and ERR carry it in the low byte of their u64.
fn ring_index(msg: &Message) -> Option<u32> {
    let p = &msg.payload;
    match msg.request {
        REQ_SET_VRING_NUM | REQ_SET_VRING_ADDR | REQ_SET_VRING_BASE | REQ_GET_VRING_BASE
        | REQ_SET_VRING_ENABLE => Some(u32::from_le_bytes(p.get(..4)?.try_into().ok()?)),
        REQ_SET_VRING_KICK | REQ_SET_VRING_CALL | REQ_SET_VRING_ERR => Some(u32::from(*p.first()?)),
        _ => None,
    }
}

/// The first 8 payload bytes as a little-endian word, if there are 8.
fn word(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Tracks the frontend's side of the handshake.
pub struct Filter {
    /// Rings the port has (2 per queue pair): a ring index must be below.
    rings: u32,
    /// The protocol features the handler offered (its answer to GET_PROTOCOL_FEATURES).
    offered: Arc<AtomicU64>,
    features_set: bool,
    /// Ring enable states (`struct vhost_vring_state`) absorbed before SET_FEATURES, by
    /// ring index: at most one per ring.
    early_enables: BTreeMap<u32, [u8; 8]>,
}

impl Filter {
    pub fn new(rings: u32, offered: Arc<AtomicU64>) -> Filter {
        Filter {
            rings,
            offered,
            features_set: false,
            early_enables: BTreeMap::new(),
        }
    }

    pub fn judge(&mut self, msg: &Message) -> Verdict {
        if let Some(index) = ring_index(msg) {
            if index >= self.rings {
                return Verdict::TooManyQueues(format!(
                    "the guest uses queue pair {} but the port offers {}: give the port \
                     queues = {} or more (--port ...,queues=N, or queues in its [[port]]), or \
                     QEMU fewer (-netdev vhost-user,...,queues=N)",
                    index / 2 + 1,
                    self.rings / 2,
                    index / 2 + 1
                ));
            }
        }
        match msg.request {
            REQ_SET_FEATURES => {
                self.features_set = true;
                Verdict::Forward
            }
            // The frontend gives the device up; vhost-user-backend would only forget the
            // features while the rings and memory stay in use. Ending the connection
            // resets all of it, as a disconnect does; a frontend connects again to go on.
            REQ_RESET_OWNER => Verdict::End(
                "RESET_OWNER: the frontend gave the device up; the port is reset (its rings, \
                 memory and learned MACs dropped) until a frontend connects again"
                    .into(),
            ),
            // vhost-user-backend takes whatever protocol features it is told (CONFIGURE_MEM_SLOTS
            // included, which opens ADD_MEM_REG): only what was offered may be set.
            REQ_SET_PROTOCOL_FEATURES => {
                let offered = self.offered.load(Ordering::Acquire);
                match word(&msg.payload) {
                    Some(asked) if asked & !offered == 0 => Verdict::Forward,
                    Some(asked) => Verdict::Refuse(format!(
                        "protocol features {asked:#x} include {:#x}, which were never offered \
                         (offered: {offered:#x})",
                        asked & !offered
                    )),
                    None => Verdict::Refuse("SET_PROTOCOL_FEATURES without its 8 bytes".into()),
                }
            }
            REQ_SET_VRING_KICK | REQ_SET_VRING_CALL | REQ_SET_VRING_ERR => {
                match msg.fds.iter().try_for_each(take_eventfd) {
                    Ok(()) => Verdict::Forward,
                    Err(why) => Verdict::Refuse(why),
                }
            }
            // ADD_MEM_REG carries one region laid out as the first of a memory table.
            REQ_SET_MEM_TABLE | REQ_ADD_MEM_REG => match check_mem_table(msg) {
                Ok(()) => Verdict::Forward,
                Err(why) => Verdict::Refuse(why),
            },
            REQ_SET_VRING_ENABLE if !self.features_set => {
                let state: Option<[u8; 8]> = msg.payload.as_slice().try_into().ok();
                let Some(state) = state else {
                    return Verdict::Refuse(format!(
                        "SET_VRING_ENABLE with {} bytes, not 8",
                        msg.payload.len()
                    ));
                };
                let index = u32::from_le_bytes([state[0], state[1], state[2], state[3]]);
                if index >= self.rings {
                    return Verdict::Refuse(format!(
                        "SET_VRING_ENABLE for ring {index}; this port has {} rings",
                        self.rings
                    ));
                }
                self.early_enables.insert(index, state);
                Verdict::Absorb {
                    ack: msg.flags & FLAG_NEED_REPLY != 0,
                }
            }
            _ => Verdict::Forward,
        }
    }

    /// Early ring enables held until SET_FEATURES (at most one per ring).
    pub fn kept(&self) -> usize {
        self.early_enables.len()
    }

    /// The enable requests to send after `set_features` went through. Without
    /// PROTOCOL_FEATURES the handler enables every ring by itself.
    pub fn replay(&mut self, set_features: &Message) -> Vec<Message> {
        let mut word = [0u8; 8];
        let n = set_features.payload.len().min(8);
        word[..n].copy_from_slice(&set_features.payload[..n]);
        let early = std::mem::take(&mut self.early_enables);
        if u64::from_le_bytes(word) & F_PROTOCOL_FEATURES == 0 {
            return Vec::new();
        }
        early
            .into_values()
            .map(|state| Message {
                request: REQ_SET_VRING_ENABLE,
                flags: FLAG_VERSION,
                payload: state.to_vec(),
                fds: Vec::new(),
            })
            .collect()
    }
}

/// Relays between `frontend` and `backend` (the handler of a port with `rings` rings) until
/// either side closes; then closes both.
/// `told`: the port's "too many queue pairs" refusal was logged at warn already (QEMU
/// reconnects every second; the log says it once).
pub fn spawn(
    port: &str,
    rings: u32,
    frontend: UnixStream,
    backend: UnixStream,
    told: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let port = port.to_string();
    let offered = Arc::new(AtomicU64::new(0));
    let offered_seen = offered.clone();
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let backend_rx = backend.try_clone()?;
    let replies = to_frontend.clone();
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    let back = thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            while let Ok(Some(msg)) = read_message(&backend_rx) {
                if msg.request == REQ_GET_PROTOCOL_FEATURES && msg.flags & FLAG_REPLY != 0 {
                    if let Some(offered) = word(&msg.payload) {
                        offered_seen.store(offered, Ordering::Release);
                    }
                }
                let out = replies.lock().unwrap_or_else(|e| e.into_inner());
                if write_message(&out, &msg).is_err() {
                    break;
                }
            }
            let _ = f2.shutdown(Shutdown::Both);
            let _ = b2.shutdown(Shutdown::Both);
        })?;
    thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let mut filter = Filter::new(rings, offered);
            while let Ok(Some(msg)) = read_message(&frontend) {
                let verdict = filter.judge(&msg);
                log::debug!(
                    "vhost-user request {} flags {:#x} size {} fds {}: {verdict:?}",
                    msg.request,
                    msg.flags,
                    msg.payload.len(),
                    msg.fds.len()
                );
                let ok = match verdict {
                    Verdict::Forward if msg.request == REQ_SET_FEATURES => {
                        write_message(&backend, &msg).is_ok()
                            && filter
                                .replay(&msg)
                                .iter()
                                .all(|m| write_message(&backend, m).is_ok())
                    }
                    Verdict::Forward => write_message(&backend, &msg).is_ok(),
                    Verdict::Refuse(why) => {
                        log::warn!("port {port}: frontend refused: {why}; closing the connection");
                        false
                    }
                    Verdict::End(why) => {
                        log::info!("port {port}: {why}");
                        false
                    }
                    Verdict::TooManyQueues(why) => {
                        if told.swap(true, Ordering::Relaxed) {
                            log::debug!("port {port}: {why}; closing the connection");
                        } else {
                            log::warn!(
                                "port {port}: {why}; closing the connection (said once; QEMU \
                                 keeps reconnecting)"
                            );
                        }
                        false
                    }
                    Verdict::Absorb { ack: false } => true,
                    Verdict::Absorb { ack: true } => {
                        let reply = Message {
                            request: msg.request,
                            flags: FLAG_VERSION | FLAG_REPLY,
                            payload: 0u64.to_le_bytes().to_vec(),
                            fds: Vec::new(),
                        };
                        let out = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
                        write_message(&out, &reply).is_ok()
                    }
                };
                if !ok {
                    break;
                }
            }
            let _ = frontend.shutdown(Shutdown::Both);
            let _ = backend.shutdown(Shutdown::Both);
            let _ = back.join();
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Message {
        Message {
            request,
            flags,
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn absorbs_early_vring_enable_and_forwards_the_rest() {
        let (qemu, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, handler) = UnixStream::pair().unwrap();
        let t = spawn("test", 2, relay_front, relay_back, Arc::default()).unwrap();

        let enable = [0u8, 0, 0, 0, 1, 0, 0, 0];
        let disable_early = [0u8, 0, 0, 0, 0, 0, 0, 0];
        write_message(
            &qemu,
            &msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &disable_early),
        )
        .unwrap();
        // Early enable asking for an ack: answered by the relay, not forwarded.
        write_message(
            &qemu,
            &msg(
                REQ_SET_VRING_ENABLE,
                FLAG_VERSION | FLAG_NEED_REPLY,
                &enable,
            ),
        )
        .unwrap();
        let ack = read_message(&qemu).unwrap().unwrap();
        assert_eq!(ack.request, REQ_SET_VRING_ENABLE);
        assert_eq!(ack.flags, FLAG_VERSION | FLAG_REPLY);
        assert_eq!(ack.payload, 0u64.to_le_bytes());
        // Early enable without ack: silently absorbed.
        write_message(&qemu, &msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &enable)).unwrap();

        // A message with an fd passes through with its fd.
        let file = File::open("/dev/null").unwrap();
        let with_fd = Message {
            fds: vec![file],
            ..msg(5, FLAG_VERSION, &[1, 2, 3])
        };
        write_message(&qemu, &with_fd).unwrap();
        let got = read_message(&handler).unwrap().unwrap();
        assert_eq!((got.request, got.payload.len(), got.fds.len()), (5, 3, 1));

        // SET_FEATURES with PROTOCOL_FEATURES: forwarded, then the early enable replayed.
        let features = (F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        write_message(&qemu, &msg(REQ_SET_FEATURES, FLAG_VERSION, &features)).unwrap();
        assert_eq!(
            read_message(&handler).unwrap().unwrap().request,
            REQ_SET_FEATURES
        );
        let replayed = read_message(&handler).unwrap().unwrap();
        assert_eq!(
            (replayed.request, replayed.flags),
            (REQ_SET_VRING_ENABLE, FLAG_VERSION)
        );
        assert_eq!(replayed.payload, enable);
        write_message(&qemu, &msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &enable)).unwrap();
        assert_eq!(
            read_message(&handler).unwrap().unwrap().request,
            REQ_SET_VRING_ENABLE
        );

        // Replies flow back.
        write_message(&handler, &msg(1, FLAG_VERSION | FLAG_REPLY, &[9; 8])).unwrap();
        assert_eq!(read_message(&qemu).unwrap().unwrap().payload, vec![9; 8]);

        // A closed frontend closes the handler's side too.
        drop(qemu);
        assert!(read_message(&handler).unwrap().is_none());
        t.join().unwrap();
    }

    #[test]
    fn rejects_oversized_payloads() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = &a;
        w.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
            .unwrap();
        assert_eq!(
            read_message(&b).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// A SET_MEM_TABLE with one region per `(size, offset)`, each backed by `file`.
    fn mem_table(file: &File, regions: &[(u64, u64)]) -> Message {
        let mut payload = (regions.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        for (i, &(size, offset)) in regions.iter().enumerate() {
            for word in [i as u64 * (1 << 30), size, 0x7f00_0000_0000, offset] {
                payload.extend_from_slice(&word.to_le_bytes());
            }
        }
        Message {
            request: REQ_SET_MEM_TABLE,
            flags: FLAG_VERSION,
            payload,
            fds: regions.iter().map(|_| file.try_clone().unwrap()).collect(),
        }
    }

    #[test]
    fn memory_regions_must_lie_inside_their_files() {
        // SAFETY: a plain memfd_create with a constant name.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(1 << 20).unwrap();
        let mb = 1u64 << 20;
        assert_eq!(check_mem_table(&mem_table(&file, &[(mb, 0)])), Ok(()));
        assert_eq!(
            check_mem_table(&mem_table(&file, &[(mb / 2, mb / 2)])),
            Ok(())
        );
        for bad in [(2 * mb, 0), (mb / 2, mb / 2 + 4096), (4096, u64::MAX)] {
            let err = check_mem_table(&mem_table(&file, &[(mb, 0), bad])).unwrap_err();
            assert!(
                err.contains("region 1") && err.contains("past its end"),
                "{err}"
            );
        }
        let mut filter = Filter::new(2, Arc::new(AtomicU64::new(0)));
        assert!(matches!(
            filter.judge(&mem_table(&file, &[(2 * mb, 0)])),
            Verdict::Refuse(_)
        ));
        assert_eq!(
            filter.judge(&mem_table(&file, &[(mb, 0)])),
            Verdict::Forward
        );
        // ADD_MEM_REG carries one region laid out the same way: checked the same.
        let add = |size| Message {
            request: REQ_ADD_MEM_REG,
            ..mem_table(&file, &[(size, 0)])
        };
        assert!(matches!(filter.judge(&add(2 * mb)), Verdict::Refuse(_)));
        assert_eq!(filter.judge(&add(mb)), Verdict::Forward);
        // Not a regular file: nothing to measure it against, the handler decides.
        let dev = File::open("/dev/zero").unwrap();
        assert_eq!(check_mem_table(&mem_table(&dev, &[(2 * mb, 0)])), Ok(()));
    }

    #[test]
    fn guest_memory_must_be_in_memory_filesystems() {
        let mb = 1u64 << 20;
        // /dev/shm is tmpfs, where QEMU's memory-backend-file usually points.
        let shm = tempfile::tempfile_in("/dev/shm").unwrap();
        shm.set_len(mb).unwrap();
        assert_eq!(check_mem_table(&mem_table(&shm, &[(mb, 0)])), Ok(()));
        // A file on the disk this crate sits on (ext4 on our machines).
        let disk = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        disk.set_len(mb).unwrap();
        let err = check_mem_table(&mem_table(&disk, &[(mb, 0)])).unwrap_err();
        assert!(
            err.contains("region 0 is a file on a filesystem of type")
                && err.contains("memory-backend-memfd"),
            "{err}"
        );
        assert_eq!(filesystem_kind(libc::HUGETLBFS_MAGIC), Ok(()));
        assert_eq!(filesystem_kind(libc::NFS_SUPER_MAGIC), Err("NFS".into()));
        assert_eq!(filesystem_kind(libc::FUSE_SUPER_MAGIC), Err("FUSE".into()));
    }

    #[test]
    fn only_offered_protocol_features_and_one_enable_per_existing_ring() {
        const MQ: u64 = 1;
        const REPLY_ACK: u64 = 1 << 3;
        const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
        let mut filter = Filter::new(4, Arc::new(AtomicU64::new(MQ | REPLY_ACK)));
        let set = |bits: u64| msg(REQ_SET_PROTOCOL_FEATURES, FLAG_VERSION, &bits.to_le_bytes());
        assert_eq!(filter.judge(&set(MQ | REPLY_ACK)), Verdict::Forward);
        match filter.judge(&set(MQ | CONFIGURE_MEM_SLOTS)) {
            Verdict::Refuse(why) => assert!(
                why.contains("0x8000") && why.contains("never offered"),
                "{why}"
            ),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            filter.judge(&msg(REQ_SET_PROTOCOL_FEATURES, FLAG_VERSION, &[1])),
            Verdict::Refuse(_)
        ));
        // Early enables: thousands, for rings the port has, keep one state per ring.
        for i in 0..20_000u32 {
            let mut state = (i % 4).to_le_bytes().to_vec();
            state.extend_from_slice(&(i & 1).to_le_bytes());
            assert_eq!(
                filter.judge(&msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &state)),
                Verdict::Absorb { ack: false }
            );
        }
        assert_eq!(filter.early_enables.len(), 4);
        // A ring the port does not have (a queue pair it does not offer), or a payload that
        // is not a ring state: refused.
        let mut state = 4u32.to_le_bytes().to_vec();
        state.extend_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            filter.judge(&msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &state)),
            Verdict::TooManyQueues(why) if why.contains("queue pair 3 but the port offers 2")
        ));
        for request in [REQ_SET_VRING_NUM, REQ_SET_VRING_ADDR, REQ_GET_VRING_BASE] {
            assert!(matches!(
                filter.judge(&msg(request, FLAG_VERSION, &state)),
                Verdict::TooManyQueues(_)
            ));
        }
        assert!(matches!(
            filter.judge(&msg(REQ_SET_VRING_CALL, FLAG_VERSION, &4u64.to_le_bytes())),
            Verdict::TooManyQueues(_)
        ));
        assert!(matches!(
            filter.judge(&msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &[0; 65536])),
            Verdict::Refuse(_)
        ));
        assert_eq!(filter.early_enables.len(), 4);
    }

    #[test]
    fn ring_descriptors_must_be_eventfds_and_are_made_non_blocking() {
        let mut filter = Filter::new(2, Arc::new(AtomicU64::new(0)));
        // SAFETY: a plain eventfd(2) call; the descriptor is owned by `event` below.
        let raw = unsafe { libc::eventfd(0, 0) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let event = unsafe { File::from_raw_fd(raw) };
        let call = Message {
            fds: vec![event.try_clone().unwrap()],
            ..msg(REQ_SET_VRING_CALL, FLAG_VERSION, &0u64.to_le_bytes())
        };
        assert_eq!(filter.judge(&call), Verdict::Forward);
        // SAFETY: F_GETFL on a descriptor `event` owns.
        let flags = unsafe { libc::fcntl(event.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "left blocking");
        // A pipe (or any other file) is refused.
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let kick = Message {
            fds: vec![File::from(std::os::fd::OwnedFd::from(reader))],
            ..msg(REQ_SET_VRING_KICK, FLAG_VERSION, &0u64.to_le_bytes())
        };
        match filter.judge(&kick) {
            Verdict::Refuse(why) => assert!(why.contains("must be an eventfd"), "{why}"),
            v => panic!("{v:?}"),
        }
        // No descriptor (polling mode, the invalid-fd flag): nothing to check.
        let polling = msg(REQ_SET_VRING_CALL, FLAG_VERSION, &0x100u64.to_le_bytes());
        assert_eq!(filter.judge(&polling), Verdict::Forward);
    }
}
