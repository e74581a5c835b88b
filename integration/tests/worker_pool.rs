//! The worker pool (`--workers N`) as a user runs it: every port's queue pairs served by
//! N threads, across reconnects, pinned to the CPUs given.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame};
use integration::testbed::BackendProcess;
use integration::{DeviceOptions, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;

/// The backend's threads: (name, CPUs it may run on as `Cpus_allowed_list` says).
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), cpus));
    }
    out
}

const SECOND: Duration = Duration::from_secs(1);
/// How long a frame sent to a connection whose rings may not be set up yet is waited for.
const SHORT: Duration = Duration::from_millis(200);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

struct Ports {
    _dir: tempfile::TempDir,
    backend: BackendProcess,
    sockets: Vec<PathBuf>,
}

/// The backend with `n` ports p0.. of `queues` queue pairs each, and `extra` arguments.
fn start(n: usize, queues: u16, extra: &[&str]) -> Ports {
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<PathBuf> = (0..n)
        .map(|i| dir.path().join(format!("p{i}.sock")))
        .collect();
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for (i, s) in sockets.iter().enumerate() {
        args.push("--port".into());
        args.push(format!("name=p{i},socket={},queues={queues}", s.display()));
    }
    let backend = BackendProcess::start(args, sockets.clone(), dir.path().join("log"));
    Ports {
        _dir: dir,
        backend,
        sockets,
    }
}

/// A frontend with its MAC (`mac(n)`) and queue pairs, RX buffers posted on each.
struct Guest {
    dev: VirtioNetDevice,
    mac: u8,
    queues: u16,
}

fn guest(path: &PathBuf, mac: u8, queues: u16) -> Guest {
    let mut dev = VirtioNetDevice::connect_retry(
        path,
        DeviceOptions {
            queue_pairs: queues,
            ..Default::default()
        },
    );
    for qp in 0..queues {
        dev.post_rx(qp, 64).unwrap();
    }
    Guest { dev, mac, queues }
}

/// Sends `count` frames from `from` on its queue pair `qp` to `to`, and takes them from
/// any of `to`'s queues; returns how many arrived `within` that time.
fn send_and_count(
    from: &mut Guest,
    qp: u16,
    to: &mut Guest,
    count: usize,
    within: Duration,
) -> usize {
    let mut got = 0;
    for k in 0..count {
        let mut f = udp_frame(mac(from.mac), mac(to.mac), 200);
        f[34..36].copy_from_slice(&(1000 + k as u16).to_be_bytes());
        from.dev.send(qp, &NetHdr::default(), &f).unwrap();
    }
    let end = Instant::now() + within;
    while got < count && Instant::now() < end {
        for q in 0..to.queues {
            while let Some(f) = to.dev.recv(q, Duration::from_millis(5)) {
                assert_eq!(&f.frame[..12], &[mac(to.mac), mac(from.mac)].concat()[..]);
                got += 1;
            }
        }
    }
    got
}

#[test]
fn one_worker_serves_eight_ports_of_two_queue_pairs() {
    let mut p = start(8, 2, &["--workers", "1"]);
    let pid = p.backend.pid();
    let mut devs: Vec<Guest> = (0..8)
        .map(|i| guest(&p.sockets[i], i as u8 + 1, 2))
        .collect();
    // Each port learned on the switch first (flooded frames to a MAC no one has).
    for d in devs.iter_mut() {
        let f = udp_frame(mac(d.mac), mac(99), 64);
        d.dev.send(0, &NetHdr::default(), &f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    for d in devs.iter_mut() {
        for q in 0..2 {
            d.dev.recv_all(q, Duration::from_millis(20));
        }
    }
    // A ring round the ports, from both of each one's queue pairs.
    for i in 0..8 {
        let j = (i + 1) % 8;
        for qp in 0..2 {
            let (a, b) = if i < j {
                let (x, y) = devs.split_at_mut(j);
                (&mut x[i], &mut y[0])
            } else {
                let (x, y) = devs.split_at_mut(i);
                (&mut y[0], &mut x[j])
            };
            let got = send_and_count(a, qp, b, 32, SECOND);
            assert_eq!(got, 32, "p{i} -> p{j}, queue pair {qp}");
        }
    }
    // One worker thread, none per queue pair.
    let names: Vec<String> = threads(pid).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("vnet-worker"))
            .count(),
        1,
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("q0-")),
        "threads of a queue pair's own: {names:?}"
    );
    assert!(p.backend.stop(), "the backend exits cleanly");
    let log = std::fs::read_to_string(&p.backend.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn pooled_ports_reconnect_and_leave_nothing_behind() {
    let mut p = start(2, 2, &["--workers", "2"]);
    let pid = p.backend.pid();
    let mut a = guest(&p.sockets[0], 1, 2);
    a.dev.sync().unwrap();
    let mut counts = Vec::new();
    for round in 0..6 {
        let before = fd_count(pid);
        let mut b = guest(&p.sockets[1], 2, 2);
        let end = Instant::now() + Duration::from_secs(10);
        // The new connection's rings are watched once QEMU-like setup is done: a frame
        // until one arrives.
        while send_and_count(&mut a, round % 2, &mut b, 1, SHORT) == 0 {
            assert!(Instant::now() < end, "round {round}: no frame arrived");
        }
        assert_eq!(send_and_count(&mut b, 1, &mut a, 16, SECOND), 16);
        drop(b);
        // (The first connection leaves the port's doorbell made: one more after it.)
        let end = Instant::now() + Duration::from_secs(1);
        while fd_count(pid) > before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        counts.push(fd_count(pid));
    }
    assert!(
        counts.iter().all(|&c| c == counts[0]),
        "descriptors open after each reconnect: {counts:?}"
    );
    assert!(p.backend.stop(), "the backend exits cleanly");
}

#[test]
fn workers_run_on_the_cpus_given() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (cpus - 1).to_string();
    // Pool threads, each on one CPU of the list.
    let mut p = start(1, 1, &["--workers", "2", "--worker-cpus", &last]);
    // Each names and pins itself as it starts, maybe after the sockets appeared.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let pool: Vec<_> = threads(p.backend.pid())
            .into_iter()
            .filter(|(n, _)| n.starts_with("vnet-worker"))
            .collect();
        if pool.len() == 2 && pool.iter().all(|(_, c)| *c == last) {
            break;
        }
        assert!(
            Instant::now() < end,
            "not two workers on CPU {last}: {pool:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(p.backend.stop());
    // A thread per queue pair, on the CPUs given.
    let mut p = start(2, 1, &["--worker-cpus", &last]);
    let mut a = guest(&p.sockets[0], 1, 1);
    let mut b = guest(&p.sockets[1], 2, 1);
    let end = Instant::now() + Duration::from_secs(10);
    while send_and_count(&mut a, 0, &mut b, 1, SHORT) == 0 {
        assert!(Instant::now() < end, "no frame arrived");
    }
    let workers: Vec<_> = threads(p.backend.pid())
        .into_iter()
        .filter(|(n, _)| n.starts_with("q0-"))
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(
        workers.iter().all(|(_, c)| *c == last),
        "a worker not on CPU {last}: {workers:?}"
    );
    assert!(p.backend.stop());
}

#[test]
fn a_port_offering_sixteen_queue_pairs_costs_threads_only_for_those_started() {
    let mut p = start(2, 16, &[]);
    let pid = p.backend.pid();
    let count = |pid: u32| {
        threads(pid)
            .iter()
            .filter(|(n, _)| n.starts_with('q') && n.contains('-'))
            .count()
    };
    let mut a = guest(&p.sockets[0], 1, 1);
    let mut b = guest(&p.sockets[1], 2, 2);
    let end = Instant::now() + Duration::from_secs(10);
    while send_and_count(&mut a, 0, &mut b, 1, SHORT) == 0 {
        assert!(Instant::now() < end, "no frame arrived");
    }
    assert_eq!(send_and_count(&mut b, 1, &mut a, 8, SECOND), 8);
    // One pair started on a, two on b: three threads, not 32 (each names itself as it
    // starts, maybe after the frames went).
    let end = Instant::now() + Duration::from_secs(5);
    while count(pid) != 3 {
        assert!(Instant::now() < end, "{:?}", threads(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(pid), 3, "{:?}", threads(pid));
    // A guest gone takes its threads with it.
    drop(b);
    let end = Instant::now() + Duration::from_secs(5);
    while count(pid) != 1 {
        assert!(Instant::now() < end, "{:?}", threads(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.backend.stop());
}

#[test]
fn a_cpu_the_process_may_not_use_is_refused_by_name() {
    let out = std::process::Command::new(integration::testbed::backend_binary())
        .args(["--workers", "1", "--worker-cpus", "1000"])
        .args(["--port", "name=a,socket=/tmp/never-made.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker CPU 1000"), "{err}");
    assert!(err.contains("allowed: 0"), "{err}");
}

/// How many lines of `log` contain `text`.
fn said(log: &std::path::Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

/// Waits up to 5 s for `times` lines of `log` to contain `text`.
fn wait_until_said(log: &std::path::Path, text: &str, times: usize) {
    let end = Instant::now() + Duration::from_secs(5);
    while said(log, text) < times {
        assert!(
            Instant::now() < end,
            "{}",
            std::fs::read_to_string(log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Frames both ways between `a` and `b` until each way has carried one: both pairs'
/// threads run then.
fn both_ways(a: &mut Guest, b: &mut Guest) {
    let end = Instant::now() + Duration::from_secs(10);
    while send_and_count(a, 0, b, 1, SHORT) == 0 {
        assert!(Instant::now() < end, "no frame arrived from a");
    }
    while send_and_count(b, 0, a, 1, SHORT) == 0 {
        assert!(Instant::now() < end, "no frame arrived from b");
    }
}

#[test]
fn queue_pair_threads_outnumbering_their_cpus_are_told_with_the_flag_that_helps() {
    const CROWDED: &str = "2 queue pairs have a thread each on 1 CPU(s)";
    let mut p = start(2, 1, &["--worker-cpus", "0"]);
    let log = p.backend.log.clone();
    let mut a = guest(&p.sockets[0], 1, 1);
    let mut b = guest(&p.sockets[1], 2, 1);
    both_ways(&mut a, &mut b);
    wait_until_said(&log, CROWDED, 1);
    assert_eq!(
        said(&log, "--workers 1 lets 1 thread(s) serve every pair"),
        1
    );
    // Once while they stay crowded; again after a guest left and came back.
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    let mut b = guest(&p.sockets[1], 2, 1);
    both_ways(&mut a, &mut b);
    wait_until_said(&log, CROWDED, 2);
    assert!(p.backend.stop());
    assert_eq!(said(&log, CROWDED), 2);

    // As many threads as CPUs: nothing to say.
    let mut p = start(1, 1, &["--worker-cpus", "0"]);
    let log = p.backend.log.clone();
    let mut a = guest(&p.sockets[0], 1, 1);
    let f = udp_frame(mac(1), mac(9), 200);
    a.dev.send(0, &NetHdr::default(), &f).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !threads(p.backend.pid()).iter().any(|(n, _)| n == "q0-p0") {
        assert!(Instant::now() < end, "{:?}", threads(p.backend.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(p.backend.stop());
    assert_eq!(said(&log, "queue pairs have a thread each"), 0);
}
