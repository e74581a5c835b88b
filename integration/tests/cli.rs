//! vnet-guest's command line: help exits 0 at once and builds no guest image, mistakes exit
//! 2 with clap's message and build nothing either. `VNET_CACHE` points at an empty folder:
//! the image build would create `guest/` there first thing.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(cache: &Path, args: &[&str]) -> Output {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vnet-guest"))
        .args(args)
        .env("VNET_CACHE", cache)
        .current_dir(cache)
        .output()
        .unwrap();
    // A build downloads a kernel and takes many seconds; parsing takes milliseconds.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{args:?} took {:?}",
        start.elapsed()
    );
    assert_eq!(
        std::fs::read_dir(cache).unwrap().count(),
        0,
        "{args:?} built (part of) an image"
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn help_names_the_subcommands_exits_0_and_builds_nothing() {
    let cache = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let out = run(cache.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.contains("image") && text.contains("boot"),
            "{args:?}: {text}"
        );
    }
    for args in [&["boot", "--help"][..], &["boot", "-h"], &["help", "boot"]] {
        let out = run(cache.path(), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        for option in ["--socket", "--ip", "--mac", "--queues", "--mtu"] {
            assert!(text.contains(option), "{args:?} {option}: {text}");
        }
    }
    let out = run(cache.path(), &["image", "--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Usage: vnet-guest image"));
}

#[test]
fn unknown_arguments_exit_2_and_build_nothing() {
    let cache = tempfile::tempdir().unwrap();
    for args in [
        &["--no-such-option"][..],
        &["image", "--no-such-option"],
        &[
            "boot",
            "--socket",
            "/tmp/x.sock",
            "--ip",
            "10.0.0.1/24",
            "--no-such-option",
            "1",
        ],
        &["shell"],
        // What the hand-made parser refused with its usage, and exit 2, too.
        &["boot", "--socket", "/tmp/x.sock"],
        &[
            "boot",
            "--socket",
            "/tmp/x.sock",
            "--ip",
            "10.0.0.1/24",
            "--mac",
            "300",
        ],
        &[
            "boot",
            "--socket",
            "/tmp/x.sock",
            "--ip",
            "10.0.0.1/24",
            "--queues",
        ],
    ] {
        let out = run(cache.path(), args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains("try '--help'"),
            "{args:?}: {err}"
        );
    }
    let out = run(cache.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: vnet-guest"));
}
