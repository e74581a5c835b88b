//! A seeded hostile frontend beside two canary ports, against the backend binary.
//!
//! The hostile port does what a compromised QEMU or guest driver may: frames with random
//! virtio-net headers and bytes, raw descriptor chains with random addresses, lengths, flags
//! and links (TX and RX), avail indexes moved past what was written, scribbles over its
//! own rings, interrupt eventfds kept full, and reconnects with random features and ring
//! sizes. Meanwhile the canaries must keep exchanging frames, and the backend must stay up
//! with its memory and descriptors bounded.
//!
//! CI runs a few seconds per seed; a longer run:
//!   VNET_HOSTILE_SECS=600 VNET_HOSTILE_SEED=7 cargo test -p integration --test hostile_frontend

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame, BROADCAST};
use integration::frontend::{ALL_FEATURES, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use integration::testbed::{rss_kib, BackendProcess};
use integration::{DeviceOptions, RawDesc, RawNext, VirtioNetDevice};
use vhost_net_backend::virtio::{features as f, NetHdr};
use vmm_sys_util::eventfd::EventFd;

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Running, not exited (a child that exited stays a zombie until reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
        .unwrap_or(false)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A random feature set and ring size for the hostile port.
fn hostile_opts(rng: &mut Rng) -> DeviceOptions {
    let mut features = ALL_FEATURES & rng.next();
    if rng.chance(70) {
        features |= f::VERSION_1 | f::PROTOCOL_FEATURES;
    }
    DeviceOptions {
        features,
        queue_size: 1 << (4 + rng.below(5)),
        rx_buf_size: [64, 256, 1526, 2048, 9100][rng.below(5) as usize],
        ..Default::default()
    }
}

fn random_hdr(rng: &mut Rng) -> NetHdr {
    NetHdr {
        flags: (rng.next() & 3) as u8,
        gso_type: [0u8, 1, 3, 4, 5, 0x81, 0x84, rng.next() as u8][rng.below(8) as usize],
        hdr_len: rng.below(300) as u16,
        gso_size: [0u16, 1, 47, 48, 536, 1448, 9000, rng.next() as u16][rng.below(8) as usize],
        csum_start: rng.below(200) as u16,
        csum_offset: rng.below(80) as u16,
        num_buffers: rng.next() as u16,
    }
}

fn random_descs(rng: &mut Rng, dev: &mut VirtioNetDevice, writable: bool) -> Vec<RawDesc> {
    let n = 1 + rng.below(5) as usize;
    let mem = dev.mem_size();
    let scratch = dev.scratch_addr(0);
    (0..n)
        .map(|i| {
            let addr = match rng.below(5) {
                0 => rng.next(),
                1 => mem.saturating_sub(rng.below(4096)),
                2 => u64::MAX - rng.below(4096),
                _ => scratch + rng.below(2048),
            };
            let mut flags = 0;
            if i + 1 < n || rng.chance(10) {
                flags |= DESC_F_NEXT;
            }
            if writable != rng.chance(10) {
                flags |= DESC_F_WRITE;
            }
            if rng.chance(10) {
                flags |= DESC_F_INDIRECT;
            }
            RawDesc {
                addr,
                len: [0u32, 1, 12, 64, 1514, 65536, rng.next() as u32][rng.below(7) as usize],
                flags,
                next: if rng.chance(80) {
                    RawNext::Pos((i + 1) % n)
                } else {
                    RawNext::Index(rng.next() as u16)
                },
            }
        })
        .collect()
}

/// One hostile action. Errors and panics of our own driver (whose rings it scribbles on)
/// only mean the hostile device is replaced.
fn hostile_step(rng: &mut Rng, dev: &mut VirtioNetDevice) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(|| match rng.below(10) {
        0..=2 => {
            let len = rng.below(9200) as usize;
            let mut frame = rng.bytes(len);
            if frame.len() >= 12 {
                let dst =
                    [mac(1), mac(2), BROADCAST, [0x33, 0x33, 0, 0, 0, 1]][rng.below(4) as usize];
                frame[..6].copy_from_slice(&dst);
                frame[6..12].copy_from_slice(&mac(0x40 + rng.below(8) as u8));
                if rng.chance(50) && frame.len() >= 14 {
                    frame[12..14].copy_from_slice(&[0x08, 0x00]);
                }
            }
            dev.send(0, &random_hdr(rng), &frame).is_ok()
        }
        3 => {
            let descs = random_descs(rng, dev, false);
            dev.send_raw(0, &descs).is_ok()
        }
        4 => {
            let descs = random_descs(rng, dev, true);
            dev.post_rx_raw(0, &descs).is_ok()
        }
        5 => dev
            .publish_bogus(0, rng.next() as u16, rng.below(4) as u16)
            .is_ok(),
        6 => {
            // Scribbles over the start of its memory, where the rings are.
            let at = rng.below(dev.mem_size() / 8);
            let n = 1 + rng.below(64) as usize;
            dev.write_mem(at, &rng.bytes(n));
            true
        }
        7 => {
            let full = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
            let _ = full.write(0xffff_ffff_ffff_fffe);
            dev.replace_call(rng.below(2) as usize, full).is_ok()
        }
        8 => dev.post_rx(0, rng.below(8) as usize).is_ok(),
        _ => {
            while dev.recv(0, Duration::from_millis(1)).is_some() {}
            true
        }
    }));
    matches!(outcome, Ok(true))
}

/// The canaries exchange one frame each way; both must arrive, unchanged.
fn canaries_talk(a: &mut VirtioNetDevice, b: &mut VirtioNetDevice, round: u32, seed: u64) {
    // Canary a is mac(1), b is mac(2).
    for (src, dst) in [(1u8, 2u8), (2, 1)] {
        let mut frame = udp_frame(mac(src), mac(dst), 200);
        frame[60..64].copy_from_slice(&round.to_be_bytes());
        let (tx, rx) = if src == 1 {
            (&mut *a, &mut *b)
        } else {
            (&mut *b, &mut *a)
        };
        tx.send(0, &NetHdr::default(), &frame)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: canary send: {e}"));
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            match rx.recv(0, Duration::from_millis(100)) {
                // Floods from the hostile port may arrive too; only ours counts.
                Some(got) if got.frame == frame => break,
                Some(_) => {}
                None if Instant::now() > end => panic!(
                    "seed {seed} round {round}: canary frame mac({src}) -> mac({dst}) never arrived"
                ),
                None => {}
            }
        }
    }
}

#[test]
fn canaries_keep_talking_beside_a_hostile_frontend() {
    canaries_beside_a_hostile_frontend(&[], &[1, 2, 3]);
}

/// The same with every port's queues on one shared worker (`--workers 1`): a fault of
/// the hostile port's must not stop the thread the canaries need too.
#[test]
fn canaries_keep_talking_beside_a_hostile_frontend_on_one_shared_worker() {
    canaries_beside_a_hostile_frontend(&["--workers", "1"], &[4]);
}

/// The hostile frontend on port h for each seed (`VNET_HOSTILE_SEED`: that one only), 6
/// s each (`VNET_HOSTILE_SECS`), the backend started with `extra` arguments.
fn canaries_beside_a_hostile_frontend(extra: &[&str], default_seeds: &[u64]) {
    let secs: u64 = std::env::var("VNET_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seeds: Vec<u64> = match std::env::var("VNET_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => default_seeds.to_vec(),
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = |n: &str| dir.path().join(format!("{n}.sock"));
    let mut backend = BackendProcess::start(
        extra
            .iter()
            .map(|s| s.to_string())
            .chain(["a", "b", "h"].iter().flat_map(|n| {
                [
                    "--port".to_string(),
                    format!("name={n},socket={},queues=2", sock(n).display()),
                ]
            }))
            .collect(),
        vec![sock("a"), sock("b"), sock("h")],
        dir.path().join("backend.log"),
    );
    let pid = backend.pid();
    let mut a = VirtioNetDevice::connect_retry(sock("a"), DeviceOptions::default());
    let mut b = VirtioNetDevice::connect_retry(sock("b"), DeviceOptions::default());
    a.post_rx(0, 128).unwrap();
    b.post_rx(0, 128).unwrap();
    // The canaries' guest memory outside their rings and buffers must never change.
    a.fill_unused(0xa5);
    b.fill_unused(0x5a);
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    let mut round = 0u32;
    let mut reconnects = 0;
    for &seed in &seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut h = VirtioNetDevice::connect_retry(sock("h"), hostile_opts(&mut rng));
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            for _ in 0..40 {
                // A refused action often means the connection was closed: start over
                // now and then (and sometimes for no reason).
                let refused = !hostile_step(&mut rng, &mut h);
                if (refused && rng.chance(20)) || rng.chance(1) {
                    drop(h);
                    reconnects += 1;
                    h = VirtioNetDevice::connect_retry(sock("h"), hostile_opts(&mut rng));
                }
            }
            canaries_talk(&mut a, &mut b, round, seed);
            for (name, dev, pattern) in [("a", &a, 0xa5), ("b", &b, 0x5a)] {
                if let Some(at) = dev.unused_changed(pattern) {
                    panic!("seed {seed} round {round}: canary {name}'s memory changed at {at:#x}, outside its rings and buffers");
                }
            }
            round += 1;
            assert!(alive(pid), "seed {seed}: the backend died");
        }
        drop(h);
    }
    let (rss, fds) = (rss_kib(pid), fd_count(pid));
    let log = std::fs::read_to_string(&backend.log).unwrap_or_default();
    assert!(
        rss < rss0 + 256 * 1024,
        "backend grew from {rss0} KiB to {rss} KiB\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    assert!(
        fds < fds0 + 64,
        "descriptors: {fds0} at the start, {fds} at the end"
    );
    assert!(round > 10, "only {round} canary rounds");
    eprintln!("{round} canary rounds, {reconnects} hostile reconnects, RSS {rss0} -> {rss} KiB, fds {fds0} -> {fds}");
    assert!(backend.stop(), "backend exits cleanly");
    assert!(!log.contains("panicked"), "{log}");
}
