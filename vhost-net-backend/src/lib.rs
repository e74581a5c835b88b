//! A vhost-user-net backend that is a learning virtual switch.
//!
//! Each VM NIC is a vhost-user socket; the backend maps the guest's memory and switches
//! frames between VM ports and a tap uplink, copying each frame once, straight from the
//! sender's memory into the receiver's RX buffers; offloads a receiver did not negotiate
//! are finished in software.
//!
//! # Layers
//!
//! Each module imports only modules of its own layer or below.
//!
//! ```text
//! 6 control    server (start and stop, ageing and the policy's clock),
//!              control (the control socket's commands: counters, rules, flows, changes,
//!              ports added and deleted), port_sockets (each VM port's socket and thread),
//!              metrics (Prometheus, over HTTP), capture (`ctl capture`'s pcap writer),
//!              vhost_user::{backend (VhostUserBackend of a VM port), relay}
//! 5 datapath   datapath::burst: THE pipeline, decision -> policy -> delivery -> flush;
//!              datapath::vm_tx (a VM's TX ring), datapath::tap_rx (the tap's readers),
//!              datapath::ports (the port table, replaced whole when ports change)
//! 4 endpoints  endpoint::{vm (RX ring driver), tap}: where a decided frame goes;
//!              `Endpoint` is every kind of port, matched on the hot path
//! 3 decisions  switch::{mac_table, cache}, policy::{source_guard, rules, conntrack, rate,
//!              flow_log}, route::{neighbour} (the gateway of routed segments): a frame's
//!              parsed headers and port ids only
//! 2 packet     packet::{ingress (one check for every port), meta, flow, l3, vlan, offload,
//!              rewrite (a routed frame's head), build (the frames the router writes),
//!              signature (what decisions read of a frame)}: pure functions on bytes
//! 1 guest      mem (the only place guest addresses become host pointers), vring (a
//!              queue as vhost-user-backend keeps it, and who watches its kicks),
//!              virtio::{net_hdr, chain, ring (the only file that knows the split ring's
//!              layout), copy}
//! 0 vocabulary types, counters, config, cpu_set, fault (panics contained where they would
//!              spread)
//! ```
//!
//! # A frame's way
//!
//! Three files follow a frame from one guest to another:
//!
//! 1. `datapath/vm_tx.rs`: guest A kicks its TX queue; its worker takes a burst of chains,
//!    walks each (`virtio::chain`), copies its first bytes and checks them
//!    (`packet::ingress`).
//! 2. `datapath/burst.rs`: the burst is decided (`switch`, MAC learning and lookup; `route`
//!    for frames to a gateway), passed through the policy, and delivered to each
//!    destination's `Endpoint` (a routed frame with its first bytes rewritten). A frame
//!    that the decisions cannot tell from the one decided before it (`packet::signature`)
//!    takes that one's decision, its policy verdict repeated on the same tracked flow.
//! 3. `endpoint/vm.rs`: the frame is copied from A's memory into B's RX buffers (offload
//!    requests kept where B negotiated them, otherwise finished in software), B's used
//!    ring written; back in `vm_tx`, A's chains are returned and `burst::flush` interrupts
//!    each RX queue written, once per burst (EVENT_IDX honoured).
//!
//! From the tap, `datapath/tap_rx.rs` takes the place of the first step.

pub mod balancer;
pub mod capture;
pub mod config;
pub mod control;
pub mod counters;
pub mod cpu_set;
pub mod datapath;
pub mod endpoint;
pub mod fault;
pub mod host_side;
pub mod mem;
pub mod metrics;
pub mod packet;
pub mod policy;
pub mod port_sockets;
pub mod route;
pub mod server;
pub mod switch;
pub mod types;
pub mod vhost_user;
pub mod virtio;
pub mod vring;

pub use config::{MacAddr, PortConfig, PortMode, SwitchConfig};
pub use counters::{CounterSnapshot, DropReason};
pub use server::Server;
