//! The datapath: the port table (`ports`) with the decisions that run over it, and the drivers that
//! pull frames in and run them through the pipeline (`burst`): a VM's TX ring (`vm_tx`)
//! and the tap's readers (`tap_rx`); and the router's advertisements the ticker sends
//! (`adverts`).

pub mod adverts;
pub mod burst;
pub mod ports;
pub mod tap_rx;
pub mod vm_tx;

use std::sync::Arc;

use crate::config::{ConfigError, SwitchConfig};
use crate::endpoint::tap::TapPort;
use crate::policy::Policy;
use crate::route::Router;
use crate::switch::Switch;
use ports::PortTable;

/// Everything a frame's way through the switch consults.
pub struct Datapath {
    pub switch: Switch,
    pub policy: Policy,
    pub router: Router,
    pub ports: PortTable,
    pub mtu: Option<u16>,
    /// Largest frame (Ethernet header included) forwarded as it is.
    pub max_frame_len: usize,
    /// Busy-poll window of the TX workers after a burst, microseconds (0: none).
    pub poll_us: u64,
    /// CPUs the datapath's threads run on (empty: any).
    pub worker_cpus: Vec<usize>,
}

impl Datapath {
    /// The VM ports of `config`, free places for more, then `tap` (the uplink, opened
    /// already). Fails on a policy that does not compile.
    pub fn new(
        config: &SwitchConfig,
        tap: Option<Arc<TapPort>>,
    ) -> Result<Arc<Datapath>, ConfigError> {
        let ports = PortTable::new(config, tap);
        let by_id = ports.by_id(config);
        let policy = Policy::new(&by_id)?;
        Ok(Arc::new(Datapath {
            switch: Switch::new(&ports.profiles(), config.mac_ageing_secs),
            policy,
            router: Router::new(&by_id),
            ports,
            mtu: config.mtu,
            max_frame_len: config.max_frame_len(),
            poll_us: config.poll_us,
            worker_cpus: config.worker_cpus.clone(),
        }))
    }
}
