//! Running the switch: one listening socket per port that keeps accepting after each
//! disconnect, MAC ageing, and the control socket that reports counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::balancer::{health, Balancer};
use crate::config::{ConfigError, SwitchConfig};
use crate::control::{stats_json, Control, Reloader};
use crate::datapath::{tap_rx, Datapath};
use crate::endpoint::tap::TapPort;
use crate::host_side::{HostSide, HostSideError};
use crate::types::PortId;
use crate::vhost_user::backend::Port;
use crate::vhost_user::relay;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "port '{port}': cannot listen on {path}: {source} (is the directory there and writable?)"
    )]
    Listen {
        port: String,
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("{path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uplink tap {tap}: {source} (creating a tap needs CAP_NET_ADMIN)")]
    Uplink {
        tap: String,
        source: hostnet::tap::TapError,
    },
    #[error("port '{port}': cannot set the owner or mode of {path}: {source} (changing the owner needs root)")]
    SocketAccess {
        port: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    HostSide(#[from] HostSideError),
}

/// How a thread blocked in accept() on a listening socket is woken at shutdown.
enum Wake {
    /// A socket of ours: shut down.
    Shutdown(RawFd),
    /// A socket handed over (`--fd`, socket activation) and still its owner's: a
    /// connection to it, which the stopping thread drops.
    Connect(std::os::unix::net::SocketAddr),
}

/// A running switch. Dropping it (or calling `stop`) closes every connection and removes
/// the sockets it created.
pub struct Server {
    dp: Arc<Datapath>,
    stop: Arc<AtomicBool>,
    /// How to wake each thread blocked in accept() at shutdown.
    wake: Vec<Wake>,
    threads: Vec<JoinHandle<()>>,
    ticker: Option<mpsc::Sender<()>>,
    control_path: Option<PathBuf>,
    control: Arc<Control>,
    /// Holds the protocol handlers' internal sockets; only we can reach it.
    private_dir: PathBuf,
    /// The host's side of the uplink, removed at shutdown.
    host_side: Option<Arc<HostSide>>,
}

fn make_private_dir() -> Result<PathBuf, ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("vnet-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|source| ServerError::Control {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

impl Server {
    /// Validates the config, binds every socket (so errors surface before anything runs)
    /// and starts serving.
    pub fn start(config: &SwitchConfig) -> Result<Server, ServerError> {
        Server::start_with(config, Vec::new())
    }

    /// `start`, with some ports served on listening sockets the caller hands over (an
    /// inherited `--fd`, socket activation): `(index of the port in config.ports, socket)`.
    pub fn start_with(
        config: &SwitchConfig,
        mut inherited: Vec<(usize, OwnedFd)>,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        crate::policy::rules::RuleSet::compile(config)?;
        // The tap first: a failure to open it (no CAP_NET_ADMIN) comes before anything runs.
        let tap = match &config.uplink {
            Some(up) => Some(Arc::new(TapPort::open(up).map_err(|source| {
                ServerError::Uplink {
                    tap: up.tap.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let dp = Datapath::new(config, tap.clone())?;
        let mut listeners = Vec::new();
        for (i, p) in config.ports.iter().enumerate() {
            let handed = inherited
                .iter()
                .position(|(port, _)| *port == i)
                .map(|k| inherited.swap_remove(k).1);
            let listener = match handed {
                Some(fd) => {
                    let l = UnixListener::from(fd);
                    // Shared with whoever handed it over (systemd keeps its copy to
                    // activate the next start): woken by a connection, never shut down.
                    let wake = match l.local_addr() {
                        Ok(a) if a.as_pathname().is_some() => Wake::Connect(a),
                        _ => Wake::Shutdown(l.as_raw_fd()),
                    };
                    listeners.push((Listener::from(l), wake));
                    continue;
                }
                None => {
                    let l =
                        Listener::new(&p.socket, true).map_err(|source| ServerError::Listen {
                            port: p.name.clone(),
                            path: p.socket.clone(),
                            source,
                        })?;
                    // Checked by validate: only the change itself can fail here.
                    let access = p.socket_access().unwrap_or_default();
                    access
                        .apply(&p.socket)
                        .map_err(|source| ServerError::SocketAccess {
                            port: p.name.clone(),
                            path: p.socket.clone(),
                            source,
                        })?;
                    l
                }
            };
            let wake = Wake::Shutdown(listener.as_raw_fd());
            listeners.push((listener, wake));
        }
        let control = match &config.control_socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                Some(
                    UnixListener::bind(path).map_err(|source| ServerError::Control {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };

        let balancers: Vec<Arc<Balancer>> = config
            .balancers
            .iter()
            .map(|b| Arc::new(Balancer::new(b)))
            .collect();
        let slots: Vec<_> = balancers
            .iter()
            .map(|b| (b.config.name.clone(), b.slot_addresses()))
            .collect();
        let private_dir = make_private_dir()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            private_dir: private_dir.clone(),
            dp: dp.clone(),
            stop: stop.clone(),
            wake: Vec::new(),
            threads: Vec::new(),
            ticker: None,
            control_path: config.control_socket.clone(),
            control: Arc::new(Control::new(dp.clone(), config.clone(), balancers.clone())),
            host_side: None,
        };
        // Dropped on an error from here on, the server removes what the host side made.
        server.host_side = HostSide::up(config, &slots)?.map(Arc::new);
        if let Some(host) = server.host_side.clone() {
            for b in &balancers {
                let t = health::spawn(b.clone(), host.clone(), stop.clone())
                    .map_err(ServerError::Thread)?;
                server.threads.push(t);
            }
        }
        for (i, (listener, wake)) in listeners.into_iter().enumerate() {
            server.wake.push(wake);
            let (dp, stop) = (dp.clone(), stop.clone());
            let internal = private_dir.join(format!("{i}.sock"));
            let name = format!("port-{}", config.ports[i].name);
            let t = thread::Builder::new()
                .name(name)
                .spawn(move || serve_port(dp, i as PortId, listener, internal, stop))
                .map_err(ServerError::Thread)?;
            server.threads.push(t);
        }
        if let Some(control) = control {
            server.wake.push(Wake::Shutdown(control.as_raw_fd()));
            let (commands, stop) = (server.control.clone(), stop.clone());
            let t = thread::Builder::new()
                .name("control".into())
                .spawn(move || serve_control(&commands, control, stop))
                .map_err(ServerError::Thread)?;
            server.threads.push(t);
        }
        if let (Some(up), Some(tap), Some(port)) = (&config.uplink, tap, dp.ports.last()) {
            let readers = tap_rx::spawn_readers(dp.clone(), port.clone(), tap, stop.clone())
                .map_err(ServerError::Thread)?;
            server.threads.extend(readers);
            info!(
                "uplink: tap {} ({})",
                up.tap,
                if up.trunk {
                    "trunk".to_string()
                } else {
                    format!("vlan {}", up.vlan.unwrap_or(0))
                }
            );
        }
        let (tx, rx) = mpsc::channel::<()>();
        let ageing = dp.clone();
        let t = thread::Builder::new()
            .name("mac-ageing".into())
            .spawn(move || {
                // A closed channel is the stop signal; a timeout is a tick.
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(1))
                {
                    ageing.switch.macs.tick(1);
                    ageing.policy.tick();
                    ageing.router.neighbours.age();
                }
            })
            .map_err(ServerError::Thread)?;
        server.threads.push(t);
        server.ticker = Some(tx);
        info!(
            "switch up: {} ports, forwarding frames up to {} bytes",
            config.ports.len(),
            dp.max_frame_len
        );
        Ok(server)
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.dp
    }

    pub fn stats_json(&self) -> String {
        stats_json(&self.dp)
    }

    /// Answers a control command, as the control socket does.
    pub fn command(&self, line: &str) -> String {
        self.control.handle(line)
    }

    /// How `reload` (SIGHUP, `ctl reload`) reads the config again.
    pub fn set_reloader(&self, reloader: Reloader) {
        self.control.set_reloader(reloader);
    }

    /// Reads the config again and puts its policy in force; an error leaves the running
    /// one.
    pub fn reload(&self) -> Result<(), String> {
        self.control.reload()
    }

    /// Closes every connection, stops the threads and removes the sockets.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        for p in &self.dp.ports {
            p.reset_connection();
        }
        for w in &self.wake {
            match w {
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
        self.ticker.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = &self.control_path {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir_all(&self.private_dir);
        if let Some(host) = self.host_side.take() {
            host.down();
        }
        self.dp.policy.finish();
        for p in &self.dp.ports {
            info!("port {}: {}", p.name, p.counters.snapshot());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_port(
    dp: Arc<Datapath>,
    id: PortId,
    public: Listener,
    internal_path: PathBuf,
    stop: Arc<AtomicBool>,
) {
    let shared = dp.ports[usize::from(id)].clone();
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
    while !stop.load(Ordering::SeqCst) {
        let frontend = match public.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                if !stop.load(Ordering::SeqCst) {
                    error!("port {}: accept failed: {e}", shared.name);
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Err(e) = serve_connection(
            &dp,
            id,
            frontend,
            &mut internal,
            &internal_path,
            &stop,
            &told_queues,
        ) {
            error!("port {}: {e}", shared.name);
        }
    }
    // Dropping the listeners removes their socket files.
}

/// Closes a connection's leftover exit-event descriptors (`Port::close_exit_events`)
/// when dropped, after the connection's daemon.
struct ExitEvents(Port);

impl Drop for ExitEvents {
    fn drop(&mut self) {
        self.0.close_exit_events();
    }
}

/// Serves one frontend connection until it ends.
fn serve_connection(
    dp: &Arc<Datapath>,
    id: PortId,
    frontend: UnixStream,
    internal: &mut Listener,
    internal_path: &Path,
    stop: &AtomicBool,
    told: &Arc<AtomicBool>,
) -> Result<(), String> {
    let shared = dp.ports[usize::from(id)].clone();
    let port = Port::new(dp.clone(), id).ok_or("not a VM port")?;
    let vm = port.vm().clone();
    // Declared before the daemon, so dropped after it, on every return path.
    let _exit_events = ExitEvents(port.clone());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(shared.name.clone(), port.clone(), mem)
        .map_err(|e| format!("cannot set up the device: {e}"))?;
    // Connecting first leaves the connection in the backlog for the daemon's accept.
    let handler_side = UnixStream::connect(internal_path)
        .map_err(|e| format!("cannot reach {}: {e}", internal_path.display()))?;
    daemon
        .start(internal)
        .map_err(|e| format!("cannot start the protocol handler: {e}"))?;
    let rings = u32::from(shared.queue_pairs) * 2;
    let relay = match relay::spawn(&shared.name, rings, frontend, handler_side, told.clone()) {
        Ok(r) => r,
        Err(e) => {
            // Its protocol thread is running: end and join it, so the daemon's workers are
            // gone when it is dropped.
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
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    vm.detach();
    dp.switch.macs.forget_port(id);
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

fn serve_control(control: &Control, listener: UnixListener, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut reader = BufReader::new(&conn);
        if reader.by_ref().take(4096).read_line(&mut line).is_err() {
            continue;
        }
        let reply = control.handle(line.trim());
        let _ = conn.write_all(reply.as_bytes());
        let _ = conn.write_all(b"\n");
    }
}
