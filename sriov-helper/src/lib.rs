//! Host-side SR-IOV for QEMU/KVM guests: list physical functions and their VFs, apply a
//! desired state (VF count, per-VF MAC/VLAN/QoS/spoof check/trust/rates/link state, and the
//! driver: vfio-pci for passthrough or the PF's VF driver), and print the QEMU arguments.
//!
//! Modules: `sysfs` (the PCI tree, under a root tests can fake), `vf` (VF settings over
//! rtnetlink), `apply` (desired state, changes, QEMU arguments), `error`.

pub mod apply;
pub mod error;
pub mod sysfs;
pub mod vf;

pub use error::SriovError;
