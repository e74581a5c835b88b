//! A switch started in-process on sockets in a temporary directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vhost_net_backend::counters::CounterSnapshot;
use vhost_net_backend::{PortConfig, Server, SwitchConfig};

use crate::frontend::{DeviceOptions, Result, VirtioNetDevice};

pub struct TestSwitch {
    pub dir: TempDir,
    pub server: Option<Server>,
    pub config: SwitchConfig,
}

/// A port description for `TestSwitch::start`: name, VLAN, queue pairs.
pub struct TestPort {
    pub name: &'static str,
    pub vlan: Option<u16>,
    pub queues: u16,
}

impl TestPort {
    pub fn new(name: &'static str) -> Self {
        TestPort {
            name,
            vlan: None,
            queues: 1,
        }
    }

    pub fn vlan(mut self, vlan: u16) -> Self {
        self.vlan = Some(vlan);
        self
    }

    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues;
        self
    }
}

impl TestSwitch {
    pub fn start(ports: Vec<TestPort>, mtu: Option<u16>) -> TestSwitch {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = SwitchConfig {
            mtu,
            ports: ports
                .iter()
                .map(|p| PortConfig {
                    name: p.name.to_string(),
                    socket: dir.path().join(format!("{}.sock", p.name)),
                    vlan: p.vlan,
                    queues: p.queues,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let server = Server::start(&config).expect("switch starts");
        TestSwitch {
            dir,
            server: Some(server),
            config,
        }
    }

    /// A switch of `config`, each port's socket put in a temporary directory.
    pub fn start_config(mut config: SwitchConfig) -> TestSwitch {
        let dir = tempfile::tempdir().expect("temporary directory");
        for p in &mut config.ports {
            p.socket = dir.path().join(format!("{}.sock", p.name));
        }
        let server = Server::start(&config).expect("switch starts");
        TestSwitch {
            dir,
            server: Some(server),
            config,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    pub fn socket(&self, port: &str) -> PathBuf {
        self.dir.path().join(format!("{port}.sock"))
    }

    /// Connects a frontend and waits until the port's workers have picked up its RX queues
    /// (they do so asynchronously, as the vrings are enabled), so no test frame races them.
    pub fn connect(&self, port: &str, opts: DeviceOptions) -> Result<VirtioNetDevice> {
        let pairs = usize::from(opts.queue_pairs);
        let dev = VirtioNetDevice::connect(self.socket(port), opts)?;
        let shared = self
            .server
            .as_ref()
            .expect("running")
            .datapath()
            .ports
            .by_name(port)
            .expect("port exists");
        let end = Instant::now() + Duration::from_secs(5);
        while shared.rx_queues_published() < pairs && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(dev)
    }

    /// A frontend on `port` with the default options and 128 RX buffers posted on its
    /// first queue: a guest that is up and listening.
    pub fn attach(&self, port: &str) -> VirtioNetDevice {
        let mut d = self
            .connect(port, DeviceOptions::default())
            .expect("frontend connects");
        d.post_rx(0, 128).expect("RX buffers posted");
        d
    }

    pub fn counters(&self, port: &str) -> CounterSnapshot {
        self.server
            .as_ref()
            .expect("running")
            .datapath()
            .ports
            .by_name(port)
            .expect("port exists")
            .counters
            .snapshot()
    }
}

/// Runs `vhost-net-backend ctl --socket CONTROL ARGS...` (the backend binary's own client).
pub fn ctl(control: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(backend_binary())
        .arg("ctl")
        .arg("--socket")
        .arg(control)
        .args(args)
        .output()
        .expect("the backend binary runs")
}

/// The `vhost-net-backend` binary built beside the running test or tool (build it with
/// `cargo build --workspace --bins`, as ci/test.sh does); `VNET_BACKEND` overrides.
pub fn backend_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VNET_BACKEND") {
        return PathBuf::from(p);
    }
    let mut dir = std::env::current_exe().expect("current exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("vhost-net-backend");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// The backend binary running as its own process, as users run it.
pub struct BackendProcess {
    child: Option<std::process::Child>,
    /// Network namespace to run it in (for an uplink tap there).
    pub netns: Option<String>,
    args: Vec<String>,
    sockets: Vec<PathBuf>,
    pub log: PathBuf,
}

impl BackendProcess {
    /// Starts the binary with `args` and waits for `sockets` to appear.
    pub fn start(args: Vec<String>, sockets: Vec<PathBuf>, log: PathBuf) -> BackendProcess {
        Self::start_in(None, args, sockets, log)
    }

    /// The same, inside a network namespace.
    pub fn start_in(
        netns: Option<String>,
        args: Vec<String>,
        sockets: Vec<PathBuf>,
        log: PathBuf,
    ) -> BackendProcess {
        let mut p = BackendProcess {
            child: None,
            netns,
            args,
            sockets,
            log,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("backend log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(backend_binary());
                c
            }
            None => std::process::Command::new(backend_binary()),
        };
        let child = cmd
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .expect("backend starts");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while !self.sockets.iter().all(|s| s.exists()) {
            assert!(Instant::now() < end, "backend sockets never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process outright (no cleanup: what a crash looks like) and starts it again.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Resident memory of process `pid`, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
