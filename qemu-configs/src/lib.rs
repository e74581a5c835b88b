//! A declarative topology for QEMU/KVM guests (networks, the flows allowed between them,
//! the VMs on them) rendered into host networks (through bridge-plugin) and QEMU command
//! lines, and brought up and down in one command.
//!
//! Modules: `topology` (the file and its checks), `probe` (what the QEMU binary has),
//! `render` (QEMU arguments), `switch` (the
//! switch configuration of `mode = "switch"` networks), `run` (up and down), `script`, `libvirt` and `graph` (the
//! topology as a shell script, libvirt domains and Graphviz), `verify` (the reachability matrix against the policy).

pub mod graph;
pub mod libvirt;
pub mod probe;
pub mod render;
pub mod run;
pub mod script;
pub mod switch;
pub mod topology;
pub mod verify;
