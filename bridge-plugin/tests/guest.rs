//! A real QEMU guest on a `nat` network through `-netdev bridge,helper=qemu-bridge-plugin`,
//! all inside a namespace: the guest gets its tap from our helper and reaches the host and,
//! through the host's NAT, the outside.

mod common;

use std::time::Duration;

use common::{bin, Netns};
use integration::guest_image::guest_image;
use integration::qemu::{detect_accel, Guest, GuestSpec, NicBackend, Qemu};

#[test]
fn guest_on_a_nat_network_through_the_helper_reaches_host_and_outside() {
    let (host, _outside) = Netns::host_with_outside("ghost");
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net.toml");
    std::fs::write(
        &net,
        "[[network]]\nname = \"web\"\nmode = \"nat\"\nbridge = \"bp-web\"\naddress = \"10.1.0.1/24\"\nuplink = \"up0\"\n",
    )
    .unwrap();
    host.sh(&format!(
        "{} net up {}",
        bin("bridge-plugin"),
        net.display()
    ));
    let acl = dir.path().join("bridge.conf");
    std::fs::write(&acl, "allow bp-web\n").unwrap();

    let image = guest_image().expect("guest image");
    let qemu = Qemu::from_env().expect("QEMU");
    let accel = detect_accel(&qemu, &image);
    let mut spec = GuestSpec::new("web1", dir.path(), 10, "10.1.0.10/24");
    spec.nics[0].backend = NicBackend::Bridge {
        bridge: "bp-web".into(),
        helper: format!(
            "{} --acl={} --config-dir={}",
            bin("qemu-bridge-plugin"),
            acl.display(),
            dir.path().display()
        ),
    };
    spec.netns = Some(host.name.clone());
    let mut g = Guest::boot(&qemu, accel, &image, &spec).unwrap_or_else(|e| panic!("{e}"));
    let cmd = Duration::from_secs(60);
    let tap = host.sh("ip -j link show master bp-web");
    assert!(
        tap.contains("tap"),
        "the helper's tap is on the bridge: {tap}"
    );
    g.ok("ping -c 2 -W 3 10.1.0.1", cmd);
    g.ok("ip route add default via 10.1.0.1", cmd);
    g.ok("ping -c 2 -W 3 192.0.2.2", cmd);
    assert!(g.shutdown(Duration::from_secs(30)));
    // QEMU closed the tap: it is gone.
    assert!(!host.sh("ip -j link show master bp-web").contains("tap"));
    host.sh(&format!(
        "{} net down {}",
        bin("bridge-plugin"),
        net.display()
    ));
}

#[test]
fn tap_subcommand_gives_qemu_a_multiqueue_tap() {
    let host = Netns::new("mq");
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net.toml");
    std::fs::write(
        &net,
        "[[network]]\nname = \"mq\"\nmode = \"host-only\"\nbridge = \"bp-mq\"\naddress = \"10.5.0.1/24\"\n",
    )
    .unwrap();
    host.sh(&format!(
        "{} net up {}",
        bin("bridge-plugin"),
        net.display()
    ));

    let image = guest_image().expect("guest image");
    let qemu = Qemu::from_env().expect("QEMU");
    let accel = detect_accel(&qemu, &image);
    let mut spec = GuestSpec::new("mq1", dir.path(), 11, "10.5.0.10/24");
    spec.nics[0].backend = NicBackend::Provided("net0".into());
    spec.nics[0].queues = 2;
    spec.cpus = 2;
    spec.netns = Some(host.name.clone());
    spec.wrapper = vec![
        bin("bridge-plugin"),
        "tap".into(),
        "--br=bp-mq".into(),
        "--queues=2".into(),
        "--".into(),
    ];
    let mut g = Guest::boot(&qemu, accel, &image, &spec).unwrap_or_else(|e| panic!("{e}"));
    let cmd = Duration::from_secs(60);
    let l = g.ok("ethtool -l eth0", cmd);
    assert!(
        l.split("Current hardware settings")
            .next()
            .unwrap()
            .contains("Combined:\t2"),
        "{l}"
    );
    g.ok("ethtool -L eth0 combined 2", cmd);
    g.ok("ping -c 2 -W 3 10.5.0.1", cmd);
    let tap = host.sh("ip -j -d link show master bp-mq");
    assert!(
        tap.contains("\"multi_queue\":true") || tap.contains("multi_queue"),
        "{tap}"
    );
    assert!(g.shutdown(Duration::from_secs(30)));
    host.sh(&format!(
        "{} net down {}",
        bin("bridge-plugin"),
        net.display()
    ));
}
