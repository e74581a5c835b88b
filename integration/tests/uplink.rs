//! The tap uplink, with the backend binary running inside a network namespace: frames from
//! a VM port reach the host's stack through the tap and come back, a 64 KiB TSO frame
//! arrives as one GSO frame the host's TCP accepts, and a trunk tags VLANs on the wire.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use integration::frames::{as_partial_tcp, mac, udp_frame, BROADCAST};
use integration::netns::Netns;
use integration::testbed::backend_binary;
use integration::{DeviceOptions, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;

const WAIT: Duration = Duration::from_secs(5);
const VM_IP: [u8; 4] = [10, 7, 0, 2];
const HOST_IP: [u8; 4] = [10, 7, 0, 1];

struct Backend {
    child: Child,
    dir: tempfile::TempDir,
}

impl Backend {
    fn start(ns: &Netns, ports: &[&str], uplink: &str) -> Backend {
        Self::start_with(ns, ports, uplink, None)
    }

    /// With `policy` (TOML) as its `--config`, if given.
    fn start_with(ns: &Netns, ports: &[&str], uplink: &str, policy: Option<&str>) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]).arg(backend_binary());
        for p in ports {
            let (name, spec) = p.split_once(',').map_or((*p, ""), |(n, s)| (n, s));
            cmd.arg("--port").arg(format!(
                "name={name},socket={}{}{spec}",
                dir.path().join(format!("{name}.sock")).display(),
                if spec.is_empty() { "" } else { "," }
            ));
        }
        cmd.arg("--uplink").arg(uplink).stderr(Stdio::null());
        if let Some(text) = policy {
            let path = dir.path().join("policy.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let child = cmd.spawn().unwrap();
        let b = Backend { child, dir };
        let end = Instant::now() + WAIT;
        while !ports
            .iter()
            .all(|p| b.sock(p.split(',').next().unwrap()).exists())
            || !ns.try_sh("ip link show vnet0").status.success()
        {
            assert!(Instant::now() < end, "backend did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn sock(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    fn connect(&self, name: &str) -> VirtioNetDevice {
        let mut d = connect_retry(&self.sock(name));
        d.post_rx(0, 64).unwrap();
        d
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect_retry(path: &Path) -> VirtioNetDevice {
    let end = Instant::now() + WAIT;
    loop {
        match VirtioNetDevice::connect(path, DeviceOptions::default()) {
            Ok(d) => {
                // The port's workers pick up the rings asynchronously.
                std::thread::sleep(Duration::from_millis(100));
                return d;
            }
            Err(e) if Instant::now() > end => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn host_mac(ns: &Netns) -> [u8; 6] {
    let link = ns.link_json("vnet0");
    let s = link["address"].as_str().unwrap();
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(s.split(':')) {
        *o = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

fn setup_host(ns: &Netns) {
    ns.sh("ip addr add 10.7.0.1/24 dev vnet0");
    ns.sh("ip neigh replace 10.7.0.2 lladdr 52:54:00:00:00:01 dev vnet0");
}

/// Waits for a frame on `dev` that `pick` accepts.
fn recv_matching<T>(
    dev: &mut VirtioNetDevice,
    mut pick: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if let Some(f) = dev.recv(0, Duration::from_millis(200)) {
            if let Some(t) = pick(&f.frame) {
                return Some(t);
            }
        }
    }
    None
}

#[test]
fn a_vm_reaches_the_host_through_the_tap_and_back() {
    let ns = Netns::new("upl");
    let backend = Backend::start(&ns, &["a"], "tap:vnet0");
    setup_host(&ns);
    let mut a = backend.connect("a");
    let hmac = host_mac(&ns);
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(mac(1), hmac)
        .ipv4(VM_IP, HOST_IP, 64)
        .icmpv4_echo_request(0x77, 1)
        .write(&mut ping, b"through the uplink")
        .unwrap();
    a.send(0, &NetHdr::default(), &ping).unwrap();
    let reply = recv_matching(&mut a, |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        match (p.net?, p.transport?) {
            (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp))
                if ip.header().source() == HOST_IP =>
            {
                Some(icmp.payload().to_vec())
            }
            _ => None,
        }
    });
    assert_eq!(
        reply.as_deref(),
        Some(&b"through the uplink"[..]),
        "no echo reply from the host"
    );
    let rx: u64 = ns
        .sh("cat /sys/class/net/vnet0/statistics/rx_packets")
        .trim()
        .parse()
        .unwrap();
    assert!(rx >= 1);
}

#[test]
fn a_tso_frame_reaches_the_host_as_one_gso_frame_and_tcp_takes_it() {
    let ns = Netns::new("tso");
    let backend = Backend::start(&ns, &["a"], "tap:vnet0");
    setup_host(&ns);
    let server = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c"])
        .arg(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('10.7.0.1', 5001)); s.listen(1); c, _ = s.accept(); n = 0\n\
             while n < 60000:\n    b = c.recv(65536)\n    if not b: break\n    n += len(b)\nprint(n)",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut a = backend.connect("a");
    let hmac = host_mac(&ns);
    let tcp = |seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]| {
        let mut b = PacketBuilder::ethernet2(mac(1), hmac)
            .ipv4(VM_IP, HOST_IP, 64)
            .tcp(40000, 5001, seq, 64000);
        if syn {
            b = b.syn();
        }
        if let Some(n) = ack {
            b = b.ack(n);
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    };
    a.send(0, &NetHdr::default(), &tcp(1000, None, true, &[]))
        .unwrap();
    let their_seq = recv_matching(&mut a, |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        match p.transport? {
            TransportSlice::Tcp(t) if t.syn() && t.ack() => Some(t.sequence_number()),
            _ => None,
        }
    })
    .expect("SYN-ACK from the host");
    a.send(
        0,
        &NetHdr::default(),
        &tcp(1001, Some(their_seq + 1), false, &[]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let rx_before: u64 = ns
        .sh("cat /sys/class/net/vnet0/statistics/rx_packets")
        .trim()
        .parse()
        .unwrap();
    let payload: Vec<u8> = (0..60000u32).map(|i| (i % 251) as u8).collect();
    let mut data = tcp(1001, Some(their_seq + 1), false, &payload);
    let hdr = as_partial_tcp(&mut data, 1448);
    a.send(0, &hdr, &data).unwrap();
    let out = server.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "60000",
        "the host's TCP took all 60000 bytes"
    );
    let rx_after: u64 = ns
        .sh("cat /sys/class/net/vnet0/statistics/rx_packets")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        rx_after - rx_before,
        1,
        "one GSO frame, not {} segments",
        rx_after - rx_before
    );
}

/// Prints the VLAN of the first frame from the given source MAC. The kernel takes the tag
/// off on receive and reports it beside the frame (PACKET_AUXDATA).
const CAPTURE: &str = "import socket,struct,sys
s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind(('vnet0', 0)); s.settimeout(5)
s.setsockopt(263, 8, 1)
while True:
    f, anc, _, _ = s.recvmsg(65535, 64)
    if f[6:12] != bytes.fromhex(sys.argv[1]): continue
    for level, kind, data in anc:
        if level == 263 and kind == 8:
            status, _, _, _, _, tci, _ = struct.unpack('IIIHHHH', data[:20])
            print(tci & 0xfff if status & 16 else 'untagged')
    break";

const INJECT: &str = "import socket,sys
s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('vnet0', 0)); s.send(bytes.fromhex(sys.argv[1]))";

#[test]
fn a_vm_port_added_at_run_time_cannot_take_the_uplinks_name() {
    let ns = Netns::new("upname");
    let control = tempfile::tempdir().unwrap();
    let ctl_path = control.path().join("ctl.sock");
    let backend = Backend::start_with(
        &ns,
        &["a"],
        "tap:vnet0",
        Some(&format!("control_socket = \"{}\"\n", ctl_path.display())),
    );
    let spec = format!("name=uplink,socket={}", backend.sock("x").display());
    let out = integration::testbed::ctl(&ctl_path, &["port", "add", &spec]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'uplink' names the tap uplink"), "{err}");
    // The switch answers on: a port under another name is added.
    let spec = format!("name=b,socket={}", backend.sock("b").display());
    let out = integration::testbed::ctl(&ctl_path, &["port", "add", &spec]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_trunk_carries_vlans_tagged() {
    let ns = Netns::new("trunk");
    let backend = Backend::start(&ns, &["a,vlan=10", "b,vlan=20"], "tap:vnet0,trunk");
    let mut a = backend.connect("a");
    let mut b = backend.connect("b");

    // VM -> wire: a's broadcast leaves tagged with VID 10.
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "python3",
            "-c",
            CAPTURE,
            "525400000001",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    a.send(0, &NetHdr::default(), &udp_frame(mac(1), BROADCAST, 100))
        .unwrap();
    let out = capture.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");
    assert!(
        b.recv(0, Duration::from_millis(300)).is_none(),
        "VLAN 10 must not reach VLAN 20"
    );

    // Wire -> VM: a frame tagged 20 reaches b untagged, and not a.
    let plain = udp_frame(mac(9), BROADCAST, 80);
    let mut tagged = plain.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 20]);
    let hex: String = tagged.iter().map(|x| format!("{x:02x}")).collect();
    ns.sh(&format!("python3 -c \"{INJECT}\" {hex}"));
    let got = b.recv(0, WAIT).expect("b gets the VLAN 20 frame");
    assert_eq!(got.frame, plain);
    assert!(a.recv(0, Duration::from_millis(300)).is_none());
}

#[test]
fn an_802_1ad_frame_from_the_tap_is_dropped_like_the_same_frame_from_a_guest() {
    // One ingress check for every kind of port: a service-tagged (0x88a8) frame could carry
    // a customer tag into a segment it does not belong to, from a guest or from the host.
    let ns = Netns::new("qinq");
    let backend = Backend::start(&ns, &["a", "b"], "tap:vnet0,trunk");
    let mut a = backend.connect("a");
    let mut b = backend.connect("b");
    let plain = udp_frame(mac(9), BROADCAST, 80);
    let mut qinq = plain.clone();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 20, 0x81, 0x00, 0x00, 30]);
    let hex = |f: &[u8]| f.iter().map(|x| format!("{x:02x}")).collect::<String>();

    // Whether `dev` receives `frame` within half a second (the host's own IPv6 chatter
    // comes through the tap too).
    let gets = |dev: &mut VirtioNetDevice, frame: &[u8]| {
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            if dev
                .recv(0, Duration::from_millis(100))
                .is_some_and(|f| f.frame == frame)
            {
                return true;
            }
        }
        false
    };

    b.send(0, &NetHdr::default(), &qinq).unwrap();
    assert!(!gets(&mut a, &qinq), "a guest's 802.1ad frame was switched");
    ns.sh(&format!("python3 -c \"{INJECT}\" {}", hex(&qinq)));
    assert!(
        !gets(&mut a, &qinq),
        "the host's 802.1ad frame was switched"
    );
    // The same path carries an untagged frame.
    ns.sh(&format!("python3 -c \"{INJECT}\" {}", hex(&plain)));
    assert!(gets(&mut a, &plain), "a gets the untagged frame");
}

#[test]
fn the_outside_is_a_peer_of_the_policy() {
    let ns = Netns::new("uplpol");
    let backend = Backend::start_with(
        &ns,
        &["a,group=web,ip=10.7.0.2"],
        "tap:vnet0",
        Some(
            "[[rule]]\naction = \"allow\"\nfrom = \"outside\"\nto = \"web\"\nproto = \"tcp\"\nports = 80\n\
             [[rule]]\naction = \"allow\"\nfrom = \"web\"\nto = \"outside\"\nproto = \"icmp\"\n",
        ),
    );
    setup_host(&ns);
    let mut a = backend.connect("a");
    // The VM may ping the host, and gets the reply.
    let hmac = host_mac(&ns);
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(mac(1), hmac)
        .ipv4(VM_IP, HOST_IP, 64)
        .icmpv4_echo_request(0x78, 1)
        .write(&mut ping, b"allowed out")
        .unwrap();
    a.send(0, &NetHdr::default(), &ping).unwrap();
    let reply = recv_matching(&mut a, |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        match (p.net?, p.transport?) {
            (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp))
                if ip.header().source() == HOST_IP =>
            {
                Some(icmp.payload().to_vec())
            }
            _ => None,
        }
    });
    assert_eq!(reply.as_deref(), Some(&b"allowed out"[..]), "no echo reply");
    // The host may open tcp/80 on the VM, not tcp/22.
    let syn_to = |dev: &mut VirtioNetDevice, port: u16| {
        recv_matching(dev, |f| {
            let p = SlicedPacket::from_ethernet(f).ok()?;
            match p.transport? {
                TransportSlice::Tcp(t) if t.destination_port() == port && t.syn() => Some(()),
                _ => None,
            }
        })
        .is_some()
    };
    let _ = ns.try_sh("timeout 1 bash -c 'echo > /dev/tcp/10.7.0.2/80'");
    assert!(
        syn_to(&mut a, 80),
        "the host's SYN to tcp/80 did not arrive"
    );
    let _ = ns.try_sh("timeout 1 bash -c 'echo > /dev/tcp/10.7.0.2/22'");
    assert!(!syn_to(&mut a, 22), "the host's SYN to tcp/22 arrived");
}
