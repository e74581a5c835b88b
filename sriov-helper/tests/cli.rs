//! The command line: help exits 0 and touches nothing, mistakes exit 2 with clap's message,
//! and the options are still taken anywhere on the line.

use std::path::Path;
use std::process::{Command, Output};

fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sriov-helper"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn help_names_the_subcommands_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let out = run(dir.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        for name in [
            "list",
            "show",
            "apply",
            "qemu-args",
            "--sysfs-root",
            "--json",
            "--dry-run",
        ] {
            assert!(text.contains(name), "{args:?} {name}: {text}");
        }
    }
    // `apply --help` must not take `--help` for the file (a decoy is there, not TOML).
    std::fs::write(dir.path().join("--help"), "not toml [[[").unwrap();
    for args in [
        &["apply", "--help"][..],
        &["apply", "-h"],
        &["help", "apply"],
    ] {
        let out = run(dir.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("Usage: sriov-helper apply") && text.contains("FILE.toml"),
            "{args:?}: {text}"
        );
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
    let out = run(dir.path(), &["show", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Usage: sriov-helper show"));
}

#[test]
fn unknown_arguments_exit_2_with_clap_message() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--no-such-option"][..],
        &["list", "--no-such-option"],
        &["frobnicate"],
        &["show"],
        &["list", "extra"],
        &["--sysfs-root"],
    ] {
        let out = run(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains("try '--help'"),
            "{args:?}: {err}"
        );
    }
    // No command: the help, on stderr, and 2.
    let out = run(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: sriov-helper"));
}

/// `--sysfs-root DIR`, `--sysfs-root=DIR` and `--json` are taken before or after the
/// command, as before clap.
#[test]
fn options_anywhere_on_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let eq = format!("--sysfs-root={root}");
    for args in [
        &["--sysfs-root", root, "list", "--json"][..],
        &["--json", "list", "--sysfs-root", root],
        &["list", &eq, "--json"],
    ] {
        let out = run(dir.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "[]", "{args:?}");
    }
    let out = run(dir.path(), &["list", "--sysfs-root", root]);
    assert_eq!(stdout(&out).trim(), "no SR-IOV physical functions");
}
