//! Frontend tests: the real backend, in-process, driven over real vhost-user sockets with
//! shared memfd memory by the integration crate's virtio-net driver.

use std::time::Duration;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use integration::frames::{as_partial_tcp, mac, tcp_frame, udp_frame, BROADCAST};
use integration::frontend::{
    ALL_FEATURES, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, PLAIN_FEATURES,
};
use integration::testbed::TestPort;
use integration::{DeviceOptions, RawDesc, RawNext, TestSwitch, VirtioNetDevice};
use vhost_net_backend::virtio::{features as f, NetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM};
use vhost_net_backend::DropReason;

const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for a frame that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

fn plain() -> NetHdr {
    NetHdr::default()
}

fn device(sw: &TestSwitch, port: &str, opts: DeviceOptions) -> VirtioNetDevice {
    let mut d = sw.connect(port, opts).expect("frontend connects");
    d.post_rx(0, 64).unwrap();
    d
}

fn opts(features: u64) -> DeviceOptions {
    DeviceOptions {
        features,
        ..Default::default()
    }
}

/// A receiver with 64 KiB buffers and no mergeable RX, as Linux posts with GUEST_TSO.
fn big_buffers() -> DeviceOptions {
    DeviceOptions {
        features: ALL_FEATURES & !f::MRG_RXBUF,
        rx_buf_size: 65562,
        ..Default::default()
    }
}

fn ports(names: &[&'static str]) -> Vec<TestPort> {
    names.iter().map(|n| TestPort::new(n)).collect()
}

#[test]
fn learns_floods_and_forwards_unicast_across_three_ports() {
    let sw = TestSwitch::start(ports(&["a", "b", "c"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut c = device(&sw, "c", DeviceOptions::default());

    // Unknown destination: flooded to b and c, never back to a.
    let f1 = udp_frame(mac(1), mac(2), 200);
    a.send(0, &plain(), &f1).unwrap();
    assert_eq!(b.recv(0, WAIT).expect("b gets the flood").frame, f1);
    assert_eq!(c.recv(0, WAIT).expect("c gets the flood").frame, f1);
    assert!(a.recv(0, QUIET).is_none(), "no hairpin back to the sender");

    // b answers: a's MAC was learned, so only a receives it.
    let f2 = udp_frame(mac(2), mac(1), 300);
    b.send(0, &plain(), &f2).unwrap();
    assert_eq!(a.recv(0, WAIT).expect("a gets the reply").frame, f2);
    assert!(c.recv(0, QUIET).is_none(), "c must not see learned unicast");

    // Now both are known: a -> b is unicast.
    let f3 = udp_frame(mac(1), mac(2), 400);
    a.send(0, &plain(), &f3).unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame, f3);
    assert!(c.recv(0, QUIET).is_none());

    // Broadcast reaches everybody else.
    let f4 = udp_frame(mac(3), BROADCAST, 100);
    c.send(0, &plain(), &f4).unwrap();
    assert_eq!(a.recv(0, WAIT).unwrap().frame, f4);
    assert_eq!(b.recv(0, WAIT).unwrap().frame, f4);

    let ca = sw.counters("a");
    assert_eq!(ca.tx_packets, 2);
    assert_eq!(ca.rx_packets, 2);
    assert_eq!(sw.counters("b").rx_bytes, (200 + 400 + 100) as u64);

    // ctl: the MAC table as learned, the ports as attached; a flush makes a -> b flood
    // again until b is heard from.
    let ctl = |line: &str| -> serde_json::Value {
        serde_json::from_str(&sw.server().command(line)).unwrap()
    };
    let macs = ctl("macs");
    let rows: Vec<(String, String)> = macs["macs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["mac"].as_str().unwrap().into(),
                r["port"].as_str().unwrap().into(),
            )
        })
        .collect();
    let m = |n: u8| vhost_net_backend::config::MacAddr(mac(n)).to_string();
    assert_eq!(
        rows,
        vec![(m(1), "a".into()), (m(2), "b".into()), (m(3), "c".into())],
        "{macs}"
    );
    assert_eq!(ctl("macs port=b")["macs"].as_array().unwrap().len(), 1);
    let ports = ctl("ports");
    let pa = &ports["ports"][0];
    assert_eq!(
        (pa["name"].as_str(), pa["kind"].as_str()),
        (Some("a"), Some("vm"))
    );
    assert_eq!(pa["connected"], true);
    assert_eq!(pa["macs_learned"], 1);
    assert!(
        pa["features"].as_str().is_some_and(|f| f.starts_with("0x")),
        "{ports}"
    );
    assert_eq!(ctl("mac-flush port=b")["flushed"], 1);
    a.send(0, &plain(), &f3).unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame, f3);
    assert_eq!(c.recv(0, WAIT).expect("flooded after the flush").frame, f3);
    assert!(ctl("macs port=nobody")["error"]
        .as_str()
        .unwrap()
        .contains("no port named"));
}

#[test]
fn vlans_isolate_segments() {
    let sw = TestSwitch::start(
        vec![
            TestPort::new("a").vlan(10),
            TestPort::new("b").vlan(10),
            TestPort::new("c").vlan(20),
        ],
        None,
    );
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut c = device(&sw, "c", DeviceOptions::default());

    let bc = udp_frame(mac(1), BROADCAST, 120);
    a.send(0, &plain(), &bc).unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame, bc);
    assert!(c.recv(0, QUIET).is_none(), "VLAN 20 must not see VLAN 10");

    // c learns nothing from VLAN 10, and its frames to a's MAC go nowhere.
    c.send(0, &plain(), &udp_frame(mac(3), mac(1), 120))
        .unwrap();
    assert!(a.recv(0, QUIET).is_none());
    assert!(b.recv(0, Duration::from_millis(50)).is_none());

    // A tagged frame from an access port is dropped: it could hop segments.
    let mut tagged = udp_frame(mac(1), BROADCAST, 120);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 20]);
    a.send(0, &plain(), &tagged).unwrap();
    assert!(c.recv(0, QUIET).is_none());
    assert!(b.recv(0, Duration::from_millis(50)).is_none());
    assert_eq!(sw.counters("a").drop_count(DropReason::VlanMismatch), 1);
}

#[test]
fn jumbo_frames_pass_by_default_and_oversize_is_dropped() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    // Non-mergeable receiver with big buffers, as Linux posts with GUEST_TSO and no MRG_RXBUF.
    let mut b = device(&sw, "b", big_buffers());
    let jumbo = udp_frame(mac(1), mac(2), 9014);
    a.send(0, &plain(), &jumbo).unwrap();
    let got = b.recv(0, WAIT).expect("9000-byte MTU frame arrives");
    assert_eq!(got.frame, jumbo);
    assert_eq!(got.buffers, 1);

    a.send(0, &plain(), &udp_frame(mac(1), mac(2), 9015))
        .unwrap();
    assert!(b.recv(0, QUIET).is_none());
    assert_eq!(sw.counters("a").drop_count(DropReason::Oversize), 1);
}

#[test]
fn mtu_option_is_advertised_and_enforced() {
    let sw = TestSwitch::start(ports(&["a", "b"]), Some(1500));
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    assert_ne!(a.features & f::MTU, 0, "MTU feature offered with --mtu");
    a.send(0, &plain(), &udp_frame(mac(1), mac(2), 1514))
        .unwrap();
    assert!(b.recv(0, WAIT).is_some());
    a.send(0, &plain(), &udp_frame(mac(1), mac(2), 1515))
        .unwrap();
    assert!(b.recv(0, QUIET).is_none());
    assert_eq!(sw.counters("a").drop_count(DropReason::Oversize), 1);

    // Without --mtu, no MTU is imposed.
    let sw2 = TestSwitch::start(ports(&["x"]), None);
    let x = sw2.connect("x", DeviceOptions::default()).unwrap();
    assert_eq!(x.features & f::MTU, 0);
}

#[test]
fn mergeable_rx_buffers_span_several_descriptors() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(
        &sw,
        "b",
        DeviceOptions {
            rx_buf_size: 1024,
            ..Default::default()
        },
    );
    assert_ne!(b.features & f::MRG_RXBUF, 0);
    let frame = udp_frame(mac(1), mac(2), 9000);
    a.send(0, &plain(), &frame).unwrap();
    let got = b.recv(0, WAIT).expect("frame arrives in merged buffers");
    assert_eq!(got.frame, frame);
    assert_eq!(got.buffers as usize, (9000 + 12usize).div_ceil(1024));
    assert_eq!(got.hdr.num_buffers, got.buffers);

    // The same small buffers without MRG_RXBUF cannot hold it: dropped and counted, the
    // buffers kept for frames that fit.
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(
        &sw,
        "b",
        DeviceOptions {
            features: ALL_FEATURES & !f::MRG_RXBUF,
            rx_buf_size: 1024,
            ..Default::default()
        },
    );
    a.send(0, &plain(), &frame).unwrap();
    assert!(b.recv(0, QUIET).is_none());
    assert_eq!(sw.counters("b").drop_count(DropReason::RxBufferTooSmall), 1);
    let small = udp_frame(mac(1), mac(2), 500);
    a.send(0, &plain(), &small).unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame, small);
}

fn check_tso(ipv6: bool) {
    let sw = TestSwitch::start(ports(&["a", "tso", "plain"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut tso = device(&sw, "tso", big_buffers());
    let mut plain_port = device(&sw, "plain", opts(PLAIN_FEATURES));
    assert_eq!(plain_port.features & (f::GUEST_TSO4 | f::GUEST_CSUM), 0);

    let original = tcp_frame(mac(1), BROADCAST, ipv6, 62000);
    let mut partial = original.clone();
    let hdr = as_partial_tcp(&mut partial, 1448);
    a.send(0, &hdr, &partial).unwrap();

    // The TSO-capable port gets the one 64 KiB frame, header fields kept.
    let got = tso.recv(0, WAIT).expect("TSO frame delivered whole");
    assert_eq!(got.frame, partial);
    assert_eq!(got.hdr.gso_type, hdr.gso_type);
    assert_eq!(got.hdr.gso_size, 1448);
    assert_eq!(got.hdr.csum_start, hdr.csum_start);
    assert_eq!(
        got.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_F_NEEDS_CSUM
    );

    // The plain port gets what a NIC puts on the wire: MSS-sized segments, all checksummed.
    let mut payload = Vec::new();
    let mut segments = 0;
    let mut next_seq = 7_000_000u32;
    while payload.len() < 62000 {
        let seg = plain_port.recv(0, WAIT).expect("segment arrives");
        assert_eq!(
            seg.hdr,
            NetHdr {
                num_buffers: seg.hdr.num_buffers,
                ..NetHdr::default()
            }
        );
        let p = SlicedPacket::from_ethernet(&seg.frame).expect("segment parses");
        let Some(TransportSlice::Tcp(tcp)) = p.transport else {
            panic!("not TCP")
        };
        let h = tcp.to_header();
        let want = match p.net.unwrap() {
            NetSlice::Ipv4(ip) => {
                let iph = ip.header().to_header();
                assert_eq!(
                    iph.header_checksum,
                    iph.calc_header_checksum(),
                    "IPv4 checksum"
                );
                h.calc_checksum_ipv4(&iph, tcp.payload()).unwrap()
            }
            NetSlice::Ipv6(ip) => h
                .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
                .unwrap(),
            _ => panic!("no IP"),
        };
        assert_eq!(tcp.checksum(), want, "TCP checksum of segment {segments}");
        assert_eq!(tcp.sequence_number(), next_seq);
        assert!(tcp.payload().len() <= 1448);
        next_seq += tcp.payload().len() as u32;
        payload.extend_from_slice(tcp.payload());
        segments += 1;
    }
    assert_eq!(segments, 62000usize.div_ceil(1448));
    let orig = SlicedPacket::from_ethernet(&original).unwrap();
    let Some(TransportSlice::Tcp(otcp)) = orig.transport else {
        panic!()
    };
    assert_eq!(payload, otcp.payload());
    assert_eq!(sw.counters("plain").rx_packets, segments as u64);
}

#[test]
fn tso_frames_pass_whole_or_are_segmented_ipv4() {
    check_tso(false);
}

#[test]
fn tso_frames_pass_whole_or_are_segmented_ipv6() {
    check_tso(true);
}

#[test]
fn checksum_is_completed_for_ports_without_guest_csum() {
    let sw = TestSwitch::start(ports(&["a", "csum", "plain"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut csum = device(&sw, "csum", DeviceOptions::default());
    let mut plain_port = device(&sw, "plain", opts(PLAIN_FEATURES));
    let original = tcp_frame(mac(1), BROADCAST, false, 700);
    let mut partial = original.clone();
    let hdr = as_partial_tcp(&mut partial, 0);
    // Sent in three pieces through an indirect table, as Linux does for scattered skbs.
    let h = hdr.to_bytes();
    a.send_pieces(0, &[&h, &partial[..100], &partial[100..]], true)
        .unwrap();
    let got = csum.recv(0, WAIT).unwrap();
    assert_eq!(
        got.frame, partial,
        "passed on with the checksum left to the receiver"
    );
    assert!(got.hdr.needs_csum());
    let got = plain_port.recv(0, WAIT).unwrap();
    assert_eq!(got.frame, original, "checksum completed in software");
    assert!(!got.hdr.needs_csum());
}

#[test]
fn a_port_without_rx_buffers_drops_without_blocking_others() {
    let sw = TestSwitch::start(ports(&["a", "full", "c"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut full = sw.connect("full", DeviceOptions::default()).unwrap();
    let mut c = device(&sw, "c", DeviceOptions::default());
    for i in 0..20 {
        a.send(0, &plain(), &udp_frame(mac(1), BROADCAST, 100 + i))
            .unwrap();
    }
    for i in 0..20 {
        assert_eq!(
            c.recv(0, WAIT).expect("c keeps receiving").frame.len(),
            100 + i
        );
    }
    assert!(a.wait_tx_done(0, WAIT));
    assert_eq!(sw.counters("full").drop_count(DropReason::NoRxBuffer), 20);
    // Once it posts buffers, it receives again.
    full.post_rx(0, 8).unwrap();
    let f = udp_frame(mac(1), BROADCAST, 64);
    a.send(0, &plain(), &f).unwrap();
    assert_eq!(full.recv(0, WAIT).unwrap().frame, f);
}

#[test]
fn malformed_chains_are_counted_and_survived() {
    let sw = TestSwitch::start(ports(&["bad", "b", "c"]), None);
    let mut bad = device(&sw, "bad", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut c = device(&sw, "c", DeviceOptions::default());
    let good = udp_frame(mac(1), BROADCAST, 100);
    let mut good_with_hdr = plain().to_bytes().to_vec();
    good_with_hdr.extend_from_slice(&good);
    let scratch = bad.scratch_addr(0);
    bad.write_mem(scratch, &good_with_hdr);
    let outside = bad.mem_size() + 0x1000;
    let d = |addr, len, flags, next| RawDesc {
        addr,
        len,
        flags,
        next,
    };

    let cases: Vec<(&str, Vec<RawDesc>)> = vec![
        (
            "address outside guest memory",
            vec![d(outside, 200, 0, RawNext::Index(0))],
        ),
        (
            "buffer running past the end",
            vec![d(bad.mem_size() - 10, 200, 0, RawNext::Index(0))],
        ),
        (
            "a loop",
            vec![
                d(scratch, 20, DESC_F_NEXT, RawNext::Pos(1)),
                d(scratch, 20, DESC_F_NEXT, RawNext::Pos(0)),
            ],
        ),
        (
            "a length overflow",
            vec![
                d(scratch, u32::MAX, DESC_F_NEXT, RawNext::Pos(1)),
                d(scratch, u32::MAX, 0, RawNext::Index(0)),
            ],
        ),
        (
            "next index out of range",
            vec![d(scratch, 20, DESC_F_NEXT, RawNext::Index(999))],
        ),
        (
            "writable buffer in a TX chain",
            vec![d(scratch, 120, DESC_F_WRITE, RawNext::Index(0))],
        ),
        (
            "indirect table of bad length",
            vec![d(scratch, 20, DESC_F_INDIRECT, RawNext::Index(0))],
        ),
    ];
    let n = cases.len() as u64;
    for (what, descs) in cases {
        bad.send_raw(0, &descs)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // Too short for a header plus an Ethernet header; and no bytes at all, as one empty
    // buffer or an indirect table of them.
    bad.send_raw(0, &[d(scratch, 5, 0, RawNext::Index(0))])
        .unwrap();
    bad.send_raw(0, &[d(scratch, 0, 0, RawNext::Index(0))])
        .unwrap();
    let empty_table = scratch + 4096;
    bad.write_mem(empty_table, &[0u8; 32]);
    bad.send_raw(0, &[d(empty_table, 32, DESC_F_INDIRECT, RawNext::Index(0))])
        .unwrap();
    assert!(
        bad.wait_tx_done(0, WAIT),
        "every bad chain is returned to the guest"
    );
    let counters = sw.counters("bad");
    assert_eq!(counters.drop_count(DropReason::BadTxDescriptor), n);
    assert_eq!(counters.drop_count(DropReason::Malformed), 3);
    assert!(b.recv(0, QUIET).is_none());

    // The same queue still works, and so do the other ports.
    bad.send_raw(
        0,
        &[d(scratch, good_with_hdr.len() as u32, 0, RawNext::Index(0))],
    )
    .unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame, good);
    assert_eq!(c.recv(0, WAIT).unwrap().frame, good);
    c.send(0, &plain(), &udp_frame(mac(3), mac(2), 90)).unwrap();
    assert_eq!(b.recv(0, WAIT).unwrap().frame.len(), 90);
}

#[test]
fn a_burst_mixing_destinations_and_bad_chains_keeps_each_flow_in_order() {
    // A TX burst is walked and checked as a whole, then delivered in runs per destination
    // queue: frames to two ports interleaved with bad chains must all still arrive, each
    // destination's in the order sent, and only the bad chains be dropped.
    let sw = TestSwitch::start(ports(&["a", "b", "c"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut c = device(&sw, "c", DeviceOptions::default());
    b.send(0, &plain(), &udp_frame(mac(2), mac(1), 60)).unwrap();
    c.send(0, &plain(), &udp_frame(mac(3), mac(1), 60)).unwrap();
    assert_eq!(a.recv_all(0, QUIET).len(), 2, "b and c are learned");
    // Each also got the other's frame, flooded while a was unknown.
    assert_eq!(b.recv_all(0, QUIET).len(), 1);
    assert_eq!(c.recv_all(0, QUIET).len(), 1);
    let outside = a.mem_size() + 0x1000;
    let bad = RawDesc {
        addr: outside,
        len: 100,
        flags: 0,
        next: RawNext::Index(0),
    };
    for seq in 0..90u8 {
        match seq % 3 {
            0 | 1 => {
                let to = if seq % 3 == 0 { mac(2) } else { mac(3) };
                let mut fr = udp_frame(mac(1), to, 100);
                fr[60] = seq;
                a.send(0, &plain(), &fr).unwrap();
            }
            _ => a.send_raw(0, &[bad]).unwrap(),
        }
        if seq % 30 == 29 {
            assert!(a.wait_tx_done(0, WAIT), "the backend returns every chain");
        }
    }
    let seqs = |d: &mut VirtioNetDevice| -> Vec<u8> {
        d.recv_all(0, QUIET).iter().map(|f| f.frame[60]).collect()
    };
    assert_eq!(seqs(&mut b), (0..90u8).step_by(3).collect::<Vec<_>>());
    assert_eq!(seqs(&mut c), (1..90u8).step_by(3).collect::<Vec<_>>());
    assert_eq!(sw.counters("a").drop_count(DropReason::BadTxDescriptor), 30);
}

/// Offers an RX buffer the device may not write: a malformed RX chain.
fn post_read_only_rx(d: &mut VirtioNetDevice) {
    d.post_rx_raw(
        0,
        &[RawDesc {
            addr: 4096,
            len: 2048,
            flags: 0,
            next: RawNext::Index(0),
        }],
    )
    .unwrap();
}

#[test]
fn malformed_rx_buffers_are_counted_and_survived() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = sw.connect("b", DeviceOptions::default()).unwrap();
    let outside = b.mem_size() + 4096;
    // A read-only RX buffer, then one outside memory, then good ones.
    post_read_only_rx(&mut b);
    b.post_rx_raw(
        0,
        &[RawDesc {
            addr: outside,
            len: 2048,
            flags: DESC_F_WRITE,
            next: RawNext::Index(0),
        }],
    )
    .unwrap();
    b.post_rx(0, 8).unwrap();
    for _ in 0..3 {
        a.send(0, &plain(), &udp_frame(mac(1), mac(2), 100))
            .unwrap();
    }
    let got = b
        .recv(0, WAIT)
        .expect("the third frame lands in a good buffer");
    assert_eq!(got.frame.len(), 100);
    assert_eq!(sw.counters("b").drop_count(DropReason::BadRxDescriptor), 2);
}

#[test]
fn a_bad_rx_buffer_comes_back_with_an_interrupt() {
    // A unicast frame (written in runs) and a flooded one (written one by one).
    for (dst, path) in [(mac(2), "unicast"), (BROADCAST, "flood")] {
        let sw = TestSwitch::start(ports(&["a", "b"]), None);
        let mut a = device(&sw, "a", DeviceOptions::default());
        let mut b = sw.connect("b", DeviceOptions::default()).unwrap();
        // b learnt; b's only RX buffer is read-only.
        b.send(0, &plain(), &udp_frame(mac(2), mac(1), 60)).unwrap();
        assert!(a.recv(0, WAIT).is_some());
        while b.rx_interrupted(0, Duration::from_millis(100)) {}
        post_read_only_rx(&mut b);
        a.send(0, &plain(), &udp_frame(mac(1), dst, 100)).unwrap();
        // Handed back unused, and the driver is told: else a driver with only bad buffers
        // would wait for them forever.
        assert!(
            b.rx_interrupted(0, WAIT),
            "{path}: no interrupt for the returned buffer"
        );
        assert_eq!(sw.counters("b").drop_count(DropReason::BadRxDescriptor), 1);
    }
}

#[test]
fn a_reconnecting_frontend_gets_a_working_port() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    {
        let mut b = device(&sw, "b", DeviceOptions::default());
        a.send(0, &plain(), &udp_frame(mac(1), mac(2), 100))
            .unwrap();
        assert!(b.recv(0, WAIT).is_some());
        b.send(0, &plain(), &udp_frame(mac(2), mac(1), 100))
            .unwrap();
        assert!(a.recv(0, WAIT).is_some());
    } // b's frontend goes away: socket closed, memory unmapped on our side.

    // While b is gone, frames to it are dropped and counted, nothing else breaks.
    std::thread::sleep(Duration::from_millis(200));
    a.send(0, &plain(), &udp_frame(mac(1), mac(2), 100))
        .unwrap();
    assert!(a.wait_tx_done(0, WAIT));

    let mut b = device(&sw, "b", opts(PLAIN_FEATURES));
    let f = udp_frame(mac(1), mac(2), 333);
    a.send(0, &plain(), &f).unwrap();
    assert_eq!(b.recv(0, WAIT).expect("reconnected port receives").frame, f);
    b.send(0, &plain(), &udp_frame(mac(2), mac(1), 70)).unwrap();
    assert_eq!(a.recv(0, WAIT).unwrap().frame.len(), 70);
}

/// Ports a and b with `pairs` queue pairs each, both connected with all of them; each RX
/// queue of a and b gets `rx_a` and `rx_b` buffers.
fn multiqueue_pair(
    pairs: u16,
    rx_a: usize,
    rx_b: usize,
) -> (TestSwitch, VirtioNetDevice, VirtioNetDevice) {
    let sw = TestSwitch::start(
        vec![
            TestPort::new("a").queues(pairs),
            TestPort::new("b").queues(pairs),
        ],
        None,
    );
    let mq = DeviceOptions {
        queue_pairs: pairs,
        ..Default::default()
    };
    let mut a = sw.connect("a", mq.clone()).unwrap();
    let mut b = sw.connect("b", mq).unwrap();
    for qp in 0..pairs {
        a.post_rx(qp, rx_a).unwrap();
        b.post_rx(qp, rx_b).unwrap();
    }
    (sw, a, b)
}

#[test]
fn multiqueue_pairs_carry_traffic() {
    let (_sw, mut a, mut b) = multiqueue_pair(2, 32, 32);
    // Different flows (UDP source ports) from both TX queues of a.
    let mut got = 0;
    for i in 0..16u8 {
        let mut fr = udp_frame(mac(1), mac(2), 100);
        fr[35] = i; // UDP source port low byte, in the flow hash
        a.send(u16::from(i % 2), &plain(), &fr).unwrap();
    }
    for qp in 0..2 {
        got += b.recv_all(qp, Duration::from_millis(500)).len();
    }
    assert_eq!(got, 16);
}

#[test]
fn offload_requests_are_checked_and_headers_rebuilt() {
    let sw = TestSwitch::start(ports(&["a", "nocsum", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut nocsum = device(&sw, "nocsum", opts(PLAIN_FEATURES));
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut partial = tcp_frame(mac(2), mac(3), false, 3000);
    let mut hdr = as_partial_tcp(&mut partial, 1448);

    // GSO with an absurd MSS, and a checksum request from a port that never negotiated CSUM.
    hdr.gso_size = 8;
    a.send(0, &hdr, &partial).unwrap();
    let csum_only = NetHdr {
        gso_type: 0,
        gso_size: 0,
        ..hdr
    };
    nocsum.send(0, &csum_only, &partial).unwrap();
    assert!(b.recv(0, QUIET).is_none());
    assert!(a.wait_tx_done(0, WAIT) && nocsum.wait_tx_done(0, WAIT));
    assert_eq!(sw.counters("a").drop_count(DropReason::BadOffload), 1);
    assert_eq!(sw.counters("nocsum").drop_count(DropReason::BadOffload), 1);

    // A sender's DATA_VALID (or stray flag bits) never reaches a receiver.
    let frame = udp_frame(mac(1), mac(3), 200);
    let lying = NetHdr {
        flags: 0x02 | 0x40,
        ..NetHdr::default()
    };
    a.send(0, &lying, &frame).unwrap();
    let got = b.recv(0, WAIT).unwrap();
    assert_eq!(got.frame, frame);
    assert_eq!(got.hdr.flags, 0);
}

#[test]
fn traffic_follows_the_queue_pairs_the_guest_enabled() {
    let (sw, mut a, mut b) = multiqueue_pair(4, 0, 64);
    // The guest uses 2 of its 4 queue pairs (ethtool -L combined 2): QEMU disables the rest.
    for vring in 4..8 {
        b.set_vring_enable(vring, false).unwrap();
    }
    b.sync().unwrap();
    for i in 0..32u8 {
        let mut fr = udp_frame(mac(1), mac(2), 100);
        fr[35] = i;
        a.send(u16::from(i % 4), &plain(), &fr).unwrap();
    }
    let got: Vec<usize> = (0..4)
        .map(|qp| b.recv_all(qp, Duration::from_millis(300)).len())
        .collect();
    assert_eq!(
        got[0] + got[1],
        32,
        "a {:?} b {:?}",
        sw.counters("a"),
        sw.counters("b")
    );
    assert!(
        got[0] > 0 && got[1] > 0,
        "flows spread over both enabled pairs: {got:?}"
    );
    assert_eq!(got[2] + got[3], 0, "nothing on disabled pairs: {got:?}");
    assert_eq!(sw.counters("b").drop_count(DropReason::PortDown), 0);
}

#[test]
fn a_flow_stays_on_one_rx_queue_and_in_order() {
    let (_sw, mut a, mut b) = multiqueue_pair(4, 0, 128);
    // One flow (as a guest sends it: from one TX queue), numbered in its payload.
    for seq in 0..100u8 {
        let mut fr = udp_frame(mac(1), mac(2), 100);
        fr[60] = seq;
        a.send(0, &plain(), &fr).unwrap();
    }
    let per_queue: Vec<Vec<u8>> = (0..4)
        .map(|qp| {
            b.recv_all(qp, Duration::from_millis(300))
                .iter()
                .map(|f| f.frame[60])
                .collect()
        })
        .collect();
    let used: Vec<&Vec<u8>> = per_queue.iter().filter(|q| !q.is_empty()).collect();
    assert_eq!(used.len(), 1, "one flow, one RX queue: {per_queue:?}");
    assert_eq!(*used[0], (0..100u8).collect::<Vec<_>>(), "in order");
}

#[test]
fn a_driver_that_breaks_the_ring_protocol_is_reset_and_can_come_back() {
    let sw = TestSwitch::start(ports(&["bad", "b", "c"]), None);
    let mut b = device(&sw, "b", DeviceOptions::default());
    let mut c = device(&sw, "c", DeviceOptions::default());
    for (what, head, extra) in [
        ("head index out of range", 4000u16, 0u16),
        ("avail index jumps past the ring", 0, 5000),
    ] {
        let mut bad = device(&sw, "bad", DeviceOptions::default());
        bad.publish_bogus(0, head, extra).unwrap();
        // The backend closes that connection: the frontend's next request fails.
        let end = std::time::Instant::now() + WAIT;
        while bad.sync().is_ok() {
            assert!(
                std::time::Instant::now() < end,
                "{what}: connection not reset"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every other port goes on.
        b.send(0, &plain(), &udp_frame(mac(2), mac(3), 100))
            .unwrap();
        assert_eq!(c.recv(0, WAIT).expect("c still receives").frame.len(), 100);
    }
    assert!(sw.counters("bad").drop_count(DropReason::BadTxDescriptor) >= 2);
    // And the port takes a new, well-behaved connection.
    let mut again = device(&sw, "bad", DeviceOptions::default());
    again
        .send(0, &plain(), &udp_frame(mac(1), mac(2), 77))
        .unwrap();
    assert_eq!(
        b.recv(0, WAIT)
            .expect("the reset port works again")
            .frame
            .len(),
        77
    );
}

#[test]
fn a_driver_without_event_idx_is_asked_for_kicks_only_when_the_switch_waits_for_them() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let no_event_idx = opts(ALL_FEATURES & !f::RING_EVENT_IDX);
    let mut a = device(&sw, "a", no_event_idx.clone());
    let mut b = device(&sw, "b", no_event_idx);
    // Frames one at a time, each received (and its RX buffer posted again) before the next.
    // The first 20 while b's queue pair's thread starts (at its rings' enable): its first
    // RX kick turns them off.
    let mut warm_kicks = 0;
    for i in 0..220u32 {
        if i == 20 {
            warm_kicks = b.kicks(0);
        }
        let mut frame = udp_frame(mac(1), mac(2), 100);
        frame[60..64].copy_from_slice(&i.to_be_bytes());
        a.send(0, &plain(), &frame).unwrap();
        assert_eq!(b.recv(0, WAIT).expect("frame arrives").frame, frame);
    }
    // RX buffers are never waited for: after the first, reposting them needs no kick
    // (before: one kick, one wake-up of b's worker, per buffer).
    let kicks = b.kicks(0) - warm_kicks;
    assert!(
        kicks <= 1,
        "b's RX queue kicked {kicks} times in 200 frames"
    );
    // TX: the switch sleeps between frames, so it asks for each one's kick.
    assert!(
        a.kicks(1) >= 150,
        "a's TX queue kicked {} times",
        a.kicks(1)
    );
}

#[test]
fn a_new_memory_table_is_used_at_once_by_a_polling_worker() {
    // A worker polling its TX ring (here for up to a second) keeps going from burst to
    // burst; a memory table sent meanwhile must take effect there, not at its next sleep.
    let sw = TestSwitch::start_config(vhost_net_backend::SwitchConfig {
        poll_us: 1_000_000,
        ports: ["a", "b"]
            .iter()
            .map(|n| vhost_net_backend::PortConfig {
                name: n.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let frame = |i: u8| {
        let mut f = udp_frame(mac(1), mac(2), 120);
        f[70] = i;
        f
    };
    for i in 0..3u8 {
        a.send(0, &plain(), &frame(i)).unwrap();
        assert_eq!(b.recv(0, WAIT).expect("frame arrives").frame, frame(i));
    }
    // a's worker is inside its polling window now.
    a.remap_memory().unwrap();
    let sent = std::time::Instant::now();
    a.send(0, &plain(), &frame(10)).unwrap();
    let got = b.recv(0, WAIT).map(|r| r.frame);
    assert_eq!(got, Some(frame(10)), "the frame sent from the new memory");
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "it waited for the polling window to close: {:?}",
        sent.elapsed()
    );
    // The receiving side too.
    b.remap_memory().unwrap();
    a.send(0, &plain(), &frame(11)).unwrap();
    assert_eq!(b.recv(0, WAIT).map(|r| r.frame), Some(frame(11)));
}

#[test]
fn reset_owner_resets_the_port_until_a_frontend_connects_again() {
    let sw = TestSwitch::start(ports(&["a", "b"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut b = device(&sw, "b", DeviceOptions::default());
    let to_b = udp_frame(mac(1), mac(2), 100);
    a.send(0, &plain(), &to_b).unwrap();
    assert_eq!(b.recv(0, WAIT).expect("before").frame, to_b);
    a.reset_owner().unwrap();
    // The old rings are no longer served: nothing a posts reaches b, nothing reaches a.
    std::thread::sleep(Duration::from_millis(100));
    let _ = a.send(0, &plain(), &to_b);
    assert!(b.recv(0, QUIET).is_none(), "a's rings were still served");
    b.send(0, &plain(), &udp_frame(mac(2), mac(1), 100))
        .unwrap();
    assert!(a.recv(0, QUIET).is_none(), "a's RX ring was still written");
    // A new frontend on the port gets a working device.
    let end = std::time::Instant::now() + WAIT;
    let mut a2 = loop {
        match sw.connect("a", DeviceOptions::default()) {
            Ok(d) => break d,
            Err(_) if std::time::Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("no new connection: {e}"),
        }
    };
    a2.post_rx(0, 64).unwrap();
    a2.send(0, &plain(), &to_b).unwrap();
    assert_eq!(b.recv(0, WAIT).expect("after").frame, to_b);
    let back = udp_frame(mac(2), mac(1), 90);
    b.send(0, &plain(), &back).unwrap();
    assert_eq!(a2.recv(0, WAIT).expect("back").frame, back);
}

#[test]
fn a_flooded_tso_frame_with_a_tiny_mss_is_not_segmented_for_every_port() {
    let sw = TestSwitch::start(ports(&["a", "tso", "plain", "plain2"]), None);
    let mut a = device(&sw, "a", DeviceOptions::default());
    let mut tso = device(&sw, "tso", big_buffers());
    let mut plains = [
        device(&sw, "plain", opts(PLAIN_FEATURES)),
        device(&sw, "plain2", opts(PLAIN_FEATURES)),
    ];
    // 62,000 bytes with an MSS of 48: 1,292 segments for each port without TSO.
    let mut partial = tcp_frame(mac(1), BROADCAST, false, 62000);
    let hdr = as_partial_tcp(&mut partial, 48);
    a.send(0, &hdr, &partial).unwrap();
    assert_eq!(
        tso.recv(0, WAIT).expect("whole to the TSO port").frame,
        partial
    );
    for p in &mut plains {
        assert!(p.recv(0, QUIET).is_none(), "segmented for a flood target");
    }
    assert_eq!(sw.counters("a").drop_count(DropReason::BadOffload), 2);
    // Learned unicast to a port without TSO is segmented, MSS 48 or not.
    plains[0]
        .send(0, &plain(), &udp_frame(mac(3), mac(1), 60))
        .unwrap();
    assert!(a.recv(0, WAIT).is_some());
    let mut partial = tcp_frame(mac(1), mac(3), false, 2400);
    let hdr = as_partial_tcp(&mut partial, 48);
    a.send(0, &hdr, &partial).unwrap();
    let segments = plains[0].recv_all(0, QUIET).len();
    assert_eq!(segments, 50, "2,400 bytes in segments of 48");
}

#[test]
fn legacy_drivers_with_ten_and_twelve_byte_headers_exchange_frames_with_a_modern_one() {
    // A guest whose driver does not ack VERSION_1 (a transitional device under an old
    // kernel, or QEMU's disable-modern=on): a 10-byte header, or 12 with mergeable buffers.
    let sw = TestSwitch::start(ports(&["modern", "legacy", "legacy_mrg"]), None);
    let mut modern = device(&sw, "modern", DeviceOptions::default());
    let mut legacy = device(&sw, "legacy", opts(f::PROTOCOL_FEATURES));
    let mut legacy_mrg = device(&sw, "legacy_mrg", opts(f::PROTOCOL_FEATURES | f::MRG_RXBUF));
    assert_eq!(legacy.hdr_len(), 10);
    assert_eq!(legacy_mrg.hdr_len(), 12);
    for (dev, n) in [(&mut legacy, 2u8), (&mut legacy_mrg, 3)] {
        // Each way, a frame arrives whole: a header length taken wrong shifts it by two.
        let there = udp_frame(mac(1), mac(n), 700);
        let back = udp_frame(mac(n), mac(1), 300);
        let mut got = None;
        for _ in 0..3 {
            // The first frames flood (nothing learned yet); the reply teaches the way back.
            dev.send(0, &plain(), &back).unwrap();
            let _ = modern.recv(0, QUIET);
            modern.send(0, &plain(), &there).unwrap();
            got = dev.recv(0, QUIET).filter(|g| g.frame == there);
            if got.is_some() {
                break;
            }
        }
        let got = got.expect("the modern port's frame reached the legacy one whole");
        assert_eq!(got.hdr.flags, 0);
        dev.send(0, &plain(), &back).unwrap();
        let mut seen = None;
        while let Some(g) = modern.recv(0, QUIET) {
            seen = Some(g);
        }
        assert_eq!(seen.expect("the legacy port's frame arrived").frame, back);
    }
    for name in ["modern", "legacy", "legacy_mrg"] {
        assert_eq!(sw.counters(name).drops.values().sum::<u64>(), 0, "{name}");
    }
}
