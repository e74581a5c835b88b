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
                    mac: None,
                    queues: p.queues,
                    listen_fd: None,
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
            .switch()
            .port_by_name(port)
            .expect("port exists")
            .clone();
        let end = Instant::now() + Duration::from_secs(5);
        while shared.rx_read().queue_count() < pairs && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(dev)
    }

    pub fn counters(&self, port: &str) -> CounterSnapshot {
        self.server
            .as_ref()
            .expect("running")
            .switch()
            .port_by_name(port)
            .expect("port exists")
            .counters
            .snapshot()
    }
}
