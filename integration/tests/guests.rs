//! End-to-end: real QEMU guests (the tiny Debian-kernel image) on a running
//! vhost-net-backend process. QEMU version: `VNET_QEMU` (`7.2`, `10`; unset: the
//! system QEMU). Acceleration: probed, or `VNET_ACCEL`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration::guest_image::{guest_image, GuestImage};
use integration::netns::Netns;
use integration::qemu::{detect_accel, Accel, Guest, GuestSpec, NicBackend, Qemu};
use integration::testbed::{backend_binary, BackendProcess};
use tempfile::TempDir;

/// Guests are CPU-heavy under TCG on 2 cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CMD: Duration = Duration::from_secs(60);

struct Env {
    qemu: Qemu,
    accel: Accel,
    image: GuestImage,
    dir: TempDir,
}

fn env() -> Env {
    let image = guest_image().expect("guest image builds");
    let qemu = Qemu::from_env().expect("QEMU is available");
    let accel = detect_accel(&qemu, &image);
    eprintln!(
        "QEMU {}.{} ({}), accel {}",
        qemu.version.0,
        qemu.version.1,
        qemu.binary.display(),
        accel.name()
    );
    Env {
        qemu,
        accel,
        image,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// Starts the backend with `ports` given as (name, extra spec such as ",vlan=10").
    fn backend(&self, ports: &[(&str, &str)], extra: &[&str]) -> BackendProcess {
        let mut args = Vec::new();
        let mut sockets = Vec::new();
        for (name, spec) in ports {
            args.push("--port".to_string());
            args.push(format!(
                "name={name},socket={}{spec}",
                self.sock(name).display()
            ));
            sockets.push(self.sock(name));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        BackendProcess::start(args, sockets, self.dir.path().join("backend.log"))
    }

    fn boot(&self, spec: GuestSpec) -> Guest {
        Guest::boot(&self.qemu, self.accel, &self.image, &spec).unwrap_or_else(|e| {
            panic!(
                "{e}\nbackend log:\n{}",
                std::fs::read_to_string(self.dir.path().join("backend.log")).unwrap_or_default()
            )
        })
    }

    fn guest(&self, name: &str, mac: u8, addr: &str) -> GuestSpec {
        GuestSpec::new(name, &self.sock(name), mac, addr)
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Shuts the guests down and checks nothing is left: no QEMU, and after the backend stops,
/// no socket or temporary file. Returns the backend's log.
fn finish(env: Env, guests: Vec<Guest>, mut backend: BackendProcess) -> String {
    let pids: Vec<u32> = guests.iter().map(|g| g.pid()).collect();
    for g in guests {
        let name = g.name.clone();
        assert!(
            g.shutdown(Duration::from_secs(30)),
            "guest {name} did not power off"
        );
    }
    for pid in pids {
        assert!(!pid_alive(pid), "QEMU {pid} still running");
    }
    assert!(backend.stop(), "backend did not exit cleanly on SIGTERM");
    let left: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != "backend.log")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::read_to_string(env.dir.path().join("backend.log")).unwrap_or_default()
}

/// `ping` from iputils (busybox's lacks `-M do`; busybox's shell runs its own
/// applets first, whatever PATH says, hence the full path).
fn ping_ok(g: &mut Guest, args: &str) -> bool {
    g.run(&format!("/usr/bin/ping -c 3 -W 2 {args}"), CMD)
        .unwrap()
        .status
        == 0
}

/// Waits until `from` can ping `addr` (the first ARP/ICMP may race the link coming up).
fn wait_ping(g: &mut Guest, addr: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while !ping_ok(g, &format!("-c 1 {addr}")) {
        assert!(Instant::now() < end, "{} cannot reach {addr}", g.name);
    }
}

#[test]
fn guests_ping_jumbo_isolated_vlans_offloads_and_iperf3() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    let backend = env.backend(
        &[("a", ",vlan=10"), ("b", ",vlan=10"), ("c", ",vlan=20")],
        &["--mtu", "9000"],
    );
    let mut spec_a = env.guest("a", 1, "10.0.0.1/24");
    let mut spec_b = env.guest("b", 2, "10.0.0.2/24");
    let mut spec_c = env.guest("c", 3, "10.0.0.3/24");
    for s in [&mut spec_a, &mut spec_b, &mut spec_c] {
        s.mtu = Some(9000);
    }
    let mut a = env.boot(spec_a);
    let mut b = env.boot(spec_b);
    let mut c = env.boot(spec_c);

    wait_ping(&mut a, "10.0.0.2");
    assert!(ping_ok(&mut b, "10.0.0.1"));
    // c is on VLAN 20: same subnet, but nothing crosses.
    assert!(!ping_ok(&mut a, "10.0.0.3"), "VLAN 10 reached VLAN 20");
    assert!(!ping_ok(&mut c, "10.0.0.2"), "VLAN 20 reached VLAN 10");

    // MTU 9000 end to end, without fragmentation.
    assert!(a.ok("cat /sys/class/net/eth0/mtu", CMD).trim() == "9000");
    assert!(
        ping_ok(&mut a, "-s 8972 -M do 10.0.0.2"),
        "9000-byte ping failed"
    );
    assert!(
        !ping_ok(&mut a, "-s 8973 -M do 10.0.0.2"),
        "oversize DF ping passed"
    );

    // Offloads were negotiated: the guest's driver has them on.
    let k = a.ok("ethtool -k eth0", CMD);
    for feature in [
        "tx-checksumming: on",
        "tcp-segmentation-offload: on",
        "rx-checksumming: on",
    ] {
        assert!(k.contains(feature), "ethtool -k lacks '{feature}':\n{k}");
    }

    // A TCP transfer between the guests.
    b.ok("iperf3 -s -D -1", CMD);
    std::thread::sleep(Duration::from_millis(500));
    let out = a.ok("iperf3 -c 10.0.0.2 -t 3 -f m", CMD);
    let line = out
        .lines()
        .find(|l| l.contains("receiver"))
        .unwrap_or_else(|| panic!("no iperf3 summary:\n{out}"));
    let mbits: f64 = line
        .split_whitespace()
        .zip(line.split_whitespace().skip(1))
        .find(|(_, unit)| *unit == "Mbits/sec")
        .and_then(|(v, _)| v.parse().ok())
        .expect("throughput figure");
    eprintln!(
        "iperf3 guest a -> b ({} {}): {mbits:.0} Mbit/s",
        env.accel.name(),
        env.qemu.version.0
    );
    assert!(mbits > 0.0);

    finish(env, vec![a, b, c], backend);
}

#[test]
fn multiqueue_guests_on_default_ports_see_and_use_their_channels() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    // Ports left at their default (16 queue pairs offered): a guest started with queues=4
    // and one with queues=2 each get what they asked for.
    let backend = env.backend(&[("a", ""), ("b", "")], &[]);
    let mut specs = [
        env.guest("a", 1, "10.0.1.1/24"),
        env.guest("b", 2, "10.0.1.2/24"),
    ];
    specs[0].nics[0].queues = 4;
    specs[1].nics[0].queues = 2;
    for s in &mut specs {
        s.cpus = 2;
    }
    let [sa, sb] = specs;
    let mut a = env.boot(sa);
    let mut b = env.boot(sb);
    let l = a.ok("ethtool -l eth0", CMD);
    let max = l.split("Current hardware settings").next().unwrap();
    assert!(max.contains("Combined:\t4"), "ethtool -l:\n{l}");
    a.ok("ethtool -L eth0 combined 4", CMD);
    b.ok("ethtool -L eth0 combined 2", CMD);
    let l = a.ok("ethtool -l eth0", CMD);
    assert!(
        l.split("Current hardware settings")
            .nth(1)
            .unwrap()
            .contains("Combined:\t4"),
        "{l}"
    );
    wait_ping(&mut a, "10.0.1.2");
    b.ok("iperf3 -s -D -1", CMD);
    std::thread::sleep(Duration::from_millis(500));
    let out = a.ok("iperf3 -c 10.0.1.2 -t 2 -P 4 -f m", CMD);
    assert!(out.contains("receiver"), "{out}");
    // And back to one pair: traffic still flows.
    a.ok("ethtool -L eth0 combined 1", CMD);
    assert!(ping_ok(&mut a, "10.0.1.2"));
    finish(env, vec![a, b], backend);
}

#[test]
fn backend_restart_is_picked_up_by_running_guests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    let mut backend = env.backend(&[("a", ""), ("b", "")], &[]);
    let mut a = env.boot(env.guest("a", 1, "10.0.2.1/24"));
    let b = env.boot(env.guest("b", 2, "10.0.2.2/24"));
    wait_ping(&mut a, "10.0.2.2");

    backend.crash_and_restart();
    // QEMU reconnects within its reconnect interval; the guests were never restarted.
    wait_ping(&mut a, "10.0.2.2");
    let log = std::fs::read_to_string(env.dir.path().join("backend.log")).unwrap();
    assert!(
        log.matches("port a: frontend connected").count() >= 2,
        "{log}"
    );
    finish(env, vec![a, b], backend);
}

/// Runs `ctl ARGS` against the backend's control socket; its stdout, or a panic with its
/// stderr.
fn ctl(control: &Path, args: &[&str]) -> String {
    let out = integration::testbed::ctl(control, args);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_port_added_at_run_time_serves_a_guest_and_a_deleted_one_costs_the_others_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    let control = env.dir.path().join("control.sock");
    let control_arg = control.display().to_string();
    let backend = env.backend(&[("a", ""), ("b", "")], &["--control-socket", &control_arg]);
    let mut a = env.boot(env.guest("a", 1, "10.0.3.1/24"));
    let b = env.boot(env.guest("b", 2, "10.0.3.2/24"));
    wait_ping(&mut a, "10.0.3.2");
    // a pings b the whole time the ports change: 150 pings, 0.1 s apart.
    a.ok(
        "/usr/bin/ping -q -c 150 -i 0.1 10.0.3.2 > /tmp/ping.out 2>&1 &",
        CMD,
    );
    let spec = format!("name=c,socket={}", env.sock("c").display());
    ctl(&control, &["port", "add", &spec]);
    let mut c = env.boot(env.guest("c", 3, "10.0.3.3/24"));
    wait_ping(&mut c, "10.0.3.1");
    ctl(&control, &["port", "del", "c"]);
    assert!(!env.sock("c").exists(), "c's socket is removed");
    assert!(!ping_ok(&mut c, "-c 1 10.0.3.1"), "c is cut off");
    // Back in the same place, c's QEMU reconnects (it retries every second) and its guest
    // is switched again without a reboot.
    ctl(&control, &["port", "add", &spec]);
    wait_ping(&mut c, "10.0.3.2");
    let end = Instant::now() + Duration::from_secs(60);
    let summary = loop {
        let out = a.ok("cat /tmp/ping.out", CMD);
        if out.contains("packets transmitted") {
            break out;
        }
        assert!(Instant::now() < end, "a's ping never ended: {out}");
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        summary.contains("150 packets transmitted, 150 received"),
        "a lost pings to b while c came and went: {summary}"
    );
    let log = finish(env, vec![a, b, c], backend);
    assert!(
        log.contains("port c: deleted") && log.contains("port c: added"),
        "{log}"
    );
}

#[test]
fn a_client_port_serves_qemu_as_the_server_across_a_switch_crash() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    // QEMU listens on g's socket (libvirt's mode='server'); the switch connects to it.
    let g_port = format!("name=g,socket={},mode=client", env.sock("g").display());
    let mut backend = env.backend(&[("b", "")], &["--port", &g_port]);
    let mut spec = env.guest("g", 1, "10.0.4.1/24");
    spec.nics[0].backend = NicBackend::VhostUserServer(env.sock("g"));
    let mut g = env.boot(spec);
    let b = env.boot(env.guest("b", 2, "10.0.4.2/24"));
    wait_ping(&mut g, "10.0.4.2");
    // A crash: no clean-up, QEMU's socket stays; the new switch connects to it again,
    // with no reconnect= on QEMU's side.
    backend.crash_and_restart();
    let restarted = Instant::now();
    wait_ping(&mut g, "10.0.4.2");
    eprintln!(
        "g reaches b again {} ms after the switch restarted (one ping, its console round \
         trip included)",
        restarted.elapsed().as_millis()
    );
    let log = finish(env, vec![g, b], backend);
    assert!(
        log.matches("port g: frontend connected").count() >= 2,
        "{log}"
    );
}

/// Whether `g` opens a TCP connection to `addr:port` (an iperf3 client for one second:
/// a real handshake, then data).
fn tcp_connects(g: &mut Guest, addr: &str, port: u16) -> bool {
    g.run(
        &format!("iperf3 -c {addr} -p {port} -t 1 --connect-timeout 3000 >/dev/null 2>&1"),
        CMD,
    )
    .unwrap()
    .status
        == 0
}

fn flow_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn micro_segmentation_between_three_guests_with_a_flow_log() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    // The user's files, apart from what the backend makes (which `finish` checks).
    let files = tempfile::tempdir().unwrap();
    let log = files.path().join("flows.log");
    let policy = files.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[policy]\nflow_log = \"{}\"\nflow_log_interval_secs = 1\n\
             [[rule]]\nname = \"web-to-app\"\naction = \"allow\"\nfrom = \"web\"\nto = \"app\"\n\
             proto = \"tcp\"\nports = 8080\n",
            log.display()
        ),
    )
    .unwrap();
    let backend = env.backend(
        &[
            ("web", ",group=web,ip=10.0.3.1"),
            ("app", ",group=app,ip=10.0.3.2"),
            ("db", ",group=db,ip=10.0.3.3"),
        ],
        &["--config", &policy.display().to_string()],
    );
    let mut web = env.boot(env.guest("web", 1, "10.0.3.1/24"));
    let mut app = env.boot(env.guest("app", 2, "10.0.3.2/24"));
    let mut db = env.boot(env.guest("db", 3, "10.0.3.3/24"));
    for g in [&mut web, &mut app, &mut db] {
        g.ok("iperf3 -s -p 8080 -D", CMD);
    }
    std::thread::sleep(Duration::from_millis(500));

    // web -> app tcp/8080: allowed (the first try may race the links coming up).
    let end = Instant::now() + Duration::from_secs(60);
    while !tcp_connects(&mut web, "10.0.3.2", 8080) {
        assert!(Instant::now() < end, "web cannot reach app on tcp/8080");
    }
    // The rest is denied: the other way, another tier, and ping.
    assert!(!tcp_connects(&mut app, "10.0.3.1", 8080), "app reached web");
    assert!(!tcp_connects(&mut web, "10.0.3.3", 8080), "web reached db");
    assert!(!ping_ok(&mut web, "10.0.3.2"), "ping passed");
    // db takes an address it does not own: its frames go nowhere.
    db.ok(
        "ip addr flush dev eth0 && ip addr add 10.0.3.9/24 dev eth0",
        CMD,
    );
    assert!(
        !tcp_connects(&mut db, "10.0.3.2", 8080),
        "a spoofed source passed"
    );

    // The flow log shows each attempt with its verdict.
    let wanted = |l: &serde_json::Value, src: &str, dst: &str, proto: &str, verdict: &str| {
        l["src"] == src && l["dst"] == dst && l["proto"] == proto && l["verdict"] == verdict
    };
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = flow_log(&log);
        let seen = [
            lines.iter().any(|l| {
                wanted(l, "10.0.3.1", "10.0.3.2", "tcp", "allow")
                    && l["rule"] == "web-to-app"
                    && l["dport"] == 8080
            }),
            lines
                .iter()
                .any(|l| wanted(l, "10.0.3.2", "10.0.3.1", "tcp", "deny") && l["dport"] == 8080),
            lines
                .iter()
                .any(|l| wanted(l, "10.0.3.1", "10.0.3.3", "tcp", "deny") && l["dport"] == 8080),
            lines
                .iter()
                .any(|l| wanted(l, "10.0.3.1", "10.0.3.2", "icmp", "deny")),
        ];
        if seen.iter().all(|s| *s) {
            break;
        }
        assert!(
            Instant::now() < end,
            "flow log lacks an attempt ({seen:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // db's frames from an address it does not own were dropped as spoofed: its counters,
    // logged at exit, say so.
    let text = finish(env, vec![web, app, db], backend);
    let db_line = text
        .lines()
        .find(|l| l.contains("port db: rx"))
        .unwrap_or_else(|| panic!("no counters of port db in the log:\n{text}"));
    assert!(db_line.contains("spoofed_ip"), "{db_line}");
}

#[test]
fn two_guests_in_two_subnets_talk_through_the_switch_as_their_router() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("routed.toml");
    std::fs::write(
        &config,
        "[[segment]]\nname = \"front\"\nvlan = 10\n\
         gateway = [\"10.0.11.1/24\", \"fd00:11::1/64\"]\ndhcp = { mtu = 4000 }\n\
         [[segment]]\nname = \"back\"\nvlan = 20\n\
         gateway = [\"10.0.12.1/24\", \"fd00:12::1/64\"]\ndhcp = { mtu = 4000 }\n\
         [[rule]]\nname = \"web-to-app\"\naction = \"allow\"\nfrom = \"web\"\nto = \"app\"\n\
         proto = \"tcp\"\nports = 8080\n",
    )
    .unwrap();
    // web's binding is learned (it has no mac=), app's is configured. Their IPv6
    // addresses are the ones SLAAC derives from their MACs (EUI-64).
    const WEB6: &str = "fd00:11::5054:ff:fe00:1";
    const APP6: &str = "fd00:12::5054:ff:fe00:2";
    let backend = env.backend(
        &[
            ("web", &format!(",vlan=10,group=web,ip=10.0.11.2,ip={WEB6}")),
            (
                "app",
                &format!(",vlan=20,group=app,ip=10.0.12.2,ip={APP6},mac=52:54:00:00:00:02"),
            ),
        ],
        &["--config", &config.display().to_string()],
    );
    // No vnet.ip=: the guests' udhcpc gets address, gateway and MTU from the switch.
    let dhcp = |name: &str, mac: u8| {
        let mut spec = env.guest(name, mac, "");
        spec.addrs.clear();
        spec
    };
    let mut web = env.boot(dhcp("web", 1));
    let mut app = env.boot(dhcp("app", 2));
    for (g, addr, gw) in [
        (&mut web, "10.0.11.2/24", "10.0.11.1"),
        (&mut app, "10.0.12.2/24", "10.0.12.1"),
    ] {
        let got = g.ok(
            "ip -4 -o addr show eth0; ip route; cat /sys/class/net/eth0/mtu",
            CMD,
        );
        assert!(got.contains(addr), "{}: no {addr} by DHCP:\n{got}", g.name);
        assert!(
            got.contains(&format!("default via {gw}")),
            "{}: {got}",
            g.name
        );
        assert!(
            got.lines().any(|l| l.trim() == "4000"),
            "{}: MTU: {got}",
            g.name
        );
    }
    app.ok("iperf3 -s -p 8080 -D", CMD);
    web.ok("iperf3 -s -p 8080 -D", CMD);
    // Each guest finds its gateway by ARP and gets its pings answered, a whole segment
    // MTU unfragmented.
    wait_ping(&mut web, "10.0.11.1");
    wait_ping(&mut app, "10.0.12.1");
    assert!(
        ping_ok(&mut web, "-M do -s 3972 10.0.11.1"),
        "4000-byte ping"
    );
    assert!(
        !ping_ok(&mut web, "-M do -s 3973 10.0.11.1"),
        "over the MTU"
    );
    // web -> app tcp/8080 across the subnets, a real TCP transfer both ways.
    let end = Instant::now() + Duration::from_secs(60);
    while !tcp_connects(&mut web, "10.0.12.2", 8080) {
        assert!(
            Instant::now() < end,
            "web cannot reach app on tcp/8080 through the router"
        );
    }
    let out = web.ok("iperf3 -c 10.0.12.2 -p 8080 -t 2 -J", CMD);
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    eprintln!("iperf3 web -> app routed: {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 1e6, "routed TCP carried {bps} bit/s");
    // The hop is there: the guest's TTL arrives one less (traceroute's first hop).
    let trace = web.ok("traceroute -n -m 3 -q 1 -w 2 10.0.12.2 2>&1 || true", CMD);
    assert!(
        trace.contains("10.0.11.1"),
        "no first hop at the gateway:\n{trace}"
    );
    // IPv6 from the switch's router advertisements alone: each guest's address (SLAAC)
    // and default route through the router's link-local address; across the subnets.
    for (g, addr) in [(&mut web, WEB6), (&mut app, APP6)] {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let got = g.ok(
                "ip -6 -o addr show dev eth0 scope global; ip -6 route show default; \
                 cat /proc/sys/net/ipv6/conf/eth0/mtu",
                CMD,
            );
            if got.contains(addr) && got.contains("default via fe80::76:6eff:fe00:1") {
                assert!(got.lines().any(|l| l.trim() == "4000"), "{}: {got}", g.name);
                break;
            }
            assert!(
                Instant::now() < end,
                "{}: no IPv6 from the router:\n{got}",
                g.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    wait_ping(&mut web, "fd00:11::1");
    assert!(tcp_connects(&mut web, APP6, 8080), "web -> app over IPv6");
    // The policy holds between the subnets: app may not open a connection to web.
    assert!(
        !tcp_connects(&mut app, "10.0.11.2", 8080),
        "app reached web"
    );
    assert!(
        !tcp_connects(&mut app, WEB6, 8080),
        "app reached web over IPv6"
    );
    assert!(!ping_ok(&mut web, "10.0.12.2"), "ping between tiers passed");
    let text = finish(env, vec![web, app], backend);
    let app_line = text
        .lines()
        .find(|l| l.contains("port app: rx"))
        .unwrap_or_else(|| panic!("no counters of port app in the log:\n{text}"));
    assert!(app_line.contains("policy_denied"), "{app_line}");
}

/// The `bridge-plugin` binary from the same target folder.
fn bridge_plugin_binary() -> PathBuf {
    backend_binary().with_file_name("bridge-plugin")
}

#[test]
fn guest_reaches_host_and_outside_through_the_uplink_on_a_nat_bridge() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = env();
    // The host side lives in a namespace: a NAT network made by bridge-plugin, with an
    // "outside" namespace behind its uplink.
    let (host, _outside) = Netns::host_with_outside("uphost");
    let net = env.dir.path().join("net.toml");
    std::fs::write(
        &net,
        "[[network]]\nname = \"web\"\nmode = \"nat\"\nbridge = \"bp-web\"\naddress = \"10.1.0.1/24\"\nuplink = \"up0\"\n",
    )
    .unwrap();
    host.sh(&format!(
        "{} net up {}",
        bridge_plugin_binary().display(),
        net.display()
    ));
    let sock = env.sock("web1");
    let mut backend = BackendProcess::start_in(
        Some(host.name.clone()),
        vec![
            "--port".into(),
            format!("name=web1,socket={}", sock.display()),
            "--uplink".into(),
            "tap:vnet0".into(),
        ],
        vec![sock],
        env.dir.path().join("backend.log"),
    );
    host.sh("ip link set vnet0 master bp-web");

    let mut web1 = env.boot(env.guest("web1", 1, "10.1.0.10/24"));
    wait_ping(&mut web1, "10.1.0.1");
    web1.ok("ip route add default via 10.1.0.1", CMD);
    assert!(
        ping_ok(&mut web1, "192.0.2.2"),
        "the outside through the host's NAT"
    );
    let k = web1.ok("ethtool -k eth0", CMD);
    assert!(k.contains("tcp-segmentation-offload: on"), "{k}");

    assert!(web1.shutdown(Duration::from_secs(30)));
    assert!(backend.stop(), "backend did not exit cleanly");
    host.sh(&format!(
        "{} net down {}",
        bridge_plugin_binary().display(),
        net.display()
    ));
    std::fs::remove_file(env.dir.path().join("net.toml")).unwrap();
    finish(env, Vec::new(), backend);
}
