//! Where a decided frame goes: the port table, and every kind of port behind one type the
//! datapath delivers to (`Endpoint`, matched on the hot path: no dynamic dispatch). An
//! endpoint knows rings, guest memory and file descriptors, never the switch or the policy.

pub mod capture;
pub mod frame;
pub mod notifier;
pub mod tap;
pub mod vm;

#[cfg(test)]
pub(crate) use vm::test_rings;

use std::sync::Arc;

use crate::counters::PortCounters;
use crate::types::{MacAddr, PortId, VACANT};
use capture::Capture;
use tap::TapPort;
use vm::{VmEndpoint, VmPort};

/// The kinds of port.
pub enum Endpoint {
    /// A VM NIC served over vhost-user.
    Vm(Arc<VmEndpoint>),
    /// The tap uplink towards the host.
    Tap(Arc<TapPort>),
    /// A free place in the port table: a port deleted, or room for `port-add`. Nothing
    /// is delivered to it and nothing comes from it.
    Vacant,
}

/// One port of the switch: what outlives a guest connection.
pub struct SwitchPort {
    pub id: PortId,
    pub name: String,
    /// Its VLAN segment, or `TRUNK`.
    pub segment: u16,
    pub queue_pairs: u16,
    /// The MAC configured on it (`mac=`).
    pub mac: Option<MacAddr>,
    /// Port security: the most source MACs it may send from.
    pub max_macs: Option<u16>,
    pub counters: PortCounters,
    /// Copies of its frames while `ctl capture` runs.
    pub capture: Capture,
    pub endpoint: Endpoint,
}

impl SwitchPort {
    /// This port as the VM RX driver sees it, if it is a VM port.
    #[inline]
    pub fn as_vm(&self) -> Option<VmPort<'_>> {
        match &self.endpoint {
            Endpoint::Vm(vm) => Some(VmPort {
                id: self.id,
                name: &self.name,
                counters: &self.counters,
                vm,
            }),
            Endpoint::Tap(_) | Endpoint::Vacant => None,
        }
    }

    /// A free place in the port table at `id`.
    pub fn vacant(id: PortId) -> SwitchPort {
        SwitchPort {
            id,
            name: String::new(),
            segment: VACANT,
            queue_pairs: 0,
            mac: None,
            max_macs: None,
            counters: PortCounters::default(),
            capture: Capture::default(),
            endpoint: Endpoint::Vacant,
        }
    }

    pub fn is_vacant(&self) -> bool {
        matches!(self.endpoint, Endpoint::Vacant)
    }

    /// Whether something is attached: a guest (its memory table taken), or the tap.
    pub fn connected(&self) -> bool {
        match &self.endpoint {
            Endpoint::Vm(vm) => vm.rx_read().mem.is_some(),
            Endpoint::Tap(_) => true,
            Endpoint::Vacant => false,
        }
    }

    /// How many RX queues a VM port's guest has started and enabled, those frames go to
    /// (0 for the tap, which has none).
    pub fn rx_queues_published(&self) -> usize {
        match &self.endpoint {
            Endpoint::Vm(vm) => vm.rx_read().queue_count(),
            Endpoint::Tap(_) | Endpoint::Vacant => 0,
        }
    }

    /// Drops the current vhost-user connection, if this is a VM port with one.
    pub fn reset_connection(&self) {
        if let Endpoint::Vm(vm) = &self.endpoint {
            vm.reset_connection();
        }
    }
}
