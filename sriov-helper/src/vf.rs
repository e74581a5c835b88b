//! VF settings over rtnetlink: IFLA_VFINFO_LIST read from a PF's link, and set one
//! IFLA_VF_* attribute per request, so a refusal names exactly what was refused.

use hostnet::rtnetlink::{Rtnetlink, RtnetlinkError};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState, VfInfoMac,
    VfInfoRate, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState,
};
use netlink_packet_route::RouteNetlinkMessage;
use serde::{Deserialize, Serialize};

use hostnet::MacAddr;

use crate::error::SriovError;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Auto,
    Enable,
    Disable,
}

/// One setting of one VF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfSetting {
    Mac([u8; 6]),
    Vlan { vlan: u16, qos: u8 },
    SpoofCheck(bool),
    Trust(bool),
    Rate { min: u32, max: u32 },
    LinkState(LinkState),
}

/// A VF as the PF's driver reports it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VfNetState {
    pub index: u32,
    pub mac: String,
    pub vlan: u32,
    pub qos: u32,
    pub spoof_check: Option<bool>,
    pub trust: Option<bool>,
    pub min_tx_rate: u32,
    pub max_tx_rate: u32,
    pub link_state: Option<LinkState>,
}

pub fn mac_string(m: &[u8]) -> String {
    let mut mac = [0u8; 6];
    let n = m.len().min(6);
    mac[..n].copy_from_slice(&m[..n]);
    MacAddr(mac).to_string()
}

impl VfSetting {
    pub fn to_vf_info(&self, vf: u32) -> VfInfo {
        match self {
            VfSetting::Mac(m) => VfInfo::Mac(VfInfoMac::new(vf, m)),
            VfSetting::Vlan { vlan, qos } => {
                VfInfo::Vlan(VfInfoVlan::new(vf, u32::from(*vlan), u32::from(*qos)))
            }
            VfSetting::SpoofCheck(on) => VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, *on)),
            VfSetting::Trust(on) => VfInfo::Trust(VfInfoTrust::new(vf, *on)),
            VfSetting::Rate { min, max } => VfInfo::Rate(VfInfoRate::new(vf, *min, *max)),
            VfSetting::LinkState(s) => VfInfo::LinkState(VfInfoLinkState::new(
                vf,
                match s {
                    LinkState::Auto => VfLinkState::Auto,
                    LinkState::Enable => VfLinkState::Enable,
                    LinkState::Disable => VfLinkState::Disable,
                },
            )),
        }
    }

    /// The `ip link set dev PF vf N ...` words for it.
    pub fn ip_words(&self) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        match self {
            VfSetting::Mac(m) => format!("mac {}", mac_string(m)),
            VfSetting::Vlan { vlan, qos } => format!("vlan {vlan} qos {qos}"),
            VfSetting::SpoofCheck(b) => format!("spoofchk {}", onoff(*b)),
            VfSetting::Trust(b) => format!("trust {}", onoff(*b)),
            VfSetting::Rate { min, max } => format!("min_tx_rate {min} max_tx_rate {max}"),
            VfSetting::LinkState(s) => format!("state {}", format!("{s:?}").to_lowercase()),
        }
    }
}

/// The RTM_SETLINK request that applies `setting` to VF `vf` of the link `pf_index`.
pub fn set_message(pf_index: u32, vf: u32, setting: &VfSetting) -> RouteNetlinkMessage {
    let mut link = LinkMessage::default();
    link.header.index = pf_index;
    link.attributes
        .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![
            setting.to_vf_info(vf)
        ])]));
    RouteNetlinkMessage::SetLink(link)
}

/// The VFs listed in a link message (none for a link without SR-IOV).
pub fn vfs_of(link: &LinkMessage) -> Vec<VfNetState> {
    let mut out = Vec::new();
    for a in &link.attributes {
        let LinkAttribute::VfInfoList(list) = a else {
            continue;
        };
        for LinkVfInfo(infos) in list {
            let mut vf = VfNetState::default();
            for i in infos {
                match i {
                    VfInfo::Mac(m) => {
                        vf.index = m.vf_id;
                        vf.mac = mac_string(&m.mac);
                    }
                    VfInfo::Vlan(v) => {
                        vf.vlan = v.vlan_id;
                        vf.qos = v.qos;
                    }
                    VfInfo::SpoofCheck(s) => vf.spoof_check = Some(s.enabled),
                    VfInfo::Trust(t) => vf.trust = Some(t.enabled),
                    VfInfo::Rate(r) => {
                        vf.min_tx_rate = r.min_tx_rate;
                        vf.max_tx_rate = r.max_tx_rate;
                    }
                    VfInfo::LinkState(l) => {
                        vf.link_state = match l.state {
                            VfLinkState::Auto => Some(LinkState::Auto),
                            VfLinkState::Enable => Some(LinkState::Enable),
                            VfLinkState::Disable => Some(LinkState::Disable),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
            out.push(vf);
        }
    }
    out
}

/// A link and its VFs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkVfs {
    pub index: u32,
    pub name: String,
    pub vfs: Vec<VfNetState>,
}

pub struct VfNetlink {
    nl: Rtnetlink,
}

impl VfNetlink {
    pub fn open() -> Result<VfNetlink, SriovError> {
        let nl = Rtnetlink::open().map_err(|e| SriovError::Socket(e.to_string()))?;
        Ok(VfNetlink { nl })
    }

    /// Every link with its VFs (a real dump of this machine's interfaces).
    pub fn links(&mut self) -> Result<Vec<LinkVfs>, SriovError> {
        let mut link = LinkMessage::default();
        link.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
        let links: Vec<LinkMessage> = self
            .nl
            .request(RouteNetlinkMessage::GetLink(link), NLM_F_DUMP)
            .map_err(|e| SriovError::Socket(format!("link dump: {e}")))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect();
        Ok(links
            .iter()
            .map(|l| LinkVfs {
                index: l.header.index,
                name: l
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                vfs: vfs_of(l),
            })
            .collect())
    }

    pub fn link(&mut self, name: &str) -> Result<LinkVfs, SriovError> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| SriovError::NoDevice(format!("{name} (no such interface)")))
    }

    pub fn set(&mut self, pf: &LinkVfs, vf: u32, setting: &VfSetting) -> Result<(), SriovError> {
        match self
            .nl
            .request(set_message(pf.index, vf, setting), NLM_F_ACK)
        {
            Ok(_) => Ok(()),
            Err(RtnetlinkError::Kernel(source)) => Err(SriovError::Netlink {
                what: format!("vf {vf} {}", setting.ip_words()),
                pf: pf.name.clone(),
                source,
            }),
            Err(e) => Err(SriovError::Socket(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostnet::rtnetlink::encode;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};

    /// Each setting encodes into an RTM_SETLINK whose IFLA_VFINFO_LIST decodes, attribute by
    /// attribute, back to the same VF values with the netlink crate's own parser.
    #[test]
    fn set_requests_round_trip_through_the_parser() {
        let settings = [
            VfSetting::Mac([0x52, 0x54, 0, 0xaa, 0, 1]),
            VfSetting::Vlan { vlan: 100, qos: 3 },
            VfSetting::SpoofCheck(false),
            VfSetting::Trust(true),
            VfSetting::Rate { min: 10, max: 1000 },
            VfSetting::LinkState(LinkState::Disable),
        ];
        for (i, s) in settings.iter().enumerate() {
            let bytes = encode(set_message(7, 2, s), NLM_F_ACK, 40 + i as u32);
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).unwrap();
            assert_eq!(msg.header.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(msg.header.sequence_number, 40 + i as u32);
            let NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)) = msg.payload
            else {
                panic!("not RTM_SETLINK")
            };
            assert_eq!(link.header.index, 7);
            let LinkAttribute::VfInfoList(list) = &link.attributes[0] else {
                panic!("no IFLA_VFINFO_LIST")
            };
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].0, vec![s.to_vf_info(2)], "{s:?}");
            let decoded = vfs_of(&link);
            assert_eq!(decoded.len(), 1);
            match s {
                VfSetting::Vlan { .. } => assert_eq!((decoded[0].vlan, decoded[0].qos), (100, 3)),
                VfSetting::Trust(_) => assert_eq!(decoded[0].trust, Some(true)),
                VfSetting::SpoofCheck(_) => assert_eq!(decoded[0].spoof_check, Some(false)),
                VfSetting::Rate { .. } => {
                    assert_eq!((decoded[0].min_tx_rate, decoded[0].max_tx_rate), (10, 1000))
                }
                VfSetting::LinkState(_) => {
                    assert_eq!(decoded[0].link_state, Some(LinkState::Disable))
                }
                VfSetting::Mac(_) => assert_eq!(
                    (decoded[0].index, decoded[0].mac.as_str()),
                    (2, "52:54:00:aa:00:01")
                ),
            }
        }
        assert_eq!(settings[1].ip_words(), "vlan 100 qos 3");
        assert_eq!(settings[5].ip_words(), "state disable");
    }

    #[test]
    fn this_machines_links_dump_with_no_vfs() {
        let mut nl = VfNetlink::open().unwrap();
        let links = nl.links().unwrap();
        let lo = links
            .iter()
            .find(|l| l.name == "lo")
            .expect("lo is always there");
        assert!(lo.vfs.is_empty());
        assert!(nl.link("no-such-if0").is_err());
    }
}
