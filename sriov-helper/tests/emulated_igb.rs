//! SR-IOV on emulated hardware: QEMU 10's igb (an Intel 82576 with 7 VFs) behind an
//! emulated Intel IOMMU, in a guest running Debian's generic kernel (igb, igbvf, vfio-pci)
//! with this helper inside. Whatever the kernel does, it does for real here.

use std::path::PathBuf;
use std::time::Duration;

use integration::guest_image::{build_image, ImageSpec};
use integration::qemu::{Accel, Guest, GuestSpec, Qemu};

#[test]
fn apply_creates_configures_and_binds_vfs_on_an_emulated_igb() {
    let spec = ImageSpec {
        name: "sriov-guest",
        kernel: "linux-image-amd64",
        modules: vec!["igb", "igbvf", "vfio_pci", "vfio_iommu_type1"],
        programs: vec![
            PathBuf::from(env!("CARGO_BIN_EXE_sriov-helper")),
            PathBuf::from("/usr/sbin/ip"),
        ],
    };
    let image = build_image(&spec).expect("SR-IOV guest image");
    // igb exists from QEMU 8.0 on: QEMU 10 from bookworm-backports (ci/install-deps.sh).
    let qemu = Qemu::version("10").expect("QEMU 10 (ci/install-deps.sh)");
    let mut g = GuestSpec::new("sriov", std::path::Path::new("/nonexistent"), 1, "");
    g.nics.clear();
    g.addrs.clear();
    g.machine = "q35".into();
    g.mem_mb = 512;
    g.kernel_args = "intel_iommu=on iommu=pt".into();
    g.extra_args = ["-device", "intel-iommu,intremap=off", "-device", "igb"]
        .map(String::from)
        .to_vec();
    let mut guest = Guest::boot(&qemu, Accel::Tcg, &image, &g).unwrap_or_else(|e| panic!("{e}"));
    let t = Duration::from_secs(120);
    let helper = "/".to_string() + env!("CARGO_BIN_EXE_sriov-helper").trim_start_matches('/');

    guest.ok("/usr/sbin/ip link set eth0 up", t);
    let list = guest.ok(&format!("{helper} list --json"), t);
    let pfs: serde_json::Value =
        serde_json::from_str(list.trim()).unwrap_or_else(|e| panic!("{e}: {list}"));
    assert_eq!(pfs[0]["driver"], "igb", "{list}");
    assert_eq!(pfs[0]["total_vfs"], 7);
    assert_eq!(pfs[0]["num_vfs"], 0);

    let desired = [
        "[[pf]]",
        "device = \"eth0\"",
        "num_vfs = 2",
        "[[pf.vf]]",
        "index = 0",
        "mac = \"52:54:00:5a:00:01\"",
        "vlan = 10",
        "spoof_check = false",
        "trust = true",
        "[[pf.vf]]",
        "index = 1",
        "driver = \"vfio-pci\"",
    ];
    let write = desired
        .iter()
        .map(|l| format!("'{l}'"))
        .collect::<Vec<_>>()
        .join(" ");
    guest.ok(&format!("printf '%s\\n' {write} > /tmp/sriov.toml"), t);
    let first = guest.ok(&format!("{helper} apply /tmp/sriov.toml"), t);
    assert!(first.contains("sriov_numvfs"), "{first}");

    // What the kernel now reports, read with iproute2.
    let link = guest.ok("/usr/sbin/ip -d link show dev eth0", t);
    let vf0 = link
        .lines()
        .find(|l| l.trim_start().starts_with("vf 0"))
        .unwrap_or_else(|| panic!("{link}"));
    assert!(vf0.contains("52:54:00:5a:00:01"), "{vf0}");
    assert!(vf0.contains("vlan 10"), "{vf0}");
    assert!(vf0.contains("spoof checking off"), "{vf0}");
    assert!(vf0.contains("trust on"), "{vf0}");
    let list = guest.ok(&format!("{helper} list --json"), t);
    let pfs: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(pfs[0]["num_vfs"], 2);
    assert_eq!(pfs[0]["vfs"][1]["driver"], "vfio-pci", "{list}");
    assert!(pfs[0]["vfs"][1]["iommu_group"].is_string(), "{list}");
    let vf1 = pfs[0]["vfs"][1]["bdf"].as_str().unwrap().to_string();

    // Twice: nothing left to change.
    let second = guest.ok(&format!("{helper} apply /tmp/sriov.toml"), t);
    assert!(second.contains("# nothing to change"), "{second}");

    let args = guest.ok(&format!("{helper} qemu-args"), t);
    assert!(args.contains(&format!("vfio-pci,host={vf1}")), "{args}");
    assert!(guest.shutdown(Duration::from_secs(30)));
}
