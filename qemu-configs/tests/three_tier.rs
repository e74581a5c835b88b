//! The three-tier example brought up by `qemu-configs up` with real QEMU guests, inside a
//! namespace with an "outside" behind its uplink: the allowed flows pass, the others are
//! dropped and counted, the outside reaches only web's forwarded port, and SIGTERM takes
//! everything down again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::guest_image::guest_image;
use integration::netns::Netns;
use integration::qemu::{detect_accel, Qemu};

fn bin(name: &str) -> PathBuf {
    let own = PathBuf::from(env!("CARGO_BIN_EXE_qemu-configs"));
    let path = own.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build --workspace --bins first",
        path.display()
    );
    path
}

/// A line-oriented shell on a guest's console socket (the image's command loop).
struct Console {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Console {
    fn connect(path: &Path) -> Console {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Console {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Runs `cmd`; returns its exit status and output.
    fn run(&mut self, cmd: &str) -> (i32, String) {
        writeln!(self.writer, "{cmd} 2>&1; echo \"@@$?@@\"").unwrap();
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("no answer to `{cmd}`: {e}; so far: {out}"));
            assert!(n > 0, "console closed during `{cmd}`");
            let line = line.trim_end();
            if let Some(code) = line.strip_prefix("@@").and_then(|l| l.strip_suffix("@@")) {
                return (code.parse().unwrap(), out);
            }
            out.push_str(line);
            out.push('\n');
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `qemu-configs up FILE` inside `host`, its state in `state`.
fn up_command(host: &Netns, file: &Path, state: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.name])
        .arg(bin("qemu-configs"))
        .arg("up")
        .arg(file)
        .arg("--state-dir")
        .arg(state)
        .arg("--helper")
        .arg(bin("qemu-bridge-plugin"));
    cmd
}

struct Up(Child);

impl Drop for Up {
    /// A failed test still takes its VMs and networks down: SIGTERM first.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        // The VMs get the topology's shutdown_secs (30) to power off, then SIGTERM.
        let end = Instant::now() + Duration::from_secs(60);
        while !matches!(self.0.try_wait(), Ok(Some(_))) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn three_tier_example_enforces_its_policy_with_real_guests() {
    let (host, outside) = Netns::host_with_outside("3t");
    let image = guest_image().expect("guest image");
    let qemu = Qemu::from_env().expect("QEMU");
    let accel = detect_accel(&qemu, &image);
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier-bridges.toml"
    );
    let topo = std::fs::read_to_string(example)
        .unwrap()
        .replace("@KERNEL@", &image.kernel.display().to_string())
        .replace("@INITRD@", &image.initrd.display().to_string())
        .replace("@ACCEL@", accel.name())
        .replace("@UPLINK@", "up0");
    let file = dir.path().join("three-tier.toml");
    std::fs::write(&file, topo).unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("up.log");

    let child = up_command(&host, &file, &state)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut up = Up(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    for vm in ["web1", "app1", "db1"] {
        let console_log = state.join(format!("{vm}.log"));
        wait_for(&format!("{vm} to boot"), Duration::from_secs(120), || {
            assert!(
                !matches!(up.0.try_wait(), Ok(Some(_))),
                "qemu-configs up ended: {}",
                log_text()
            );
            std::fs::read_to_string(&console_log).is_ok_and(|t| t.contains("READY"))
        });
    }
    let mut web = Console::connect(&state.join("web1.console"));
    let mut app = Console::connect(&state.join("app1.console"));
    let mut db = Console::connect(&state.join("db1.console"));
    // Busybox's static wget crashes in glibc's resolver; nc speaks enough HTTP. The body is
    // the answer's last line.
    const REQUEST: &str = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'";
    let get = |c: &mut Console, host: &str, port: u16| {
        c.run(&format!(
            "{REQUEST} | nc -w 3 {host} {port} | tail -n 1 | grep ."
        ))
    };

    // The services started at boot; wait until each answers locally.
    for (c, port) in [(&mut web, 80), (&mut app, 8080), (&mut db, 5432)] {
        let end = Instant::now() + Duration::from_secs(30);
        while get(c, "127.0.0.1", port).0 != 0 {
            if Instant::now() > end {
                let (_, why) = c.run(&format!(
                    "{REQUEST} | nc -w 3 127.0.0.1 {port}; netstat -ltn"
                ));
                panic!("the boot-time service on port {port} never answered:\n{why}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    // Allowed: web -> app:8080, app -> db:5432.
    let (code, out) = get(&mut web, "10.10.2.10", 8080);
    assert_eq!((code, out.trim()), (0, "app1"), "web -> app:8080");
    let (code, out) = get(&mut app, "10.10.3.10", 5432);
    assert_eq!((code, out.trim()), (0, "db1"), "app -> db:5432");
    // Denied: web -> db, db -> app, app -> web.
    assert_ne!(get(&mut web, "10.10.3.10", 5432).0, 0, "web -> db");
    assert_ne!(get(&mut db, "10.10.2.10", 8080).0, 0, "db -> app");
    assert_ne!(get(&mut app, "10.10.1.10", 80).0, 0, "app -> web");
    // The outside reaches web's forwarded port on the host's uplink address, nothing else.
    let http = format!("{REQUEST} | busybox nc -w 3");
    let from_outside = outside.try_sh(&format!("{http} 192.0.2.1 8080 | tail -n 1"));
    assert_eq!(
        String::from_utf8_lossy(&from_outside.stdout).trim(),
        "web1",
        "outside -> host:8080 -> web1:80"
    );
    outside.sh("ip route add 10.10.0.0/16 via 192.0.2.1");
    let to_app = outside.try_sh(&format!("{http} 10.10.2.10 8080 | tail -n 1"));
    assert_eq!(
        String::from_utf8_lossy(&to_app.stdout).trim(),
        "",
        "outside -> app"
    );

    // SIGUSR1: the rules' counters, allowed and dropped, in the log.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGUSR1) };
    // The running VMs are logged first, then each rule's counter (after asking nftables).
    wait_for("the counters in the log", Duration::from_secs(10), || {
        let t = log_text();
        t.contains("running: web1 app1 db1")
            && ["allow web -> app tcp/8080", "deny from segments"]
                .iter()
                .all(|r| t.lines().any(|l| l.contains(r) && l.ends_with("packets")))
    });
    let text = log_text();
    let packets = |rule: &str| -> u64 {
        text.lines()
            .find(|l| l.contains(rule))
            .and_then(|l| l.rsplit(": ").next()?.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no counter for '{rule}' in:\n{text}"))
    };
    assert!(packets("allow web -> app tcp/8080") > 0, "{text}");
    assert!(
        packets("deny from segments") > 0,
        "denied flows are counted:\n{text}"
    );

    // SIGTERM: VMs stopped, networks and consoles gone, exit 0.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", log_text());
    // Each guest powered itself off when its ACPI power button was pressed over QMP.
    for vm in ["web1", "app1", "db1"] {
        assert!(
            log_text().contains(&format!("vm {vm}: powered off")),
            "{vm} did not power off by its button: {}",
            log_text()
        );
    }
    assert!(!host.try_sh("ip link show tt-web").status.success());
    assert!(!state.join("web1.console").exists());
    assert!(!state.join("web1.qmp").exists());
    assert!(!host
        .sh("ps -eo args")
        .contains(&format!("--state-dir {}", state.display())));
    assert!(!host
        .sh("ps -eo args")
        .contains(&state.join("web1.console").display().to_string()));
}

#[test]
fn a_failed_up_names_the_cause_and_leaves_nothing_behind() {
    let host = Netns::new("3tf");
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let topo = |kernel: &Path, extra: &str| {
        format!(
            "name = \"t\"\n[guest]\nkernel = \"{}\"\naccel = \"tcg\"\n{extra}\n\
             [[network]]\nname = \"app\"\nmode = \"host-only\"\nbridge = \"tf-app\"\naddress = \"10.20.0.1/24\"\n\
             [[vm]]\nname = \"app1\"\nnetwork = \"app\"\naddress = \"10.20.0.10/24\"\n",
            kernel.display()
        )
    };
    let up = |text: String| {
        let file = dir.path().join("t.toml");
        std::fs::write(&file, text).unwrap();
        up_command(&host, &file, &dir.path().join("state"))
            .output()
            .unwrap()
    };

    // A missing kernel: refused before anything is built.
    let out = up(topo(&kernel, ""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("kernel {} does not exist", kernel.display())),
        "{err}"
    );
    assert!(!host.try_sh("ip link show tf-app").status.success());

    // Someone else's bridge of the same name: refused, and left as it was.
    std::fs::write(&kernel, b"not a kernel").unwrap();
    host.sh("ip link add tf-app type bridge");
    let out = up(topo(&kernel, ""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bridge tf-app already exist"), "{err}");
    assert!(host.try_sh("ip link show tf-app").status.success());
    host.sh("ip link del tf-app");

    // QEMU refusing its arguments: its own words, and the network taken down again.
    let out = up(topo(&kernel, "qemu_args = [\"-no-such-option\"]"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vm app1: QEMU exited at once") && err.contains("no-such-option"),
        "{err}"
    );
    assert!(!host.try_sh("ip link show tf-app").status.success());
    assert!(!dir.path().join("state/app1.console").exists());
}

#[test]
fn two_topologies_live_side_by_side() {
    let host = Netns::new("3ts");
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for QEMU that just stays up: this test is about the host side.
    let fake_qemu = dir.path().join("fake-qemu");
    std::fs::write(&fake_qemu, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&fake_qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"").unwrap();
    let start = |name: &str, net: u8| {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\n[guest]\nqemu = \"{}\"\nkernel = \"{}\"\n\
                 [[network]]\nname = \"n\"\nmode = \"host-only\"\nbridge = \"{name}-br\"\naddress = \"10.3{net}.0.1/24\"\n\
                 [[vm]]\nname = \"{name}1\"\nnetwork = \"n\"\naddress = \"10.3{net}.0.10/24\"\n",
                fake_qemu.display(),
                kernel.display()
            ),
        )
        .unwrap();
        let child = up_command(&host, &file, &dir.path().join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let up = Up(child);
        wait_for(&format!("{name}'s table"), Duration::from_secs(20), || {
            host.try_sh(&format!("nft list table inet qemu_configs_{name}"))
                .status
                .success()
        });
        up
    };
    let a = start("ta", 1);
    let b = start("tb", 2);
    drop(b);
    // b's down removed b's table and bridge, and nothing of a's.
    assert!(!host
        .try_sh("nft list table inet qemu_configs_tb")
        .status
        .success());
    assert!(!host.try_sh("ip link show tb-br").status.success());
    assert!(host
        .try_sh("nft list table inet qemu_configs_ta")
        .status
        .success());
    assert!(host.try_sh("ip link show ta-br").status.success());
    drop(a);
    assert!(!host
        .try_sh("nft list table inet qemu_configs_ta")
        .status
        .success());
}
