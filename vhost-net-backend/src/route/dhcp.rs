//! The DHCPv4 server of a routed segment (RFC 2131): a port with an IPv4 address in the
//! config gets that address (a static binding, whatever MAC it asks for), another port one
//! from the segment's pool, leased per client MAC. Offers the subnet mask, the gateway as
//! router and server, DNS servers, the lease time and the MTU. Slow path: a frame at a time,
//! under a lock of its own.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::DhcpConfig;
use crate::packet::build;
use crate::packet::l3::{Prefix, PROTO_UDP};
use crate::types::{MacAddr, PortId, ETHERTYPE_IPV4, ETH_HLEN};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// The fixed part of a BOOTP message, then the magic cookie (RFC 2131 section 3).
const FIXED: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The smallest BOOTP message some clients accept (RFC 1542 section 3.3: 300 bytes).
const MIN_REPLY: usize = 300;
/// A reply's largest size: fixed part, cookie and our options.
const MAX_REPLY: usize = 576;
/// How long an offered pool address is held for the client that was offered it.
const OFFER_HOLD: Duration = Duration::from_secs(30);

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
const RELEASE: u8 = 7;
const INFORM: u8 = 8;

const OPT_PAD: u8 = 0;
const OPT_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED: u8 = 50;
const OPT_LEASE: u8 = 51;
const OPT_TYPE: u8 = 53;
const OPT_SERVER: u8 = 54;
const OPT_RENEW: u8 = 58;
const OPT_REBIND: u8 = 59;
const OPT_END: u8 = 255;

/// A client's message, as far as the server reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    kind: u8,
    xid: [u8; 4],
    broadcast: bool,
    ciaddr: [u8; 4],
    chaddr: MacAddr,
    requested: Option<[u8; 4]>,
    server: Option<[u8; 4]>,
}

/// Reads a whole untagged frame as a DHCP client message to the server port; None for
/// anything else or anything malformed.
fn parse(frame: &[u8]) -> Option<Request> {
    if frame.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let ip = frame.get(ETH_HLEN..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl + 8 || total > ip.len() {
        return None;
    }
    // A fragment is not a message.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ip[9] != PROTO_UDP {
        return None;
    }
    let udp = &ip[ihl..total];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if u16::from_be_bytes([udp[2], udp[3]]) != SERVER_PORT || udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let m = &udp[8..udp_len];
    // BOOTREQUEST on Ethernet, with the cookie.
    if m.len() < FIXED + 4 || m[0] != 1 || m[1] != 1 || m[2] != 6 || m[FIXED..FIXED + 4] != COOKIE {
        return None;
    }
    let four = |at: usize| -> [u8; 4] { m[at..at + 4].try_into().unwrap_or_default() };
    let mut r = Request {
        kind: 0,
        xid: four(4),
        broadcast: m[10] & 0x80 != 0,
        ciaddr: four(12),
        chaddr: MacAddr(m[28..34].try_into().unwrap_or_default()),
        requested: None,
        server: None,
    };
    let mut opts = &m[FIXED + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            OPT_PAD => {
                opts = rest;
                continue;
            }
            OPT_END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        match (code, value.len()) {
            (OPT_TYPE, 1) => r.kind = value[0],
            (OPT_REQUESTED, 4) => r.requested = value.try_into().ok(),
            (OPT_SERVER, 4) => r.server = value.try_into().ok(),
            _ => {}
        }
        opts = &rest[usize::from(len)..];
    }
    (r.kind != 0).then_some(r)
}

/// One lease of `ctl leases`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub address: Ipv4Addr,
    /// The port of a static binding; None for a pool lease.
    pub port: Option<PortId>,
    /// The client of a pool lease.
    pub mac: Option<MacAddr>,
    /// Seconds left of a pool lease.
    pub expires_in: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    address: u32,
    until: Instant,
    /// Acknowledged, not only offered.
    bound: bool,
}

pub struct DhcpServer {
    gateway: [u8; 4],
    mask: [u8; 4],
    dns: Vec<[u8; 4]>,
    lease_secs: u32,
    mtu: Option<u16>,
    pool: Option<(u32, u32)>,
    /// Static bindings: port, address.
    fixed: RwLock<Vec<(PortId, [u8; 4])>>,
    /// Pool leases by client MAC (at most one per pool address).
    leases: Mutex<HashMap<MacAddr, Lease>>,
}

impl DhcpServer {
    /// The server of a segment whose IPv4 subnet is `subnet` (its gateway's address and
    /// length); `config` was checked.
    pub fn new(subnet: Prefix, config: &DhcpConfig) -> DhcpServer {
        let v4 = |ip: Ipv4Addr| u32::from(ip);
        DhcpServer {
            gateway: (subnet.addr.0 as u32).to_be_bytes(),
            mask: (subnet.mask() as u32).to_be_bytes(),
            dns: config.dns.iter().map(|d| d.octets()).collect(),
            lease_secs: config.lease_secs,
            mtu: config.mtu,
            pool: config
                .pool_range()
                .ok()
                .flatten()
                .map(|(a, b)| (v4(a), v4(b))),
            fixed: RwLock::new(Vec::new()),
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the ports' static addresses (in this segment's subnet) as the bindings.
    pub fn set_fixed(&self, fixed: Vec<(PortId, [u8; 4])>) {
        *self.fixed.write().unwrap_or_else(|e| e.into_inner()) = fixed;
    }

    fn fixed_of(&self, port: PortId) -> Option<[u8; 4]> {
        let fixed = self.fixed.read().unwrap_or_else(|e| e.into_inner());
        fixed.iter().find(|(p, _)| *p == port).map(|(_, a)| *a)
    }

    /// The address for `client` on `port`: its static binding, else its pool lease, else
    /// a free pool address held for it (`hold`): `wanted` if that one is free, else (unless
    /// `only`) the first free one; None when the pool is empty or full.
    fn address_for(
        &self,
        port: PortId,
        client: MacAddr,
        hold: Option<Duration>,
        (wanted, only): (Option<[u8; 4]>, bool),
    ) -> Option<[u8; 4]> {
        if let Some(a) = self.fixed_of(port) {
            return Some(a);
        }
        let (first, last) = self.pool?;
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(l) = leases.get(&client) {
            return Some(l.address.to_be_bytes());
        }
        let hold = hold?;
        let fixed = self.fixed.read().unwrap_or_else(|e| e.into_inner());
        let taken = |a: u32| {
            leases.values().any(|l| l.address == a && l.until > now)
                || fixed.iter().any(|(_, f)| u32::from_be_bytes(*f) == a)
        };
        // The address it asks for, if that one is in the pool and free; with `only`,
        // no other.
        let wanted = wanted
            .map(u32::from_be_bytes)
            .filter(|a| (first..=last).contains(a) && !taken(*a));
        let free = match wanted {
            Some(a) => a,
            None if only => return None,
            None => (first..=last).find(|a| !taken(*a))?,
        };
        drop(fixed);
        leases.retain(|_, l| l.until > now);
        leases.insert(
            client,
            Lease {
                address: free,
                until: now + hold,
                bound: false,
            },
        );
        Some(free.to_be_bytes())
    }

    /// Answers the DHCP message in `frame` (whole, untagged) that came in on `port` from
    /// the guest at `src`: appends the reply to `out`; false if there is none to send.
    pub fn answer(
        &self,
        port: PortId,
        router_mac: MacAddr,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        let Some(r) = parse(frame) else {
            return false;
        };
        if r.server.is_some_and(|s| s != self.gateway) {
            // The client took another server's offer: what we held for it is free again.
            if r.kind == REQUEST {
                self.forget_offer(r.chaddr);
            }
            return false;
        }
        let lease = Duration::from_secs(u64::from(self.lease_secs));
        // An address asked for by name is given only to a client asking for itself (its
        // frame from the MAC the message names): a guest asking in another's name takes
        // any free one, never a chosen one.
        let for_itself = frame.get(6..12) == Some(&r.chaddr.0[..]);
        let wanted = r.requested.filter(|_| for_itself);
        let (kind, yiaddr) = match r.kind {
            DISCOVER => match self.address_for(port, r.chaddr, Some(OFFER_HOLD), (wanted, false)) {
                Some(a) => (OFFER, a),
                None => {
                    log::warn!(
                        "dhcp: no address for {} on port {port}: the pool is full or the \
                         segment has none; give the port an address or widen the pool",
                        r.chaddr
                    );
                    return false;
                }
            },
            REQUEST => {
                let asked = r.requested.unwrap_or(r.ciaddr);
                // A request naming no server (rebooting, renewing, rebinding) from a client
                // the switch has no record of (leases live in memory: it restarted) takes
                // the address it had if that is in the pool and free, as an authoritative
                // server (dnsmasq's) gives it back: a restart does not renumber guests.
                let reclaim = r.server.is_none() && asked != [0; 4] && for_itself;
                let hold = reclaim.then_some(lease);
                match self.address_for(port, r.chaddr, hold, (Some(asked), true)) {
                    Some(a) if a == asked => {
                        self.bind(r.chaddr, lease);
                        (ACK, a)
                    }
                    // Another server's client renewing, or a guest moved to another segment.
                    _ => (NAK, [0; 4]),
                }
            }
            RELEASE => {
                self.forget_offer(r.chaddr);
                let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                leases.remove(&r.chaddr);
                return false;
            }
            INFORM => (ACK, [0; 4]),
            // DECLINE (the address is in use by someone else): the lease is kept, so that
            // the address is not offered again at once. Others have no answer.
            _ => return false,
        };
        let mut m = [0u8; MAX_REPLY];
        m[0] = 2;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&r.xid);
        m[10] = u8::from(r.broadcast) << 7;
        if r.kind == INFORM {
            m[12..16].copy_from_slice(&r.ciaddr);
        }
        m[16..20].copy_from_slice(&yiaddr);
        m[20..24].copy_from_slice(&self.gateway);
        m[28..34].copy_from_slice(&r.chaddr.0);
        m[FIXED..FIXED + 4].copy_from_slice(&COOKIE);
        let mut at = FIXED + 4;
        let mut opt = |code: u8, value: &[u8]| {
            m[at] = code;
            m[at + 1] = value.len() as u8;
            m[at + 2..at + 2 + value.len()].copy_from_slice(value);
            at += 2 + value.len();
        };
        opt(OPT_TYPE, &[kind]);
        opt(OPT_SERVER, &self.gateway);
        if kind != NAK {
            if r.kind != INFORM {
                opt(OPT_LEASE, &self.lease_secs.to_be_bytes());
                opt(OPT_RENEW, &(self.lease_secs / 2).to_be_bytes());
                opt(OPT_REBIND, &(self.lease_secs / 8 * 7).to_be_bytes());
            }
            opt(OPT_MASK, &self.mask);
            opt(OPT_ROUTER, &self.gateway);
            if !self.dns.is_empty() {
                let mut dns = [0u8; 4 * 8];
                let n = self.dns.len().min(8);
                for (i, d) in self.dns.iter().take(n).enumerate() {
                    dns[i * 4..i * 4 + 4].copy_from_slice(d);
                }
                opt(OPT_DNS, &dns[..n * 4]);
            }
            if let Some(mtu) = self.mtu {
                opt(OPT_MTU, &mtu.to_be_bytes());
            }
        }
        m[at] = OPT_END;
        let len = (at + 1).max(MIN_REPLY);
        // RFC 2131 4.1: to the client's address if it has one, broadcast if it asks (or is
        // told no), else to the address offered at its MAC.
        let (dst_mac, dst_ip) = if kind == NAK || r.broadcast {
            ([0xff; 6], [0xff; 4])
        } else if r.ciaddr != [0; 4] {
            (r.chaddr.0, r.ciaddr)
        } else {
            (r.chaddr.0, yiaddr)
        };
        let src = (router_mac.0, self.gateway, SERVER_PORT);
        build::udp4(out, src, (dst_mac, dst_ip, CLIENT_PORT), &m[..len]);
        true
    }

    /// Extends the pool lease of `client`, if it has one, to the full lease time.
    fn bind(&self, client: MacAddr, lease: Duration) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = leases.get_mut(&client) {
            l.until = Instant::now() + lease;
            l.bound = true;
        }
    }

    /// Frees a pool address offered to `client` and not yet acknowledged.
    fn forget_offer(&self, client: MacAddr) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.get(&client).is_some_and(|l| !l.bound) {
            leases.remove(&client);
        }
    }

    /// Static bindings, then live pool leases.
    pub fn rows(&self) -> Vec<LeaseRow> {
        let mut rows: Vec<LeaseRow> = self
            .fixed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, a)| LeaseRow {
                address: Ipv4Addr::from(*a),
                port: Some(*p),
                mac: None,
                expires_in: None,
            })
            .collect();
        let now = Instant::now();
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let mut pool: Vec<LeaseRow> = leases
            .iter()
            .filter(|(_, l)| l.until > now)
            .map(|(mac, l)| LeaseRow {
                address: Ipv4Addr::from(l.address),
                port: None,
                mac: Some(*mac),
                expires_in: Some((l.until - now).as_secs()),
            })
            .collect();
        pool.sort_by_key(|r| r.address);
        rows.extend(pool);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 7]);
    const ROUTER: MacAddr = MacAddr([2, 0x76, 0x6e, 0, 0, 1]);

    /// A client message as udhcpc sends it: `kind`, with the options given.
    fn client(kind: u8, ciaddr: [u8; 4], flags: u16, opts: &[(u8, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; FIXED];
        m[..4].copy_from_slice(&[1, 1, 6, 0]);
        m[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        m[10..12].copy_from_slice(&flags.to_be_bytes());
        m[12..16].copy_from_slice(&ciaddr);
        m[28..34].copy_from_slice(&GUEST.0);
        m.extend_from_slice(&COOKIE);
        m.extend_from_slice(&[OPT_TYPE, 1, kind]);
        for (code, v) in opts {
            m.push(*code);
            m.push(v.len() as u8);
            m.extend_from_slice(v);
        }
        m.push(OPT_END);
        let mut frame = Vec::new();
        let src = if ciaddr == [0; 4] { [0; 4] } else { ciaddr };
        build::udp4(
            &mut frame,
            (GUEST.0, src, CLIENT_PORT),
            ([0xff; 6], [0xff; 4], SERVER_PORT),
            &m,
        );
        frame
    }

    /// A reply, read with no help from the server's code: destination MAC and IP, yiaddr,
    /// and its options by code.
    struct Reply {
        dst_mac: [u8; 6],
        dst_ip: [u8; 4],
        yiaddr: [u8; 4],
        xid: [u8; 4],
        opts: HashMap<u8, Vec<u8>>,
    }

    fn read(frame: &[u8]) -> Reply {
        assert_eq!(&frame[12..14], &[8, 0]);
        let ip = &frame[14..];
        let sum = !checksum(ip[..20].to_vec());
        assert_eq!(sum, 0, "IPv4 header checksum");
        let udp = &ip[20..];
        assert_eq!(&udp[..4], &[0, 67, 0, 68]);
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&udp[4..6]);
        pseudo.extend_from_slice(udp);
        assert_eq!(!checksum(pseudo), 0, "UDP checksum");
        let m = &udp[8..];
        assert!(m.len() >= 300, "a BOOTP reply is at least 300 bytes");
        assert_eq!(m[0], 2, "BOOTREPLY");
        assert_eq!(&m[236..240], &[99, 130, 83, 99]);
        let mut opts = HashMap::new();
        let mut i = 240;
        while m[i] != 255 {
            let (code, len) = (m[i], usize::from(m[i + 1]));
            opts.insert(code, m[i + 2..i + 2 + len].to_vec());
            i += 2 + len;
        }
        Reply {
            dst_mac: frame[..6].try_into().unwrap(),
            dst_ip: ip[16..20].try_into().unwrap(),
            yiaddr: m[16..20].try_into().unwrap(),
            xid: m[4..8].try_into().unwrap(),
            opts,
        }
    }

    fn checksum(mut b: Vec<u8>) -> u16 {
        if b.len() % 2 == 1 {
            b.push(0);
        }
        let mut s: u32 = b
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn server(pool: Option<&str>) -> DhcpServer {
        let config = DhcpConfig {
            pool: pool.map(String::from),
            dns: vec![Ipv4Addr::new(10, 0, 1, 53)],
            lease_secs: 600,
            mtu: Some(9000),
        };
        let s = DhcpServer::new("10.0.1.1/24".parse().unwrap(), &config);
        s.set_fixed(vec![(3, [10, 0, 1, 10])]);
        s
    }

    fn ask(s: &DhcpServer, port: PortId, frame: &[u8]) -> Option<Reply> {
        let mut out = Vec::new();
        s.answer(port, ROUTER, frame, &mut out).then(|| read(&out))
    }

    #[test]
    fn a_port_with_an_address_is_offered_and_given_it_with_every_option() {
        let s = server(None);
        let offer = ask(&s, 3, &client(DISCOVER, [0; 4], 0, &[])).unwrap();
        assert_eq!(offer.yiaddr, [10, 0, 1, 10]);
        assert_eq!(offer.xid, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(offer.dst_mac, GUEST.0, "unicast to the client's MAC");
        assert_eq!(offer.dst_ip, [10, 0, 1, 10]);
        assert_eq!(offer.opts[&OPT_TYPE], [OFFER]);
        assert_eq!(offer.opts[&OPT_SERVER], [10, 0, 1, 1]);
        assert_eq!(offer.opts[&OPT_MASK], [255, 255, 255, 0]);
        assert_eq!(offer.opts[&OPT_ROUTER], [10, 0, 1, 1]);
        assert_eq!(offer.opts[&OPT_DNS], [10, 0, 1, 53]);
        assert_eq!(offer.opts[&OPT_MTU], 9000u16.to_be_bytes());
        assert_eq!(offer.opts[&OPT_LEASE], 600u32.to_be_bytes());
        assert_eq!(offer.opts[&OPT_RENEW], 300u32.to_be_bytes());
        assert_eq!(offer.opts[&OPT_REBIND], 525u32.to_be_bytes());

        let request = client(
            REQUEST,
            [0; 4],
            0x8000,
            &[
                (OPT_REQUESTED, &[10, 0, 1, 10]),
                (OPT_SERVER, &[10, 0, 1, 1]),
            ],
        );
        let ack = ask(&s, 3, &request).unwrap();
        assert_eq!(ack.opts[&OPT_TYPE], [ACK]);
        assert_eq!(ack.yiaddr, [10, 0, 1, 10]);
        assert_eq!(
            ack.dst_mac, [0xff; 6],
            "the broadcast flag asks for a broadcast"
        );
        assert_eq!(ack.dst_ip, [0xff; 4]);

        // Another address, or a renewal from one it does not own: told no.
        let wrong = client(REQUEST, [0; 4], 0, &[(OPT_REQUESTED, &[10, 0, 1, 11])]);
        let nak = ask(&s, 3, &wrong).unwrap();
        assert_eq!(nak.opts[&OPT_TYPE], [NAK]);
        assert_eq!(nak.yiaddr, [0; 4]);
        assert!(!nak.opts.contains_key(&OPT_ROUTER));
        // A renewal, unicast from its address: answered there.
        let renew = ask(&s, 3, &client(REQUEST, [10, 0, 1, 10], 0, &[])).unwrap();
        assert_eq!(
            (renew.opts[&OPT_TYPE][0], renew.dst_ip),
            (ACK, [10, 0, 1, 10])
        );
        // A request for another server's offer is not ours to answer.
        let theirs = client(REQUEST, [0; 4], 0, &[(OPT_SERVER, &[10, 0, 1, 2])]);
        assert!(ask(&s, 3, &theirs).is_none());
    }

    #[test]
    fn pool_leases_are_per_client_held_bounded_and_released() {
        // A port without an address and no pool gets nothing.
        assert!(ask(&server(None), 4, &client(DISCOVER, [0; 4], 0, &[])).is_none());
        let s = server(Some("10.0.1.100-10.0.1.101"));
        let offer = ask(&s, 4, &client(DISCOVER, [0; 4], 0, &[])).unwrap();
        assert_eq!(offer.yiaddr, [10, 0, 1, 100]);
        // Asked again, the same address.
        let again = ask(&s, 4, &client(DISCOVER, [0; 4], 0, &[])).unwrap();
        assert_eq!(again.yiaddr, [10, 0, 1, 100]);
        let req = client(REQUEST, [0; 4], 0, &[(OPT_REQUESTED, &[10, 0, 1, 100])]);
        assert_eq!(ask(&s, 4, &req).unwrap().opts[&OPT_TYPE], [ACK]);
        let rows = s.rows();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[1].mac, Some(GUEST));
        assert!(rows[1].expires_in.unwrap() > 590);
        // Two more clients: one gets the last address, the next nothing.
        let other = |last: u8| {
            let mut f = client(DISCOVER, [0; 4], 0, &[]);
            f[6 + 5] = last; // the source MAC: not read
            let chaddr = 14 + 20 + 8 + 28 + 5;
            f[chaddr] = last;
            f
        };
        assert_eq!(ask(&s, 5, &other(8)).unwrap().yiaddr, [10, 0, 1, 101]);
        assert!(ask(&s, 6, &other(9)).is_none(), "the pool is full");
        // Released, the address goes to the next client.
        let mut release = client(RELEASE, [10, 0, 1, 100], 0, &[]);
        assert!(ask(&s, 4, &release).is_none());
        assert_eq!(ask(&s, 6, &other(9)).unwrap().yiaddr, [10, 0, 1, 100]);
        // Malformed messages are not answered: a bad cookie, a cut option, a reply.
        for (at, byte) in [(14 + 20 + 8 + 236, 0u8), (14 + 20 + 8, 2)] {
            release = client(DISCOVER, [0; 4], 0, &[]);
            release[at] = byte;
            assert!(ask(&s, 4, &release).is_none());
        }
        let mut cut = client(DISCOVER, [0; 4], 0, &[(OPT_REQUESTED, &[1, 2, 3, 4])]);
        let n = cut.len();
        cut.truncate(n - 3);
        assert!(ask(&s, 4, &cut).is_none());
    }

    #[test]
    fn a_client_unknown_since_a_restart_keeps_its_address_if_it_is_free() {
        let s = server(Some("10.0.1.100-10.0.1.110"));
        // From another client: its MAC as the frame's source and in the message.
        let of = |last: u8, mut f: Vec<u8>| {
            f[6 + 5] = last;
            f[14 + 20 + 8 + 28 + 5] = last;
            f
        };
        let rebooting = |a: [u8; 4]| client(REQUEST, [0; 4], 0, &[(OPT_REQUESTED, &a)]);
        // Rebooting (no server named, the address it had): given it back, bound.
        let ack = ask(&s, 4, &rebooting([10, 0, 1, 105])).unwrap();
        assert_eq!(
            (ack.opts[&OPT_TYPE].clone(), ack.yiaddr),
            (vec![ACK], [10, 0, 1, 105])
        );
        assert!(s.rows().iter().any(|r| r.mac == Some(GUEST)));
        // Renewing (its address as ciaddr), another client: the same.
        let renewing = of(9, client(REQUEST, [10, 0, 1, 106], 0, &[]));
        let r = ask(&s, 5, &renewing).unwrap();
        assert_eq!(
            (r.opts[&OPT_TYPE].clone(), r.yiaddr),
            (vec![ACK], [10, 0, 1, 106])
        );
        // Another client's address, one outside the pool, a static binding (outside the
        // pool, and inside it): refused, and nothing held for the client.
        s.set_fixed(vec![(3, [10, 0, 1, 10]), (9, [10, 0, 1, 107])]);
        for a in [
            [10, 0, 1, 105],
            [10, 0, 2, 5],
            [10, 0, 1, 10],
            [10, 0, 1, 107],
        ] {
            let nak = ask(&s, 6, &of(8, rebooting(a))).unwrap();
            assert_eq!(nak.opts[&OPT_TYPE], [NAK], "{a:?}");
        }
        assert_eq!(s.rows().iter().filter(|r| r.mac.is_some()).count(), 2);
        // A discover naming an address it would like: that one, if free.
        let discover = of(
            8,
            client(DISCOVER, [0; 4], 0, &[(OPT_REQUESTED, &[10, 0, 1, 109])]),
        );
        assert_eq!(ask(&s, 6, &discover).unwrap().yiaddr, [10, 0, 1, 109]);
        // In another client's name (its frame from another MAC): no address of its choice.
        let mut in_its_name = of(0x20, rebooting([10, 0, 1, 110]));
        in_its_name[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x21]);
        assert_eq!(ask(&s, 6, &in_its_name).unwrap().opts[&OPT_TYPE], [NAK]);
    }
}
