//! Each VM port's listening socket and the thread that serves it, one connection after
//! another; started and stopped one port at a time (at start, and by `port-add` and
//! `port-del`), never touching another port.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{PortConfig, PortMode};
use crate::datapath::Datapath;
use crate::endpoint::notifier::NotifierThread;
use crate::endpoint::SwitchPort;
use crate::types::PortId;
use crate::vhost_user::backend::Port;
use crate::vhost_user::relay;
use crate::vhost_user::worker_pool::WorkerPool;
use crate::vring;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error(
        "port '{port}': cannot listen on {path}: {source} (is the directory there and writable?)"
    )]
    Listen {
        port: String,
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("port '{port}': will not listen on {path}: {source}")]
    PathTaken {
        port: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("port '{port}': cannot set the owner or mode of {path}: {source} (changing the owner needs root)")]
    SocketAccess {
        port: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("port '{port}': cannot start its thread: {source}")]
    Thread {
        port: String,
        source: std::io::Error,
    },
}

/// Where a port's frontends come from.
pub enum Socket {
    /// Our listening socket: QEMU connects.
    Listening(Listener, Wake),
    /// QEMU's listening socket (`mode=client`): we connect, again after each connection.
    Connecting(PathBuf),
}

/// How a thread blocked in accept() on a listening socket is woken at shutdown.
pub enum Wake {
    /// A socket of ours: shut down.
    Shutdown(RawFd),
    /// A socket handed over (`--fd`, socket activation) and still its owner's: a
    /// connection to it, which the stopping thread drops.
    Connect(std::os::unix::net::SocketAddr),
}

impl Wake {
    pub fn wake(&self) {
        match self {
            // SAFETY: shutting down a listening socket we own; it wakes a blocked
            // accept().
            Wake::Shutdown(fd) => unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            },
            Wake::Connect(addr) => {
                let _ = UnixStream::connect_addr(addr);
            }
        }
    }
}

/// Port `p`'s socket: bound, in server mode (a stale one removed; the configured owner and
/// mode given); QEMU's path, in client mode.
pub fn open(p: &PortConfig) -> Result<Socket, ListenError> {
    if p.mode == PortMode::Client {
        return Ok(Socket::Connecting(p.socket.clone()));
    }
    let (l, wake) = listen(p)?;
    Ok(Socket::Listening(l, wake))
}

/// The directory of a socket path, locked (`flock`) from the check of the path until the
/// socket is bound: two switches starting at once with one path would both find a stale
/// socket there, and the second's unlink would orphan the first's new one, which would run
/// on unreachable. Dropped once the socket is bound.
#[derive(Debug)]
pub struct PathClaim {
    /// The directory, open and locked (None: not locked); closing it unlocks.
    _locked: Option<std::fs::File>,
}

impl PathClaim {
    /// How long a claim waits for another: a check and a bind take microseconds; a
    /// directory locked longer (by anyone who can read it) is claimed without the lock, as
    /// before there was one, so that it cannot hold the switch's start or a port's add.
    const PATIENCE: Duration = Duration::from_secs(1);

    fn take(path: &Path) -> PathClaim {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // A directory that cannot be opened has no socket to race for: bind says why.
        let Ok(file) = std::fs::File::open(dir) else {
            return PathClaim { _locked: None };
        };
        let start = std::time::Instant::now();
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                return PathClaim {
                    _locked: Some(file),
                };
            }
            if start.elapsed() > Self::PATIENCE {
                warn!(
                    "{}: its directory stays locked by another process; claimed without the lock",
                    path.display()
                );
                return PathClaim { _locked: None };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Makes `path` free for a listening socket: a socket nobody listens on any more (left by a
/// switch that was killed) is removed; anything else there is refused, not replaced (a
/// live socket, another port's or the control socket, or a file that is no socket). Bind
/// the socket before dropping the claim.
pub fn clear_stale_socket(path: &Path) -> std::io::Result<PathClaim> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    let claim = PathClaim::take(path);
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(claim),
        Err(e) => return Err(e),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            "it exists and is not a socket (remove it, or choose another path)",
        ));
    }
    if listened_on(path)? {
        return Err(Error::new(
            ErrorKind::AddrInUse,
            "something listens on it already (another switch, or another of this \
             switch's sockets): choose another path, or stop what listens there",
        ));
    }
    std::fs::remove_file(path)?;
    Ok(claim)
}

/// Whether something listens on the socket at `path`, asked without waiting: a blocking
/// connect to a listener that never accepts, its backlog full, waits for ever (and with
/// it the switch's start, or the control thread adding a port).
fn listened_on(path: &Path) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the path is too long for a socket (107 bytes at most)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned just below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the length given, alive for the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(false),
        // Its backlog is full: listened on, by something slow or hostile.
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(true),
        _ => Err(e),
    }
}

fn listen(p: &PortConfig) -> Result<(Listener, Wake), ListenError> {
    let claim = clear_stale_socket(&p.socket).map_err(|source| ListenError::PathTaken {
        port: p.name.clone(),
        path: p.socket.clone(),
        source,
    })?;
    let l = Listener::new(&p.socket, false).map_err(|source| ListenError::Listen {
        port: p.name.clone(),
        path: p.socket.clone(),
        source,
    })?;
    drop(claim);
    // Checked by validate: only the change itself can fail here.
    let access = p.socket_access().unwrap_or_default();
    access
        .apply(&p.socket)
        .map_err(|source| ListenError::SocketAccess {
            port: p.name.clone(),
            path: p.socket.clone(),
            source,
        })?;
    let wake = Wake::Shutdown(l.as_raw_fd());
    Ok((l, wake))
}

struct PortThread {
    port: Arc<SwitchPort>,
    stop: Arc<AtomicBool>,
    /// None for a client port, whose thread sees `stop` while it waits to connect.
    wake: Option<Wake>,
    thread: JoinHandle<()>,
}

impl PortThread {
    fn signal(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.port.reset_connection();
        if let Some(w) = &self.wake {
            w.wake();
        }
    }

    fn stop(self) {
        self.signal();
        let _ = self.thread.join();
    }
}

/// The threads serving the VM ports' sockets, by port id.
pub struct PortSockets {
    dp: Arc<Datapath>,
    /// Holds the protocol handlers' internal sockets; only we can reach it.
    private_dir: PathBuf,
    running: Mutex<HashMap<PortId, PortThread>>,
    /// The threads serving every port's queue pairs.
    pool: Arc<WorkerPool>,
}

impl PortSockets {
    pub fn new(dp: Arc<Datapath>, private_dir: PathBuf, pool: Arc<WorkerPool>) -> PortSockets {
        PortSockets {
            dp,
            private_dir,
            running: Mutex::new(HashMap::new()),
            pool,
        }
    }

    /// Serves the port at `id` (in the port table already) on `socket`.
    pub fn start(&self, id: PortId, socket: Socket) -> Result<(), ListenError> {
        let Some(port) = self.dp.ports.get(id).filter(|p| p.as_vm().is_some()) else {
            return Ok(());
        };
        let stop = Arc::new(AtomicBool::new(false));
        let internal = self.private_dir.join(format!("{id}.sock"));
        let (dp, p, s) = (self.dp.clone(), port.clone(), stop.clone());
        let pool = self.pool.clone();
        let (source, wake) = match socket {
            Socket::Listening(l, wake) => (Source::Listening(l), Some(wake)),
            Socket::Connecting(path) => (Source::Connecting(path), None),
        };
        let thread = thread::Builder::new()
            .name(format!("port-{}", port.name))
            .spawn(move || serve_port(dp, p, source, internal, s, pool))
            .map_err(|source| ListenError::Thread {
                port: port.name.clone(),
                source,
            })?;
        let t = PortThread {
            port,
            stop,
            wake,
            thread,
        };
        // Taken out under the lock, stopped (and joined) without it.
        let old = self.lock().insert(id, t);
        if let Some(old) = old {
            old.stop();
        }
        Ok(())
    }

    /// Closes port `id`'s connection, stops its thread and removes its socket (one it
    /// created). Returns when all of it is done.
    pub fn stop(&self, id: PortId) {
        let t = self.lock().remove(&id);
        if let Some(t) = t {
            t.stop();
        }
    }

    /// `stop` for every port, all connections closed first.
    pub fn stop_all(&self) {
        let all: Vec<PortThread> = self.lock().drain().map(|(_, t)| t).collect();
        for t in &all {
            t.signal();
        }
        for t in all {
            let _ = t.thread.join();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PortId, PortThread>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A port thread's way to its next frontend.
enum Source {
    Listening(Listener),
    Connecting(PathBuf),
}

/// Longest wait between two attempts to reach QEMU's socket: a restarted QEMU is served
/// within this (OVS's vhost-user client retries every second too).
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Source {
    /// The next frontend; None when there is none yet (try again) or `stop` was set.
    fn next(&self, port: &str, stop: &AtomicBool, tries: &mut u32) -> Option<UnixStream> {
        match self {
            Source::Listening(l) => match l.accept() {
                Ok(s) => s,
                Err(e) => {
                    if !stop.load(Ordering::SeqCst) {
                        error!("port {port}: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                    None
                }
            },
            Source::Connecting(path) => match UnixStream::connect(path) {
                Ok(s) => {
                    *tries = 0;
                    Some(s)
                }
                Err(e) => {
                    if *tries == 0 {
                        info!(
                            "port {port}: waiting for its frontend (QEMU, a DPDK application) to listen on {} ({e})",
                            path.display()
                        );
                    }
                    // 10 ms, doubling up to a second.
                    let wait = (Duration::from_millis(10) * 2u32.pow((*tries).min(7)))
                        .min(CONNECT_BACKOFF_MAX);
                    *tries += 1;
                    sleep_unless_stopped(wait, stop);
                    None
                }
            },
        }
    }
}

/// Sleeps for `wait`, in 10 ms slices that notice `stop`.
fn sleep_unless_stopped(wait: Duration, stop: &AtomicBool) {
    let end = std::time::Instant::now() + wait;
    while std::time::Instant::now() < end && !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
}

fn serve_port(
    dp: Arc<Datapath>,
    shared: Arc<SwitchPort>,
    source: Source,
    internal_path: PathBuf,
    stop: Arc<AtomicBool>,
    pool: Arc<WorkerPool>,
) {
    let told_queues = Arc::new(AtomicBool::new(false));
    // The protocol handler accepts on a private socket; the relay joins it to the frontend.
    let mut internal = match Listener::new(&internal_path, true) {
        Ok(l) => l,
        Err(e) => {
            error!(
                "port {}: cannot create {}: {e}",
                shared.name,
                internal_path.display()
            );
            return;
        }
    };
    let mut tries = 0;
    while !stop.load(Ordering::SeqCst) {
        let Some(frontend) = source.next(&shared.name, &stop, &mut tries) else {
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let served = Served {
            dp: &dp,
            shared: &shared,
            pool: &pool,
            told: &told_queues,
        };
        if let Err(e) = serve_connection(&served, frontend, &mut internal, &internal_path, &stop) {
            error!("port {}: {e}", shared.name);
        }
        if matches!(source, Source::Connecting(_)) {
            // QEMU still listening after a connection it ended at once (a frontend that
            // refuses us) is not reconnected to in a tight loop.
            sleep_unless_stopped(Duration::from_millis(100), &stop);
        }
    }
    // Dropping the listeners removes their socket files.
}

/// What a port's connections are served with.
struct Served<'a> {
    dp: &'a Arc<Datapath>,
    shared: &'a Arc<SwitchPort>,
    pool: &'a WorkerPool,
    /// Whether a frontend asking for too many queue pairs was told already.
    told: &'a Arc<AtomicBool>,
}

/// Serves one frontend connection until it ends.
fn serve_connection(
    served: &Served,
    frontend: UnixStream,
    internal: &mut Listener,
    internal_path: &Path,
    stop: &AtomicBool,
) -> Result<(), String> {
    let Served {
        dp,
        shared,
        pool,
        told,
    } = *served;
    let port = Port::new(dp.clone(), shared.clone()).ok_or("not a VM port")?;
    let vm = port.vm().clone();
    // This connection's interrupts: stopped when this returns, after the daemon is gone.
    let _notifier = NotifierThread::spawn(vm.notifier.clone(), &shared.name)
        .map_err(|e| format!("cannot start the notifier thread: {e}"))?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let (daemon, rings) =
        vring::collect(|| VhostUserDaemon::new(shared.name.clone(), port.clone(), mem));
    let mut daemon = daemon.map_err(|e| format!("cannot set up the device: {e}"))?;
    let ring_count = u32::from(shared.queue_pairs) * 2;
    if rings.len() != ring_count as usize {
        // vhost-user-backend made its rings elsewhere than `collect` expects.
        return Err(format!(
            "the protocol handler made {} rings where {ring_count} were expected",
            rings.len()
        ));
    }
    port.publish(&rings);
    // Dropped (its pairs off their threads) when this returns, before the daemon.
    let _served = pool
        .attach(&port, &rings)
        .map_err(|e| format!("cannot give its queue pairs a thread: {e}"))?;
    // Connecting first leaves the connection in the backlog for the daemon's accept.
    let handler_side = UnixStream::connect(internal_path)
        .map_err(|e| format!("cannot reach {}: {e}", internal_path.display()))?;
    daemon
        .start(internal)
        .map_err(|e| format!("cannot start the protocol handler: {e}"))?;
    let relay = match relay::spawn(
        &shared.name,
        ring_count,
        frontend,
        handler_side,
        told.clone(),
    ) {
        Ok(r) => r,
        Err(e) => {
            // Its protocol thread is running: end and join it before the daemon is dropped.
            daemon.request_shutdown();
            let _ = daemon.wait();
            return Err(format!("relay: {e}"));
        }
    };
    *vm.connection.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
    if stop.load(Ordering::SeqCst) {
        // Shutdown began before the handle was stored: it could not close this connection.
        daemon.request_shutdown();
    }
    info!("port {}: frontend connected", shared.name);
    let result = daemon.wait();
    *vm.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
    port.retire();
    vm.detach();
    dp.switch.macs.forget_port(shared.id);
    let _ = relay.join();
    match result {
        // A frontend closing its socket (a VM shut down, QEMU or testpmd quit) is the
        // usual end of a connection, not a fault.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
            info!("port {}: frontend disconnected", shared.name)
        }
        Err(e) => warn!("port {}: connection ended: {e}", shared.name),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::os::unix::net::UnixListener;

    #[test]
    fn of_switches_starting_at_once_on_one_stale_socket_one_binds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port.sock");
        let mut doubled = 0;
        for _ in 0..40 {
            drop(UnixListener::bind(&path).unwrap());
            let start = Arc::new(std::sync::Barrier::new(4));
            let racers: Vec<_> = (0..4)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let claim = clear_stale_socket(&path).ok()?;
                        let l = UnixListener::bind(&path).ok();
                        drop(claim);
                        l
                    })
                })
                .collect();
            let bound: Vec<UnixListener> = racers
                .into_iter()
                .filter_map(|r| r.join().unwrap())
                .collect();
            assert!(!bound.is_empty(), "nobody bound the path");
            if bound.len() > 1 {
                doubled += 1;
            }
            std::fs::remove_file(&path).unwrap();
        }
        assert_eq!(
            doubled, 0,
            "rounds where a second switch orphaned the first's socket"
        );
    }

    #[test]
    fn only_a_socket_nobody_listens_on_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        // Nothing there: free.
        clear_stale_socket(&path("none.sock")).unwrap();
        // Left by a switch that was killed: removed.
        drop(UnixListener::bind(path("stale.sock")).unwrap());
        assert!(path("stale.sock").exists());
        clear_stale_socket(&path("stale.sock")).unwrap();
        assert!(!path("stale.sock").exists());
        // Listened on (another switch, the control socket): refused, left alone.
        let live = UnixListener::bind(path("live.sock")).unwrap();
        let e = clear_stale_socket(&path("live.sock")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
        assert!(path("live.sock").exists());
        drop(live);
        // One that never accepts, its backlog full: refused at once, not waited on.
        let full = path("full.sock");
        let never = UnixListener::bind(&full).unwrap();
        // SAFETY: listen(2) on the listener's own descriptor: a backlog of one.
        assert_eq!(unsafe { libc::listen(never.as_raw_fd(), 0) }, 0);
        let (done, wait) = std::sync::mpsc::channel();
        // In a thread of its own, so that a wait fails the test, not hangs it.
        std::thread::spawn(move || {
            let _queued = UnixStream::connect(&full).unwrap();
            done.send(clear_stale_socket(&full)).unwrap()
        });
        let e = wait
            .recv_timeout(Duration::from_secs(5))
            .expect("the check waits on a listener that never accepts")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
        // A file that is no socket: refused, kept.
        std::fs::write(path("notes.txt"), "keep me").unwrap();
        let e = clear_stale_socket(&path("notes.txt")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert_eq!(
            std::fs::read_to_string(path("notes.txt")).unwrap(),
            "keep me"
        );
    }
}
