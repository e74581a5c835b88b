//! A small synchronous rtnetlink client: links, bridge ports, bridge VLANs and addresses.

use std::net::IpAddr;

use crate::rtnetlink::{Rtnetlink, RtnetlinkError};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoBridgePort, InfoData,
    InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("no network interface named {0}")]
    NoSuchLink(String),
    #[error("netlink reply could not be decoded: {0}")]
    Decode(String),
}

impl NetlinkError {
    /// hostnet's error, with `what` naming the request the kernel refused.
    fn from_rtnetlink(e: RtnetlinkError, what: &str) -> NetlinkError {
        match e {
            RtnetlinkError::Kernel(source) => NetlinkError::Kernel {
                what: what.to_string(),
                source,
            },
            RtnetlinkError::Socket(e) => NetlinkError::Socket(e),
            RtnetlinkError::Decode(e) => NetlinkError::Decode(e),
        }
    }

    /// The kernel's errno, if this is a refusal from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// What the kernel reports about a link.
#[derive(Clone, Debug, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub controller: Option<u32>,
    pub kind: Option<String>,
    /// Its hardware address, if it has an Ethernet one.
    pub mac: Option<[u8; 6]>,
}

pub struct Netlink {
    nl: Rtnetlink,
}

impl Netlink {
    pub fn open() -> Result<Netlink> {
        let nl = Rtnetlink::open()
            .map_err(|e| NetlinkError::from_rtnetlink(e, "open a netlink socket"))?;
        Ok(Netlink { nl })
    }

    /// Sends one request (`what` names it in errors) and collects the replies.
    fn request(
        &mut self,
        what: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.nl
            .request(msg, flags)
            .map_err(|e| NetlinkError::from_rtnetlink(e, what))
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(&l)),
                _ => None,
            })
            .collect())
    }

    pub fn link(&mut self, name: &str) -> Result<Link> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    pub fn index(&mut self, name: &str) -> Result<u32> {
        Ok(self.link(name)?.index)
    }

    /// Creates a bridge (optionally VLAN-filtering).
    pub fn add_bridge(&mut self, name: &str, vlan_filtering: bool) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let mut info = vec![LinkInfo::Kind(InfoKind::Bridge)];
        // Only when asked: kernels without CONFIG_BRIDGE_VLAN_FILTERING refuse the attribute.
        if vlan_filtering {
            info.push(LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::VlanFiltering(true),
            ])));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(info));
        self.request(
            &format!("create bridge {name}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    pub fn delete_link(&mut self, name: &str) -> Result<()> {
        let index = self.index(name)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            &format!("delete {name}"),
            RouteNetlinkMessage::DelLink(msg),
            NLM_F_ACK,
        )
        .map(|_| ())
    }

    fn set_link(
        &mut self,
        what: String,
        index: u32,
        attrs: Vec<LinkAttribute>,
        up: Option<bool>,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(up) = up {
            msg.header.change_mask = LinkFlags::Up;
            msg.header.flags = if up {
                LinkFlags::Up
            } else {
                LinkFlags::empty()
            };
        }
        msg.attributes = attrs;
        self.request(&what, RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)
            .map(|_| ())
    }

    pub fn set_up(&mut self, name: &str) -> Result<()> {
        let index = self.index(name)?;
        self.set_link(format!("bring {name} up"), index, Vec::new(), Some(true))
    }

    pub fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<()> {
        let index = self.index(name)?;
        self.set_link(
            format!("set the MTU of {name} to {mtu}"),
            index,
            vec![LinkAttribute::Mtu(mtu)],
            None,
        )
    }

    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> Result<()> {
        let index = self.index(name)?;
        self.set_link(
            format!("set the MAC address of {name}"),
            index,
            vec![LinkAttribute::Address(mac.to_vec())],
            None,
        )
    }

    /// Replaces the root qdisc of `name` with a token bucket filter: `rate` bytes per
    /// second, `burst` bytes of bucket, and a queue of what `latency_ms` holds at that rate
    /// (`tc qdisc replace dev NAME root tbf rate R burst B latency L`, without running tc).
    pub fn set_tbf(&mut self, name: &str, rate: u64, burst: u32, latency_ms: u32) -> Result<()> {
        const TCA_TBF_PARMS: u16 = 1;
        const TCA_TBF_RATE64: u16 = 4;
        const TCA_TBF_BURST: u16 = 6;
        const TC_LINKLAYER_ETHERNET: u8 = 1;
        let index = self.index(name)?;
        let rate32 = u32::try_from(rate).unwrap_or(u32::MAX);
        let limit = u32::try_from(rate * u64::from(latency_ms) / 1000 + u64::from(burst))
            .unwrap_or(u32::MAX);
        // struct tc_tbf_qopt: rate and peakrate (struct tc_ratespec, 12 bytes each), limit,
        // buffer, mtu. The rate's link layer is set, so the kernel needs no rate table;
        // the bucket is given in bytes (TCA_TBF_BURST), so `buffer` may stay 0.
        let mut qopt = [0u8; 36];
        qopt[1] = TC_LINKLAYER_ETHERNET;
        qopt[8..12].copy_from_slice(&rate32.to_ne_bytes());
        qopt[24..28].copy_from_slice(&limit.to_ne_bytes());
        let mut options = vec![
            TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, qopt.to_vec())),
            TcOption::Other(DefaultNla::new(TCA_TBF_BURST, burst.to_ne_bytes().to_vec())),
        ];
        if rate32 == u32::MAX {
            options.push(TcOption::Other(DefaultNla::new(
                TCA_TBF_RATE64,
                rate.to_ne_bytes().to_vec(),
            )));
        }
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        msg.header.parent = TcHandle::ROOT;
        msg.attributes.push(TcAttribute::Kind("tbf".into()));
        msg.attributes.push(TcAttribute::Options(options));
        self.request(
            &format!("limit {name} to {rate} bytes/s (tbf)"),
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// Makes `port` a port of `bridge`.
    pub fn set_controller(&mut self, port: &str, bridge: &str) -> Result<()> {
        let (port_index, bridge_index) = (self.index(port)?, self.index(bridge)?);
        self.set_link(
            format!("attach {port} to {bridge}"),
            port_index,
            vec![LinkAttribute::Controller(bridge_index)],
            None,
        )
    }

    /// Isolated bridge ports cannot talk to each other, only to non-isolated ports.
    pub fn set_port_isolated(&mut self, port: &str, isolated: bool) -> Result<()> {
        // Port (slave) data is only applied by RTM_NEWLINK on the existing link, as
        // `ip link set PORT type bridge_slave isolated on` does; RTM_SETLINK ignores it.
        let mut msg = LinkMessage::default();
        msg.header.index = self.index(port)?;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Isolated(
                isolated,
            )])),
        ]));
        self.request(
            &format!("set port isolation on {port}"),
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK,
        )
        .map(|_| ())
    }

    fn bridge_vlan(
        &mut self,
        port: &str,
        vid: u16,
        flags: BridgeVlanInfoFlags,
        add: bool,
    ) -> Result<()> {
        let index = self.index(port)?;
        let mut msg = LinkMessage::default();
        msg.header.interface_family = AddressFamily::Bridge;
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::AfSpecBridge(vec![AfSpecBridge::VlanInfo(
                BridgeVlanInfo { flags, vid },
            )]));
        let (verb, req) = if add {
            ("add", RouteNetlinkMessage::SetLink(msg))
        } else {
            ("remove", RouteNetlinkMessage::DelLink(msg))
        };
        self.request(&format!("{verb} VLAN {vid} on {port}"), req, NLM_F_ACK)
            .map(|_| ())
    }

    /// Makes `port` an access port of VLAN `vid`: untagged in and out, and nothing else.
    pub fn set_access_vlan(&mut self, port: &str, vid: u16) -> Result<()> {
        let _ = self.bridge_vlan(port, 1, BridgeVlanInfoFlags::empty(), false);
        self.bridge_vlan(
            port,
            vid,
            BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
            true,
        )
    }

    /// Takes `port` out of whatever bridge it is a port of.
    pub fn release(&mut self, port: &str) -> Result<()> {
        let index = self.index(port)?;
        self.set_link(
            format!("take {port} out of its bridge"),
            index,
            vec![LinkAttribute::Controller(0)],
            None,
        )
    }

    /// The addresses of `name` that reach beyond the link itself (IPv6 link-local
    /// addresses and the like left out), as address and prefix length.
    pub fn addresses(&mut self, name: &str) -> Result<Vec<(IpAddr, u8)>> {
        let index = self.index(name)?;
        let replies = self.request(
            &format!("list the addresses of {name}"),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut found = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index || a.header.scope != AddressScope::Universe {
                continue;
            }
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                found.push((addr, a.header.prefix_len));
            }
        }
        Ok(found)
    }

    /// Routes of the main table that leave through `name`, other than the ones the kernel
    /// made for its addresses, described as `ip route` prints them.
    pub fn routes_via(&mut self, name: &str) -> Result<Vec<String>> {
        let index = self.index(name)?;
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let replies = self.request(
                &format!("list the routes through {name}"),
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_DUMP,
            )?;
            for m in replies {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                let h = &r.header;
                if h.table != RouteHeader::RT_TABLE_MAIN
                    || h.kind != RouteType::Unicast
                    || h.protocol == RouteProtocol::Kernel
                    || !r.attributes.contains(&RouteAttribute::Oif(index))
                {
                    continue;
                }
                let addr = |want_gw: bool| {
                    r.attributes.iter().find_map(|a| match (a, want_gw) {
                        (RouteAttribute::Destination(d), false)
                        | (RouteAttribute::Gateway(d), true) => match d {
                            RouteAddress::Inet(v4) => Some(v4.to_string()),
                            RouteAddress::Inet6(v6) => Some(v6.to_string()),
                            _ => None,
                        },
                        _ => None,
                    })
                };
                let dest = match addr(false) {
                    Some(d) => format!("{d}/{}", h.destination_prefix_length),
                    None => "default".to_string(),
                };
                found.push(match addr(true) {
                    Some(gw) => format!("{dest} via {gw}"),
                    None => dest,
                });
            }
        }
        Ok(found)
    }

    pub fn delete_address(&mut self, name: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        let msg = address_message(self.index(name)?, addr, prefix);
        self.request(
            &format!("remove {addr}/{prefix} from {name}"),
            RouteNetlinkMessage::DelAddress(msg),
            NLM_F_ACK,
        )
        .map(|_| ())
    }

    /// The route to `dst/prefix` through the router `via` on `name`, in the main table
    /// (replaced if there is one).
    pub fn replace_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        via: IpAddr,
        name: &str,
    ) -> Result<()> {
        let msg = route_message(self.index(name)?, dst, prefix, via);
        self.request(
            &format!("add the route to {dst}/{prefix} via {via} dev {name}"),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// Removes the route to `dst/prefix` via `via` on `name`; gone already is no error.
    pub fn delete_route(&mut self, dst: IpAddr, prefix: u8, via: IpAddr, name: &str) -> Result<()> {
        let msg = route_message(self.index(name)?, dst, prefix, via);
        match self.request(
            &format!("remove the route to {dst}/{prefix} via {via}"),
            RouteNetlinkMessage::DelRoute(msg),
            NLM_F_ACK,
        ) {
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Adds an address; whether it was added (false: it was there already).
    pub fn add_address(&mut self, name: &str, addr: IpAddr, prefix: u8) -> Result<bool> {
        let msg = address_message(self.index(name)?, addr, prefix);
        match self.request(
            &format!("add {addr}/{prefix} to {name}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            // Already there: `up` is idempotent.
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            r => r.map(|_| true),
        }
    }
}

/// A static unicast route of the main table, as RTM_NEWROUTE and RTM_DELROUTE carry it.
fn route_message(index: u32, dst: IpAddr, prefix: u8, via: IpAddr) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = match dst {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    h.destination_prefix_length = prefix;
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::Static;
    h.scope = RouteScope::Universe;
    h.kind = RouteType::Unicast;
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    };
    msg.attributes.push(RouteAttribute::Destination(addr(dst)));
    msg.attributes.push(RouteAttribute::Gateway(addr(via)));
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// `addr/prefix` on link `index`, as RTM_NEWADDR and RTM_DELADDR carry it.
fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}
