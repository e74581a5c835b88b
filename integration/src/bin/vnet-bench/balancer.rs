//! New connections per second through the uplink's load balancer, the way an outside
//! client's connection goes: the backend in a network namespace of its own, its tap uplink
//! with the host's address, a forward of the host's port 8080 to a balancer of three
//! backends (three ports, played by three frontend threads that answer every SYN with a
//! SYN-ACK), a default-deny policy that lets the outside reach the web tier's port 80.
//! Sixteen client threads on the host side connect to 10.10.0.2:8080 (the host's NAT
//! picks a backend, the switch routes and tracks the connection) and reset each connection
//! once it is established (no TIME_WAIT, so ports come round again). A connection is three frames
//! through the switch (SYN, SYN-ACK, RST) and two passes through the host's conntrack.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use integration::netns::Netns;
use integration::testbed::BackendProcess;
use integration::{DeviceOptions, VirtioNetDevice};
use serde::Serialize;
use vhost_net_backend::virtio::NetHdr;

const GATEWAY_MAC: [u8; 6] = [0x02, 0x76, 0x6e, 0, 0, 1];
const BACKENDS: usize = 3;
const CLIENTS: usize = 16;

#[derive(Serialize)]
pub struct BalancerRun {
    pub seconds: f64,
    pub connections: u64,
    pub per_second: f64,
    /// Handshakes each backend answered.
    pub spread: Vec<u64>,
    /// Connections that failed (refused or timed out).
    pub failed: u64,
}

fn config(dir: &Path) -> String {
    let mut c = format!(
        "[policy]\ndefault = \"deny\"\nmax_flows = 2000000\nmax_flows_per_port = 2000000\n\
         [[rule]]\naction = \"allow\"\nfrom = \"outside\"\nto = \"web\"\nproto = \"tcp\"\nports = 80\n\
         [[segment]]\nname = \"web\"\nvlan = 10\ngateway = [\"10.10.1.1/24\"]\n\
         [[segment]]\nname = \"outside\"\nvlan = 100\ngateway = [\"10.10.0.1/24\"]\n\
         [uplink]\ntap = \"vnb0\"\nvlan = 100\nhost = \"10.10.0.2/24\"\n\
         [[uplink.forward]]\nhost_port = 8080\nbalancer = \"web\"\n\
         [[balancer]]\nname = \"web\"\nport = 80\nbackends = [{}]\n",
        (0..BACKENDS)
            .map(|i| format!("\"10.10.1.{}\"", 10 + i))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for i in 0..BACKENDS {
        c += &format!(
            "[[port]]\nname = \"web{i}\"\nsocket = \"{}\"\nvlan = 10\nmac = \"02:00:00:00:01:{:02x}\"\n\
             addresses = [\"10.10.1.{}\"]\ngroups = [\"web\"]\n",
            dir.join(format!("web{i}.sock")).display(),
            i + 1,
            10 + i
        );
    }
    c
}

/// Answers every SYN to port 80 on `dev` with a SYN-ACK until `stop`; how many it answered.
fn respond(mut dev: VirtioNetDevice, mac: [u8; 6], stop: Arc<AtomicBool>) -> u64 {
    let mut answered = 0;
    let mut out = Vec::with_capacity(128);
    while !stop.load(Ordering::Relaxed) {
        let Some(rx) = dev.recv(0, Duration::from_millis(20)) else {
            continue;
        };
        let Ok(p) = SlicedPacket::from_ethernet(&rx.frame) else {
            continue;
        };
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (&p.net, &p.transport)
        else {
            continue;
        };
        if !tcp.syn() || tcp.ack() {
            continue;
        }
        out.clear();
        let (src, dst) = (ip.header().source(), ip.header().destination());
        let built = PacketBuilder::ethernet2(mac, GATEWAY_MAC)
            .ipv4(dst, src, 64)
            .tcp(80, tcp.source_port(), 7000, 64240)
            .syn()
            .ack(tcp.sequence_number().wrapping_add(1))
            .write(&mut out, &[]);
        if built.is_ok() && dev.send(0, &NetHdr::default(), &out).is_ok() {
            answered += 1;
        }
    }
    answered
}

/// Runs `f` on a new thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns on this thread only, with an fd we hold open for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Connects to `to` and resets each connection, counting them in `done`, until `stop`;
/// returns the connections that failed (refused, or no answer within a second).
fn connect_loop(to: SocketAddr, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> u64 {
    let mut failed = 0;
    while !stop.load(Ordering::Relaxed) {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(s) => {
                // Closed with a reset, not a FIN: no TIME_WAIT, the port comes round again.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => failed += 1,
        }
    }
    failed
}

/// The run, or why it could not be made.
pub fn new_connections(seconds: f64) -> Result<BalancerRun, String> {
    let host = Netns::new("lb");
    host.sh("sysctl -qw net.ipv4.ip_local_port_range='1024 65000'");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = dir.path().join("switch.toml");
    std::fs::write(&cfg, config(dir.path())).map_err(|e| e.to_string())?;
    let sockets: Vec<_> = (0..BACKENDS)
        .map(|i| dir.path().join(format!("web{i}.sock")))
        .collect();
    let log = dir.path().join("backend.log");
    let mut backend = BackendProcess::start_in(
        Some(host.name.clone()),
        vec!["--config".into(), cfg.display().to_string()],
        sockets.clone(),
        log.clone(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(10);
    while !read_log().contains("switch up") {
        if Instant::now() > end {
            return Err(format!("the switch never came up:\n{}", read_log()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut responders = Vec::new();
    for (i, path) in sockets.iter().enumerate() {
        let mut dev = VirtioNetDevice::connect_retry(path, DeviceOptions::default());
        dev.post_rx(0, 256).map_err(|e| e.to_string())?;
        let stop = stop.clone();
        let mac = [2, 0, 0, 0, 1, i as u8 + 1];
        responders.push(std::thread::spawn(move || respond(dev, mac, stop)));
    }
    // The backends' first health checks pass before the clients start.
    std::thread::sleep(Duration::from_millis(300));
    let to: SocketAddr = "10.10.0.2:8080".parse().expect("address");
    let done = Arc::new(AtomicU64::new(0));
    let clients_stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done) = (clients_stop.clone(), done.clone());
            in_netns(&host, move || connect_loop(to, stop, done))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let connections = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    // The clients' last connections complete before the backends stop answering.
    clients_stop.store(true, Ordering::Relaxed);
    let failed = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    stop.store(true, Ordering::Relaxed);
    let spread = responders
        .into_iter()
        .map(|r| r.join().unwrap_or(0))
        .collect();
    backend.stop();
    if connections == 0 {
        return Err(format!("no connection completed:\n{}", read_log()));
    }
    Ok(BalancerRun {
        seconds: elapsed,
        connections,
        per_second: connections as f64 / elapsed,
        spread,
        failed,
    })
}

/// The run as one line of the report.
pub fn describe(r: &BalancerRun) -> String {
    format!(
        "new connections through the balancer (host's NAT -> switch, routed, policy -> 3 backends): \
         {:.1} k/s ({} in {:.1} s, {} failed; handshakes per backend {:?})",
        r.per_second / 1000.0,
        r.connections,
        r.seconds,
        r.failed,
        r.spread
    )
}
