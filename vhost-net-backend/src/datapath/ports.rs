//! The port table: every port by id, with free places for ports added at run time. It is
//! replaced whole when a port comes or goes; a worker reads one table for a whole burst,
//! so a burst never sees half a change, and nothing on the hot path takes a lock for it.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::config::{PortConfig, SwitchConfig};
use crate::counters::PortCounters;
use crate::endpoint::tap::TapPort;
use crate::endpoint::vm::VmEndpoint;
use crate::endpoint::{Endpoint, SwitchPort};
use crate::switch::PortProfile;
use crate::types::PortId;

/// Ids `0..capacity` are VM ports (the config's in its order at start, then free places);
/// the tap uplink, if there is one, is at `capacity`.
pub struct PortTable {
    slots: ArcSwap<Vec<Arc<SwitchPort>>>,
    capacity: usize,
}

/// What a change of the configured ports does to the table.
#[derive(Debug, Default)]
pub struct PortPlan {
    /// Ports to take down: deleted, or changed in what only a new connection applies.
    pub down: Vec<PortId>,
    /// Ports to bring up, and where.
    pub up: Vec<(PortId, PortConfig)>,
    /// The new config with its ports laid out by id, free places as empty ports: what the
    /// policy and the router are built from, so that a port's index is its id.
    pub by_id: SwitchConfig,
}

/// A place nobody holds, as a config entry: no name, no address, no group.
fn vacant_config() -> PortConfig {
    PortConfig::default()
}

/// Whether `a` and `b` differ only in what the policy applies to a running port (groups,
/// addresses, rates).
fn same_connection(a: &PortConfig, b: &PortConfig) -> bool {
    let strip = |p: &PortConfig| PortConfig {
        groups: Vec::new(),
        addresses: Vec::new(),
        rate_tx: None,
        rate_rx: None,
        ..p.clone()
    };
    strip(a) == strip(b)
}

pub fn vm_port(id: PortId, p: &PortConfig) -> SwitchPort {
    SwitchPort {
        id,
        name: p.name.clone(),
        segment: p.segment(),
        queue_pairs: p.queues,
        mac: p.mac,
        max_macs: p.max_macs,
        counters: PortCounters::default(),
        capture: Default::default(),
        endpoint: Endpoint::Vm(Arc::new(VmEndpoint::new(p.queues))),
    }
}

impl PortTable {
    /// The ports of `config` at ids `0..`, free places up to its capacity, then `tap`.
    pub fn new(config: &SwitchConfig, tap: Option<Arc<TapPort>>) -> PortTable {
        let capacity = config.port_capacity();
        let mut slots: Vec<Arc<SwitchPort>> = (0..capacity)
            .map(|i| {
                let id = i as PortId;
                Arc::new(match config.ports.get(i) {
                    Some(p) => vm_port(id, p),
                    None => SwitchPort::vacant(id),
                })
            })
            .collect();
        if let Some(t) = tap {
            slots.push(Arc::new(SwitchPort {
                id: capacity as PortId,
                name: "uplink".to_string(),
                segment: t.segment(),
                queue_pairs: t.queue_count() as u16,
                mac: None,
                max_macs: None,
                counters: PortCounters::default(),
                capture: Default::default(),
                endpoint: Endpoint::Tap(t),
            }));
        }
        PortTable {
            slots: ArcSwap::from_pointee(slots),
            capacity,
        }
    }

    /// The table as it is now; hold it for a burst, not longer (a port deleted meanwhile
    /// stays alive while it is held).
    #[inline]
    pub fn load(&self) -> Guard<Arc<Vec<Arc<SwitchPort>>>> {
        self.slots.load()
    }

    pub fn get(&self, id: PortId) -> Option<Arc<SwitchPort>> {
        self.load().get(usize::from(id)).cloned()
    }

    /// The ports in use (not the free places), by id.
    pub fn in_use(&self) -> Vec<Arc<SwitchPort>> {
        self.load()
            .iter()
            .filter(|p| !p.is_vacant())
            .cloned()
            .collect()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<SwitchPort>> {
        self.load()
            .iter()
            .find(|p| !p.is_vacant() && p.name == name)
            .cloned()
    }

    /// The name of port `id`, for tables and logs ("?" for an id no port has).
    pub fn name(&self, id: PortId) -> String {
        self.get(id)
            .filter(|p| !p.is_vacant())
            .map_or_else(|| "?".to_string(), |p| p.name.clone())
    }

    pub fn uplink(&self) -> Option<Arc<SwitchPort>> {
        self.load()
            .iter()
            .find(|p| matches!(p.endpoint, Endpoint::Tap(_)))
            .cloned()
    }

    /// What the switch knows of each port, by id.
    pub fn profiles(&self) -> Vec<PortProfile> {
        self.load()
            .iter()
            .map(|p| PortProfile {
                segment: p.segment,
                mac: p.mac,
                max_macs: p.max_macs,
            })
            .collect()
    }

    /// `config` with its ports laid out by id: the table as it is, all in use.
    pub fn by_id(&self, config: &SwitchConfig) -> SwitchConfig {
        let table = self.load();
        let mut ports = vec![vacant_config(); self.capacity];
        for p in &config.ports {
            if let Some(at) = table.iter().find(|s| !s.is_vacant() && s.name == p.name) {
                if let Some(place) = ports.get_mut(usize::from(at.id)) {
                    *place = p.clone();
                }
            }
        }
        SwitchConfig {
            ports,
            ..config.clone()
        }
    }

    /// Where the ports of `new` go, coming from `old` (the config the table holds now):
    /// a port kept keeps its id, one changed in its connection settings is brought down
    /// and up again at its id, a new one takes the lowest free id.
    pub fn plan(&self, old: &SwitchConfig, new: &SwitchConfig) -> Result<PortPlan, String> {
        let table = self.load();
        // VM ports only: the uplink's place is not one to plan.
        let id_of = |name: &str| {
            table[..self.capacity.min(table.len())]
                .iter()
                .find(|s| !s.is_vacant() && s.name == name)
                .map(|s| s.id)
        };
        let mut plan = PortPlan::default();
        let mut taken = vec![false; self.capacity];
        for p in &old.ports {
            let Some(id) = id_of(&p.name) else { continue };
            match new.ports.iter().find(|n| n.name == p.name) {
                Some(n) if same_connection(p, n) => taken[usize::from(id)] = true,
                Some(n) => {
                    plan.down.push(id);
                    plan.up.push((id, n.clone()));
                    taken[usize::from(id)] = true;
                }
                None => plan.down.push(id),
            }
        }
        let mut ports = vec![vacant_config(); self.capacity];
        for p in &new.ports {
            let id = match id_of(&p.name).filter(|id| taken[usize::from(*id)]) {
                Some(id) => id,
                None => {
                    let free = taken.iter().position(|t| !t).ok_or(format!(
                        "no free place for port '{}': the switch holds at most {} ports \
                         (max_ports, which only a restart changes)",
                        p.name, self.capacity
                    ))?;
                    taken[free] = true;
                    plan.up.push((free as PortId, p.clone()));
                    free as PortId
                }
            };
            ports[usize::from(id)] = p.clone();
        }
        plan.by_id = SwitchConfig {
            ports,
            ..new.clone()
        };
        Ok(plan)
    }

    /// Puts `port` at its id.
    pub fn set(&self, port: SwitchPort) {
        let mut slots = Vec::clone(&self.load());
        if let Some(place) = slots.get_mut(usize::from(port.id)) {
            *place = Arc::new(port);
        }
        self.slots.store(Arc::new(slots));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str) -> PortConfig {
        PortConfig {
            name: name.into(),
            socket: format!("/tmp/{name}.sock").into(),
            ..Default::default()
        }
    }

    fn config(names: &[&str]) -> SwitchConfig {
        SwitchConfig {
            ports: names.iter().map(|n| port(n)).collect(),
            max_ports: Some(4),
            ..Default::default()
        }
    }

    #[test]
    fn ports_keep_their_ids_and_new_ones_take_free_places() {
        let old = config(&["a", "b", "c"]);
        let t = PortTable::new(&old, None);
        assert_eq!(t.load().len(), 4);
        assert!(t.load()[3].is_vacant());
        // b goes, d comes: d takes the lowest free id, b's.
        let new = config(&["a", "c", "d"]);
        let plan = t.plan(&old, &new).unwrap();
        assert_eq!(plan.down, vec![1]);
        assert_eq!(plan.up.len(), 1);
        assert_eq!((plan.up[0].0, plan.up[0].1.name.as_str()), (1, "d"));
        let names: Vec<&str> = plan.by_id.ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["a", "d", "c", ""]);
    }

    #[test]
    fn a_changed_socket_restarts_the_port_at_its_id_but_a_new_group_does_not() {
        let old = config(&["a", "b"]);
        let t = PortTable::new(&old, None);
        let mut new = old.clone();
        new.ports[1].groups = vec!["web".into()];
        let plan = t.plan(&old, &new).unwrap();
        assert!(plan.down.is_empty() && plan.up.is_empty());
        new.ports[1].socket = "/tmp/other.sock".into();
        let plan = t.plan(&old, &new).unwrap();
        assert_eq!(plan.down, vec![1]);
        assert_eq!(plan.up[0].0, 1);
    }

    #[test]
    fn a_full_table_refuses_another_port_by_name() {
        let old = config(&["a", "b", "c", "d"]);
        let t = PortTable::new(&old, None);
        let mut new = old.clone();
        new.max_ports = Some(5);
        new.ports.push(port("e"));
        let e = t.plan(&old, &new).unwrap_err();
        assert!(e.contains("'e'") && e.contains("at most 4"), "{e}");
    }

    #[test]
    fn a_vacant_place_is_not_a_port() {
        let t = PortTable::new(&config(&["a"]), None);
        t.set(SwitchPort::vacant(0));
        assert!(t.in_use().is_empty());
        assert!(t.by_name("").is_none());
        assert_eq!(t.name(0), "?");
    }
}
