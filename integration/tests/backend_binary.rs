//! The `vhost-net-backend` binary as a user runs it: command line, errors, the control
//! socket, the vhost-user program conventions and a clean exit on signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame};
use integration::{DeviceOptions, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;

use integration::testbed::{backend_binary as backend_bin, rss_kib};

fn run(args: &[&str]) -> Output {
    Command::new(backend_bin()).args(args).output().unwrap()
}

fn wait_for(path: &Path) {
    let end = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < end, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A backend process, killed if a test ends before it stopped it: a failed assertion
/// leaves no backend running.
struct Reaped(Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The backend binary with ports a and b on `sa` and `sb` (`opts` appended to each
/// `--port`), its stderr discarded unless `configure` says otherwise; returns once both
/// sockets exist.
fn two_ports(sa: &Path, sb: &Path, opts: &str, configure: impl FnOnce(&mut Command)) -> Reaped {
    let mut cmd = Command::new(backend_bin());
    for (name, sock) in [("a", sa), ("b", sb)] {
        cmd.arg("--port")
            .arg(format!("name={name},socket={}{opts}", sock.display()));
    }
    cmd.stderr(Stdio::null());
    configure(&mut cmd);
    let child = Reaped(cmd.spawn().unwrap());
    wait_for(sa);
    wait_for(sb);
    child
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("backend did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn control(path: &Path, command: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(path).unwrap();
    writeln!(s, "{command}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn prints_capabilities() {
    let out = run(&["--print-capabilities"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "net");
}

#[test]
fn installs_the_vhost_user_description_qemu_asks_for() {
    // docs/interop/vhost-user.json: type, description and the binary, which must run and
    // answer --print-capabilities.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("share/qemu/vhost-user");
    let out = run(&[
        "install-description",
        "--dir",
        &target.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target.join("50-vhost-net-backend.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["type"], "net");
    assert!(v["description"].as_str().is_some_and(|d| !d.is_empty()));
    let binary = Path::new(v["binary"].as_str().unwrap());
    assert!(binary.is_absolute(), "{binary:?}");
    let caps = Command::new(binary)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(caps.status.success());
}

#[test]
fn help_explains_options_with_a_qemu_example() {
    let out = run(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--port",
        "--config",
        "--mtu",
        "--socket-path",
        "--fd",
        "-netdev vhost-user",
        "share=on",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn bad_input_fails_with_a_message_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[port]]\nname = \"a\"\nsocket = \"/tmp/a.sock\"\nvlan = 5000\n",
    )
    .unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no ports configured"),
        (vec!["--port".into(), "name=a".into()], "missing socket"),
        (
            vec!["--port".into(), "name=a,socket=/tmp/x.sock,vlan=x".into()],
            "vlan 'x'",
        ),
        (
            vec!["--config".into(), "/nonexistent/switch.toml".into()],
            "/nonexistent/switch.toml",
        ),
        (
            vec!["--config".into(), cfg.display().to_string()],
            "vlan 5000",
        ),
        (
            vec![
                "--port".into(),
                "name=a,socket=/nonexistent-dir/a.sock".into(),
            ],
            "cannot listen on /nonexistent-dir/a.sock",
        ),
        (vec!["--fd".into(), "57".into()], "--fd 57"),
    ];
    for (args, needle) in cases {
        let out = Command::new(backend_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr lacks '{needle}': {stderr}"
        );
    }
}

#[test]
fn serves_ports_reports_counters_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb, ctl) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("ctl.sock"),
    );
    let mut child = two_ports(&sa, &sb, "", |cmd| {
        cmd.arg("--control-socket").arg(&ctl);
    });
    wait_for(&ctl);

    let _pair = connected_pair(&sa, &sb);

    let stats = control(&ctl, "stats");
    let ports = stats["ports"].as_array().unwrap();
    assert_eq!(ports[0]["name"], "a");
    assert!(ports[0]["tx_packets"].as_u64().unwrap() >= 1);
    assert_eq!(ports[1]["rx_packets"], 1);
    assert_eq!(ports[1]["rx_bytes"], 128);
    assert_eq!(ports[1]["connected"], true);
    assert!(control(&ctl, "frobnicate")["error"]
        .as_str()
        .unwrap()
        .contains("stats"));

    signal(&child, libc::SIGUSR1);
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child);
    assert!(status.success(), "exit status {status}");
    for p in [&sa, &sb, &ctl] {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn vhost_user_conventions_socket_path_and_fd() {
    let dir = tempfile::tempdir().unwrap();
    // --socket-path PATH
    let sp = dir.path().join("vm.sock");
    let mut child = Reaped(
        Command::new(backend_bin())
            .arg("--socket-path")
            .arg(&sp)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sp);
    let dev = VirtioNetDevice::connect(&sp, DeviceOptions::default()).unwrap();
    assert_ne!(dev.features, 0);
    drop(dev);
    signal(&child, libc::SIGINT);
    assert!(wait_exit(&mut child).success());
    assert!(!sp.exists());

    // --fd N: a listening socket inherited from the parent (as QEMU or systemd pass it).
    let fdp = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&fdp).unwrap();
    let raw = listener.as_raw_fd();
    let mut cmd = Command::new(backend_bin());
    cmd.args(["--fd", "3"]).stderr(Stdio::null());
    // SAFETY: dup2 in the child between fork and exec; it only touches fd numbers.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps FD_CLOEXEC, so clear it explicitly in that case.
            let ok = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(raw, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    drop(listener);
    let dev = VirtioNetDevice::connect(&fdp, DeviceOptions::default())
        .expect("served on the inherited fd");
    assert_ne!(dev.features, 0);
    drop(dev);
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
}

#[test]
fn the_benchmark_refuses_arguments_it_does_not_know() {
    let bench = env!("CARGO_BIN_EXE_vnet-bench");
    let help = Command::new(bench).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--queue-size"));
    for bad in [
        &["--bogus"][..],
        &["--seconds"],
        &["--seconds", "0"],
        &["--queue-size", "300"],
    ] {
        let out = Command::new(bench).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty(), "{bad:?}");
    }
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `open_fds` once the backend has torn a closed connection down: as soon as it is back
/// to `before` (what was open before that connection) or, with a leak, after 5 s.
fn fds_after_teardown(pid: u32, before: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds(pid);
        if now <= before || Instant::now() > end {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the backend with SIGTERM, requires a clean exit, and returns what it logged.
fn stop_and_read_log(child: &mut Reaped) -> String {
    signal(child, libc::SIGTERM);
    assert!(wait_exit(child).success());
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

/// A memory region of 4 MiB backed by `memory` (which the tests make 2 MiB long).
fn four_mib_of(memory: &std::fs::File) -> vhost::VhostUserMemoryRegionInfo {
    vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 4 << 20,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: memory.as_raw_fd(),
    }
}

/// New frontends on ports a and b (sockets `sa`, `sb`), RX buffers posted, that have
/// exchanged a frame.
fn connected_pair(sa: &Path, sb: &Path) -> (VirtioNetDevice, VirtioNetDevice) {
    let mut a = VirtioNetDevice::connect(sa, DeviceOptions::default()).unwrap();
    let mut b = VirtioNetDevice::connect(sb, DeviceOptions::default()).unwrap();
    a.post_rx(0, 16).unwrap();
    b.post_rx(0, 16).unwrap();
    exchange(&mut a, &mut b);
    (a, b)
}

/// Sends a 128-byte frame a -> b until one arrives (a new connection's workers pick up
/// its rings asynchronously).
fn exchange(a: &mut VirtioNetDevice, b: &mut VirtioNetDevice) {
    let frame = udp_frame(mac(1), mac(2), 128);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        a.send(0, &NetHdr::default(), &frame).unwrap();
        if let Some(f) = b.recv(0, Duration::from_millis(200)) {
            assert_eq!(f.frame, frame);
            return;
        }
        assert!(Instant::now() < end, "frame never arrived");
    }
}

#[test]
fn reconnecting_guests_leave_no_descriptors_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = two_ports(&sa, &sb, ",queues=2", |_| {});
    let two = DeviceOptions {
        queue_pairs: 2,
        ..Default::default()
    };
    let mut a = VirtioNetDevice::connect(&sa, two.clone()).unwrap();
    a.post_rx(0, 16).unwrap();
    // a's memory and rings are taken in before the first count.
    a.sync().unwrap();
    let mut counts = Vec::new();
    // A guest rebooting over and over, its peer staying up.
    for _ in 0..6 {
        let before = open_fds(child.id());
        let mut b = VirtioNetDevice::connect(&sb, two.clone()).unwrap();
        b.post_rx(0, 16).unwrap();
        exchange(&mut a, &mut b);
        drop(b);
        counts.push(fds_after_teardown(child.id(), before));
    }
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    // Every connection must give back all it took: kicks, calls, exit events, memory.
    assert!(
        counts.iter().all(|&c| c == counts[0]),
        "descriptors open after each reconnect: {counts:?}"
    );
}

#[test]
fn a_memory_table_past_its_file_is_refused_and_other_ports_keep_working() {
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = two_ports(&sa, &sb, "", |cmd| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::piped());
    });

    // A frontend whose memory file holds 2 MiB while its table claims 4: mapped as it
    // says, the first access past 2 MiB would kill the backend with SIGBUS.
    // In /dev/shm (tmpfs), where QEMU puts file-backed guest memory.
    let memory = tempfile::tempfile_in("/dev/shm").unwrap();
    memory.set_len(2 << 20).unwrap();
    let bad = Frontend::connect(&sa, 2).unwrap();
    bad.set_owner().unwrap();
    let features = bad.get_features().unwrap();
    bad.set_features(features).unwrap();
    let region = four_mib_of(&memory);
    let _ = bad.set_mem_table(&[region]);
    // The backend closed that connection: the next request gets no answer.
    assert!(
        bad.get_features().is_err(),
        "the bad memory table was taken"
    );
    drop(bad);

    // Nothing else suffered: port a takes the next frontend, and frames pass.
    let _pair = connected_pair(&sa, &sb);
    // Refused for that reason, and told so.
    let log = stop_and_read_log(&mut child);
    assert!(
        log.contains("port a") && log.contains("memory region 0") && log.contains("past its end"),
        "{log}"
    );
}

#[test]
fn early_ring_enables_cannot_pile_up_in_the_backend() {
    // Before SET_FEATURES the relay answers SET_VRING_ENABLE itself and keeps the last state
    // of each ring; a frontend sending thousands of them, for any ring index and with 64 KiB
    // payloads, must not make it keep them all (that took 1.28 GB for 20,000 of them).
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let child = two_ports(&sa, &sb, "", |cmd| {
        cmd.env("RUST_LOG", "error");
    });
    let before = rss_kib(child.id());
    let mut sock = std::os::unix::net::UnixStream::connect(&sa).unwrap();
    let mut msg = Vec::with_capacity(12 + 65536);
    for i in 0..2000u32 {
        msg.clear();
        msg.extend_from_slice(&18u32.to_le_bytes()); // SET_VRING_ENABLE
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&65536u32.to_le_bytes());
        msg.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
        msg.resize(12 + 65536, 1);
        if std::io::Write::write_all(&mut sock, &msg).is_err() {
            break; // refused: the backend closed the connection
        }
    }
    // Measured with the connection still open: what the relay kept is still kept.
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(child.id()).saturating_sub(before);
    drop(sock);
    assert!(grown < 32 * 1024, "the backend grew by {grown} KiB");
    // And the port takes the next frontend.
    let _pair = connected_pair(&sa, &sb);
}

#[test]
fn protocol_features_never_offered_are_refused_and_added_regions_checked() {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = two_ports(&sa, &sb, "", |cmd| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::piped());
    });

    // CONFIGURE_MEM_SLOTS is not offered; a frontend that sets it anyway, then adds a
    // region of 4 MiB backed by a 2 MiB file, would have the backend map past the file's end.
    // In /dev/shm (tmpfs), where QEMU puts file-backed guest memory.
    let memory = tempfile::tempfile_in("/dev/shm").unwrap();
    memory.set_len(2 << 20).unwrap();
    let mut bad = Frontend::connect(&sa, 2).unwrap();
    bad.set_owner().unwrap();
    let features = bad.get_features().unwrap();
    bad.set_features(features).unwrap();
    let offered = bad.get_protocol_features().unwrap();
    assert!(!offered.contains(P::CONFIGURE_MEM_SLOTS));
    let _ = bad.set_protocol_features(offered | P::CONFIGURE_MEM_SLOTS);
    let region = four_mib_of(&memory);
    let _ = bad.add_mem_region(&region);
    assert!(
        bad.get_features().is_err(),
        "the connection went on after features that were never offered"
    );
    drop(bad);

    // The backend is alive and every port works.
    let _pair = connected_pair(&sa, &sb);
    let log = stop_and_read_log(&mut child);
    assert!(
        log.contains("port a") && log.contains("never offered"),
        "{log}"
    );
}

#[test]
fn an_interrupt_eventfd_kept_full_stalls_no_other_port() {
    // Port c's frontend gives its RX queue a blocking eventfd one short of full: writing
    // c's interrupt would block whoever delivers to c, under c's vring lock, for ever.
    use vmm_sys_util::eventfd::EventFd;
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb, sc) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("c.sock"),
    );
    let _child = two_ports(&sa, &sb, "", |cmd| {
        cmd.arg("--port")
            .arg(format!("name=c,socket={}", sc.display()));
    });
    wait_for(&sc);
    let mut c = VirtioNetDevice::connect(&sc, DeviceOptions::default()).unwrap();
    c.post_rx(0, 16).unwrap();
    let full = EventFd::new(0).unwrap();
    full.write(0xffff_ffff_ffff_fffe).unwrap();
    c.replace_call(0, full).unwrap();
    let mut a = VirtioNetDevice::connect(&sa, DeviceOptions::default()).unwrap();
    let mut b = VirtioNetDevice::connect(&sb, DeviceOptions::default()).unwrap();
    a.post_rx(0, 16).unwrap();
    b.post_rx(0, 16).unwrap();
    // A broadcast from a reaches b, and c, whose interrupt cannot be written.
    let broadcast = udp_frame(mac(1), integration::frames::BROADCAST, 100);
    // (Sent until b has one: the new connections' workers take their rings asynchronously.)
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        a.send(0, &NetHdr::default(), &broadcast).unwrap();
        if b.recv(0, Duration::from_millis(200))
            .is_some_and(|f| f.frame == broadcast)
        {
            break;
        }
        assert!(Instant::now() < end, "b never got the broadcast");
    }
    std::thread::sleep(Duration::from_millis(300));
    while b.recv(0, Duration::from_millis(100)).is_some() {}
    // a and b go on: a's worker did not wait on c's eventfd.
    exchange(&mut a, &mut b);
}

#[test]
fn an_interrupt_eventfd_made_blocking_again_by_its_frontend_stalls_no_other_port() {
    // The backend makes every call eventfd non-blocking when it gets it, but the frontend
    // shares the descriptor's open file: port c's frontend clears O_NONBLOCK again through
    // its own copy and fills the counter. Any write of c's interrupt now blocks until c
    // reads, that is for ever; a and b must not notice, and the backend must still stop.
    use vmm_sys_util::eventfd::EventFd;
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb, sc) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("c.sock"),
    );
    let mut child = two_ports(&sa, &sb, "", |cmd| {
        cmd.arg("--port")
            .arg(format!("name=c,socket={}", sc.display()))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped());
    });
    wait_for(&sc);
    let mut c = VirtioNetDevice::connect(&sc, DeviceOptions::default()).unwrap();
    c.post_rx(0, 16).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let ours = call.try_clone().unwrap();
    c.replace_call(0, call).unwrap();
    c.sync().unwrap();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
        assert_ne!(
            flags & libc::O_NONBLOCK,
            0,
            "the backend made it non-blocking"
        );
        assert_eq!(
            libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
            0
        );
    }
    ours.write(0xffff_ffff_ffff_fffe).unwrap();
    let mut a = VirtioNetDevice::connect(&sa, DeviceOptions::default()).unwrap();
    let mut b = VirtioNetDevice::connect(&sb, DeviceOptions::default()).unwrap();
    a.post_rx(0, 16).unwrap();
    b.post_rx(0, 16).unwrap();
    // Broadcasts from a reach b, and c, whose interrupt cannot be written.
    let broadcast = udp_frame(mac(1), integration::frames::BROADCAST, 100);
    let end = Instant::now() + Duration::from_secs(10);
    let mut heard = 0;
    while heard < 3 {
        a.send(0, &NetHdr::default(), &broadcast).unwrap();
        if b.recv(0, Duration::from_millis(200))
            .is_some_and(|f| f.frame == broadcast)
        {
            heard += 1;
        }
        assert!(Instant::now() < end, "b got {heard} of the broadcasts");
    }
    while b.recv(0, Duration::from_millis(100)).is_some() {}
    exchange(&mut a, &mut b);
    // And the whole backend stops cleanly, c's blocked interrupt included.
    let log = stop_and_read_log(&mut child);
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_guest_wanting_more_queue_pairs_than_its_port_offers_is_told_once() {
    // QEMU started with queues=2 on a port set to one queue pair: its messages for ring 2
    // are refused with what to change, once, however often QEMU reconnects; the port then
    // serves a frontend that asks for what it offers.
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = two_ports(&sa, &sb, ",queues=1", |cmd| {
        cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    });
    for _ in 0..3 {
        let mut sock = std::os::unix::net::UnixStream::connect(&sa).unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&8u32.to_le_bytes()); // SET_VRING_NUM
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&2u32.to_le_bytes()); // ring 2: queue pair 2
        msg.extend_from_slice(&256u32.to_le_bytes());
        std::io::Write::write_all(&mut sock, &msg).unwrap();
        // Closed by the backend.
        let mut buf = [0u8; 16];
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(std::io::Read::read(&mut sock, &mut buf).unwrap_or(0), 0);
    }
    let _pair = connected_pair(&sa, &sb);
    drop(_pair);
    let log = stop_and_read_log(&mut child);
    let told: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("uses queue pair 2 but the port offers 1"))
        .collect();
    assert_eq!(told.len(), 1, "{log}");
    assert!(
        told[0].contains("port a") && told[0].contains("queues = 2"),
        "{log}"
    );
}

#[test]
fn a_ports_socket_gets_its_group_and_mode_and_lets_that_user_in() {
    // A QEMU running as its own user (libvirt's) connects when the socket's group and mode
    // say so, and not through the process umask alone.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut cmd = Command::new(backend_bin());
    cmd.arg("--port")
        .arg(format!(
            "name=a,socket={},socket_group=nogroup,socket_mode=0660",
            sa.display()
        ))
        .arg("--port")
        .arg(format!("name=b,socket={}", sb.display()))
        .stderr(Stdio::null());
    let child = Reaped(cmd.spawn().unwrap());
    wait_for(&sa);
    wait_for(&sb);
    let meta = std::fs::metadata(&sa).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    let nogroup = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("nogroup:x:")?
                .split(':')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap();
    assert_eq!(meta.gid(), nogroup);
    // As nobody:nogroup: a connects, b (umask's mode, root's group) does not.
    let connect_as_nobody = |sock: &Path| {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["socat", "-u", "OPEN:/dev/null"])
            .arg(format!("UNIX-CONNECT:{}", sock.display()))
            .output()
            .unwrap()
    };
    let a = connect_as_nobody(&sa);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = connect_as_nobody(&sb);
    assert!(!b.status.success());
    assert!(String::from_utf8_lossy(&b.stderr).contains("Permission denied"));
    drop(child);
    // A name that resolves to nothing is refused before anything is made.
    let out = run(&[
        "--port",
        &format!(
            "name=c,socket={},socket_group=no-such-group",
            dir.path().join("c").display()
        ),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-group"));
}

#[test]
fn socket_activation_and_readiness_as_systemd_does_them() {
    // As systemd starts a socket-activated Type=notify service: two listening sockets at
    // fds 3 and 4 named by LISTEN_FDNAMES (in the other order than the ports), LISTEN_PID
    // the service's own, NOTIFY_SOCKET a datagram socket the test reads.
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixDatagram, UnixListener};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let la = UnixListener::bind(&sa).unwrap();
    let lb = UnixListener::bind(&sb).unwrap();
    let notify = UnixDatagram::bind(dir.path().join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (fa, fb) = (la.as_raw_fd(), lb.as_raw_fd());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(backend_bin())
        .arg("--port")
        .arg(format!("name=a,socket={}", sa.display()))
        .arg("--port")
        .arg(format!("name=b,socket={}", sb.display()))
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "b:a")
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .env("JOURNAL_STREAM", "8:12345")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    // SAFETY: dup2 between fork and exec, onto the numbers systemd uses.
    unsafe {
        cmd.pre_exec(move || {
            // Through numbers above both, so that neither is overwritten before it is
            // copied.
            if libc::dup2(fb, 100) < 0
                || libc::dup2(fa, 101) < 0
                || libc::dup2(100, 3) < 0
                || libc::dup2(101, 4) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY from the switch");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=serving 2 ports"),
        "{ready}"
    );
    // Frames cross between the two activated ports: each socket went to its named port.
    let _pair = connected_pair(&sa, &sb);
    drop(_pair);
    let log = stop_and_read_log(&mut child);
    let n = notify.recv(&mut buf).expect("STOPPING from the switch");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(log.contains("port a: socket from systemd (a)"), "{log}");
    // Under journald (JOURNAL_STREAM set), each line carries its priority.
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
    assert!(log.contains("<6>port a: socket from systemd (a)"), "{log}");
    // systemd's copies still listen: the next start would get them (the switch neither
    // shut them down nor removed their paths).
    assert!(sa.exists() && sb.exists());
    let _client = std::os::unix::net::UnixStream::connect(&sa).unwrap();
    la.set_nonblocking(true).unwrap();
    assert!(
        la.accept().is_ok(),
        "the socket systemd holds was shut down"
    );
}

#[test]
fn a_frontend_that_closes_its_socket_is_a_disconnect_not_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = two_ports(&sa, &sb, "", |cmd| {
        cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    });
    let (a, b) = connected_pair(&sa, &sb);
    // A VM shutting down: QEMU closes the socket.
    drop(a);
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_and_read_log(&mut child);
    assert!(
        log.contains("port a: frontend disconnected")
            && log.contains("port b: frontend disconnected"),
        "{log}"
    );
    assert!(!log.contains("WARN"), "{log}");
}

/// GETs `path` from `addr`; the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut conn = Tcp::connect(addr);
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

struct Tcp;

impl Tcp {
    fn connect(addr: &str) -> std::net::TcpStream {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect(addr) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(Instant::now() < end, "cannot reach {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// A loopback TCP port nobody listens on (for the metrics).
fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_metrics_count_what_the_ports_did() {
    // Given as a port alone: the switch listens on 127.0.0.1.
    let port = free_loopback_port();
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _child = two_ports(&sa, &sb, ",vlan=7", |cmd| {
        cmd.arg("--metrics").arg(port.to_string());
    });
    let (mut a, mut b) = connected_pair(&sa, &sb);
    for _ in 0..9 {
        exchange(&mut a, &mut b);
    }
    // A frame b cannot take: too big for the switch, dropped as oversize on a.
    let _ = a.send(0, &NetHdr::default(), &udp_frame(mac(1), mac(2), 9200));
    std::thread::sleep(Duration::from_millis(200));
    let addr = format!("127.0.0.1:{port}");
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text page");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{body}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        }
    };
    assert!(
        value(
            "vnet_port_rx_packets_total",
            &[("port", "b"), ("kind", "vm")]
        ) >= 10.0
    );
    assert!(value("vnet_port_tx_packets_total", &[("port", "a")]) >= 10.0);
    assert!(value("vnet_port_rx_bytes_total", &[("port", "b")]) >= 1280.0);
    assert_eq!(
        value(
            "vnet_port_dropped_total",
            &[("port", "a"), ("reason", "oversize")]
        ),
        1.0
    );
    assert_eq!(value("vnet_port_connected", &[("port", "b")]), 1.0);
    assert_eq!(value("vnet_port_rx_queues", &[("port", "a")]), 1.0);
    assert!(value("vnet_mac_table_entries", &[]) >= 1.0);
    assert_eq!(value("vnet_contained_panics_total", &[]), 0.0);
    // Per queue pair: one pair each here, so it holds all of the port's traffic.
    let q0 = |port| [("port", port), ("queue", "0")];
    assert_eq!(
        value("vnet_queue_rx_packets_total", &q0("b")),
        value("vnet_port_rx_packets_total", &[("port", "b")])
    );
    assert_eq!(
        value("vnet_queue_tx_bytes_total", &q0("a")),
        value("vnet_port_tx_bytes_total", &[("port", "a")])
    );
    // a's worker took 10 bursts at least (each frame was sent alone), all of one frame.
    let bursts: f64 = ["1", "2-4", "5-16", "17-64", "65+"]
        .iter()
        .map(|size| {
            value(
                "vnet_worker_bursts_total",
                &[("port", "a"), ("queue", "0"), ("size", size)],
            )
        })
        .sum();
    assert!(bursts >= 10.0, "{bursts} bursts");
    assert_eq!(
        value(
            "vnet_worker_bursts_total",
            &[("port", "a"), ("queue", "0"), ("size", "1")]
        ),
        bursts
    );
    let busy = value("vnet_worker_busy_seconds_total", &q0("a"));
    assert!(busy > 0.0 && busy < 1.0, "{busy} s busy");
    assert!(
        body.contains("# TYPE vnet_port_rx_packets counter"),
        "{body}"
    );
    let (status, _) = http_get(&addr, "/nothing");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn each_queue_pair_counts_its_own_traffic_and_worker() {
    let port = free_loopback_port();
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _child = two_ports(&sa, &sb, ",vlan=7,queues=2", |cmd| {
        cmd.arg("--metrics").arg(port.to_string());
    });
    let opts = DeviceOptions {
        queue_pairs: 2,
        ..Default::default()
    };
    let mut a = VirtioNetDevice::connect_retry(&sa, opts.clone());
    let mut b = VirtioNetDevice::connect_retry(&sb, opts);
    for qp in 0..2 {
        a.post_rx(qp, 16).unwrap();
        b.post_rx(qp, 64).unwrap();
    }
    // A new connection's workers pick up its rings asynchronously: a frame of a's first
    // pair until one arrives, wherever.
    let end = Instant::now() + Duration::from_secs(10);
    let (mut warm, mut sent) = ([0usize; 2], 0);
    while warm == [0, 0] {
        assert!(Instant::now() < end, "no frame ever arrived");
        sent += 1;
        a.send(0, &NetHdr::default(), &udp_frame(mac(1), mac(2), 128))
            .unwrap();
        for (qp, n) in warm.iter_mut().enumerate() {
            while b.recv(qp as u16, Duration::from_millis(50)).is_some() {
                *n += 1;
            }
        }
    }
    // 64 flows (source ports) sent from a's second queue pair, 16 at a time: the switch
    // spreads them over b's two RX queues by their hash.
    let mut received = warm;
    for round in 0..4u16 {
        for i in 0..16u16 {
            let mut f = udp_frame(mac(1), mac(2), 128);
            f[34..36].copy_from_slice(&(1000 + round * 16 + i).to_be_bytes());
            a.send(1, &NetHdr::default(), &f).unwrap();
        }
        while received.iter().sum::<usize>()
            < warm.iter().sum::<usize>() + usize::from(round + 1) * 16
        {
            assert!(Instant::now() < end, "only {received:?} arrived");
            for (qp, n) in received.iter_mut().enumerate() {
                while b.recv(qp as u16, Duration::from_millis(5)).is_some() {
                    *n += 1;
                }
            }
        }
    }
    assert!(
        received.iter().all(|n| *n > 0),
        "one RX queue took all: {received:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    assert!(status.contains("200"), "{status}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("a Prometheus text page");
    let value = |name: &str, port: &str, queue: &str| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.get("port") == Some(port)
                    && s.labels.get("queue") == Some(queue)
            })
            .unwrap_or_else(|| panic!("no {name} {port} {queue} in:\n{body}"));
        match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a counter"),
        }
    };
    // What each RX queue got, as the guest saw it; a's 64 flows all from its second pair.
    for (qp, n) in received.iter().enumerate() {
        assert_eq!(
            value("vnet_queue_rx_packets_total", "b", &qp.to_string()),
            *n as f64,
            "b's RX queue {qp}"
        );
    }
    assert_eq!(value("vnet_queue_tx_packets_total", "a", "1"), 64.0);
    // The first pair sent the warm-up frames (one arrived; earlier ones may have found
    // b's queues not ready yet).
    let first = value("vnet_queue_tx_packets_total", "a", "0");
    assert!((1.0..=sent as f64).contains(&first), "{first} of {sent}");
    assert!(value("vnet_worker_busy_seconds_total", "a", "1") > 0.0);
}

#[test]
fn the_control_socket_gets_the_configured_group_and_mode() {
    // An operator's group (here nogroup) may run `ctl`; others may not.
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (sa, control, config) = (
        dir.path().join("a.sock"),
        dir.path().join("control.sock"),
        dir.path().join("switch.toml"),
    );
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\ncontrol_socket_group = \"nogroup\"\n\
             control_socket_mode = \"0660\"\n[[port]]\nname = \"a\"\nsocket = \"{}\"\n",
            control.display(),
            sa.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(backend_bin());
    cmd.arg("--config").arg(&config).stderr(Stdio::null());
    let child = Reaped(cmd.spawn().unwrap());
    wait_for(&sa);
    wait_for(&control);
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    let as_user = |group: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                &format!("--regid={group}"),
                "--clear-groups",
            ])
            .arg(backend_bin())
            .args(["ctl", "--json", "--socket"])
            .arg(&control)
            .arg("stats")
            .output()
            .unwrap()
    };
    let ok = as_user("nogroup");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"name\":\"a\""));
    let refused = as_user("daemon");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(child);
    // A group that does not exist is refused at start, naming it.
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\ncontrol_socket_group = \"no-such-group\"\n\
             [[port]]\nname = \"a\"\nsocket = \"{}\"\n",
            control.display(),
            sa.display()
        ),
    )
    .unwrap();
    let out = run(&["--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
