//! sriov-helper list|show|apply|qemu-args

use std::path::PathBuf;
use std::process::ExitCode;

use sriov_helper::apply::{execute, plan_counts, plan_vfs, qemu_args, resolve_pf, Desired};
use sriov_helper::sysfs::Sysfs;
use sriov_helper::vf::VfNetlink;
use sriov_helper::SriovError;

const USAGE: &str = "usage: sriov-helper [--sysfs-root DIR] COMMAND
  list [--json]                 physical functions and their VFs
  show DEVICE [--json]          one PF (PCI address or interface) with VF settings from netlink
  apply FILE.toml [--dry-run]   reach the file's state, changing only what differs
  qemu-args                     -device vfio-pci arguments for the VFs bound to vfio-pci";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut root = PathBuf::from("/");
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--sysfs-root" {
            root = PathBuf::from(it.next().ok_or(USAGE)?);
        } else {
            rest.push(a);
        }
    }
    let json = rest.iter().any(|a| a == "--json");
    let dry_run = rest.iter().any(|a| a == "--dry-run");
    rest.retain(|a| a != "--json" && a != "--dry-run");
    let sysfs = Sysfs::new(root);
    let e = |e: SriovError| e.to_string();
    match rest
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            let pfs = sysfs.pfs().map_err(e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pfs).unwrap_or_default());
            } else if pfs.is_empty() {
                println!("no SR-IOV physical functions");
            } else {
                for pf in pfs {
                    println!(
                        "{} {:<12} driver {:<10} vfs {}/{} iommu group {}",
                        pf.bdf,
                        pf.netdev.unwrap_or_else(|| "-".into()),
                        pf.driver.unwrap_or_else(|| "-".into()),
                        pf.num_vfs,
                        pf.total_vfs,
                        pf.iommu_group.unwrap_or_else(|| "-".into())
                    );
                    for vf in pf.vfs {
                        println!(
                            "  vf {:<3} {} {:<12} driver {:<10} iommu group {}",
                            vf.index,
                            vf.bdf,
                            vf.netdev.unwrap_or_else(|| "-".into()),
                            vf.driver.unwrap_or_else(|| "-".into()),
                            vf.iommu_group.unwrap_or_else(|| "-".into())
                        );
                    }
                }
            }
            Ok(())
        }
        ["show", device] => {
            let pf = resolve_pf(&sysfs, device).map_err(e)?;
            let vfs = match &pf.netdev {
                Some(n) => {
                    VfNetlink::open()
                        .and_then(|mut nl| nl.link(n))
                        .map_err(e)?
                        .vfs
                }
                None => Vec::new(),
            };
            if json {
                println!("{}", serde_json::json!({"pf": pf, "vf_settings": vfs}));
            } else {
                println!(
                    "{} {} vfs {}/{}",
                    pf.bdf,
                    pf.netdev.as_deref().unwrap_or("-"),
                    pf.num_vfs,
                    pf.total_vfs
                );
                for v in vfs {
                    println!(
                        "  vf {} mac {} vlan {} qos {} spoofchk {:?} trust {:?} rate {}-{} state {:?}",
                        v.index, v.mac, v.vlan, v.qos, v.spoof_check, v.trust, v.min_tx_rate, v.max_tx_rate, v.link_state
                    );
                }
            }
            Ok(())
        }
        ["apply", file] => {
            let desired = Desired::load(&PathBuf::from(file)).map_err(e)?;
            if !dry_run && !is_root() {
                return Err(e(SriovError::NotRoot));
            }
            let counts = plan_counts(&sysfs, &desired).map_err(e)?;
            let mut nl = if dry_run {
                None
            } else {
                Some(VfNetlink::open().map_err(e)?)
            };
            for c in &counts {
                println!("{c}");
                if !dry_run {
                    execute(&sysfs, nl.as_mut(), c).map_err(e)?;
                }
            }
            if dry_run && !counts.is_empty() {
                println!("# VF settings are planned once the VFs exist");
                return Ok(());
            }
            let changes = match nl.as_mut() {
                Some(nl) => plan_vfs(&sysfs, &desired, nl).map_err(e)?,
                None => {
                    plan_vfs(&sysfs, &desired, &mut VfNetlink::open().map_err(e)?).map_err(e)?
                }
            };
            for c in &changes {
                println!("{c}");
                if !dry_run {
                    execute(&sysfs, nl.as_mut(), c).map_err(e)?;
                }
            }
            if counts.is_empty() && changes.is_empty() {
                println!("# nothing to change");
            }
            Ok(())
        }
        ["qemu-args"] => {
            println!("{}", qemu_args(&sysfs).map_err(e)?.join(" "));
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sriov-helper: {err}");
            ExitCode::FAILURE
        }
    }
}
