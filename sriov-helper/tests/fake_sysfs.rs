//! list, apply and qemu-args against fake sysfs trees with the kernel's layout.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use sriov_helper::apply::{execute, plan_counts, plan_vfs, qemu_args, Change, Desired, VfSource};
use sriov_helper::sysfs::Sysfs;
use sriov_helper::vf::{LinkState, VfNetState, VfSetting};
use sriov_helper::SriovError;

struct Fake {
    dir: tempfile::TempDir,
}

struct FakeVf<'a> {
    bdf: &'a str,
    driver: Option<&'a str>,
    group: Option<&'a str>,
}

impl Fake {
    fn new() -> Fake {
        let f = Fake {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(f.path("sys/bus/pci/devices")).unwrap();
        std::fs::create_dir_all(f.path("sys/class/net")).unwrap();
        std::fs::write(f.path("sys/bus/pci/drivers_probe"), "").unwrap();
        f
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn device(&self, bdf: &str, driver: Option<&str>, group: Option<&str>) -> PathBuf {
        let dev = self.path(&format!("sys/bus/pci/devices/{bdf}"));
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        if let Some(d) = driver {
            let drv = self.path(&format!("sys/bus/pci/drivers/{d}"));
            std::fs::create_dir_all(&drv).unwrap();
            std::fs::write(drv.join("unbind"), "").unwrap();
            symlink(&drv, dev.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gdir = self.path(&format!("sys/kernel/iommu_groups/{g}/devices"));
            std::fs::create_dir_all(&gdir).unwrap();
            symlink(&dev, gdir.join(bdf)).unwrap();
            symlink(gdir.parent().unwrap(), dev.join("iommu_group")).unwrap();
        }
        dev
    }

    fn pf(&self, bdf: &str, netdev: &str, total: u32, vfs: &[FakeVf]) {
        let dev = self.device(bdf, Some("igb"), Some("10"));
        std::fs::write(dev.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
        std::fs::write(dev.join("sriov_numvfs"), format!("{}\n", vfs.len())).unwrap();
        std::fs::create_dir_all(dev.join("net").join(netdev)).unwrap();
        let class = self.path(&format!("sys/class/net/{netdev}"));
        std::fs::create_dir_all(&class).unwrap();
        symlink(&dev, class.join("device")).unwrap();
        for (i, vf) in vfs.iter().enumerate() {
            let vdev = self.device(vf.bdf, vf.driver, vf.group);
            symlink(&vdev, dev.join(format!("virtfn{i}"))).unwrap();
            symlink(&dev, vdev.join("physfn")).unwrap();
            if vf.driver == Some("igbvf") {
                std::fs::create_dir_all(vdev.join("net").join(format!("{netdev}v{i}"))).unwrap();
            }
        }
    }

    fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.root())
    }
}

const PF: &str = "0000:03:00.0";

fn two_vfs(fake: &Fake) {
    fake.pf(
        PF,
        "eth1",
        7,
        &[
            FakeVf {
                bdf: "0000:03:10.0",
                driver: Some("igbvf"),
                group: Some("20"),
            },
            FakeVf {
                bdf: "0000:03:10.2",
                driver: Some("vfio-pci"),
                group: Some("21"),
            },
        ],
    );
}

/// VF settings as a driver would report them.
struct Reported(Vec<VfNetState>);

impl VfSource for Reported {
    fn vfs(&mut self, pf: &str) -> Result<Vec<VfNetState>, SriovError> {
        assert_eq!(pf, "eth1");
        Ok(self.0.clone())
    }
}

fn desired(text: &str) -> Desired {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sriov.toml");
    std::fs::write(&p, text).unwrap();
    Desired::load(&p).unwrap()
}

#[test]
fn lists_pfs_and_vfs() {
    let fake = Fake::new();
    two_vfs(&fake);
    fake.device("0000:00:02.0", Some("e1000e"), Some("1")); // no SR-IOV: not listed
    let pfs = fake.sysfs().pfs().unwrap();
    assert_eq!(pfs.len(), 1);
    let pf = &pfs[0];
    assert_eq!(
        (pf.bdf.as_str(), pf.netdev.as_deref(), pf.driver.as_deref()),
        (PF, Some("eth1"), Some("igb"))
    );
    assert_eq!(
        (pf.total_vfs, pf.num_vfs, pf.iommu_group.as_deref()),
        (7, 2, Some("10"))
    );
    assert_eq!(pf.vfs[0].netdev.as_deref(), Some("eth1v0"));
    assert_eq!(pf.vfs[1].driver.as_deref(), Some("vfio-pci"));
    assert_eq!(pf.vfs[1].iommu_group.as_deref(), Some("21"));
    // The binary, as JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_sriov-helper"))
        .args([
            "--sysfs-root",
            fake.root().to_str().unwrap(),
            "list",
            "--json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["vfs"][1]["bdf"], "0000:03:10.2");
    let empty = Fake::new();
    assert!(empty.sysfs().pfs().unwrap().is_empty());
}

#[test]
fn count_changes_go_through_zero() {
    let fake = Fake::new();
    two_vfs(&fake);
    let sysfs = fake.sysfs();
    let d = desired("[[pf]]\ndevice = \"eth1\"\nnum_vfs = 4\n");
    let changes = plan_counts(&sysfs, &d).unwrap();
    assert_eq!(
        changes,
        vec![Change::NumVfs {
            pf: PF.into(),
            from: 2,
            to: 4
        }]
    );
    assert_eq!(
        changes[0].to_string(),
        format!("echo 0 > /sys/bus/pci/devices/{PF}/sriov_numvfs; echo 4 > /sys/bus/pci/devices/{PF}/sriov_numvfs")
    );
    execute(&sysfs, None, &changes[0]).unwrap();
    let writes: Vec<String> = sysfs
        .writes
        .borrow()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(writes, vec!["0", "4"]);
    // From 0, and back to 0, in one write.
    let d0 = desired(&format!("[[pf]]\ndevice = \"{PF}\"\nnum_vfs = 0\n"));
    let c = plan_counts(&sysfs, &d0).unwrap();
    assert_eq!(
        c[0].to_string(),
        format!("echo 0 > /sys/bus/pci/devices/{PF}/sriov_numvfs")
    );
}

#[test]
fn refusals_name_the_device_and_the_fix() {
    let fake = Fake::new();
    two_vfs(&fake);
    fake.device("0000:00:02.0", Some("e1000e"), None);
    let sysfs = fake.sysfs();
    let cases = [
        (
            "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 8\n",
            "supports at most 7",
        ),
        (
            "[[pf]]\ndevice = \"0000:00:02.0\"\nnum_vfs = 1\n",
            "0000:00:02.0 has no SR-IOV capability",
        ),
        (
            "[[pf]]\ndevice = \"0000:09:00.0\"\nnum_vfs = 1\n",
            "no PCI device 0000:09:00.0",
        ),
        ("[[pf]]\ndevice = \"eth9\"\nnum_vfs = 1\n", "eth9"),
        (
            "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 2\n[[pf.vf]]\nindex = 5\n",
            "vf 5 is configured but num_vfs is 2",
        ),
    ];
    for (text, needle) in cases {
        let e = plan_counts(&sysfs, &desired(text)).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    // A config error names the file and the VF.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.toml");
    std::fs::write(
        &p,
        "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 2\n[[pf.vf]]\nindex = 0\nmac = \"nope\"\n",
    )
    .unwrap();
    let e = Desired::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.toml") && e.contains("vf 0") && e.contains("nope"),
        "{e}"
    );
    // Kernel refusals carry a hint (EBUSY: VFs in use).
    let err = SriovError::Write {
        path: "/sys/bus/pci/devices/x/sriov_numvfs".into(),
        value: "0".into(),
        source: std::io::Error::from_raw_os_error(libc::EBUSY),
    };
    assert!(err.to_string().contains("VFs are in use"));
}

#[test]
fn vf_settings_change_only_what_differs_and_are_idempotent() {
    let fake = Fake::new();
    two_vfs(&fake);
    let sysfs = fake.sysfs();
    let d = desired(
        "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 2\n\
         [[pf.vf]]\nindex = 0\nmac = \"52:54:00:aa:00:01\"\nvlan = 10\nspoof_check = true\ntrust = false\nmax_tx_rate = 100\nlink_state = \"enable\"\n\
         [[pf.vf]]\nindex = 1\nmac = \"52:54:00:aa:00:02\"\n",
    );
    let now = vec![
        VfNetState {
            index: 0,
            mac: "00:00:00:00:00:00".into(),
            spoof_check: Some(true),
            trust: Some(false),
            ..Default::default()
        },
        VfNetState {
            index: 1,
            mac: "52:54:00:aa:00:02".into(),
            ..Default::default()
        },
    ];
    let changes = plan_vfs(&sysfs, &d, &mut Reported(now)).unwrap();
    let lines: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        lines,
        vec![
            "ip link set dev eth1 vf 0 mac 52:54:00:aa:00:01",
            "ip link set dev eth1 vf 0 vlan 10 qos 0",
            "ip link set dev eth1 vf 0 min_tx_rate 0 max_tx_rate 100",
            "ip link set dev eth1 vf 0 state enable",
        ]
    );
    // Once the driver reports the desired values, nothing is left to do.
    let done = vec![
        VfNetState {
            index: 0,
            mac: "52:54:00:aa:00:01".into(),
            vlan: 10,
            spoof_check: Some(true),
            trust: Some(false),
            max_tx_rate: 100,
            link_state: Some(LinkState::Enable),
            ..Default::default()
        },
        VfNetState {
            index: 1,
            mac: "52:54:00:aa:00:02".into(),
            ..Default::default()
        },
    ];
    assert!(plan_vfs(&sysfs, &d, &mut Reported(done))
        .unwrap()
        .is_empty());
    assert!(plan_counts(&sysfs, &d).unwrap().is_empty());
    assert!(matches!(
        &changes[0],
        Change::Vf {
            setting: VfSetting::Mac(_),
            ..
        }
    ));
}

#[test]
fn binds_vfio_and_back_through_sysfs() {
    let fake = Fake::new();
    two_vfs(&fake);
    let sysfs = fake.sysfs();
    let d = desired("[[pf]]\ndevice = \"eth1\"\nnum_vfs = 2\n[[pf.vf]]\nindex = 0\ndriver = \"vfio-pci\"\n[[pf.vf]]\nindex = 1\ndriver = \"vfio-pci\"\n");
    let changes = plan_vfs(&sysfs, &d, &mut Reported(Vec::new())).unwrap();
    // VF 1 is already on vfio-pci: only VF 0 changes.
    assert_eq!(changes.len(), 1);
    execute(&sysfs, None, &changes[0]).unwrap();
    let vf0 = "0000:03:10.0";
    let dev = fake.path(&format!("sys/bus/pci/devices/{vf0}"));
    assert_eq!(
        std::fs::read_to_string(dev.join("driver_override")).unwrap(),
        "vfio-pci"
    );
    assert_eq!(
        std::fs::read_to_string(fake.path("sys/bus/pci/drivers/igbvf/unbind")).unwrap(),
        vf0
    );
    assert_eq!(
        std::fs::read_to_string(fake.path("sys/bus/pci/drivers_probe")).unwrap(),
        vf0
    );
    assert_eq!(
        changes[0].to_string(),
        format!("echo 'vfio-pci' > /sys/bus/pci/devices/{vf0}/driver_override; echo {vf0} > /sys/bus/pci/drivers/igbvf/unbind; echo {vf0} > /sys/bus/pci/drivers_probe")
    );
    // Back to the VF driver.
    let back = desired(
        "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 2\n[[pf.vf]]\nindex = 1\ndriver = \"default\"\n",
    );
    let c = plan_vfs(&sysfs, &back, &mut Reported(Vec::new())).unwrap();
    assert!(
        matches!(&c[0], Change::Driver { to_vfio: false, .. }),
        "{c:?}"
    );
}

#[test]
fn vfio_needs_an_iommu_or_noiommu_mode() {
    let fake = Fake::new();
    fake.pf(
        PF,
        "eth1",
        4,
        &[FakeVf {
            bdf: "0000:03:10.0",
            driver: Some("igbvf"),
            group: None,
        }],
    );
    let sysfs = fake.sysfs();
    let d = desired(
        "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 1\n[[pf.vf]]\nindex = 0\ndriver = \"vfio-pci\"\n",
    );
    let e = plan_vfs(&sysfs, &d, &mut Reported(Vec::new()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("IOMMU is off") && e.contains("intel_iommu=on"),
        "{e}"
    );
    std::fs::create_dir_all(fake.path("sys/module/vfio/parameters")).unwrap();
    std::fs::write(
        fake.path("sys/module/vfio/parameters/enable_unsafe_noiommu_mode"),
        "Y\n",
    )
    .unwrap();
    assert_eq!(
        plan_vfs(&sysfs, &d, &mut Reported(Vec::new()))
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn qemu_args_check_the_iommu_group() {
    let fake = Fake::new();
    two_vfs(&fake);
    let sysfs = fake.sysfs();
    assert_eq!(
        qemu_args(&sysfs).unwrap(),
        vec!["-device", "vfio-pci,host=0000:03:10.2,id=vf-0000-03-10-2"]
    );
    // Another device in VF 1's group, still on a host driver: refused, naming both.
    let other = fake.device("0000:03:10.4", Some("e1000e"), None);
    let g = fake.path("sys/kernel/iommu_groups/21/devices");
    symlink(&other, g.join("0000:03:10.4")).unwrap();
    let e = qemu_args(&sysfs).unwrap_err().to_string();
    assert!(
        e.contains("IOMMU group 21") && e.contains("0000:03:10.4") && e.contains("e1000e"),
        "{e}"
    );
}

/// `apply --dry-run` of a file holding `config` on `fake`: what it prints.
fn dry_run(fake: &Fake, config: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sriov.toml");
    std::fs::write(&p, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sriov-helper"))
        .args([
            "--sysfs-root",
            fake.root().to_str().unwrap(),
            "apply",
            p.to_str().unwrap(),
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fake PF still has the two VFs `two_vfs` gave it.
fn assert_numvfs_unchanged(fake: &Fake) {
    assert_eq!(
        std::fs::read_to_string(fake.path(&format!("sys/bus/pci/devices/{PF}/sriov_numvfs")))
            .unwrap(),
        "2\n"
    );
}

#[test]
fn dry_run_prints_commands_and_changes_nothing() {
    let fake = Fake::new();
    two_vfs(&fake);
    let text = dry_run(&fake, "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 3\n");
    assert!(
        text.contains(&format!(
            "echo 0 > /sys/bus/pci/devices/{PF}/sriov_numvfs; echo 3 >"
        )),
        "{text}"
    );
    assert_numvfs_unchanged(&fake);
}

#[test]
fn a_dry_run_that_changes_the_count_plans_the_new_vfs_settings_too() {
    let fake = Fake::new();
    two_vfs(&fake);
    let text = dry_run(
        &fake,
        "[[pf]]\ndevice = \"eth1\"\nnum_vfs = 3\n\
         [[pf.vf]]\nindex = 2\nmac = \"52:54:00:aa:00:03\"\nvlan = 10\ntrust = true\n\
         driver = \"vfio-pci\"\n",
    );
    // The VFs come anew, with no settings: each one the file gives is a change.
    for line in [
        "ip link set dev eth1 vf 2 mac 52:54:00:aa:00:03",
        "ip link set dev eth1 vf 2 vlan 10 qos 0",
        "ip link set dev eth1 vf 2 trust on",
        "# VF drivers are planned once the VFs exist",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    assert_numvfs_unchanged(&fake);
}
