//! Routing between segments through real vhost-user frontends: the gateway answers ARP,
//! neighbour solicitations and pings; frames sent to it reach a port of another segment
//! with MACs and hop limit rewritten (IPv4 and IPv6, a frame over several buffers); an
//! unknown next hop is asked for; no route and an expired TTL get ICMP errors; the policy
//! holds between routed segments, replies included; `ctl routes` and `ctl neighbours`.

use std::time::Duration;

use etherparse::{Icmpv4Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use integration::{TestSwitch, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;
use vhost_net_backend::{DropReason, SwitchConfig};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

const GW: [u8; 6] = [0x02, 0x76, 0x6e, 0, 0, 1];
const WEB: [u8; 6] = [2, 0, 0, 0, 0, 1];
const APP: [u8; 6] = [2, 0, 0, 0, 0, 2];
const DB: [u8; 6] = [2, 0, 0, 0, 0, 3];
const WEB4: [u8; 4] = [10, 0, 1, 5];
const APP4: [u8; 4] = [10, 0, 2, 7];
const DB4: [u8; 4] = [10, 0, 2, 9];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// web1 in vlan 10, app1 and db1 in vlan 20; db1's address is not configured (learned).
const TOPOLOGY: &str = r#"
[[port]]
name = "web1"
socket = "/unused/web1"
vlan = 10
mac = "02:00:00:00:00:01"
addresses = ["10.0.1.5", "fd00:1::5"]
groups = ["web"]

[[port]]
name = "app1"
socket = "/unused/app1"
vlan = 20
mac = "02:00:00:00:00:02"
addresses = ["10.0.2.7", "fd00:2::7"]
groups = ["app"]

[[port]]
name = "db1"
socket = "/unused/db1"
vlan = 20
groups = ["db"]

[[segment]]
name = "front"
vlan = 10
gateway = ["10.0.1.1/24", "fd00:1::1/64"]

[[segment]]
name = "back"
vlan = 20
gateway = ["10.0.2.1/24", "fd00:2::1/64"]
"#;

fn switch(extra: &str) -> TestSwitch {
    let c = SwitchConfig::from_toml(&format!("{TOPOLOGY}{extra}")).expect("config parses");
    TestSwitch::start_config(c)
}

fn send(d: &mut VirtioNetDevice, frame: &[u8]) {
    d.send(0, &NetHdr::default(), frame).unwrap();
}

#[track_caller]
fn receive(d: &mut VirtioNetDevice, what: &str) -> Vec<u8> {
    d.recv(0, WAIT)
        .unwrap_or_else(|| panic!("{what}: nothing arrived"))
        .frame
}

#[track_caller]
fn nothing(d: &mut VirtioNetDevice, what: &str) {
    if let Some(f) = d.recv(0, QUIET) {
        panic!("{what}: a frame of {} bytes arrived", f.frame.len());
    }
}

fn udp4(
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    dport: u16,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, GW)
        .ipv4(src, dst, ttl)
        .udp(40000, dport)
        .write(&mut f, &(0..payload).map(|i| i as u8).collect::<Vec<_>>())
        .unwrap();
    f
}

fn udp6(src_mac: [u8; 6], src: [u8; 16], dst: [u8; 16], hops: u8) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, GW)
        .ipv6(src, dst, hops)
        .udp(40000, 2000)
        .write(&mut f, &[5; 64])
        .unwrap();
    f
}

fn arp_request(from_mac: [u8; 6], from_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&from_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&from_mac);
    f.extend_from_slice(&from_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// `routed` is `sent` after one hop: to `dst_mac` from the gateway, hop limit one less,
/// valid IPv4 header checksum, everything else as sent.
#[track_caller]
fn assert_routed(sent: &[u8], routed: &[u8], dst_mac: [u8; 6]) {
    assert_eq!(routed.len(), sent.len(), "length changed");
    assert_eq!(&routed[..6], &dst_mac, "destination MAC");
    assert_eq!(&routed[6..12], &GW, "source MAC");
    let p = SlicedPacket::from_ethernet(routed).expect("routed frame parses");
    match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(h.ttl(), sent[14 + 8] - 1, "TTL");
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
            assert_eq!(&routed[14 + 12..], &sent[14 + 12..], "rest of the packet");
        }
        Some(NetSlice::Ipv6(ip)) => {
            assert_eq!(ip.header().hop_limit(), sent[14 + 7] - 1, "hop limit");
            assert_eq!(&routed[14 + 8..], &sent[14 + 8..], "rest of the packet");
        }
        _ => panic!("not IP"),
    }
}

#[test]
fn the_switch_routes_between_segments_and_answers_for_its_gateways() {
    let sw = switch("");
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));

    // ARP for the gateway: answered by the switch, not flooded.
    send(&mut web, &arp_request(WEB, WEB4, [10, 0, 1, 1]));
    let reply = receive(&mut web, "ARP reply");
    let arp = etherparse::ArpPacketSlice::from_slice(&reply[14..]).unwrap();
    assert_eq!(arp.operation(), etherparse::ArpOperation::REPLY);
    assert_eq!(
        (arp.sender_hw_addr(), arp.sender_protocol_addr()),
        (&GW[..], &[10, 0, 1, 1][..])
    );
    // The gateway answers pings.
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(WEB, GW)
        .ipv4(WEB4, [10, 0, 1, 1], 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut ping, &[9; 56])
        .unwrap();
    send(&mut web, &ping);
    let pong = receive(&mut web, "echo reply from the gateway");
    let p = SlicedPacket::from_ethernet(&pong).unwrap();
    let Some(TransportSlice::Icmpv4(i)) = &p.transport else {
        panic!("not ICMP")
    };
    assert!(matches!(i.icmp_type(), Icmpv4Type::EchoReply(_)));
    assert_eq!(i.payload(), &[9; 56][..]);

    // web1 -> app1 (configured bindings) both ways, IPv4 and IPv6.
    let f = udp4(WEB, WEB4, APP4, 64, 2000, 100);
    send(&mut web, &f);
    assert_routed(&f, &receive(&mut app, "web -> app"), APP);
    let f = udp4(APP, APP4, WEB4, 17, 2000, 30);
    send(&mut app, &f);
    assert_routed(&f, &receive(&mut web, "app -> web"), WEB);
    let f = udp6(WEB, v6("fd00:1::5"), v6("fd00:2::7"), 64);
    send(&mut web, &f);
    assert_routed(&f, &receive(&mut app, "web -> app (IPv6)"), APP);
    // A jumbo frame over several TX buffers: the rewritten head, the rest from guest memory.
    let big = udp4(WEB, WEB4, APP4, 64, 2000, 3000);
    let h = NetHdr::default().to_bytes();
    web.send_pieces(
        0,
        &[
            &h[..web.hdr_len()],
            &big[..60],
            &big[60..1000],
            &big[1000..],
        ],
        false,
    )
    .unwrap();
    assert_routed(&big, &receive(&mut app, "jumbo web -> app"), APP);
    nothing(&mut db, "db1 saw routed unicast");

    // db1's address is unknown: the switch asks for it in vlan 20 and drops the frame.
    let f = udp4(WEB, WEB4, DB4, 64, 5432, 20);
    send(&mut web, &f);
    let question = receive(&mut db, "ARP request from the gateway");
    let arp = etherparse::ArpPacketSlice::from_slice(&question[14..]).unwrap();
    assert_eq!(arp.operation(), etherparse::ArpOperation::REQUEST);
    assert_eq!(arp.target_protocol_addr(), &DB4[..]);
    assert_eq!(arp.sender_protocol_addr(), &[10, 0, 2, 1][..]);
    let _ = receive(&mut app, "the question is flooded in vlan 20");
    nothing(&mut web, "the question stays in vlan 20");
    assert_eq!(sw.counters("web1").drop_count(DropReason::NoNeighbour), 1);
    // db1 answers; the next frame is routed to it.
    let mut answer = GW.to_vec();
    answer.extend_from_slice(&DB);
    answer.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    answer.extend_from_slice(&DB);
    answer.extend_from_slice(&DB4);
    answer.extend_from_slice(&GW);
    answer.extend_from_slice(&[10, 0, 2, 1]);
    send(&mut db, &answer);
    std::thread::sleep(Duration::from_millis(100));
    send(&mut web, &f);
    assert_routed(&f, &receive(&mut db, "web -> db after ARP"), DB);
    let n = sw.server().command("neighbours");
    assert!(n.contains("\"10.0.2.9\"") && n.contains("learned"), "{n}");
    assert!(n.contains("\"10.0.1.5\"") && n.contains("config"), "{n}");

    // TTL 1: ICMP time exceeded from the gateway; no route: destination unreachable.
    send(&mut web, &udp4(WEB, WEB4, APP4, 1, 2000, 10));
    let e = receive(&mut web, "time exceeded");
    assert_eq!((e[14 + 9], e[14 + 20]), (1, 11), "ICMP time exceeded");
    assert_eq!(&e[14 + 12..14 + 16], &[10, 0, 1, 1]);
    send(&mut web, &udp4(WEB, WEB4, [172, 16, 0, 1], 64, 2000, 10));
    let e = receive(&mut web, "unreachable");
    assert_eq!((e[14 + 9], e[14 + 20]), (1, 3), "ICMP unreachable");
    nothing(&mut app, "errors are not forwarded");
    let c = sw.counters("web1");
    assert_eq!(
        (
            c.drop_count(DropReason::HopLimit),
            c.drop_count(DropReason::NoRoute)
        ),
        (1, 1)
    );
    let routes = sw.server().command("routes");
    assert!(
        routes.contains("10.0.1.1/24") && routes.contains("fd00:2::1/64"),
        "{routes}"
    );
    // Per route, what it forwarded: into front app -> web (72 bytes); into back web -> app
    // over IPv4 (142) and IPv6 (126), the jumbo frame (3042) and web -> db (62). Frames
    // refused (TTL, no route, no neighbour yet) are not counted.
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    let counted = |i: usize| {
        (
            v["segments"][i]["packets"].clone(),
            v["segments"][i]["bytes"].clone(),
        )
    };
    assert_eq!(counted(0), (1.into(), 72.into()), "{routes}");
    assert_eq!(counted(1), (4.into(), 3372.into()), "{routes}");
    let page = vhost_net_backend::metrics::render(sw.server().datapath());
    assert!(
        page.contains("vnet_route_packets_total{route=\"segment back\"} 4"),
        "{page}"
    );
}

/// web may send UDP to app's port 2000.
const WEB_TO_APP_UDP: &str = r#"
[[rule]]
action = "allow"
from = "web"
to = "app"
proto = "udp"
ports = 2000
"#;

/// The packets the routes forwarded, summed over the segments (`ctl routes`).
fn routed_packets(sw: &TestSwitch) -> u64 {
    let routes = sw.server().command("routes");
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    v["segments"]
        .as_array()
        .unwrap_or_else(|| panic!("{routes}"))
        .iter()
        .map(|s| s["packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn the_policy_holds_between_routed_segments_with_replies_back() {
    let sw = switch(WEB_TO_APP_UDP);
    let (mut web, mut app) = (sw.attach("web1"), sw.attach("app1"));
    let f = udp4(WEB, WEB4, APP4, 64, 2000, 30);
    send(&mut web, &f);
    assert_routed(&f, &receive(&mut app, "allowed web -> app"), APP);
    // The reply, from the other segment, belongs to the same connection.
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(APP, GW)
        .ipv4(APP4, WEB4, 64)
        .udp(2000, 40000)
        .write(&mut reply, &[1; 10])
        .unwrap();
    send(&mut app, &reply);
    assert_routed(&reply, &receive(&mut web, "reply app -> web"), WEB);
    // Another port, or app starting a flow of its own: denied.
    send(&mut web, &udp4(WEB, WEB4, APP4, 64, 2001, 30));
    nothing(&mut app, "web -> app udp/2001");
    send(&mut app, &udp4(APP, APP4, WEB4, 64, 2000, 30));
    nothing(&mut web, "app -> web new flow");
    assert_eq!(sw.counters("web1").drop_count(DropReason::PolicyDenied), 1);
    assert_eq!(sw.counters("app1").drop_count(DropReason::PolicyDenied), 1);
    // The routes counted what they forwarded: the two frames allowed, not the two denied.
    assert_eq!(routed_packets(&sw), 2);
    // A spoofed source is never routed.
    send(&mut web, &udp4(WEB, [10, 0, 1, 99], APP4, 64, 2000, 30));
    nothing(&mut app, "spoofed web -> app");
    assert_eq!(sw.counters("web1").drop_count(DropReason::SpoofedIp), 1);
}

/// A guest's driver publishes frames in batches, and the switch decides a batch's run of
/// one flow once: each frame that differs in what a decision reads (hop limit, source,
/// ports) is still decided for itself, and every frame is counted.
#[test]
fn frames_of_one_flow_in_one_burst_are_each_checked_and_counted() {
    let sw = switch(&format!(
        "{WEB_TO_APP_UDP}
[[rule]]
action = \"allow\"
from = \"web\"
to = \"app\"
proto = \"tcp\"
ports = 80
"
    ));
    let (mut web, mut app) = (sw.attach("web1"), sw.attach("app1"));
    let f = udp4(WEB, WEB4, APP4, 64, 2000, 30);
    let other_payload = udp4(WEB, WEB4, APP4, 64, 2000, 31);
    let ttl1 = udp4(WEB, WEB4, APP4, 1, 2000, 30);
    let spoofed = udp4(WEB, [10, 0, 1, 99], APP4, 64, 2000, 30);
    let denied = udp4(WEB, WEB4, APP4, 64, 2001, 30);
    let burst: [&[u8]; 8] = [&f, &f, &ttl1, &f, &spoofed, &f, &denied, &other_payload];
    web.send_burst(0, &burst).unwrap();
    for (n, sent) in [&f, &f, &f, &f, &other_payload].into_iter().enumerate() {
        assert_routed(sent, &receive(&mut app, &format!("allowed frame {n}")), APP);
    }
    nothing(&mut app, "the TTL 1, spoofed and denied frames");
    let e = receive(&mut web, "time exceeded");
    assert_eq!((e[14 + 9], e[14 + 20]), (1, 11), "ICMP time exceeded");
    assert_eq!(sw.counters("web1").drop_count(DropReason::SpoofedIp), 1);
    assert_eq!(sw.counters("web1").drop_count(DropReason::PolicyDenied), 1);
    assert_eq!(routed_packets(&sw), 5);
    let flows: serde_json::Value = serde_json::from_str(&sw.server().command("flows")).unwrap();
    let packets: Vec<u64> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["packets"].as_u64().unwrap())
        .collect();
    assert_eq!(
        packets,
        [5],
        "one flow, every allowed frame counted: {flows}"
    );

    // Two flows interleaved, one allowed and one denied, and another family between:
    // each frame decided as its own flow is, whatever came before it.
    let ipv6 = udp6(WEB, v6("fd00:1::5"), v6("fd00:2::7"), 64);
    let interleaved: [&[u8]; 7] = [&f, &denied, &f, &denied, &ipv6, &f, &f];
    web.send_burst(0, &interleaved).unwrap();
    for (n, sent) in [&f, &f, &ipv6, &f, &f].into_iter().enumerate() {
        assert_routed(
            sent,
            &receive(&mut app, &format!("interleaved frame {n}")),
            APP,
        );
    }
    nothing(&mut app, "the denied flow's frames");
    assert_eq!(sw.counters("web1").drop_count(DropReason::PolicyDenied), 3);
    assert_eq!(routed_packets(&sw), 10);

    // TCP: a burst of data that ends with a FIN takes the connection's state along.
    let tcp = |from: [u8; 6], src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: &str| {
        let b = PacketBuilder::ethernet2(from, GW).ipv4(src, dst, 64);
        let mut t = b.tcp(ports.0, ports.1, 1, 1000);
        for c in flags.chars() {
            t = match c {
                'S' => t.syn(),
                'A' => t.ack(1),
                'F' => t.fin(),
                'P' => t.psh(),
                _ => unreachable!(),
            };
        }
        let mut f = Vec::new();
        t.write(&mut f, &[7; 20]).unwrap();
        f
    };
    let out = |flags| tcp(WEB, WEB4, APP4, (40001, 80), flags);
    send(&mut web, &out("S"));
    receive(&mut app, "SYN");
    send(&mut app, &tcp(APP, APP4, WEB4, (80, 40001), "SA"));
    receive(&mut web, "SYN ACK");
    let (ack, data, fin) = (out("A"), out("AP"), out("AF"));
    web.send_burst(0, &[&ack, &data, &data, &data, &fin, &ack])
        .unwrap();
    for n in 0..6 {
        receive(&mut app, &format!("TCP frame {n} of the burst"));
    }
    let flows: serde_json::Value =
        serde_json::from_str(&sw.server().command("flows proto=tcp")).unwrap();
    let flow = &flows["flows"][0];
    assert_eq!(flow["packets"], 7, "{flows}");
    assert_eq!(flow["packets_back"], 1, "{flows}");
    assert_eq!(flow["state"], "fin_wait", "{flows}");
}

/// The options of a neighbour discovery message after its fixed part: type and body.
fn nd_options(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 8 {
        let len = usize::from(b[1]) * 8;
        assert!(len >= 8 && len <= b.len(), "bad option length in {b:?}");
        out.push((b[0], b[2..len].to_vec()));
        b = &b[len..];
    }
    assert!(b.is_empty(), "{} bytes after the options", b.len());
    out
}

/// `frame`'s ICMPv6 message.
#[track_caller]
fn icmpv6(frame: &[u8]) -> etherparse::Icmpv6Slice<'_> {
    match SlicedPacket::from_ethernet(frame)
        .expect("parses")
        .transport
    {
        Some(TransportSlice::Icmpv6(i)) => i,
        other => panic!("not ICMPv6: {other:?}"),
    }
}

/// The all-nodes group's MAC and address.
const ALL_NODES: ([u8; 6], [u8; 16]) = (
    [0x33, 0x33, 0, 0, 0, 1],
    [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
);

/// The router's link-local address (modified EUI-64 of its MAC).
const GW_LL: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x76, 0x6e, 0xff, 0xfe, 0, 0, 1,
];

/// Checks `frame` is the router's advertisement of `prefix`/64 to `to_mac`/`to_ip`.
#[track_caller]
fn assert_advert(frame: &[u8], to: ([u8; 6], [u8; 16]), prefix: &str, mtu: Option<u32>, life: u16) {
    use etherparse::Icmpv6Type;
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::LinkSlice::Ethernet2(e)) = &p.link else {
        panic!("not Ethernet")
    };
    assert_eq!((e.destination(), e.source()), (to.0, GW));
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6")
    };
    let h = ip.header();
    assert_eq!(
        (h.source(), h.destination(), h.hop_limit()),
        (GW_LL, to.1, 255)
    );
    let i = icmpv6(frame);
    assert!(i.is_checksum_valid(GW_LL, to.1), "ICMPv6 checksum");
    let Icmpv6Type::RouterAdvertisement(ra) = i.icmp_type() else {
        panic!("not a router advertisement: {:?}", i.icmp_type())
    };
    assert_eq!(
        (
            ra.cur_hop_limit,
            ra.managed_address_config,
            ra.other_config,
            ra.router_lifetime
        ),
        (64, false, false, life)
    );
    // After reachable time and retransmission timer (8 bytes): the options.
    let opts = nd_options(&i.payload()[8..]);
    assert!(
        opts.contains(&(1, GW.to_vec())),
        "source link-layer address: {opts:?}"
    );
    let mut info = vec![64, 0xc0];
    info.extend_from_slice(&2_592_000u32.to_be_bytes());
    info.extend_from_slice(&604_800u32.to_be_bytes());
    info.extend_from_slice(&[0; 4]);
    info.extend_from_slice(&v6(prefix));
    assert!(
        opts.contains(&(3, info)),
        "prefix {prefix}/64, on-link, SLAAC: {opts:?}"
    );
    let mtus: Vec<&Vec<u8>> = opts
        .iter()
        .filter(|(t, _)| *t == 5)
        .map(|(_, b)| b)
        .collect();
    match mtu {
        Some(m) => {
            let mut body = vec![0, 0];
            body.extend_from_slice(&m.to_be_bytes());
            assert_eq!(mtus, [&body], "MTU option");
        }
        None => assert!(mtus.is_empty(), "{opts:?}"),
    }
}

#[test]
fn the_switch_advertises_itself_as_the_ipv6_router_of_its_segments() {
    use etherparse::Icmpv6Type;
    // back advertises every 4 s and gives its guests an MTU; front at the default 200 s.
    let sw = switch("ra_interval_secs = 4\ndhcp = { mtu = 4000 }\n");
    let (mut web, mut app) = (sw.attach("web1"), sw.attach("app1"));
    let started = std::time::Instant::now();

    // A solicitation from web1's link-local address: answered to it at once, not flooded.
    let web_ll = v6("fe80::1");
    let mut rs = Vec::new();
    PacketBuilder::ethernet2(WEB, [0x33, 0x33, 0, 0, 0, 2])
        .ipv6(web_ll, v6("ff02::2"), 255)
        .icmpv6(Icmpv6Type::RouterSolicitation)
        .write(&mut rs, &[1, 1, 2, 0, 0, 0, 0, 1])
        .unwrap();
    send(&mut web, &rs);
    let ra = receive(&mut web, "advertisement for web1's solicitation");
    assert_advert(&ra, (WEB, web_ll), "fd00:1::", None, 600);
    // From a host with no address yet (::): to all nodes.
    let mut rs = Vec::new();
    PacketBuilder::ethernet2(WEB, [0x33, 0x33, 0, 0, 0, 2])
        .ipv6([0; 16], v6("ff02::2"), 255)
        .icmpv6(Icmpv6Type::RouterSolicitation)
        .write(&mut rs, &[])
        .unwrap();
    send(&mut web, &rs);
    let ra = receive(&mut web, "advertisement for a solicitation from ::");
    assert_advert(&ra, ALL_NODES, "fd00:1::", None, 600);
    nothing(&mut app, "front's advertisements in back");

    // Hosts route through the router's link-local address: it is resolved to its MAC.
    let mut ns = Vec::new();
    let mut body = GW_LL.to_vec();
    body.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 2]);
    PacketBuilder::ethernet2(APP, [0x33, 0x33, 0xff, 0, 0, 1])
        .ipv6(v6("fe80::2"), v6("ff02::1:ff00:1"), 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut ns, &body)
        .unwrap();
    send(&mut app, &ns);
    let na = receive(&mut app, "advertisement of the link-local address");
    let i = icmpv6(&na);
    assert!(matches!(
        i.icmp_type(),
        Icmpv6Type::NeighborAdvertisement(_)
    ));
    assert!(i.is_checksum_valid(GW_LL, v6("fe80::2")));
    assert_eq!(&i.payload()[..16], &GW_LL);
    assert_eq!(nd_options(&i.payload()[16..]), [(2, GW.to_vec())]);
    // And answers pings.
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(APP, GW)
        .ipv6(v6("fe80::2"), GW_LL, 64)
        .icmpv6_echo_request(9, 1)
        .write(&mut ping, &[7; 32])
        .unwrap();
    send(&mut app, &ping);
    let pong = receive(&mut app, "echo reply from the link-local address");
    let i = icmpv6(&pong);
    assert!(matches!(i.icmp_type(), Icmpv6Type::EchoReply(_)));
    assert!(i.is_checksum_valid(GW_LL, v6("fe80::2")));

    // Unsolicited: back's, to all nodes, within its interval of the start (and its MTU);
    // none in front meanwhile.
    let mut since = started;
    for what in ["back's periodic advertisement", "back's next advertisement"] {
        let ra = app.recv(0, Duration::from_secs(6)).expect(what).frame;
        let waited = since.elapsed();
        assert!(waited >= Duration::from_secs(3), "{what} after {waited:?}");
        since = std::time::Instant::now();
        assert_advert(&ra, ALL_NODES, "fd00:2::", Some(4000), 12);
    }
    nothing(&mut web, "back's advertisements in front");
}

/// A DHCP client message from `mac` (udhcpc's layout), broadcast; `opts` after the type.
fn dhcp_client(mac: [u8; 6], kind: u8, opts: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[..4].copy_from_slice(&[1, 1, 6, 0]);
    m[4..8].copy_from_slice(&[1, 2, 3, 4]);
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind]);
    m.extend_from_slice(opts);
    m.push(255);
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67)
        .write(&mut f, &m)
        .unwrap();
    f
}

/// A DHCP reply read field by field: (yiaddr, options by code), after checking the UDP
/// checksum and that it comes from the gateway.
#[track_caller]
fn dhcp_reply(frame: &[u8], to: [u8; 6]) -> ([u8; 4], std::collections::HashMap<u8, Vec<u8>>) {
    assert_eq!(&frame[..6], &to, "to the client's MAC");
    assert_eq!(&frame[6..12], &GW, "from the gateway's MAC");
    let p = SlicedPacket::from_ethernet(frame).expect("reply parses");
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (&p.net, &p.transport) else {
        panic!("not UDP over IPv4")
    };
    let h = ip.header();
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    assert_eq!(h.source(), [10, 0, 2, 1], "from the gateway's address");
    assert_eq!((udp.source_port(), udp.destination_port()), (67, 68));
    let want = udp
        .to_header()
        .calc_checksum_ipv4(&h.to_header(), udp.payload())
        .unwrap();
    assert_eq!(udp.checksum(), want, "UDP checksum");
    let m = udp.payload();
    assert!(m.len() >= 300);
    assert_eq!(
        (m[0], &m[4..8], &m[28..34]),
        (2, &[1, 2, 3, 4][..], &to[..])
    );
    assert_eq!(&m[236..240], &[99, 130, 83, 99]);
    let mut opts = std::collections::HashMap::new();
    let mut i = 240;
    while m[i] != 255 {
        opts.insert(m[i], m[i + 2..i + 2 + usize::from(m[i + 1])].to_vec());
        i += 2 + usize::from(m[i + 1]);
    }
    (m[16..20].try_into().unwrap(), opts)
}

#[test]
fn the_switch_serves_dhcp_static_bindings_and_a_pool_under_a_default_deny_policy() {
    let topology = TOPOLOGY.replace(
        "gateway = [\"10.0.2.1/24\", \"fd00:2::1/64\"]\n",
        "gateway = [\"10.0.2.1/24\", \"fd00:2::1/64\"]\n\
         dhcp = { pool = \"10.0.2.100-10.0.2.109\", dns = [\"10.0.2.53\"], mtu = 9000, lease_secs = 900 }\n",
    );
    let c = SwitchConfig::from_toml(&format!("{topology}[policy]\ndefault = \"deny\"\n")).unwrap();
    let sw = TestSwitch::start_config(c);
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));

    // app1 has 10.0.2.7 in the config: offered that, with every option, the discover split
    // over three buffers (the server reads the whole frame, not only its head).
    let discover = dhcp_client(APP, 1, &[55, 3, 1, 3, 26]);
    let h = NetHdr::default().to_bytes();
    app.send_pieces(
        0,
        &[
            &h[..app.hdr_len()],
            &discover[..40],
            &discover[40..290],
            &discover[290..],
        ],
        false,
    )
    .unwrap();
    let (yiaddr, opts) = dhcp_reply(&receive(&mut app, "offer"), APP);
    assert_eq!(yiaddr, APP4);
    assert_eq!(opts[&53], [2], "OFFER");
    assert_eq!(opts[&54], [10, 0, 2, 1], "server id");
    assert_eq!(opts[&1], [255, 255, 255, 0], "mask");
    assert_eq!(opts[&3], [10, 0, 2, 1], "router");
    assert_eq!(opts[&6], [10, 0, 2, 53], "dns");
    assert_eq!(opts[&26], 9000u16.to_be_bytes(), "mtu");
    assert_eq!(opts[&51], 900u32.to_be_bytes(), "lease");
    // The broadcast stopped at the switch: db1 in the same segment saw nothing.
    nothing(&mut db, "the discover is not flooded");
    let request = dhcp_client(APP, 3, &[50, 4, 10, 0, 2, 7, 54, 4, 10, 0, 2, 1]);
    send(&mut app, &request);
    let (yiaddr, opts) = dhcp_reply(&receive(&mut app, "ack"), APP);
    assert_eq!((yiaddr, opts[&53].as_slice()), (APP4, &[5][..]));

    // db1 has no address: one from the pool, and the same one when it asks again.
    send(&mut db, &dhcp_client(DB, 1, &[]));
    let (pooled, _) = dhcp_reply(&receive(&mut db, "offer from the pool"), DB);
    assert_eq!(pooled, [10, 0, 2, 100]);
    send(&mut db, &dhcp_client(DB, 3, &[50, 4, 10, 0, 2, 100]));
    let (acked, opts) = dhcp_reply(&receive(&mut db, "ack from the pool"), DB);
    assert_eq!((acked, opts[&53].as_slice()), (pooled, &[5][..]));
    // Asking for what is not its own: NAK, broadcast.
    send(&mut db, &dhcp_client(DB, 3, &[50, 4, 10, 0, 2, 7]));
    let nak = receive(&mut db, "nak");
    assert_eq!(&nak[..6], &[0xff; 6]);
    assert_eq!(nak[14 + 20 + 8 + 242], 6, "NAK");

    let leases: serde_json::Value = serde_json::from_str(&sw.server().command("leases")).unwrap();
    let rows = leases["leases"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["address"] == "10.0.2.7" && r["port"] == "app1"),
        "{leases}"
    );
    assert!(
        rows.iter().any(|r| r["address"] == "10.0.2.100"
            && r["mac"] == "02:00:00:00:00:03"
            && r["kind"] == "pool"),
        "{leases}"
    );

    // web1's segment has no DHCP server: its discover is switched as any broadcast (and
    // answered by nobody here).
    send(&mut web, &dhcp_client(WEB, 1, &[]));
    nothing(&mut web, "no server in vlan 10");
}
