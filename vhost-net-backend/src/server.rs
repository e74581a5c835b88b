//! Running the switch: one listening socket per port that keeps accepting after each
//! disconnect, MAC ageing, and the control socket that reports counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::info;
use thiserror::Error;
use vhost::vhost_user::Listener;

use crate::balancer::{health, Balancer};
use crate::config::{ConfigError, SwitchConfig};
use crate::control::{stats_json, Control, Reloader};
use crate::datapath::adverts::Advertiser;
use crate::datapath::{tap_rx, Datapath};
use crate::endpoint::tap::TapPort;
use crate::fault;
use crate::host_side::{HostSide, HostSideError};
use crate::metrics;
use crate::port_sockets::{self, ListenError, PortSockets, Socket, Wake};
use crate::types::PortId;
use crate::vhost_user::worker_pool::WorkerPool;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Listen(#[from] ListenError),
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
    #[error("metrics: cannot listen on {addr}: {source} (is another exporter on that port?)")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    HostSide(#[from] HostSideError),
}

/// A running switch. Dropping it (or calling `stop`) closes every connection and removes
/// the sockets it created.
pub struct Server {
    dp: Arc<Datapath>,
    stop: Arc<AtomicBool>,
    /// The threads serving the VM ports' sockets.
    sockets: Arc<PortSockets>,
    /// How to wake the control thread, blocked in accept(), at shutdown.
    wake: Vec<Wake>,
    threads: Vec<JoinHandle<()>>,
    ticker: Option<mpsc::Sender<()>>,
    control_path: Option<PathBuf>,
    control: Arc<Control>,
    /// Holds the protocol handlers' internal sockets.
    private_dir: PathBuf,
    /// The host's side of the uplink, removed at shutdown.
    host_side: Option<Arc<HostSide>>,
}

fn make_private_dir() -> Result<PathBuf, ServerError> {
    // Unique within the process by the counter: two servers of one process started at
    // once met on one name in CI ("File exists"), and names of killed processes stay.
    static STARTED: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let pid = std::process::id();
    create_private_dir(&std::env::temp_dir(), || {
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        format!("vnet-{pid}-{n}-{nanos}")
    })
}

/// A new directory of mode 0700 in `base`, named by `name`; a name taken already is
/// passed over for the next (up to 100 times).
fn create_private_dir(
    base: &Path,
    mut name: impl FnMut() -> String,
) -> Result<PathBuf, ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut tries = 0;
    loop {
        let dir = base.join(name());
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
            Err(source) => return Err(ServerError::Control { path: dir, source }),
        }
    }
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
                    Socket::Listening(Listener::from(l), wake)
                }
                None => port_sockets::open(p)?,
            };
            listeners.push(listener);
        }
        let metrics = match config.metrics_address {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|source| ServerError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let control = match &config.control_socket {
            Some(path) => {
                let claim = crate::port_sockets::clear_stale_socket(path).map_err(|source| {
                    ServerError::Control {
                        path: path.clone(),
                        source,
                    }
                })?;
                let l = UnixListener::bind(path).map_err(|source| ServerError::Control {
                    path: path.clone(),
                    source,
                })?;
                drop(claim);
                // Checked by validate: only the change itself can fail here.
                let access = config.control_socket_access().unwrap_or_default();
                access.apply(path).map_err(|source| ServerError::Control {
                    path: path.clone(),
                    source,
                })?;
                Some(l)
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
        let pool = Arc::new(
            WorkerPool::start(config.workers, &config.worker_cpus).map_err(ServerError::Thread)?,
        );
        let sockets = Arc::new(PortSockets::new(dp.clone(), private_dir.clone(), pool));
        let mut server = Server {
            private_dir,
            dp: dp.clone(),
            stop: stop.clone(),
            sockets: sockets.clone(),
            wake: Vec::new(),
            threads: Vec::new(),
            ticker: None,
            control_path: config.control_socket.clone(),
            control: Arc::new(Control::new(
                dp.clone(),
                sockets.clone(),
                config.clone(),
                balancers.clone(),
            )),
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
        for (i, listener) in listeners.into_iter().enumerate() {
            sockets.start(i as PortId, listener)?;
        }
        if let Some(listener) = metrics {
            let t =
                metrics::spawn(dp.clone(), listener, stop.clone()).map_err(ServerError::Thread)?;
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
        if let (Some(up), Some(tap), Some(port)) = (&config.uplink, tap, dp.ports.uplink()) {
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
                let mut adverts = Advertiser::default();
                // A closed channel is the stop signal; a timeout is a tick.
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(1))
                {
                    ageing.switch.macs.tick(1);
                    ageing.policy.tick();
                    ageing.router.neighbours.age();
                    adverts.tick(&ageing, Instant::now());
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
        self.sockets.stop_all();
        for w in &self.wake {
            w.wake();
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
        for p in self.dp.ports.in_use() {
            info!("port {}: {}", p.name, p.counters.snapshot());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
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
        let reply = fault::contain("answering a control command", || {
            control.handle(line.trim())
        })
        .unwrap_or_else(|| r#"{"error":"internal error (a bug, logged)"}"#.to_string());
        let _ = conn.write_all(reply.as_bytes());
        let _ = conn.write_all(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::{create_private_dir, make_private_dir};

    #[test]
    fn a_private_directory_passes_over_names_taken_already() {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("taken")).unwrap();
        let mut names = ["taken", "free"].into_iter();
        let dir = create_private_dir(base.path(), || names.next().unwrap().into()).unwrap();
        assert_eq!(dir, base.path().join("free"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn servers_started_at_once_get_private_directories_of_their_own() {
        let made: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..200).map(|_| make_private_dir()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let dirs: Vec<_> = made
            .into_iter()
            .map(|d| d.expect("a new directory"))
            .collect();
        let unique: std::collections::HashSet<_> = dirs.iter().collect();
        assert_eq!(unique.len(), dirs.len());
        for d in &dirs {
            std::fs::remove_dir(d).unwrap();
        }
    }
}
