//! Test harnesses for the workspace: a vhost-user frontend that plays a guest's virtio-net
//! driver over a real socket and shared memory, a switch started in-process on temporary
//! sockets, and frame builders.

pub mod frames;
pub mod frontend;
pub mod guest_image;
pub mod netns;
pub mod qemu;
pub mod testbed;
pub mod testpmd;

pub use frontend::{DeviceOptions, RawDesc, RawNext, RxFrame, VirtioNetDevice};
pub use testbed::TestSwitch;
