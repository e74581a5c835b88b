//! Benchmark of the switch: the backend binary runs as its own process and the integration
//! frontend drives it as two guests would (port A sends, port B receives; or both ways at
//! once, frames summed), from one thread on the other core, guest memory on 2 MiB pages
//! where the host has them reserved. Reports Mpps, Gbit/s, the CPU time per frame of the
//! backend and the frontend's busy time per frame (so a frontend bottleneck shows),
//! round-trip latency with and without `--poll-us`, and a memcpy baseline of the same bytes
//! measured in the same run.
//!
//!   vnet-bench [--seconds S] [--json] [--case NAME] [--queue-size N]
//!
//! Rings have 256 entries (QEMU's default for virtio-net) unless `--queue-size` (512 or
//! 1024) says otherwise: with 1024, the buffers of a 1518 B case outgrow a core's
//! L2 cache.
//! `--case` runs only the throughput cases whose name starts with NAME ("64 B", "1518 B <->")
//! and no latency test: for comparing builds (VNET_BACKEND=path picks the backend binary).
//! `--section` runs one section of the report alone (`staged`: the policy and routed
//! cases against plain L2).
//!
//! The policy section runs the same backend with a policy: A's group may send UDP and TCP
//! to B's after 9 or 999 rules that do not match (so 10 or 1,000 rules), on established
//! flows (one flow per queue pair; at 64 KiB TSO, a TCP flow opened by a SYN first),
//! against a plain L2 backend driven in turn with it, three rounds, the median of the
//! rounds' ratios; and new connections per second at 64 B and 1518 B,
//! every frame a new 5-tuple (its ports counted up by the frontend), each size on a fresh
//! backend and up to three quarters of its table. OVS-DPDK runs
//! the same established-flow cases, with NORMAL alone and with a conntrack firewall in front
//! of it, as the reference for a stateful switch (`ovs.rs`). Then A and B are put in two
//! subnets (VLANs 10 and 20) and A sends to the switch's gateway: routed, alone and under
//! the 10-rule policy, in the same rounds; these stages also run `64 B 4 flows`, four
//! flows' frames in turn (the switch shares decisions among a burst's frames of a few).
//! Last, new connections per second through the uplink's load balancer, from the host's NAT
//! to three backends (`balancer.rs`, `--case balancer` alone); and eight ports, four
//! senders each to a receiver of its own, served by a thread per queue pair and by one pool
//! worker (`many_ports.rs`, `--case "8 ports"` alone).

mod balancer;
mod many_ports;
mod ovs;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::frames::{as_partial_tcp, mac, tcp_frame, udp_frame, BROADCAST};
use integration::frontend::ALL_FEATURES;
use integration::testbed::backend_binary;
use integration::testpmd::{self, ForwardRun, VirtioUser, DPDK_PMDS};
use integration::{DeviceOptions, VirtioNetDevice};
use serde::Serialize;
use vhost_net_backend::virtio::{features as f, NetHdr};

#[derive(Serialize)]
struct Throughput {
    backend: &'static str,
    case: String,
    queue_pairs: u16,
    frame_bytes: usize,
    frames: u64,
    mpps: f64,
    gbit_s: f64,
    backend_ns_per_frame: f64,
    /// Time the frontend spent in loop rounds that moved frames, per frame.
    frontend_busy_ns_per_frame: f64,
    memcpy_gbit_s: f64,
    backend_to_memcpy: f64,
}

#[derive(Serialize)]
struct Latency {
    poll_us: u64,
    round_trips: usize,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct Report {
    seconds_per_case: f64,
    /// Entries of every ring, RX and TX (QEMU's default for virtio-net is 256).
    queue_size: u16,
    /// "2 MiB" or "4 KiB": the frontend's guest memory pages.
    guest_pages: &'static str,
    throughput: Vec<Throughput>,
    latency: Vec<Latency>,
    /// The same round trip with no backend: two sleeping threads on CPU 1 woken in turn
    /// through eventfds, as a kick wakes a worker. What no non-polling backend beats here.
    wakeup_floor: Option<Latency>,
    /// Ours over DPDK testpmd (io forwarding), Mpps, same case and queue pairs.
    vs_dpdk: Vec<(String, u16, f64)>,
    /// With a policy over plain L2, Mpps, same case, one queue pair, same run.
    vs_plain: Vec<(String, String, f64)>,
    /// OVS-DPDK with conntrack over its NORMAL, and ours (10 rules) over OVS-DPDK with
    /// conntrack; Mpps, same case, one queue pair.
    vs_ovs: Vec<(String, String, f64)>,
    ovs: Option<String>,
    dpdk: Option<String>,
    /// DPDK's virtio-user PMD (testpmd) as the frontend, against ours and testpmd's vhost PMD.
    foreign: Vec<ForeignRun>,
    /// Ours over testpmd's vhost PMD with that frontend: case, medians' ratio.
    vs_dpdk_foreign: Vec<(String, f64)>,
    /// The frontend's own limit over testpmd's rate with it: case, the median of its busy
    /// shares' inverse over testpmd's rounds.
    foreign_limit: Vec<(String, f64)>,
    foreign_note: Option<String>,
    /// New connections per second through the uplink's load balancer.
    balancer: Option<balancer::BalancerRun>,
    balancer_error: Option<String>,
    /// Eight ports, a thread per queue pair against `--workers 1`.
    many_ports: Option<many_ports::ManyPortsRun>,
    many_ports_error: Option<String>,
}

/// One run of DPDK's virtio-user frontend (testpmd, mac forwarding, frames circulating
/// both ways) against a backend.
#[derive(Serialize)]
struct ForeignRun {
    backend: &'static str,
    case: &'static str,
    round: usize,
    /// Both directions summed.
    mpps: f64,
    /// testpmd's forwarding core: busy time per frame (idle polls excluded).
    frontend_ns_per_frame: Option<f64>,
    /// The share of its time the forwarding core was busy (busy time per frame times the
    /// rate): near 1, the frontend was the bottleneck; well below, it waited for the
    /// backend.
    frontend_busy: Option<f64>,
}

/// Rounds of the policy and routed section; its backends take turns within each.
const STAGED_ROUNDS: usize = 3;

const FOREIGN_CASES: [(&str, usize); 2] = [("64 B", 64), ("1518 B", 1518)];
/// Rounds of the foreign-frontend section; the backends take turns within each.
const FOREIGN_ROUNDS: usize = 3;

/// DPDK's virtio-user frontend against ours and against testpmd's vhost PMD (one queue
/// pair, its forwarding core on CPU 1), interleaved round by round in alternating order
/// so that a drift of the machine reaches both; medians and their ratio per case.
fn foreign_frontend(seconds: f64, only: Option<&str>, report: &mut Report) {
    if !testpmd::available() {
        report.foreign_note = Some(
            "not run: dpdk-testpmd or DPDK's virtio PMD missing (apt-get install dpdk-dev \
             librte-net-virtio23)"
                .into(),
        );
        return;
    }
    const OURS: &str = "vhost-net-backend";
    // Both ports' queues on one thread, as testpmd's one forwarding loop serves both.
    const POOLED: &str = "vhost-net-backend --workers 1";
    const THEIRS: &str = "dpdk-testpmd vhost";
    let dev = VirtioUser::default();
    for (case, size) in FOREIGN_CASES
        .into_iter()
        .filter(|(n, _)| only.is_none_or(|o| n.starts_with(o)))
    {
        for round in 0..FOREIGN_ROUNDS {
            let order = if round % 2 == 0 {
                [OURS, POOLED, THEIRS]
            } else {
                [THEIRS, POOLED, OURS]
            };
            for backend in order {
                let target: Box<dyn Target> = match backend {
                    OURS => Box::new(Backend::start(&[])),
                    POOLED => Box::new(Backend::start(&["--workers", "1"])),
                    _ => match Dpdk::start(1) {
                        Some(d) => Box::new(d),
                        None => continue,
                    },
                };
                let run = ForwardRun {
                    frame_bytes: size,
                    warmup: Duration::from_secs(1),
                    measure: Duration::from_secs_f64(seconds.max(0.5)),
                    forwarding_cpu: 0,
                    file_prefix: format!("vnetbench-fe-{}", std::process::id()),
                };
                match testpmd::forward([&target.sock("a"), &target.sock("b")], &dev, &run) {
                    Ok(r) => report.foreign.push(ForeignRun {
                        backend,
                        case,
                        round,
                        mpps: r.mpps(),
                        frontend_ns_per_frame: r.frontend_ns_per_frame(),
                        frontend_busy: r.frontend_busy(),
                    }),
                    Err(e) => {
                        let tail: String = e.lines().rev().take(15).collect::<Vec<_>>().join("\n");
                        eprintln!("vnet-bench: {backend}, {case}, DPDK frontend: {tail}");
                    }
                }
            }
        }
        let median_of = |backend: &str| {
            median(
                report
                    .foreign
                    .iter()
                    .filter(|r| r.backend == backend && r.case == case)
                    .map(|r| r.mpps)
                    .collect(),
            )
        };
        // A frontend busy a share b of its time beside testpmd could forward 1 / b times
        // testpmd's rate at the same cost a frame: the most any backend can show over
        // testpmd with it, unless the backend also makes the frontend's frames cheaper.
        let limit = median(
            report
                .foreign
                .iter()
                .filter(|r| r.backend == THEIRS && r.case == case)
                .filter_map(|r| r.frontend_busy.filter(|b| *b > 0.0).map(|b| 1.0 / b))
                .collect(),
        );
        if let Some(limit) = limit {
            report.foreign_limit.push((case.to_string(), limit));
        }
        for mine in [OURS, POOLED] {
            if let (Some(ours), Some(theirs)) = (median_of(mine), median_of(THEIRS)) {
                if theirs > 0.0 {
                    report
                        .vs_dpdk_foreign
                        .push((format!("{case}, {mine}"), ours / theirs));
                }
            }
        }
    }
    report.foreign_note = Some(format!(
        "dpdk-testpmd 22.11 as the frontend: two net_virtio_user ports ({} entries, in_order=1, \
         mrg_rxbuf=0), mac forwarding of 16 bursts of 32 frames a port, forwarding core on CPU 0; \
         the backend on CPU 1 ({FOREIGN_ROUNDS} interleaved rounds)",
        dev.queue_size
    ));
}

/// Every section driven by our own frontend (`integration::frontend`).
fn own_frontend(report: &mut Report, cases: &[Case], only: Option<&str>, setup: Setup) {
    let seconds = setup.seconds;
    for (label, extra) in [
        ("vhost-net-backend", &[][..]),
        ("  --poll-us 50", &["--poll-us", "50"][..]),
    ] {
        if !setup.runs("switching") {
            break;
        }
        let backend = Backend::start(extra);
        for qps in [1u16, 2] {
            for &case in cases {
                let (t, huge) = throughput(&backend, case, qps, setup);
                report.record(t, huge, label);
            }
        }
    }
    // The policy stage: established flows under 10 and 1,000 rules, and new connections;
    // routing, alone and with the policy. OVS-DPDK's reference after them takes the cases
    // without TSO (`policy_cases`).
    let policy_cases: Vec<Case> = cases
        .iter()
        .filter(|c| !c.tso && !c.both_ways)
        .copied()
        .collect();
    // Then routing between two subnets, alone and with the policy. Each against a plain
    // L2 backend of its own, all five started together and driven in turn, round by
    // round: the machine's speed swings by 25 % within minutes, so a ratio is taken within
    // a round and the median of the rounds' ratios is reported (one plain run before them
    // all read 0.55 to 1.41 for the same build).
    let staged: Vec<Case> = cases
        .iter()
        .filter(|c| !c.both_ways)
        .copied()
        .chain(
            [INTERLEAVED]
                .into_iter()
                .filter(|c| only.is_none_or(|o| c.name.starts_with(o))),
        )
        .collect();
    if !staged.is_empty() && setup.runs("staged") {
        let stages: [(&'static str, Option<usize>, bool); 5] = [
            ("  plain L2", None, false),
            ("  policy 10 rules", Some(10), false),
            ("  policy 1000 rules", Some(1000), false),
            ("  routed", None, true),
            ("  routed + policy 10 rules", Some(10), true),
        ];
        let backends: Vec<Backend> = stages
            .iter()
            .map(|&(_, rules, routed)| Backend::start_with(rules, routed, &[]))
            .collect();
        // 64 KiB TSO too (a TCP flow the policy allows, opened by a SYN): the OVS
        // reference below runs without it.
        for &case in &staged {
            let mut mpps = vec![Vec::new(); stages.len()];
            for _ in 0..STAGED_ROUNDS {
                for (k, (&(label, ..), backend)) in stages.iter().zip(&backends).enumerate() {
                    let (t, huge) = throughput(backend, case, 1, setup);
                    mpps[k].push(t.mpps);
                    report.record(t, huge, label);
                }
            }
            for (k, &(label, ..)) in stages.iter().enumerate().skip(1) {
                let ratios = mpps[k]
                    .iter()
                    .zip(&mpps[0])
                    .filter(|(_, plain)| **plain > 0.0)
                    .map(|(m, plain)| m / plain)
                    .collect();
                if let Some(ratio) = median(ratios) {
                    report
                        .vs_plain
                        .push((label.trim().to_string(), case.name.to_string(), ratio));
                }
            }
        }
    }
    // New connections, each size on a backend of its own: the frontend counts the ports
    // up from zero, so a second run on one table would find its flows tracked.
    for case in NEW_FLOWS
        .into_iter()
        .filter(|c| only.is_none_or(|o| c.name.starts_with(o)) && setup.runs("new"))
    {
        let backend = Backend::start_with(Some(10), false, &[]);
        let (t, huge) = throughput(&backend, case, 1, setup);
        report.record(t, huge, "  policy 10 rules");
    }

    if only.is_none_or(|o| BALANCER_CASE.starts_with(o)) && setup.runs("balancer") {
        match balancer::new_connections(seconds) {
            Ok(r) => report.balancer = Some(r),
            Err(e) => report.balancer_error = Some(e),
        }
    }

    if only.is_none_or(|o| many_ports::CASE.starts_with(o)) && setup.runs("8 ports") {
        match many_ports::compare(seconds, setup.queue_size) {
            Ok(r) => report.many_ports = Some(r),
            Err(e) => report.many_ports_error = Some(e),
        }
    }

    // OVS-DPDK, NORMAL and with a conntrack firewall, on the same cases.
    if !policy_cases.is_empty() && setup.runs("ovs") {
        report.ovs = Some(match ovs::Ovs::start() {
            Some(o) => {
                let mut mpps = std::collections::HashMap::new();
                for (label, flows) in [
                    ("ovs-dpdk NORMAL", ovs::OvsFlows::Normal),
                    ("ovs-dpdk conntrack", ovs::OvsFlows::Conntrack),
                ] {
                    if !o.set_flows(flows) {
                        break;
                    }
                    for &case in &policy_cases {
                        let (t, huge) = throughput(&o, case, 1, setup);
                        mpps.insert((label, case.name), t.mpps);
                        report.record(t, huge, label);
                    }
                }
                for &case in &policy_cases {
                    let get = |label: &str| mpps.get(&(label, case.name)).copied().unwrap_or(0.0);
                    let ours = median(
                        report
                            .throughput
                            .iter()
                            .filter(|t| t.backend == "  policy 10 rules" && t.case == case.name)
                            .map(|t| t.mpps)
                            .collect(),
                    )
                    .unwrap_or(0.0);
                    let (normal, ct) = (get("ovs-dpdk NORMAL"), get("ovs-dpdk conntrack"));
                    if normal > 0.0 && ct > 0.0 {
                        report.vs_ovs.push((
                            "OVS-DPDK conntrack / its NORMAL".into(),
                            case.name.into(),
                            ct / normal,
                        ));
                        report.vs_ovs.push((
                            "ours, policy 10 rules / OVS-DPDK conntrack".into(),
                            case.name.into(),
                            ours / ct,
                        ));
                    }
                }
                "OVS-DPDK 3.1 (Debian), netdev bridge, two dpdkvhostuser ports, one PMD core, \
                 256 MiB of 2 MiB pages"
                    .into()
            }
            None => "not run: OVS-DPDK missing or did not start (apt-get install \
                     openvswitch-switch-dpdk; it needs 128 free 2 MiB huge pages)"
                .into(),
        });
    }

    for poll_us in [0u64, 50] {
        if only.is_some() || !setup.runs("latency") {
            break;
        }
        let backend = Backend::start(&["--poll-us", &poll_us.to_string()]);
        let trips = (seconds * 2000.0) as usize;
        report
            .latency
            .push(latency(&backend, poll_us, trips.max(200)));
    }

    if only.is_none() && setup.runs("latency") {
        report.wakeup_floor = Some(wakeup_floor((seconds * 2000.0).max(200.0) as usize));
    }

    if !setup.runs("dpdk") {
        return;
    }
    match Dpdk::start(2) {
        Some(dpdk) => {
            for qps in [1u16, 2] {
                for &case in cases {
                    let (t, huge) = throughput(&dpdk, case, qps, setup);
                    let ours = report
                        .throughput
                        .iter()
                        .filter(|o| o.case == case.name && o.queue_pairs == qps)
                        .map(|o| o.mpps)
                        .fold(0.0, f64::max);
                    // `--section dpdk` alone runs none of ours: no ratio to show then.
                    if ours > 0.0 && t.mpps > 0.0 {
                        report
                            .vs_dpdk
                            .push((case.name.to_string(), qps, ours / t.mpps));
                    }
                    report.record(t, huge, "dpdk-testpmd");
                }
            }
            report.dpdk = Some(
                "dpdk-testpmd 22.11, two net_vhost ports, io forwarding, one forwarding core, --no-huge"
                    .into(),
            );
        }
        None => {
            report.dpdk = Some(
                "not run: dpdk-testpmd missing (apt-get install dpdk-dev librte-net-vhost23)"
                    .into(),
            );
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

struct Backend {
    child: Child,
    dir: tempfile::TempDir,
    /// A and B in two routed segments: frames go to the gateway.
    routed: bool,
    policy: bool,
}

/// A in 10.0.1.0/24 (vlan 10), B in 10.0.2.0/24 (vlan 20), the switch between them.
const ROUTED: &str = "[[segment]]\nvlan = 10\ngateway = [\"10.0.1.1/24\"]\n\
[[segment]]\nvlan = 20\ngateway = [\"10.0.2.1/24\"]\n";
const GATEWAY_MAC: [u8; 6] = [0x02, 0x76, 0x6e, 0, 0, 1];

impl Backend {
    fn start(extra: &[&str]) -> Backend {
        Self::start_with(None, false, extra)
    }

    /// With `rules` allowing UDP from A to B (`rules` in all), if given; `routed`: A and
    /// B in two subnets (`ROUTED`).
    fn start_with(rules: Option<usize>, routed: bool, extra: &[&str]) -> Backend {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut cmd = Command::new(backend_binary());
        for (p, n) in [("a", 1u8), ("b", 2)] {
            // Both ports on VLAN 10 unless routed: the segment checks are part of what
            // is measured.
            let placed = if routed {
                format!(
                    ",vlan={n}0,ip=10.0.{n}.5,mac={}",
                    vhost_net_backend::MacAddr(mac(n))
                )
            } else {
                ",vlan=10".into()
            };
            cmd.arg("--port").arg(format!(
                "name={p},socket={},queues=2,group={p}{placed}",
                dir.path().join(format!("{p}.sock")).display()
            ));
        }
        let mut config = rules.map(policy_file).unwrap_or_default();
        if routed {
            config.push_str(ROUTED);
        }
        if !config.is_empty() {
            let path = dir.path().join("switch.toml");
            std::fs::write(&path, config).expect("config file");
            cmd.arg("--config").arg(path);
        }
        cmd.args(extra).stderr(Stdio::null());
        on_cpu1(&mut cmd);
        let child = cmd.spawn().expect("backend starts");
        let b = Backend {
            child,
            dir,
            routed,
            policy: rules.is_some(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !(b.dir.path().join("a.sock").exists() && b.dir.path().join("b.sock").exists()) {
            assert!(Instant::now() < end, "backend sockets never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }
}

/// A policy of `n` rules: `n - 1` that no benchmark frame matches (other sources, other
/// ports), then the one that allows A's UDP to B. A table large enough for the new
/// connections case (two million flows: its frames come at about a million a second).
fn policy_file(n: usize) -> String {
    let mut s = String::from("[policy]\nmax_flows = 2000000\nmax_flows_per_port = 2000000\n");
    for i in 0..n.saturating_sub(1) {
        s.push_str(&format!(
            "[[rule]]\naction = \"allow\"\nfrom = \"192.0.{}.{}/32\"\nto = \"b\"\nproto = \"tcp\"\nports = {}\n",
            i / 250,
            i % 250 + 1,
            1000 + i
        ));
    }
    s.push_str(
        "[[rule]]\naction = \"allow\"\nfrom = \"a\"\nto = \"b\"\nproto = [\"udp\", \"tcp\"]\n",
    );
    s
}

/// DPDK's testpmd with two vhost-user ports, io forwarding: the reference backend.
struct Dpdk {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dpdk {
    /// With `queues` queue pairs a port.
    fn start(queues: u16) -> Option<Dpdk> {
        let dir = tempfile::tempdir().ok()?;
        let vdev = |i: u32, name: &str| {
            format!(
                "net_vhost{i},iface={},queues={queues},tso=1",
                dir.path().join(format!("{name}.sock")).display()
            )
        };
        let child = Command::new("dpdk-testpmd")
            .args([
                "-l",
                "0-1",
                "--no-huge",
                "-m",
                "1024",
                "--no-pci",
                "--file-prefix",
                "vnetbench",
            ])
            .arg("-d")
            .arg(format!("{DPDK_PMDS}/librte_mempool_ring.so"))
            .arg("-d")
            .arg(format!("{DPDK_PMDS}/librte_net_vhost.so"))
            .arg("--vdev")
            .arg(vdev(0, "a"))
            .arg("--vdev")
            .arg(vdev(1, "b"))
            .args([
                "--",
                "--forward-mode=io",
                "--auto-start",
                "--stats-period",
                "60",
                "--nb-cores=1",
            ])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let d = Dpdk { child, dir };
        let end = Instant::now() + Duration::from_secs(15);
        while !(d.sock("a").exists() && d.sock("b").exists()) {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(d)
    }
}

impl Drop for Dpdk {
    fn drop(&mut self) {
        // SAFETY: signalling our own child: SIGINT lets testpmd release its vhost sockets.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend under test: its two sockets and the CPU time its threads used.
trait Target {
    fn sock(&self, name: &str) -> PathBuf;
    fn cpu_ns(&self) -> u64;
    /// Whether A and B sit in two subnets with the backend routing between them.
    fn routed(&self) -> bool {
        false
    }
    /// Whether a policy decides what passes (a TCP flow must begin with a SYN).
    fn policy(&self) -> bool {
        false
    }
}

fn process_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

impl Target for Backend {
    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }
    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.child.id())
    }
    fn routed(&self) -> bool {
        self.routed
    }
    fn policy(&self) -> bool {
        self.policy
    }
}

impl Target for ovs::Ovs {
    fn sock(&self, name: &str) -> PathBuf {
        self.sock_path(name)
    }
    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid())
    }
}

impl Target for Dpdk {
    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }
    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.child.id())
    }
}

/// Like testpmd's forwarding core: the backend gets CPU 1, the frontend CPU 0.
fn on_cpu1(cmd: &mut Command) {
    // SAFETY: only sched_setaffinity between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(1, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// Keeps the frontend on CPU 0, so the backend under test has CPU 1 (testpmd pins its
/// forwarding core there; our workers go where the scheduler finds room).
fn pin_to_cpu0() {
    pin_to_cpu(0);
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `frames` frames of `size` bytes from `ring` buffers into `ring` others (as many
/// as the case's rings hold, so both copies touch as much memory); Gbit/s.
fn memcpy_gbit_s(size: usize, frames: u64, ring: usize) -> f64 {
    let src: Vec<Vec<u8>> = (0..ring).map(|i| vec![i as u8; size]).collect();
    let mut dst: Vec<Vec<u8>> = (0..ring).map(|_| vec![0u8; size]).collect();
    let start = Instant::now();
    for i in 0..frames as usize {
        dst[i % ring].copy_from_slice(&src[(i * 7) % ring]);
    }
    std::hint::black_box(&dst);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    (frames as f64 * size as f64 * 8.0) / secs / 1e9
}

/// One throughput case.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// Frame size; ignored for TSO (65000 bytes of TCP payload).
    size: usize,
    tso: bool,
    /// B sends to A at the same time as A to B; frames are summed over both directions.
    both_ways: bool,
    flows: Flows,
}

/// The flows of a case's frames.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flows {
    /// One per queue pair.
    One,
    /// This many per queue pair, their frames in turn (the switch shares decisions among a
    /// burst's frames of a few flows).
    Interleaved(u32),
    /// Every frame a new flow (its UDP ports counted up).
    New,
}

/// Four flows a queue pair, frame by frame in turn, for the policy and routed stages.
const INTERLEAVED: Case = Case {
    name: "64 B 4 flows",
    size: 64,
    tso: false,
    both_ways: false,
    flows: Flows::Interleaved(4),
};

/// New connections a second: every frame of a flow the policy has not seen.
const NEW_FLOWS: [Case; 2] = [
    Case {
        name: "64 B new flows",
        size: 64,
        tso: false,
        both_ways: false,
        flows: Flows::New,
    },
    Case {
        name: "1518 B new flows",
        size: 1518,
        tso: false,
        both_ways: false,
        flows: Flows::New,
    },
];

/// New flows sent at most, three quarters of the table `policy_file` asks for: a full
/// table refuses new flows (counted, in `Policy::full`), and the case measures tracking
/// them, not refusing. At a million a second the case stops after 1.5 s.
const NEW_FLOWS_MAX: usize = 1_500_000;

/// `--case` name of the balancer's new connections (`balancer.rs`).
const BALANCER_CASE: &str = "balancer";

const CASES: [Case; 5] = [
    Case {
        name: "64 B",
        size: 64,
        tso: false,
        both_ways: false,
        flows: Flows::One,
    },
    Case {
        name: "1518 B",
        size: 1518,
        tso: false,
        both_ways: false,
        flows: Flows::One,
    },
    Case {
        name: "64 KiB TSO",
        size: 0,
        tso: true,
        both_ways: false,
        flows: Flows::One,
    },
    Case {
        name: "64 B <->",
        size: 64,
        tso: false,
        both_ways: true,
        flows: Flows::One,
    },
    Case {
        name: "1518 B <->",
        size: 1518,
        tso: false,
        both_ways: true,
        flows: Flows::One,
    },
];

/// A UDP frame of `size` bytes from A (10.0.1.5) to B (10.0.2.5) through the gateway.
fn routed_udp_frame(size: usize) -> Vec<u8> {
    let mut frame = udp_frame(mac(1), GATEWAY_MAC, size);
    to_gateway(&mut frame);
    frame
}

/// A's 64 KiB TCP frame, to B or through the gateway.
fn tso_frame(routed: bool) -> Vec<u8> {
    let mut frame = tcp_frame(mac(1), mac(2), false, 65000);
    if routed {
        to_gateway(&mut frame);
    }
    frame
}

/// An IPv4 frame of A's made one from 10.0.1.5 to 10.0.2.5 through the gateway (`ROUTED`);
/// its IP header checksum made again (a TCP one is made by `as_partial_tcp`).
fn to_gateway(frame: &mut [u8]) {
    frame[..6].copy_from_slice(&GATEWAY_MAC);
    frame[26..30].copy_from_slice(&[10, 0, 1, 5]);
    frame[30..34].copy_from_slice(&[10, 0, 2, 5]);
    let mut ip = etherparse::Ipv4Header::from_slice(&frame[14..]).unwrap().0;
    ip.header_checksum = ip.calc_header_checksum();
    frame[14..34].copy_from_slice(&ip.to_bytes());
}

/// How a throughput case is run: for how long, and the size of every ring.
#[derive(Clone, Copy)]
struct Setup {
    seconds: f64,
    queue_size: u16,
    /// `--section`: the one section to run, or all.
    section: Option<&'static str>,
}

impl Setup {
    fn runs(&self, section: &str) -> bool {
        self.section.is_none_or(|s| s == section)
    }
}

/// What `--section` takes: the report's sections, in the order they run.
const SECTIONS: [&str; 9] = [
    "switching",
    "staged",
    "new",
    "balancer",
    "8 ports",
    "ovs",
    "latency",
    "dpdk",
    "foreign",
];

fn throughput(backend: &dyn Target, case: Case, qps: u16, setup: Setup) -> (Throughput, bool) {
    let Setup {
        seconds,
        queue_size,
        ..
    } = setup;
    let Case {
        name,
        size,
        tso,
        both_ways,
        flows,
    } = case;
    let new_flows = flows == Flows::New;
    let receiver_opts = DeviceOptions {
        features: ALL_FEATURES & !f::MRG_RXBUF,
        queue_pairs: qps,
        queue_size,
        rx_buf_size: if tso { 65562 } else { 2048 },
        auto_repost: false,
        polling: true,
        hugepages: true,
    };
    let sender_opts = if both_ways {
        receiver_opts.clone()
    } else {
        DeviceOptions {
            queue_pairs: qps,
            queue_size,
            polling: true,
            hugepages: true,
            ..Default::default()
        }
    };
    let mut a = VirtioNetDevice::connect_retry(backend.sock("a"), sender_opts);
    let mut b = VirtioNetDevice::connect_retry(backend.sock("b"), receiver_opts);
    for qp in 0..qps {
        b.post_rx(qp, usize::from(queue_size)).unwrap();
        if both_ways {
            a.post_rx(qp, usize::from(queue_size)).unwrap();
        }
    }
    // Let the switch learn both, so the frames are unicast.
    std::thread::sleep(Duration::from_millis(200));
    b.send(0, &NetHdr::default(), &udp_frame(mac(2), BROADCAST, 60))
        .unwrap();
    a.send(0, &NetHdr::default(), &udp_frame(mac(1), BROADCAST, 60))
        .unwrap();
    if tso && backend.policy() {
        // Each queue pair's flow opened by a SYN, as the policy wants of TCP.
        for qp in 0..qps {
            let mut syn = tso_frame(backend.routed())[..54].to_vec();
            syn[16..18].copy_from_slice(&40u16.to_be_bytes());
            syn[46..48].copy_from_slice(&0x5002u16.to_be_bytes());
            syn[35] = qp as u8;
            syn[36] ^= qp as u8;
            let mut ip = etherparse::Ipv4Header::from_slice(&syn[14..]).unwrap().0;
            ip.header_checksum = ip.calc_header_checksum();
            syn[14..34].copy_from_slice(&ip.to_bytes());
            a.send(qp, &NetHdr::default(), &syn).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    for qp in 0..qps {
        let _ = b.recv_all(qp, Duration::from_millis(50));
    }
    let _ = a.recv_all(0, Duration::from_millis(50));
    a.reclaim_tx(1);
    b.reclaim_tx(1);
    for qp in 0..qps {
        let (hdr, mut frame) = if tso {
            let mut fr = tso_frame(backend.routed());
            let h = as_partial_tcp(&mut fr, 1448);
            (h, fr)
        } else if backend.routed() {
            (NetHdr::default(), routed_udp_frame(size))
        } else {
            (NetHdr::default(), udp_frame(mac(1), mac(2), size))
        };
        // A different flow per queue pair, so they spread over B's queues too.
        frame[35] = qp as u8;
        if tso {
            frame[36] ^= qp as u8;
        } else {
            // No UDP checksum (valid over IPv4), so the changed port leaves no wrong one:
            // OVS's conntrack checks it and drops what fails.
            frame[40..42].fill(0);
        }
        a.tx_fill(qp, &hdr, &frame).unwrap();
        match flows {
            // UDP over IPv4: both ports, a new pair for every frame, or one of a few.
            Flows::New => a.stamp_tx(qp, 34, None),
            Flows::Interleaved(n) => a.stamp_tx(qp, 34, Some(n)),
            Flows::One => {}
        }
        if both_ways {
            let mut back = udp_frame(mac(2), mac(1), size);
            back[35] = qp as u8;
            back[40..42].fill(0);
            b.tx_fill(qp, &hdr, &back).unwrap();
        }
    }
    let frame_len = if tso { 65000 + 54 } else { size };

    let cpu0 = backend.cpu_ns();
    let mut busy = Duration::ZERO;
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    let deadline = Duration::from_secs_f64(seconds);
    let mut sent = 0;
    loop {
        let round = Instant::now();
        if round - start >= deadline || (new_flows && sent >= NEW_FLOWS_MAX) {
            break;
        }
        let mut moved = 0;
        for qp in 0..qps {
            let n = a.tx_burst(qp, 256);
            sent += n;
            moved += n;
            if both_ways {
                moved += b.tx_burst(qp, 256);
            }
        }
        for qp in 0..qps {
            let (n, by) = b.rx_drain(qp);
            let (m, bm) = if both_ways { a.rx_drain(qp) } else { (0, 0) };
            frames += n + m;
            bytes += by + bm;
            moved += (n + m) as usize;
        }
        if moved > 0 {
            busy += round.elapsed();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let backend_ns = backend.cpu_ns().saturating_sub(cpu0);
    let frontend_ns = busy.as_nanos() as u64;
    let huge = a.on_hugepages && b.on_hugepages;
    let mpps = frames as f64 / secs / 1e6;
    let gbit_s = bytes as f64 * 8.0 / secs / 1e9;
    let directions = if both_ways { 2 } else { 1 };
    let ring = usize::from(queue_size) * usize::from(qps) * directions;
    let memcpy = memcpy_gbit_s(frame_len, frames.max(1), ring);
    let per = |ns: u64| {
        if frames == 0 {
            0.0
        } else {
            ns as f64 / frames as f64
        }
    };
    let t = Throughput {
        backend: "",
        case: name.to_string(),
        queue_pairs: qps,
        frame_bytes: frame_len,
        frames,
        mpps,
        gbit_s,
        backend_ns_per_frame: per(backend_ns),
        frontend_busy_ns_per_frame: per(frontend_ns),
        memcpy_gbit_s: memcpy,
        backend_to_memcpy: if memcpy > 0.0 { gbit_s / memcpy } else { 0.0 },
    };
    (t, huge)
}

fn latency(backend: &dyn Target, poll_us: u64, round_trips: usize) -> Latency {
    let opts = DeviceOptions::default();
    let mut a = VirtioNetDevice::connect_retry(backend.sock("a"), opts.clone());
    let mut b = VirtioNetDevice::connect_retry(backend.sock("b"), opts);
    a.post_rx(0, 128).unwrap();
    b.post_rx(0, 128).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let ab = udp_frame(mac(1), mac(2), 64);
    let ba = udp_frame(mac(2), mac(1), 64);
    // Learn both sides first.
    b.send(0, &NetHdr::default(), &ba).unwrap();
    let _ = a.recv(0, Duration::from_secs(2));
    let mut samples = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let t0 = Instant::now();
        a.send(0, &NetHdr::default(), &ab).unwrap();
        let spin = |d: &mut VirtioNetDevice| {
            let end = Instant::now() + Duration::from_secs(2);
            while Instant::now() < end {
                if d.recv(0, Duration::ZERO).is_some() {
                    return true;
                }
            }
            false
        };
        if !spin(&mut b) {
            continue;
        }
        b.send(0, &NetHdr::default(), &ba).unwrap();
        if !spin(&mut a) {
            continue;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        a.reclaim_tx(1);
        b.reclaim_tx(1);
    }
    percentiles(poll_us, samples)
}

fn percentiles(poll_us: u64, mut samples: Vec<f64>) -> Latency {
    samples.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Latency {
        poll_us,
        round_trips: samples.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

/// The round trip of `latency` without the switch: this thread (CPU 0) wakes a thread
/// sleeping on an eventfd on CPU 1 and spins until it answers, then wakes a second one, as a
/// frame from A wakes A's worker and the answer from B wakes B's. The rest of a round trip
/// is the backend's work; this part is the machine's.
fn wakeup_floor(round_trips: usize) -> Latency {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sleepers: Vec<(Arc<EventFd>, Arc<AtomicU64>, std::thread::JoinHandle<()>)> = (0..2)
        .map(|_| {
            let kick = Arc::new(EventFd::new(0).expect("eventfd"));
            let woken = Arc::new(AtomicU64::new(0));
            let (k, w, stop) = (kick.clone(), woken.clone(), stop.clone());
            let t = std::thread::spawn(move || {
                pin_to_cpu(1);
                while k.read().is_ok() && !stop.load(Ordering::Relaxed) {
                    w.fetch_add(1, Ordering::Release);
                }
            });
            (kick, woken, t)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut samples = Vec::with_capacity(round_trips);
    'trips: for trip in 1..=round_trips as u64 {
        let t0 = Instant::now();
        for (kick, woken, _) in &sleepers {
            let _ = kick.write(1);
            let end = Instant::now() + Duration::from_secs(2);
            while woken.load(Ordering::Acquire) < trip {
                if Instant::now() > end {
                    break 'trips;
                }
                std::hint::spin_loop();
            }
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    stop.store(true, Ordering::Relaxed);
    for (kick, _, t) in sleepers {
        let _ = kick.write(1);
        let _ = t.join();
    }
    percentiles(0, samples)
}

impl Report {
    fn record(&mut self, mut t: Throughput, huge: bool, backend: &'static str) {
        t.backend = backend;
        if !huge {
            self.guest_pages = "4 KiB";
        }
        self.throughput.push(t);
    }
}

const USAGE: &str =
    "usage: vnet-bench [--seconds S] [--json] [--case NAME] [--queue-size 256|512|1024] \
     [--frontend ours|dpdk] [--section switching|staged|new|balancer|8 ports|ovs|latency|dpdk|foreign]";

/// Refuses what it does not know (a mistyped option silently ran the whole benchmark).
fn check_args(args: &[String]) -> Result<(), String> {
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--json" => i += 1,
            "--frontend"
                if !matches!(args.get(i + 1).map(String::as_str), Some("ours" | "dpdk")) =>
            {
                return Err("--frontend takes ours or dpdk".into());
            }
            "--section"
                if !args
                    .get(i + 1)
                    .is_some_and(|v| SECTIONS.contains(&v.as_str())) =>
            {
                return Err(format!("--section takes one of {}", SECTIONS.join(", ")));
            }
            "--seconds" | "--case" | "--queue-size" | "--frontend" | "--section" => {
                if args.get(i + 1).is_none() {
                    return Err(format!("{} needs a value", args[i]));
                }
                i += 2;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match args.iter().position(|a| a == "--seconds") {
        Some(i) if !args[i + 1].parse::<f64>().is_ok_and(|s| s > 0.0) => Err(format!(
            "--seconds takes a positive number, not {:?}",
            args[i + 1]
        )),
        _ => Ok(()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if let Err(e) = check_args(&args) {
        eprintln!("vnet-bench: {e}\n{USAGE}");
        std::process::exit(2);
    }
    let json = args.iter().any(|a| a == "--json");
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let only: Option<&str> = args
        .iter()
        .position(|a| a == "--case")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let queue_size: u16 = match args.iter().position(|a| a == "--queue-size") {
        None => 256,
        Some(i) => match args.get(i + 1).and_then(|s| s.parse::<u16>().ok()) {
            Some(q @ (256 | 512 | 1024)) => q,
            _ => {
                eprintln!("--queue-size takes 256, 512 or 1024 (the ring sizes QEMU's virtio-net accepts)");
                std::process::exit(2);
            }
        },
    };
    let section = args
        .iter()
        .position(|a| a == "--section")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| SECTIONS.iter().find(|s| **s == v.as_str()).copied());
    let setup = Setup {
        seconds,
        queue_size,
        section,
    };
    let cases: Vec<Case> = CASES
        .into_iter()
        .filter(|c| only.is_none_or(|o| c.name.starts_with(o)))
        .collect();

    pin_to_cpu0();
    let mut report = Report {
        seconds_per_case: seconds,
        queue_size,
        guest_pages: "2 MiB",
        throughput: Vec::new(),
        latency: Vec::new(),
        wakeup_floor: None,
        vs_dpdk: Vec::new(),
        vs_plain: Vec::new(),
        vs_ovs: Vec::new(),
        ovs: None,
        dpdk: None,
        foreign: Vec::new(),
        vs_dpdk_foreign: Vec::new(),
        foreign_limit: Vec::new(),
        foreign_note: None,
        balancer: None,
        balancer_error: None,
        many_ports: None,
        many_ports_error: None,
    };
    let frontend = args
        .iter()
        .position(|a| a == "--frontend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    if frontend != Some("dpdk") {
        own_frontend(&mut report, &cases, only, setup);
    }
    if frontend != Some("ours") && setup.runs("foreign") {
        foreign_frontend(seconds, only, &mut report);
    }

    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return;
    }
    println!(
        "{seconds} s per case; A sends, B receives through the backend (<->: both at once, summed); \
         one frontend thread on CPU 0; guest memory on {} pages; rings of {} entries; ports on VLAN 10",
        report.guest_pages, report.queue_size
    );
    if report.throughput.is_empty() {
        println!("(own frontend's sections not run)");
    }
    println!(
        "{:<18} {:<11} {:>3} {:>7} {:>7} {:>12} {:>13} {:>11} {:>9}",
        "backend",
        "case",
        "qps",
        "Mpps",
        "Gbit/s",
        "backend ns/f",
        "frontend busy",
        "memcpy Gb/s",
        "vs memcpy"
    );
    for t in &report.throughput {
        println!(
            "{:<18} {:<11} {:>3} {:>7.3} {:>7.2} {:>12.0} {:>13.0} {:>11.1} {:>9.2}",
            t.backend,
            t.case,
            t.queue_pairs,
            t.mpps,
            t.gbit_s,
            t.backend_ns_per_frame,
            t.frontend_busy_ns_per_frame,
            t.memcpy_gbit_s,
            t.backend_to_memcpy
        );
    }
    for (label, case, ratio) in &report.vs_plain {
        println!("{label} / plain L2, Mpps, {case}, established flows, 1 queue pair: {ratio:.2}");
    }
    for t in report
        .throughput
        .iter()
        .filter(|t| t.case.ends_with("new flows"))
    {
        println!(
            "new connections, {} (a new 5-tuple every frame, 10 rules): {:.2} M/s",
            t.case.trim_end_matches(" new flows"),
            t.mpps
        );
    }
    if let Some(r) = &report.balancer {
        println!("{}", balancer::describe(r));
    }
    if let Some(r) = &report.many_ports {
        let list = |v: &[f64]| {
            v.iter()
                .map(|m| format!("{m:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "8 ports, 4 senders at 64 B, Mpps summed: a thread per queue pair {}; --workers 1 {}; \
             one worker / a thread per queue pair (medians): {:.2}",
            list(&r.per_queue_mpps),
            list(&r.one_worker_mpps),
            r.ratio
        );
    }
    if let Some(e) = &report.many_ports_error {
        println!("8 ports: not measured: {e}");
    }
    if let Some(e) = &report.balancer_error {
        println!("new connections through the balancer: not measured: {e}");
    }
    for (label, case, ratio) in &report.vs_ovs {
        println!("{label}, Mpps, {case}, 1 queue pair: {ratio:.2}");
    }
    if let Some(o) = &report.ovs {
        println!("OVS reference: {o}");
    }
    for (case, qps, ratio) in &report.vs_dpdk {
        println!("ours (best of both modes) / DPDK testpmd, Mpps, {case}, {qps} queue pair(s): {ratio:.2}");
    }
    if let Some(d) = &report.dpdk {
        println!("DPDK reference: {d}");
    }
    if !report.foreign.is_empty() {
        println!("DPDK virtio-user frontend (testpmd, both directions summed):");
        println!(
            "{:<30} {:<7} {:>5} {:>7} {:>18} {:>13}",
            "backend", "case", "round", "Mpps", "frontend busy ns/f", "frontend busy"
        );
        for r in &report.foreign {
            println!(
                "{:<30} {:<7} {:>5} {:>7.3} {:>18} {:>13}",
                r.backend,
                r.case,
                r.round + 1,
                r.mpps,
                r.frontend_ns_per_frame
                    .map_or("-".into(), |n| format!("{n:.0}")),
                r.frontend_busy
                    .map_or("-".into(), |b| format!("{:.0} %", b * 100.0))
            );
        }
    }
    for (case, ratio) in &report.vs_dpdk_foreign {
        println!(
            "ours / DPDK testpmd vhost PMD, DPDK virtio-user frontend, {case}, medians: {ratio:.2}"
        );
    }
    for (case, limit) in &report.foreign_limit {
        println!(
            "the DPDK virtio-user frontend's own limit / DPDK testpmd vhost PMD's rate, {case} \
             (1 / the frontend's busy share beside testpmd), median: {limit:.2}"
        );
    }
    if let Some(n) = &report.foreign_note {
        println!("foreign frontend: {n}");
    }
    for l in &report.latency {
        println!(
            "round trip A->B->A, vhost-net-backend --poll-us {:>2}: p50 {:>7.1} us  p99 {:>7.1} us  ({} trips)",
            l.poll_us, l.p50_us, l.p99_us, l.round_trips
        );
    }
    if let Some(l) = &report.wakeup_floor {
        println!(
            "round trip floor, two thread wake-ups on CPU 1 (no backend):  p50 {:>7.1} us  p99 {:>7.1} us  ({} trips)",
            l.p50_us, l.p99_us, l.round_trips
        );
    }
}
