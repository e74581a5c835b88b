//! The command line: help exits 0 and touches nothing, mistakes exit 2 with clap's message,
//! and the tap settings still reach `PortSettings::set` in their `--key=value` form. Nothing
//! here changes the network.

use std::path::Path;
use std::process::{Command, Output};

fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bridge-plugin"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn help_names_the_subcommands_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let out = run(dir.path(), args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stdout.contains("net") && stdout.contains("tap"),
            "{args:?}: {stdout}"
        );
    }
    let out = run(dir.path(), &["net", "--help"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for verb in ["up", "down", "show"] {
        assert!(stdout.contains(verb), "{stdout}");
    }
    assert!(stdout.contains("--json"), "{stdout}");
    let out = run(dir.path(), &["tap", "--help"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for option in [
        "--br",
        "--queues",
        "--id",
        "--vlan",
        "--mtu",
        "--isolated",
        "--ingress-mbit",
        "--egress-mbit",
    ] {
        assert!(stdout.contains(option), "{option}: {stdout}");
    }
}

/// The hand-made parser took `net show --help` for `net show FILE` and opened `./--help`.
/// Here a `--help` file is there, and not TOML: reading it would fail; help must not read it.
#[test]
fn net_verb_help_opens_no_file_named_help() {
    let dir = tempfile::tempdir().unwrap();
    let decoy = dir.path().join("--help");
    std::fs::write(&decoy, "not a networks file [[[").unwrap();
    for args in [
        &["net", "show", "--help"][..],
        &["net", "up", "--help"],
        &["net", "down", "-h"],
        &["net", "help", "show"],
        &["help", "net", "up"],
    ] {
        let out = run(dir.path(), args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stdout.contains("Usage: bridge-plugin net") && stdout.contains("<FILE>"),
            "{args:?}: {stdout}"
        );
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("--help")]);
    assert_eq!(
        std::fs::read_to_string(&decoy).unwrap(),
        "not a networks file [[["
    );
}

#[test]
fn unknown_arguments_exit_2_with_clap_message() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--no-such-option"][..],
        &["net", "show", "--no-such-option", "x.toml"],
        &["net", "restart", "x.toml"],
        &["tap", "--br=x", "--no-such-option=1", "--", "true"],
        &["tap", "--br=x", "--json", "--", "true"],
    ] {
        let out = run(dir.path(), args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Usage: bridge-plugin"),
            "{args:?}: {stderr}"
        );
    }
    // Missing pieces are usage errors too: the bridge, the QEMU command line after `--`,
    // a queue count in 1..=16.
    for args in [
        &["tap", "--", "true"][..],
        &["tap", "--br=x"],
        &["tap", "--br=", "--", "true"],
        &["tap", "--br=x", "--queues=17", "--", "true"],
        &["net", "show"],
        &[],
    ] {
        let out = run(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}", text(&out));
    }
}

/// `--key=value` and `--key value` both reach `PortSettings::set`, which still checks the
/// values (before any privilege check or tap).
#[test]
fn tap_settings_are_checked_by_port_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (&["--vlan=5000"][..], "vlan 5000 is out of range"),
        (&["--vlan", "5000"], "vlan 5000 is out of range"),
        (&["--mtu=20"], "mtu 20 is out of range"),
        (
            &["--ingress-mbit=fast"],
            "--ingress-mbit=fast: not a number",
        ),
        (&["--egress-mbit", "x"], "--egress-mbit=x: not a number"),
    ] {
        let mut all = vec!["tap", "--br=bp-none", "--queues=2", "--id=n1"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let out = run(dir.path(), &all);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {stderr}");
        assert!(
            stderr.starts_with("bridge-plugin: ") && stderr.contains(want),
            "{all:?}: {stderr}"
        );
    }
}

/// QEMU shows a helper's stderr as the reason the netdev failed: one line, as the README
/// promises; `--help` (exit 0) is where the usage is.
#[test]
fn the_helpers_usage_mistakes_are_one_line_and_help_exits_0() {
    let helper = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qemu-bridge-plugin"))
            .args(args)
            .output()
            .unwrap()
    };
    for (args, why) in [
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["--use-vnet", "--fd=3"], "missing --br=BRIDGE"),
        (&["--use-vnet", "--br=br0"], "missing --fd=UNIXFD"),
    ] {
        let out = helper(args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    let out = helper(&["--help"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("--br=BRIDGE"), "{stdout}");
}
