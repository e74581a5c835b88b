//! DPDK's virtio PMD as the frontend (testpmd's virtio-user ports): a driver written by
//! others, with its own choices (in-order rings, no EVENT_IDX, mergeable RX buffers or not,
//! packed rings asked for), gets the switch's service as QEMU's guests do.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::testbed::{backend_binary, BackendProcess};
use integration::testpmd::{self, ForwardRun, VirtioUser};

const IN_ORDER: u64 = 1 << 35;

/// The negotiated features of every connected port, by name.
fn negotiated(ctl: &Path) -> Vec<(String, u64)> {
    let out = Command::new(backend_binary())
        .args(["ctl", "--json", "--socket"])
        .arg(ctl)
        .arg("ports")
        .output()
        .expect("ctl runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctl ports --json");
    v["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| {
            let hex = p["features"].as_str()?.trim_start_matches("0x");
            Some((
                p["name"].as_str()?.to_string(),
                u64::from_str_radix(hex, 16).ok()?,
            ))
        })
        .collect()
}

/// Frames of `bytes` circulating for `warmup_ms`, then a second measured; testpmd's
/// forwarding core on CPU 0, its runtime files under `prefix` and this process's id.
fn forward_run(bytes: usize, warmup_ms: u64, prefix: &str) -> ForwardRun {
    ForwardRun {
        frame_bytes: bytes,
        warmup: Duration::from_millis(warmup_ms),
        measure: Duration::from_secs(1),
        forwarding_cpu: 0,
        file_prefix: format!("{prefix}-{}", std::process::id()),
    }
}

/// Frames circulated both ways for the run: more than `least` on each port, far more than
/// the 512 injected on each, or a ring stalled; and no receive errors. `what` names the run.
fn circulated(r: &testpmd::ForwardResult, least: u64, what: &str) {
    let tail = r.tail(40);
    for (i, p) in r.ports.iter().enumerate() {
        assert!(
            p.rx_packets > least,
            "{what}: port {i} received {} frames\n{tail}",
            p.rx_packets
        );
        assert_eq!(p.rx_errors, 0, "{what}: port {i}\n{tail}");
    }
}

#[test]
fn dpdk_virtio_user_ports_forward_through_the_switch() {
    assert!(
        testpmd::available(),
        "dpdk-testpmd with DPDK's virtio PMD is needed: bash ci/install-deps.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let (a, b, ctl) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("ctl.sock"),
    );
    let mut backend = BackendProcess::start(
        vec![
            "--port".into(),
            format!("name=a,socket={},queues=2", a.display()),
            "--port".into(),
            format!("name=b,socket={},queues=2", b.display()),
            "--control-socket".into(),
            ctl.display().to_string(),
        ],
        vec![a.clone(), b.clone()],
        dir.path().join("backend.log"),
    );
    let in_order_split = VirtioUser::default();
    let mergeable_packed_asked = VirtioUser {
        queue_size: 256,
        in_order: false,
        mrg_rxbuf: true,
        packed_vq: true,
        queues: 1,
        server: false,
    };
    let two_queue_pairs = VirtioUser {
        queues: 2,
        ..VirtioUser::default()
    };
    // Each frontend connects to the same ports (of two queue pairs) after the one before
    // quit.
    for (dev, size) in [
        (in_order_split, 64),
        (mergeable_packed_asked.clone(), 1518),
        (two_queue_pairs.clone(), 64),
        // Chains of TX descriptors in, each frame over several mergeable RX buffers out.
        (mergeable_packed_asked, 9000),
    ] {
        let seen = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2500));
                negotiated(&ctl)
            })
        };
        let run = forward_run(size, 500, "vnet-test");
        let r = testpmd::forward([&a, &b], &dev, &run).unwrap_or_else(|e| panic!("{e}"));
        let tail = r.tail(40);
        // Jumbo frames through the debug build: 60,000-80,000 here.
        let least = if size > 2048 { 5_000 } else { 20_000 };
        circulated(&r, least, &format!("{dev:?}, {size} B"));
        for (i, p) in r.ports.iter().enumerate() {
            // Every frame whole: testpmd sends `size` bytes each.
            assert_eq!(
                p.rx_bytes,
                p.rx_packets * size as u64,
                "{dev:?}, {size} B: port {i}\n{tail}"
            );
        }
        if dev.queues > 1 {
            // Many flows each way: the switch spreads them over both RX queues of each
            // port, and what arrives on queue 1 is sent on TX queue 1 and switched too.
            for port in 0..2 {
                for queue in 0..2 {
                    let got = r
                        .streams
                        .iter()
                        .find(|s| (s.rx_port, s.rx_queue) == (port, queue))
                        .map_or(0, |s| s.rx_packets);
                    assert!(
                        got > 1000,
                        "port {port} RX queue {queue}: {got} frames\n{:?}\n{tail}",
                        r.streams
                    );
                }
            }
        }
        let features = seen.join().unwrap();
        assert_eq!(features.len(), 2, "both ports connected: {features:?}");
        for (name, f) in features {
            assert_eq!(
                f & IN_ORDER != 0,
                dev.in_order,
                "port {name}: features {f:#x} with {dev:?}"
            );
        }
    }
    let log = std::fs::read_to_string(&backend.log).unwrap_or_default();
    assert!(backend.stop(), "backend exits cleanly\n{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn client_ports_reach_dpdk_virtio_user_listening_again_after_it_or_the_switch_restarts() {
    assert!(
        testpmd::available(),
        "dpdk-testpmd with DPDK's virtio PMD is needed: bash ci/install-deps.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    // The frontend makes the sockets: nothing to wait for at the switch's start.
    let mut backend = BackendProcess::start(
        vec![
            "--port".into(),
            format!("name=a,socket={},mode=client", a.display()),
            "--port".into(),
            format!("name=b,socket={},mode=client", b.display()),
        ],
        Vec::new(),
        dir.path().join("backend.log"),
    );
    let dev = VirtioUser {
        queue_size: 256,
        server: true,
        ..VirtioUser::default()
    };
    // A second testpmd listens on the same paths after the first quit (a VM restarted).
    for turn in 0..2 {
        let run = forward_run(64, 1500, "vnet-test-server");
        let r = testpmd::forward([&a, &b], &dev, &run).unwrap_or_else(|e| panic!("{e}"));
        circulated(&r, 20_000, &format!("turn {turn}"));
    }
    // The switch killed outright and started again while a testpmd forwards: its ports
    // connect again, and the PMD, which keeps its rings as they were, starts them at 0;
    // frames injected afterwards circulate both ways.
    let run = forward_run(64, 1500, "vnet-test-server");
    let mut crash = || backend.crash_and_restart();
    let r = testpmd::forward_across([&a, &b], &dev, &run, Some(&mut crash))
        .unwrap_or_else(|e| panic!("{e}"));
    let tail = r.tail(40);
    let log = std::fs::read_to_string(&backend.log).unwrap_or_default();
    for (i, p) in r.ports.iter().enumerate() {
        assert!(
            p.rx_pps > 10_000,
            "after the restart: port {i} received {} frames a second\n{tail}\n{log}",
            p.rx_pps
        );
    }
    assert!(backend.stop(), "backend exits cleanly\n{log}");
    let log = std::fs::read_to_string(&backend.log).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(!log.contains("broke the virtio protocol"), "{log}");
    assert!(log.contains("the frontend starts the ring at 0"), "{log}");
    assert!(
        log.contains("port a: connecting to its frontend at"),
        "{log}"
    );
    // Each port connected once for each testpmd, and again after the restart.
    for port in ["a", "b"] {
        let connected = format!("port {port}: frontend connected");
        assert_eq!(log.matches(&connected).count(), 4, "{log}");
    }
}
