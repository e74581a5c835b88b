//! The helper protocol as QEMU speaks it: a socketpair, the helper run with QEMU's
//! arguments inside a namespace, the tap fd received and checked.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use bridge_plugin::tap::tap_info;
use common::{bin, Netns};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

struct Outcome {
    code: i32,
    stderr: String,
    tap: Option<File>,
}

/// Runs the helper as QEMU does (`--use-vnet --fd=N --br=BR`, plus `extra`) in `ns`.
fn run_helper(ns: &Netns, bridge: &str, acl: &Path, extra: &[&str], wrapper: &[&str]) -> Outcome {
    run_helper_at(
        Path::new(&bin("qemu-bridge-plugin")),
        ns,
        bridge,
        acl,
        extra,
        wrapper,
    )
}

/// `run_helper` with the helper binary at `helper`.
fn run_helper_at(
    helper: &Path,
    ns: &Netns,
    bridge: &str,
    acl: &Path,
    extra: &[&str],
    wrapper: &[&str],
) -> Outcome {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .args(wrapper)
        .arg(helper);
    cmd.args([
        "--use-vnet",
        "--fd=3",
        &format!("--br={bridge}"),
        &format!("--acl={}", acl.display()),
    ]);
    cmd.arg(format!("--config-dir={}", acl.parent().unwrap().display()));
    cmd.args(extra);
    run_as_qemu(cmd)
}

/// Runs `cmd` with QEMU's end of a socketpair as fd 3, and takes what comes back on ours.
fn run_as_qemu(mut cmd: Command) -> Outcome {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    // SAFETY: only fd operations between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let ok = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(raw, 3) >= 0
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = cmd.output().unwrap();
    drop(theirs);
    let mut byte = [0u8; 1];
    let tap = match ours.recv_with_fd(&mut byte) {
        Ok((1, Some(f))) => Some(f),
        _ => None,
    };
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        tap,
    }
}

fn setup(acl: &str) -> (Netns, tempfile::TempDir) {
    let ns = Netns::new("helper");
    ns.sh("ip link add br0 type bridge && ip link set br0 mtu 1400 up");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bridge.conf"), acl).unwrap();
    (ns, dir)
}

/// Tap `name` in `ns` has the rates of a `BR.toml` with ingress 100 and egress 50 Mbit/s.
fn assert_rates(ns: &Netns, name: &str) {
    let qdiscs = ns.sh(&format!("tc qdisc show dev {name}"));
    assert!(
        qdiscs.contains("tbf") && qdiscs.contains("rate 100Mbit"),
        "{qdiscs}"
    );
    let rules = ns.sh("nft list table bridge bridge_plugin");
    assert!(
        rules.contains(&format!(
            "iifname \"{name}\" limit rate over 6250 kbytes/second"
        )),
        "{rules}"
    );
}

#[test]
fn hands_qemu_a_tap_attached_to_the_bridge() {
    let (ns, dir) = setup("allow br0\n");
    std::fs::write(
        dir.path().join("br0.toml"),
        "isolated = true\ningress_mbit = 100\n",
    )
    .unwrap();
    let acl = dir.path().join("bridge.conf");
    let out = run_helper(&ns, "br0", &acl, &["--egress-mbit=50"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tap = out.tap.expect("the tap fd came back");
    let (name, vnet_hdr) = tap_info(&tap).unwrap();
    assert!(vnet_hdr, "--use-vnet asks for vnet headers");
    let link = ns.link_json(&name);
    assert_eq!(link["master"], "br0");
    assert_eq!(link["mtu"], 1400, "the tap takes the bridge's MTU");
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert_eq!(link["linkinfo"]["info_slave_data"]["isolated"], true);
    assert_rates(&ns, &name);

    // Closing the fd removes the tap (QEMU's side of its lifetime); the kernel may take a
    // moment to unregister it.
    drop(tap);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ns
        .try_sh(&format!("ip link show dev {name}"))
        .status
        .success()
    {
        assert!(std::time::Instant::now() < end, "{name} outlived its fd");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // An explicit MTU wins over the bridge's.
    let out = run_helper(&ns, "br0", &acl, &["--mtu=1300"], &[]);
    let (name, _) = tap_info(out.tap.as_ref().unwrap()).unwrap();
    assert_eq!(ns.link_json(&name)["mtu"], 1300);
}

#[test]
fn vlan_access_ports_or_a_clear_refusal() {
    let (ns, dir) = setup("allow all\n");
    let acl = dir.path().join("bridge.conf");
    let filtering = ns
        .try_sh("ip link add brv type bridge vlan_filtering 1")
        .status
        .success();
    if filtering {
        ns.sh("ip link set brv up");
        let out = run_helper(&ns, "brv", &acl, &["--vlan=20"], &[]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let (name, _) = tap_info(out.tap.as_ref().unwrap()).unwrap();
        let vlans = ns.sh(&format!("bridge -j vlan show dev {name}"));
        assert!(
            vlans.contains("\"vlan\":20") && vlans.contains("PVID"),
            "{vlans}"
        );
        assert!(!vlans.contains("\"vlan\":1,"), "{vlans}");
    } else {
        // This kernel lacks CONFIG_BRIDGE_VLAN_FILTERING: the helper says so, sends nothing.
        let out = run_helper(&ns, "br0", &acl, &["--vlan=20"], &[]);
        assert_ne!(out.code, 0);
        assert!(out.tap.is_none());
        assert!(
            out.stderr.contains("VLAN 20") && out.stderr.contains("not supported"),
            "{}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    }
}

#[test]
fn refusals_name_the_bridge_the_file_and_the_line() {
    let (ns, dir) = setup("allow br0\ninclude more.conf\n");
    std::fs::write(dir.path().join("more.conf"), "# more\ndeny br1\n").unwrap();
    let acl = dir.path().join("bridge.conf");
    ns.sh("ip link add br1 type bridge");

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("br1", vec![], "more.conf:2"),
        ("br9", vec![], "add 'allow br9'"),
        ("br0", vec!["--vlan=9999"], "vlan 9999"),
        ("br0", vec!["--speed=3"], "unknown option --speed"),
    ];
    for (bridge, extra, needle) in cases {
        let out = run_helper(&ns, bridge, &acl, &extra, &[]);
        assert_ne!(out.code, 0, "{bridge} {extra:?}");
        assert!(out.tap.is_none());
        assert!(out.stderr.contains(needle), "{bridge}: {}", out.stderr);
        assert!(out.stderr.contains(bridge), "{}", out.stderr);
    }
    // Allowed, but no such bridge.
    std::fs::write(&acl, "allow all\n").unwrap();
    let out = run_helper(&ns, "nobr", &acl, &[], &[]);
    assert!(
        out.stderr.contains("bridge nobr does not exist"),
        "{}",
        out.stderr
    );
    // Include loops and missing files.
    std::fs::write(&acl, "include loop.conf\n").unwrap();
    std::fs::write(dir.path().join("loop.conf"), "include bridge.conf\n").unwrap();
    let out = run_helper(&ns, "br0", &acl, &[], &[]);
    assert!(
        out.stderr.contains("include loop") && out.stderr.contains("loop.conf:1"),
        "{}",
        out.stderr
    );
    std::fs::write(&acl, "include gone.conf\n").unwrap();
    let out = run_helper(&ns, "br0", &acl, &[], &[]);
    assert!(
        out.stderr.contains("gone.conf") && out.stderr.contains("bridge.conf:1"),
        "{}",
        out.stderr
    );
}

#[test]
fn without_cap_net_admin_it_says_so_in_one_line() {
    let (ns, dir) = setup("allow br0\n");
    let acl = dir.path().join("bridge.conf");
    let drop_caps = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let out = run_helper(&ns, "br0", &acl, &[], &drop_caps);
    assert_ne!(out.code, 0);
    assert!(out.tap.is_none());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("CAP_NET_ADMIN"), "{}", out.stderr);
}

#[test]
fn with_file_capabilities_only_the_administrators_files_decide() {
    // Installed with cap_net_admin (or setuid), the helper serves callers without it: an
    // ACL or settings of the caller's choosing would let any user onto any bridge.
    let (ns, dir) = setup("allow all\n");
    let acl = dir.path().join("bridge.conf");
    let install = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        install.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let helper = install.path().join("qemu-bridge-plugin");
    std::fs::copy(bin("qemu-bridge-plugin"), &helper).unwrap();
    let setcap = Command::new("setcap")
        .arg("cap_net_admin+ep")
        .arg(&helper)
        .status()
        .unwrap();
    assert!(setcap.success(), "setcap");
    let as_nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let out = run_helper_at(&helper, &ns, "br0", &acl, &["--vlan=20"], &as_nobody);
    assert_ne!(out.code, 0);
    assert!(out.tap.is_none());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    for refused in ["--acl=", "--config-dir=", "--vlan="] {
        assert!(out.stderr.contains(refused), "{}", out.stderr);
    }
    assert!(
        out.stderr.contains("/etc/qemu/bridge.conf"),
        "{}",
        out.stderr
    );
    // The same binary without the capability, run by root, still takes them.
    let plain = install.path().join("plain");
    std::fs::copy(bin("qemu-bridge-plugin"), &plain).unwrap();
    let out = run_helper_at(&plain, &ns, "br0", &acl, &[], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.tap.is_some());
}

/// The helper refused: a failure exit, no tap, and a reason that names each of `needles`.
fn assert_refused(out: &Outcome, needles: &[&str]) {
    assert_ne!(out.code, 0);
    assert!(out.tap.is_none());
    for needle in needles {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
}

/// Sets a file's owner, group and mode.
fn own(path: &Path, uid: u32, gid: u32, mode: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

#[test]
fn setuid_helper_drops_privileges_and_runs_nothing_from_the_callers_path() {
    // Installed setuid root as QEMU's own helper often is, and run by `nobody` with a PATH
    // whose `tc` and `nft` are the caller's programs: nothing of the caller's may run with
    // the helper's privilege, and the ACL is read as the caller (so a file the caller
    // cannot read decides nothing for it, as with qemu-bridge-helper).
    let ns = Netns::new("suid");
    ns.sh("ip link add br0 type bridge && ip link set br0 up");
    let install = tempfile::tempdir().unwrap();
    own(install.path(), 0, 0, 0o755);
    let helper = install.path().join("qemu-bridge-plugin");
    std::fs::copy(bin("qemu-bridge-plugin"), &helper).unwrap();
    own(&helper, 0, 0, 0o4755);

    // The caller's programs: each records who ran it.
    let hostile = install.path().join("bin");
    std::fs::create_dir(&hostile).unwrap();
    own(&hostile, 0, 0, 0o755);
    let marker = install.path().join("ran");
    for prog in ["tc", "nft", "ip"] {
        let p = hostile.join(prog);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho {prog} $(id -u) >> {}\n", marker.display()),
        )
        .unwrap();
        own(&p, 0, 0, 0o755);
    }
    std::fs::write(&marker, "").unwrap();
    own(&marker, 0, 0, 0o666);

    // The administrator's files, seen by the helper as /etc/qemu.
    let etc = tempfile::tempdir().unwrap();
    own(etc.path(), 0, 0, 0o755);
    let conf = etc.path().join("bridge.conf");
    std::fs::write(&conf, "allow br0\ninclude root-only.conf\n").unwrap();
    own(&conf, 0, 0, 0o644);
    let private = etc.path().join("root-only.conf");
    std::fs::write(&private, "deny br0\n").unwrap();
    own(&private, 0, 0, 0o600);
    let settings = etc.path().join("bridge-plugin");
    std::fs::create_dir(&settings).unwrap();
    own(&settings, 0, 0, 0o755);
    let br0 = settings.join("br0.toml");
    std::fs::write(&br0, "ingress_mbit = 100\negress_mbit = 50\n").unwrap();
    own(&br0, 0, 0, 0o644);

    let run = |groups: &str| {
        // /etc/qemu exists only in this test's own mount namespace, bound to `etc`.
        let made = !Path::new("/etc/qemu").exists();
        if made {
            std::fs::create_dir("/etc/qemu").unwrap();
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/qemu && exec \"$@\"")
            .arg(etc.path())
            .args(["ip", "netns", "exec", &ns.name])
            .args(["setpriv", "--reuid=65534", "--regid=65534", groups])
            .args(["env", "-i"])
            .arg(format!("PATH={}", hostile.display()))
            .arg(&helper)
            .args(["--use-vnet", "--fd=3", "--br=br0"]);
        let out = run_as_qemu(cmd);
        if made {
            let _ = std::fs::remove_dir("/etc/qemu");
        }
        out
    };

    let out = run("--clear-groups");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tap = out.tap.expect("the tap fd came back");
    let ran = std::fs::read_to_string(&marker).unwrap();
    assert!(
        ran.is_empty(),
        "the helper ran the caller's programs: {ran}"
    );
    let (name, _) = tap_info(&tap).unwrap();
    let link = ns.link_json(&name);
    assert_eq!(link["master"], "br0");
    let mac = link["address"].as_str().unwrap();
    assert!(mac.starts_with("fe:"), "the tap's MAC is {mac}, not FE:...");
    assert_rates(&ns, &name);
    drop(tap);

    // A file only a group may read lets only that group's members in.
    own(&conf, 0, 4242, 0o640);
    assert_refused(&run("--clear-groups"), &["bridge.conf", "ermission denied"]);
    let out = run("--groups=4242");
    assert_eq!(out.code, 0, "{}", out.stderr);

    // A file the caller could have written decides nothing.
    own(&conf, 65534, 0, 0o644);
    assert_refused(&run("--clear-groups"), &["bridge.conf", "owned by root"]);
    own(&conf, 0, 0, 0o644);
    own(&br0, 0, 0, 0o666);
    assert_refused(&run("--clear-groups"), &["br0.toml"]);
    assert!(std::fs::read_to_string(&marker).unwrap().is_empty());
}
