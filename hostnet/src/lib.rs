//! Host networking that several crates of the workspace need, written once (as
//! cloud-hypervisor's `net_util` is for its VMM and its vhost-user backend):
//!
//! - `mac`: the MAC address type, parsed and printed as `52:54:00:12:34:56`;
//! - `tap`: tap devices from `/dev/net/tun` through typed ioctls;
//! - `rtnetlink`: one synchronous rtnetlink request loop;
//! - `netlink`: links, bridges and their ports and VLANs, addresses and routes over it;
//! - `nft`: nftables rulesets through `nft -j`.

pub mod mac;
pub mod netlink;
pub mod nft;
pub mod rtnetlink;
pub mod tap;

pub use mac::MacAddr;
