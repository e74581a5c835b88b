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
use qemu_configs::run::running;

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
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            // Ended and waited for: its pid may be another process's by now.
            return;
        }
        // SAFETY: kill(2) on our child, not yet waited for.
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

/// Guests are CPU-heavy under TCG on 2 cores: one topology of guests at a time.
static GUESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn three_tier_example_enforces_its_policy_with_real_guests() {
    let _one = GUESTS.lock().unwrap_or_else(|e| e.into_inner());
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

/// The example file `name` for this machine: the guest image, accelerator and the QEMU of
/// `VNET_QEMU` filled in; and the QEMU_MODULE_DIR an unpacked QEMU needs.
fn example(dir: &Path, name: &str) -> (PathBuf, Option<PathBuf>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    topology(
        dir,
        name,
        &std::fs::read_to_string(format!("{path}{name}")).unwrap(),
    )
}

/// `text` (a topology with the example's placeholders) for this machine, as `dir/name`.
fn topology(dir: &Path, name: &str, text: &str) -> (PathBuf, Option<PathBuf>) {
    let image = guest_image().expect("guest image");
    let qemu = Qemu::from_env().expect("QEMU");
    let accel = detect_accel(&qemu, &image);
    eprintln!(
        "QEMU {}.{}, accel {}",
        qemu.version.0,
        qemu.version.1,
        accel.name()
    );
    let mut guest = format!("[guest]\nqemu = \"{}\"\n", qemu.binary.display());
    let mut args: Vec<String> = Vec::new();
    for d in &qemu.data_dirs {
        args.extend(["\"-L\"".into(), format!("\"{}\"", d.display())]);
    }
    if qemu.version >= (8, 2) && qemu.module_dir.is_some() {
        args.extend(["\"-audio\"".into(), "\"none\"".into()]);
    }
    guest.push_str(&format!("qemu_args = [{}]\n", args.join(", ")));
    let topo = text
        .replace("[guest]\n", &guest)
        .replace("@KERNEL@", &image.kernel.display().to_string())
        .replace("@INITRD@", &image.initrd.display().to_string())
        .replace("@ACCEL@", accel.name())
        .replace("@UPLINK@", "up0");
    let file = dir.join(name);
    std::fs::write(&file, topo).unwrap();
    (file, qemu.module_dir.clone())
}

/// `qemu-configs up` of `file` in `host` (on the switch, when the file says so), its
/// state in `state`, its log in `log`.
fn start_up(host: &Netns, file: &Path, state: &Path, modules: Option<PathBuf>, log: &Path) -> Up {
    let mut cmd = up_command(host, file, state);
    if let Some(m) = modules {
        cmd.env("QEMU_MODULE_DIR", m);
    }
    let child = cmd
        .arg("--switch")
        .arg(bin("vhost-net-backend"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Up(child)
}

/// `up`'s log at `log`, then the switch's in `state`.
fn up_and_switch_logs(log: &Path, state: &Path) -> String {
    format!(
        "{}\nswitch:\n{}",
        std::fs::read_to_string(log).unwrap_or_default(),
        std::fs::read_to_string(state.join("switch.log")).unwrap_or_default()
    )
}

/// Waits until each of `vms` has booted (its console said READY), `up` still running.
fn wait_booted(up: &mut Up, state: &Path, vms: &[&str], log_text: impl Fn() -> String) {
    for vm in vms {
        let console_log = state.join(format!("{vm}.log"));
        wait_for(&format!("{vm} to boot"), Duration::from_secs(180), || {
            assert!(
                !matches!(up.0.try_wait(), Ok(Some(_))),
                "qemu-configs up ended: {}",
                log_text()
            );
            std::fs::read_to_string(&console_log).is_ok_and(|t| t.contains("READY"))
        });
    }
}

/// `qemu-configs verify` of a running topology: its exit status and the matrix.
fn verify(host: &Netns, file: &Path, state: &Path) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.name])
        .arg(bin("qemu-configs"))
        .arg("verify")
        .arg(file)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    let matrix = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), matrix)
}

/// iperf3 for 3 s from app1 to db1 (db's allowed port 5432): the receiver's bit rate.
fn iperf_app1_to_db1(state: &Path) -> String {
    let mut app = Console::connect(&state.join("app1.console"));
    let mut db = Console::connect(&state.join("db1.console"));
    db.run("killall httpd; iperf3 -s -p 5432 -D");
    std::thread::sleep(Duration::from_secs(1));
    let (code, out) = app.run("iperf3 -c 10.10.3.10 -p 5432 -t 3");
    assert_eq!(code, 0, "{out}");
    out.lines()
        .find(|l| l.contains("receiver"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| w.ends_with("bits/sec"))?;
            Some(format!("{} {}", words[i - 1], words[i]))
        })
        .unwrap_or_else(|| panic!("no receiver line in:\n{out}"))
}

/// The kernel-bridge example with app1 and db1 only, up for the iperf3 figure beside
/// the switch's: the receiver's bit rate.
fn iperf_over_kernel_bridges(host: &Netns, dir: &Path) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier-bridges.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    // Without web1 (its [[vm]] runs up to the next one) and the forward to it, which
    // `check` refuses without it.
    let start = text.find("[[vm]]\nname = \"web1\"").unwrap();
    let end = start + 1 + text[start + 1..].find("[[vm]]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let start = text.find("[[network.forward]]").unwrap();
    let end = start + text[start..].find("[[network]]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let (file, modules) = topology(dir, "bridges.toml", &text);
    let state = dir.join("bridges-state");
    let log = dir.join("bridges-up.log");
    let mut up = start_up(host, &file, &state, modules, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_booted(&mut up, &state, &["app1", "db1"], log_text);
    let rate = iperf_app1_to_db1(&state);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", log_text());
    rate
}

#[test]
fn three_tier_on_the_switch_is_verified_from_inside_the_guests() {
    let _one = GUESTS.lock().unwrap_or_else(|e| e.into_inner());
    let (host, outside) = Netns::host_with_outside("3w");
    let dir = tempfile::tempdir().unwrap();
    let (file, modules) = example(dir.path(), "three-tier.toml");
    let state = dir.path().join("state");
    let log = dir.path().join("up.log");
    let mut up = start_up(&host, &file, &state, modules, &log);
    let log_text = || up_and_switch_logs(&log, &state);
    let vms = ["web1", "web2", "app1", "app2", "db1"];
    wait_booted(&mut up, &state, &vms, log_text);
    // Addresses by DHCP from the switch: no vnet.ip= on the guests' command line.
    let mut db = Console::connect(&state.join("db1.console"));
    let (_, addr) = db.run("ip -4 -o addr show eth0; ip route");
    assert!(
        addr.contains("10.10.3.10/24") && addr.contains("default via 10.10.3.1"),
        "{addr}"
    );
    drop(db);
    // Both web VMs serve through the balancer once its checks pass.
    const REQUEST: &str = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'";
    let http = format!("{REQUEST} | busybox nc -w 3");
    let ask = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                let out = outside.try_sh(&format!("{http} 192.0.2.1 8080 | tail -n 1"));
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            })
            .collect()
    };
    wait_for(
        "both web VMs behind the balancer",
        Duration::from_secs(60),
        || {
            let got = ask(6);
            got.contains(&"web1".to_string()) && got.contains(&"web2".to_string())
        },
    );

    // The whole matrix, from inside every guest and from outside, equals the policy.
    let (ok, matrix) = verify(&host, &file, &state);
    eprintln!("{matrix}");
    assert!(ok && matrix.contains("is what the policy says"), "{matrix}");
    assert!(matrix.lines().count() >= 7, "{matrix}");

    // 20 requests from outside through the forwarded port: both web VMs answer.
    let got = ask(20);
    let answered = |vm: &str| got.iter().filter(|g| *g == vm).count();
    eprintln!(
        "20 requests: web1 {}, web2 {}",
        answered("web1"),
        answered("web2")
    );
    assert_eq!(answered("web1") + answered("web2"), 20, "{got:?}");
    assert!(answered("web1") > 0 && answered("web2") > 0, "{got:?}");
    // Nothing else from outside, even with a route to the guests.
    outside.sh("ip route add 10.10.0.0/16 via 192.0.2.1");
    for (addr, port) in [
        ("10.10.1.10", 80),
        ("10.10.2.10", 8080),
        ("10.10.3.10", 5432),
    ] {
        let direct = outside.try_sh(&format!("{http} {addr} {port} | tail -n 1"));
        assert_eq!(
            String::from_utf8_lossy(&direct.stdout).trim(),
            "",
            "{addr}:{port}"
        );
    }

    // iperf3 from app1 to db1 through the switch (on db's allowed port); the same over
    // kernel bridges comes once this topology is down.
    let on_switch = iperf_app1_to_db1(&state);

    // web2 powered off: out of the balancer within its checks, the service stays up.
    // (Before they booted, both were down once already.)
    let downs = || log_text().matches("backend 10.10.1.11 is down").count();
    let before = downs();
    let mut web2 = Console::connect(&state.join("web2.console"));
    let _ = writeln!(web2.writer, "poweroff -f");
    wait_for(
        "web2 off and down in the balancer",
        Duration::from_secs(30),
        || downs() > before && log_text().contains("vm web2 stopped"),
    );
    let got = ask(10);
    assert!(got.iter().all(|g| g == "web1"), "{got:?}");

    // SIGTERM: VMs stopped, then the switch; nothing left of either.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", log_text());
    assert!(log_text().contains("switch stopped"), "{}", log_text());
    assert!(
        !host.try_sh("ip link show vs-3tier").status.success(),
        "tap left"
    );
    assert!(
        host.sh("nft list tables").trim().is_empty(),
        "nftables left"
    );
    for vm in vms {
        assert!(!state.join(format!("{vm}.sock")).exists());
        assert!(!state.join(format!("{vm}.console")).exists());
    }
    assert!(!state.join("switch.ctl").exists());
    let ps = host.sh("ps -eo args");
    assert!(
        !ps.contains(&state.join("switch.toml").display().to_string()),
        "{ps}"
    );
    assert!(
        !ps.contains(&state.join("web1.console").display().to_string()),
        "{ps}"
    );

    let on_bridges = iperf_over_kernel_bridges(&host, dir.path());
    eprintln!(
        "iperf3 app1 -> db1 (3 s, one TCP stream), same run: through the switch \
         {on_switch}, through kernel bridges and nftables {on_bridges}"
    );
}

/// b1 on back, and by a second NIC on front; f1 on front. front reaches back's 7000
/// (routed) and front's 80 (within the segment); b1 listens on 80 on every address.
const TWO_NICS: &str = r#"
name = "twonics"
[guest]
kernel = "@KERNEL@"
initrd = "@INITRD@"
append = "console=ttyS0 quiet panic=-1 vnet.run={run}"
accel = "@ACCEL@"
memory_mib = 256

[switch]
uplink = "vs-2nic"

[[network]]
name = "front"
mode = "switch"
address = "10.20.1.1/24"

[[network]]
name = "back"
mode = "switch"
address = "10.20.2.1/24"

[[allow]]
from = "front"
to = "back"
proto = "tcp"
port = 7000

[[allow]]
from = "front"
to = "front"
proto = "tcp"
port = 80

[[vm]]
name = "f1"
network = "front"
address = "10.20.1.10/24"
run = "mkdir -p /www && httpd -p 80 -h /www"

[[vm]]
name = "b1"
network = "back"
address = "10.20.2.10/24"
run = "mkdir -p /www && httpd -p 7000 -h /www && httpd -p 80 -h /www"
[[vm.nic]]
network = "front"
address = "10.20.1.20/24"
"#;

#[test]
fn a_vm_with_nics_on_two_networks_on_the_switch_is_reached_on_each_as_the_policy_says() {
    let _one = GUESTS.lock().unwrap_or_else(|e| e.into_inner());
    let host = Netns::new("2n");
    let dir = tempfile::tempdir().unwrap();
    let (file, modules) = topology(dir.path(), "twonics.toml", TWO_NICS);
    let state = dir.path().join("state");
    let log = dir.path().join("up.log");
    let mut up = start_up(&host, &file, &state, modules, &log);
    let log_text = || up_and_switch_logs(&log, &state);
    wait_booted(&mut up, &state, &["f1", "b1"], log_text);
    // Both NICs got their addresses by DHCP; the default route is the first NIC's.
    let mut b1 = Console::connect(&state.join("b1.console"));
    let (_, addrs) = b1.run("ip -4 -o addr show; ip route");
    for want in [
        "eth0    inet 10.20.2.10/24",
        "eth1    inet 10.20.1.20/24",
        "default via 10.20.2.1 dev eth0",
    ] {
        assert!(
            addrs
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(&want.split_whitespace().collect::<Vec<_>>().join(" ")),
            "{want}:\n{addrs}"
        );
    }
    let mut f1 = Console::connect(&state.join("f1.console"));
    // b1's port 80 answers on its front address, not routed to its back one (front
    // reaches back on 7000 only).
    let nc = |c: &mut Console, to: &str| c.run(&format!("nc -w 2 {to} </dev/null")).0;
    wait_for("b1's services", Duration::from_secs(30), || {
        nc(&mut f1, "10.20.1.20 80") == 0
    });
    assert_eq!(nc(&mut f1, "10.20.2.10 7000"), 0, "f1 -> b1:7000, routed");
    assert_ne!(nc(&mut f1, "10.20.2.10 80"), 0, "f1 -> b1:80 on back");
    drop((f1, b1));
    let (ok, matrix) = verify(&host, &file, &state);
    eprintln!("{matrix}");
    assert!(ok && matrix.contains("is what the policy says"), "{matrix}");
    for column in ["f1:80", "b1:7000", "b1.eth1:80"] {
        assert!(matrix.lines().next().unwrap().contains(column), "{matrix}");
    }
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status}: {}", log_text());
    assert!(!state.join("b1.eth1.sock").exists());
}

#[test]
fn a_failed_up_on_the_switch_leaves_nothing_behind() {
    let host = Netns::new("3wf");
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"t\"\n[guest]\nkernel = \"{}\"\naccel = \"tcg\"\nqemu_args = [\"-no-such-option\"]\n\
             [[network]]\nname = \"app\"\nmode = \"switch\"\naddress = \"10.20.0.1/24\"\n\
             [[network.forward]]\nhost_port = 8080\nguest_port = 80\n\
             [[vm]]\nname = \"app1\"\nnetwork = \"app\"\naddress = \"10.20.0.10/24\"\n",
            kernel.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = up_command(&host, &file, &state)
        .arg("--switch")
        .arg(bin("vhost-net-backend"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vm app1: QEMU exited at once") && err.contains("no-such-option"),
        "{err}"
    );
    // The switch had come up (its tap, table and sockets) and is gone again.
    let switch_log = std::fs::read_to_string(state.join("switch.log")).unwrap();
    assert!(switch_log.contains("uplink host side"), "{switch_log}");
    assert!(
        !host.try_sh("ip link show vs-t").status.success(),
        "tap left"
    );
    assert!(
        host.sh("nft list tables").trim().is_empty(),
        "nftables left"
    );
    assert!(!state.join("app1.sock").exists() && !state.join("switch.ctl").exists());
    assert!(!host
        .sh("ps -eo args")
        .contains(&state.display().to_string()));

    // A file the switch would refuse: named before anything starts.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file).unwrap().replace(
            "[[vm]]",
            "[[allow]]\nfrom = \"app\"\nto = \"dbs\"\nproto = \"tcp\"\n[[vm]]",
        ),
    )
    .unwrap();
    let out = up_command(&host, &file, &state).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("'dbs' is no network of the file"), "{err}");
}

#[test]
fn an_up_killed_outright_takes_its_switch_and_vms_with_it() {
    let host = Netns::new("3wk");
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    // A stand-in QEMU: answers up's questions as QEMU 10 does, then runs until killed with
    // its arguments on its command line (down finds a VM's QEMU by its -name).
    let qemu = dir.path().join("qemu");
    std::fs::write(
        &qemu,
        "#!/bin/sh\ncase \"$1\" in\n--version) echo 'QEMU emulator version 10.0.0'; exit 0;;\n\
         -netdev) echo vhost-user; exit 0;;\n-object) echo memory-backend-memfd; exit 0;;\nesac\n\
         while :; do sleep 0.1; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("k.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"k\"\n[guest]\nqemu = \"{}\"\nkernel = \"{}\"\naccel = \"tcg\"\n\
             [[network]]\nname = \"app\"\nmode = \"switch\"\naddress = \"10.30.0.1/24\"\n\
             [[vm]]\nname = \"app1\"\nnetwork = \"app\"\naddress = \"10.30.0.10/24\"\n\
             [[vm]]\nname = \"app2\"\nnetwork = \"app\"\naddress = \"10.30.0.11/24\"\n",
            qemu.display(),
            kernel.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("up.log");
    let mut up = start_up(&host, &file, &state, None, &log);
    let pid_of = |name: &str| {
        std::fs::read_to_string(state.join(format!("{name}.pid")))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    wait_for("the VMs to start", Duration::from_secs(30), || {
        assert!(
            !matches!(up.0.try_wait(), Ok(Some(_))),
            "qemu-configs up ended: {}",
            up_and_switch_logs(&log, &state)
        );
        ["app1", "app2", "switch"]
            .iter()
            .all(|n| pid_of(n).is_some())
    });
    // Past its check that no QEMU exited at once: up now only supervises.
    std::thread::sleep(Duration::from_secs(2));
    let pids: Vec<u32> = ["app1", "app2", "switch"]
        .iter()
        .map(|n| pid_of(n).unwrap())
        .collect();
    assert!(pids.iter().all(|&p| running(p)), "{pids:?} before the kill");
    // Should the test fail, nothing it started outlives it.
    struct Reap(Vec<u32>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for &pid in self.0.iter().filter(|&&p| running(p)) {
                // SAFETY: kill(2) on a pid this test's up started, checked to run.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
    let _reap = Reap(pids.clone());
    up.0.kill().unwrap();
    let _ = up.0.wait();
    wait_for(
        "the switch and the QEMUs to end with up",
        Duration::from_secs(10),
        || !pids.iter().any(|&p| running(p)),
    );
    // The switch ended on its SIGTERM, as it does when stopped: its tap is gone with it.
    let switch_log = std::fs::read_to_string(state.join("switch.log")).unwrap();
    assert!(switch_log.contains("signal 15"), "{switch_log}");
    assert!(
        !host.try_sh("ip link show vs-k").status.success(),
        "tap left"
    );
    // What is left for down (pid files, sockets) it takes.
    let out = Command::new("ip")
        .args(["netns", "exec", &host.name])
        .arg(bin("qemu-configs"))
        .arg("down")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pid_of("app1").is_none() && pid_of("switch").is_none());
}
