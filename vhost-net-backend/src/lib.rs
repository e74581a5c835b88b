//! A vhost-user-net backend that is a learning virtual switch.
//!
//! Each port is a vhost-user socket served to one VM NIC. Frames a guest transmits are
//! switched (MAC learning, VLAN segments) and copied once, straight from the sender's memory
//! into the receiver's RX buffers; offloads a receiver did not negotiate are finished in
//! software.
//!
//! Modules:
//! - `config`: the switch configuration (TOML file or `--port` specs).
//! - `virtio`: descriptor chains, the virtio-net header, copies between guest memories.
//! - `offload`: checksum completion and TCP segmentation.
//! - `switch`: MAC table, VLAN segments, forwarding decision, the port table.
//! - `port`: the `VhostUserBackend` of a port and its per-queue-pair data path.
//! - `counters`: per-port counters and drop reasons.
//! - `relay`: the vhost-user control channel between QEMU and the protocol handler.
//! - `forward`: delivering a switched frame to RX queues or the uplink.
//! - `uplink`: the tap uplink (vnet headers, offloads, VLAN trunk or access).
//! - `server`: listening sockets, reconnects, MAC ageing, the control socket.

pub mod config;
pub mod counters;
pub mod forward;
pub mod offload;
pub mod port;
pub mod ram;
pub mod relay;
pub mod server;
pub mod switch;
pub mod uplink;
pub mod virtio;

pub use config::{MacAddr, PortConfig, SwitchConfig};
pub use counters::{CounterSnapshot, DropReason};
pub use server::Server;
