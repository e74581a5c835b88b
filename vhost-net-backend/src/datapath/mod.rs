//! The datapath: the port table with the decisions that run over it, and the drivers that
//! pull frames in and run them through the pipeline (`burst`): a VM's TX ring (`vm_tx`)
//! and the tap's readers (`tap_rx`).

pub mod burst;
pub mod tap_rx;
pub mod vm_tx;

use std::sync::Arc;

use crate::config::{ConfigError, SwitchConfig};
use crate::counters::PortCounters;
use crate::endpoint::tap::TapPort;
use crate::endpoint::vm::VmEndpoint;
use crate::endpoint::{Endpoint, SwitchPort};
use crate::policy::Policy;
use crate::route::Router;
use crate::switch::{PortProfile, Switch};
use crate::types::PortId;

/// Everything a frame's way through the switch consults.
pub struct Datapath {
    pub switch: Switch,
    pub policy: Policy,
    pub router: Router,
    /// Every port, indexed by its id: the VM ports of the config in its order, then the
    /// tap uplink, if there is one.
    pub ports: Vec<Arc<SwitchPort>>,
    pub mtu: Option<u16>,
    /// Largest frame (Ethernet header included) forwarded as it is.
    pub max_frame_len: usize,
    /// Busy-poll window of the TX workers after a burst, microseconds (0: none).
    pub poll_us: u64,
}

impl Datapath {
    /// The VM ports of `config`, then `tap` (the uplink, opened already) as the last port.
    /// Fails on a policy that does not compile.
    pub fn new(
        config: &SwitchConfig,
        tap: Option<Arc<TapPort>>,
    ) -> Result<Arc<Datapath>, ConfigError> {
        let vms = config.ports.iter().map(|p| {
            (
                p.name.clone(),
                p.segment(),
                p.queues,
                p.mac,
                Endpoint::Vm(Arc::new(VmEndpoint::new(p.queues))),
            )
        });
        let uplink = tap.map(|t| {
            (
                "uplink".to_string(),
                t.segment(),
                t.queue_count() as u16,
                None,
                Endpoint::Tap(t),
            )
        });
        let ports: Vec<Arc<SwitchPort>> = vms
            .chain(uplink)
            .enumerate()
            .map(|(i, (name, segment, queue_pairs, mac, endpoint))| {
                Arc::new(SwitchPort {
                    id: i as PortId,
                    name,
                    segment,
                    queue_pairs,
                    mac,
                    counters: PortCounters::default(),
                    endpoint,
                })
            })
            .collect();
        let profiles: Vec<PortProfile> = ports
            .iter()
            .map(|p| PortProfile {
                segment: p.segment,
                mac: p.mac,
                max_macs: config.ports.get(usize::from(p.id)).and_then(|c| c.max_macs),
            })
            .collect();
        let policy = Policy::new(config, ports.iter().map(|p| p.name.clone()).collect())?;
        Ok(Arc::new(Datapath {
            switch: Switch::new(&profiles, config.mac_ageing_secs),
            policy,
            router: Router::new(config),
            ports,
            mtu: config.mtu,
            max_frame_len: config.max_frame_len(),
            poll_us: config.poll_us,
        }))
    }

    pub fn port_by_name(&self, name: &str) -> Option<&Arc<SwitchPort>> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// The name of port `id`, for tables and logs ("?" for an id no port has).
    pub fn port_name(&self, id: PortId) -> &str {
        self.ports.get(usize::from(id)).map_or("?", |p| &p.name)
    }
}
