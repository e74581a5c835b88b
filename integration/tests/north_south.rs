//! North-south through the uplink, with the backend binary in a "host" namespace and an
//! "outside" namespace behind the host's uplink (192.0.2.1 / 192.0.2.2): the switch sets
//! the host's side of its tap (address, routes to the guests' subnets, nftables NAT).
//! Frontends play the guests and answer TCP handshakes. The outside reaches a guest through
//! a forwarded port and a balancer spreading 3,000 connections over 3 backends, and nothing
//! else even with a route to the guests; a guest reaches the outside through source NAT;
//! a backend that stops answering leaves the balancer within its health-check window; the
//! host is left as it was when the switch stops.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use integration::netns::Netns;
use integration::testbed::BackendProcess;
use integration::{DeviceOptions, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;

const GW: [u8; 6] = [0x02, 0x76, 0x6e, 0, 0, 1];
const WEBS: [(&str, [u8; 4]); 3] = [
    ("web1", [10, 10, 1, 10]),
    ("web2", [10, 10, 1, 11]),
    ("web3", [10, 10, 1, 12]),
];
const APP: [u8; 4] = [10, 10, 2, 10];

/// Runs `f` on a thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on this thread only, with an fd we hold open for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn config(dir: &Path) -> String {
    let mut c = format!(
        "control_socket = \"{}\"\n[policy]\ndefault = \"deny\"\n",
        dir.join("ctl.sock").display()
    );
    for (i, (name, ip)) in WEBS.iter().enumerate() {
        c += &format!(
            "[[port]]\nname = \"{name}\"\nsocket = \"{}\"\nvlan = 10\nmac = \"02:00:00:00:01:{:02x}\"\n\
             addresses = [\"{}\"]\ngroups = [\"web\"]\n",
            dir.join(format!("{name}.sock")).display(),
            i + 1,
            std::net::Ipv4Addr::from(*ip)
        );
    }
    c += &format!(
        "[[port]]\nname = \"app1\"\nsocket = \"{}\"\nvlan = 20\nmac = \"02:00:00:00:02:01\"\n\
         addresses = [\"10.10.2.10\"]\ngroups = [\"app\"]\n",
        dir.join("app1.sock").display()
    );
    c + r#"
[[segment]]
name = "web"
vlan = 10
gateway = ["10.10.1.1/24"]
[[segment]]
name = "app"
vlan = 20
gateway = ["10.10.2.1/24"]
[[segment]]
name = "outside"
vlan = 100
gateway = ["10.10.0.1/24"]

[uplink]
tap = "vnet0"
vlan = 100
host = "10.10.0.2/24"
[[uplink.forward]]
host_port = 8080
balancer = "web"
[[uplink.forward]]
host_port = 2222
to = "10.10.2.10:22"

[[balancer]]
name = "web"
port = 80
backends = ["10.10.1.10", "10.10.1.11", "10.10.1.12"]
interval_ms = 300
timeout_ms = 200
rise = 2
fall = 2
on_down = "reset"

[[rule]]
action = "allow"
from = "outside"
to = "web"
proto = "tcp"
ports = 80
[[rule]]
action = "allow"
from = "outside"
to = "app"
proto = "tcp"
ports = 22
[[rule]]
action = "allow"
from = "app"
to = "outside"
proto = "udp"
ports = 7000
"#
}

/// A guest's TCP side, as far as a handshake: answers SYNs to `port` with SYN-ACK while
/// `answering`, and counts them by source address; keeps the client's port and initial
/// sequence number of each, and the source ports of the resets it gets; sends what is put
/// in `outbox`.
struct Responder {
    answering: Arc<AtomicBool>,
    syns: Arc<Mutex<HashMap<[u8; 4], usize>>>,
    clients: Arc<Mutex<HashMap<u16, u32>>>,
    resets: Arc<Mutex<Vec<u16>>>,
    outbox: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<VirtioNetDevice>>,
}

impl Responder {
    fn start(mut dev: VirtioNetDevice, mac: [u8; 6], port: u16) -> Responder {
        let answering = Arc::new(AtomicBool::new(true));
        let syns = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Mutex::new(HashMap::new()));
        let resets = Arc::new(Mutex::new(Vec::new()));
        let outbox = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let (a, s, st) = (answering.clone(), syns.clone(), stop.clone());
        let (c, r, o) = (clients.clone(), resets.clone(), outbox.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                for f in o.lock().unwrap().drain(..) {
                    dev.send(0, &NetHdr::default(), &f).unwrap();
                }
                let Some(rx) = dev.recv(0, Duration::from_millis(20)) else {
                    continue;
                };
                let Ok(p) = SlicedPacket::from_ethernet(&rx.frame) else {
                    continue;
                };
                let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                    (&p.net, &p.transport)
                else {
                    continue;
                };
                if tcp.rst() {
                    r.lock().unwrap().push(tcp.source_port());
                }
                if !tcp.syn() || tcp.ack() || tcp.destination_port() != port {
                    continue;
                }
                // Routed to us: our MAC, from the gateway's, one hop less than the host sent
                // (64 from the host itself, 63 forwarded by it from the outside).
                let ttl = ip.header().ttl();
                if rx.frame[..6] != mac || rx.frame[6..12] != GW || !(62..=63).contains(&ttl) {
                    *s.lock().unwrap().entry([0; 4]).or_default() += 1;
                    continue;
                }
                let (src, dst) = (ip.header().source(), ip.header().destination());
                *s.lock().unwrap().entry(src).or_default() += 1;
                if !a.load(Ordering::Relaxed) {
                    continue;
                }
                c.lock()
                    .unwrap()
                    .insert(tcp.source_port(), tcp.sequence_number());
                let mut f = Vec::new();
                PacketBuilder::ethernet2(mac, GW)
                    .ipv4(dst, src, 64)
                    .tcp(port, tcp.source_port(), 7000, 64240)
                    .syn()
                    .ack(tcp.sequence_number().wrapping_add(1))
                    .write(&mut f, &[])
                    .unwrap();
                dev.send(0, &NetHdr::default(), &f).unwrap();
            }
            dev
        });
        Responder {
            answering,
            syns,
            clients,
            resets,
            outbox,
            stop,
            thread: Some(thread),
        }
    }

    fn syns_from(&self, src: [u8; 4]) -> usize {
        self.syns.lock().unwrap().get(&src).copied().unwrap_or(0)
    }

    fn finish(mut self) -> VirtioNetDevice {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn connect(path: &Path) -> VirtioNetDevice {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match VirtioNetDevice::connect(path, DeviceOptions::default()) {
            Ok(mut d) => {
                d.post_rx(0, 128).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                return d;
            }
            Err(e) if Instant::now() > end => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn ctl(dir: &Path, command: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(dir.join("ctl.sock")).unwrap();
    writeln!(s, "{command}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// `n` connections from the outside to `to`; how many completed their handshake.
fn connections(outside: &Netns, to: &str, n: usize) -> usize {
    let to: SocketAddr = to.parse().unwrap();
    in_netns(outside, move || {
        (0..n)
            .filter(|_| TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok())
            .count()
    })
}

#[test]
fn the_outside_reaches_forwards_and_the_balancer_only_and_guests_reach_it_through_nat() {
    let (host, outside) = Netns::host_with_outside("ns");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("switch.toml");
    std::fs::write(&cfg, config(dir.path())).unwrap();
    let mut sockets: Vec<_> = WEBS
        .iter()
        .map(|(n, _)| dir.path().join(format!("{n}.sock")))
        .collect();
    sockets.push(dir.path().join("app1.sock"));
    let mut backend = BackendProcess::start_in(
        Some(host.name.clone()),
        vec!["--config".into(), cfg.display().to_string()],
        sockets.clone(),
        dir.path().join("backend.log"),
    );
    let log = || std::fs::read_to_string(dir.path().join("backend.log")).unwrap_or_default();
    // A balancer's change is in force (`ctl`, the host's NAT) before it is logged.
    let logged = |what: &str| {
        let end = Instant::now() + Duration::from_secs(5);
        while !log().contains(what) {
            assert!(Instant::now() < end, "never logged '{what}':\n{}", log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The sockets come first; the host side is done once the switch says it is up.
    let end = Instant::now() + Duration::from_secs(10);
    while !log().contains("switch up") {
        assert!(Instant::now() < end, "the switch never came up:\n{}", log());
        std::thread::sleep(Duration::from_millis(10));
    }
    // The host side the switch made: the address, a route per guest subnet, the table.
    let addrs = host.sh("ip -4 -o addr show dev vnet0");
    assert!(addrs.contains("10.10.0.2/24"), "{addrs}\n{}", log());
    let routes = host.sh("ip route show");
    for net in ["10.10.1.0/24 via 10.10.0.1", "10.10.2.0/24 via 10.10.0.1"] {
        assert!(routes.contains(net), "no route {net}:\n{routes}");
    }
    assert!(host.try_sh("nft list table ip vnet_vnet0").status.success());

    let webs: Vec<Responder> = WEBS
        .iter()
        .enumerate()
        .map(|(i, (n, _))| {
            let dev = connect(&dir.path().join(format!("{n}.sock")));
            Responder::start(dev, [2, 0, 0, 0, 1, i as u8 + 1], 80)
        })
        .collect();
    let app = Responder::start(
        connect(&dir.path().join("app1.sock")),
        [2, 0, 0, 0, 2, 1],
        22,
    );
    let outside_ip = [192, 0, 2, 2];

    // The balancer: 3,000 new connections from outside to the host's port 8080, each
    // completing its handshake (translated both ways), spread within 10 % of even.
    let done = connections(&outside, "192.0.2.1:8080", 3000);
    assert!(
        done >= 2990,
        "only {done} of 3000 connections completed\n{}",
        log()
    );
    let counts: Vec<usize> = webs.iter().map(|w| w.syns_from(outside_ip)).collect();
    for c in &counts {
        assert!((900..=1100).contains(c), "not spread evenly: {counts:?}");
    }
    let misrouted: usize = webs.iter().map(|w| w.syns_from([0; 4])).sum();
    assert_eq!(misrouted, 0, "SYNs arrived with the wrong MACs or TTL");
    eprintln!("3,000 connections through the balancer: {counts:?}");
    // A forward to one guest.
    assert_eq!(
        connections(&outside, "192.0.2.1:2222", 5),
        5,
        "forward to app1:22"
    );
    assert_eq!(app.syns_from(outside_ip), 5);

    // No way in but the forwards, even with a route to the guests.
    outside.sh("ip route add 10.10.0.0/16 via 192.0.2.1");
    assert_eq!(
        connections(&outside, "10.10.1.10:80", 3),
        0,
        "web1 reached directly"
    );
    assert_eq!(
        connections(&outside, "10.10.2.10:22", 3),
        0,
        "app1 reached directly"
    );
    assert_eq!(webs[0].syns_from(outside_ip), counts[0]);
    assert_eq!(app.syns_from(outside_ip), 5);
    // Nor from the host itself, which is outside too (the balancer's health checks, its
    // own connections, still pass); its own forward works.
    let host_ip = [10, 10, 0, 2];
    assert_eq!(
        connections(&host, "10.10.1.10:80", 3),
        0,
        "web1 reached directly from the host"
    );
    assert_eq!(
        connections(&host, "10.10.0.2:2222", 2),
        2,
        "the host's own forward to app1:22"
    );
    assert_eq!(app.syns_from(host_ip), 2);

    // A guest reaches the outside through source NAT; the answer comes back to it.
    let server = in_netns(&outside, || UdpSocket::bind("0.0.0.0:7000").unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, peer) = server.recv_from(&mut buf).unwrap();
        server.send_to(peer.to_string().as_bytes(), peer).unwrap();
        peer
    });
    let mut app_dev = app.finish();
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 2, 1], GW)
        .ipv4(APP, outside_ip, 64)
        .udp(5555, 7000)
        .write(&mut f, b"hello")
        .unwrap();
    app_dev.send(0, &NetHdr::default(), &f).unwrap();
    let peer = echo.join().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "192.0.2.1",
        "not translated to the host's address"
    );
    let reply = (0..50)
        .find_map(|_| {
            let rx = app_dev.recv(0, Duration::from_millis(100))?;
            let p = SlicedPacket::from_ethernet(&rx.frame).ok()?;
            match (&p.net, &p.transport) {
                (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) => Some((
                    ip.header().destination(),
                    u.destination_port(),
                    u.payload().to_vec(),
                )),
                _ => None,
            }
        })
        .expect("the outside's answer reached the guest");
    assert_eq!((reply.0, reply.1), (APP, 5555));

    // Two connections from the outside that landed on web3, open when it goes down.
    let on_web3 = webs[2].clients.clone();
    let mut held: Vec<(TcpStream, u16)> = in_netns(&outside, move || {
        let to: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..200 {
            let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
                continue;
            };
            let port = s.local_addr().unwrap().port();
            if on_web3.lock().unwrap().contains_key(&port) {
                held.push((s, port));
                if held.len() == 2 {
                    break;
                }
            }
        }
        held
    });
    assert_eq!(held.len(), 2, "no two connections landed on web3");

    // web3 stops answering: out of the balancer within its window (2 x 300 ms and a
    // timeout), and no new connection goes to it; its peers take them all.
    webs[2].answering.store(false, Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let b = ctl(dir.path(), "balancers");
        let rows = b["balancers"].as_array().unwrap().clone();
        if rows
            .iter()
            .any(|r| r["backend"] == "10.10.1.12:80" && r["state"] == "down")
        {
            assert!(
                rows.iter()
                    .filter(|r| r["state"] == "up")
                    .all(|r| r["slots"] == 128),
                "{b}"
            );
            break;
        }
        assert!(Instant::now() < end, "web3 still up: {b}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before: Vec<usize> = webs.iter().map(|w| w.syns_from(outside_ip)).collect();
    // As with the 3,000 above, a handshake may miss its 500 ms under a loaded CI machine
    // (the SYN's retransmission comes after 1 s): nearly all complete, and none reaches web3.
    let done = connections(&outside, "192.0.2.1:8080", 300);
    assert!(done >= 295, "only {done} of 300 connections completed");
    let after: Vec<usize> = webs.iter().map(|w| w.syns_from(outside_ip)).collect();
    assert_eq!(after[2], before[2], "web3 got new connections while down");
    assert!(after[0] + after[1] - before[0] - before[1] >= done);
    logged("backend 10.10.1.12 is down");

    // on_down = "reset": the host resets web3's open connections at their next packet,
    // from either end. The client's data is answered with a reset ...
    let (mut client, _) = held.remove(0);
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let got = std::io::Read::read(&mut client, &mut [0u8; 64]);
    assert_eq!(
        got.as_ref().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "the client's connection to the down web3 was not reset: {got:?}"
    );
    // ... and so is web3's, in its window.
    let (_other, port) = held.remove(0);
    let isn = webs[2].clients.lock().unwrap()[&port];
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 1, 3], GW)
        .ipv4(WEBS[2].1, outside_ip, 64)
        .tcp(80, port, 7001, 64240)
        .ack(isn.wrapping_add(1))
        .write(&mut f, b"late answer")
        .unwrap();
    webs[2].outbox.lock().unwrap().push(f);
    let end = Instant::now() + Duration::from_secs(3);
    while !webs[2].resets.lock().unwrap().contains(&port) {
        assert!(
            Instant::now() < end,
            "web3's side of its connection from port {port} was not reset\n{}",
            host.sh("nft list table ip vnet_vnet0")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    logged("reset at their next packet");

    // web3 answers again: back after `rise` checks in a row (2 x 300 ms), with slots of
    // its own, and new connections reach it again.
    webs[2].answering.store(true, Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let b = ctl(dir.path(), "balancers");
        let rows = b["balancers"].as_array().unwrap().clone();
        let web3 = rows.iter().find(|r| r["backend"] == "10.10.1.12:80");
        if web3.is_some_and(|r| r["state"] == "up") {
            assert!(rows.iter().all(|r| r["slots"].as_u64() > Some(0)), "{b}");
            break;
        }
        assert!(Instant::now() < end, "web3 never came back: {b}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    logged("backend 10.10.1.12 is up");
    let before = webs[2].syns_from(outside_ip);
    let done = connections(&outside, "192.0.2.1:8080", 150);
    assert!(done >= 145, "only {done} of 150 connections completed");
    assert!(
        webs[2].syns_from(outside_ip) - before >= 20,
        "web3 is up but got {} of 150 new connections",
        webs[2].syns_from(outside_ip) - before
    );

    // Stopped, the switch leaves the host as it was.
    for w in webs {
        w.finish();
    }
    drop(app_dev);
    assert!(backend.stop(), "the backend did not exit cleanly");
    assert!(
        !host.try_sh("nft list table ip vnet_vnet0").status.success(),
        "table left"
    );
    let routes = host.sh("ip route show");
    assert!(!routes.contains("10.10.1.0/24"), "routes left: {routes}");
}
