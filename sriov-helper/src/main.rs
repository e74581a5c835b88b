//! sriov-helper list|show|apply|qemu-args

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sriov_helper::apply::{
    execute, plan_counts, plan_vfs, qemu_args, resolve_pf, AfterCounts, Change, Desired,
};
use sriov_helper::sysfs::Sysfs;
use sriov_helper::vf::VfNetlink;
use sriov_helper::SriovError;

/// Host-side SR-IOV for QEMU/KVM guests: physical functions and their VFs, the VFs'
/// settings, vfio-pci binding, and the QEMU arguments for them.
// `--json` and `--dry-run` are global, as the hand-made parser took them anywhere; each
// says which command uses it.
#[derive(Parser)]
#[command(name = "sriov-helper", version, args_override_self = true)]
struct Cli {
    /// Root of the sysfs tree (for tests: a fake one).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    sysfs_root: PathBuf,
    /// `list` and `show`: print JSON.
    #[arg(long, global = true)]
    json: bool,
    /// `apply`: print the commands, change nothing.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Physical functions and their VFs.
    List,
    /// One PF (PCI address or interface) with VF settings from netlink.
    Show {
        /// PCI address (0000:03:00.0) or interface name of the PF.
        device: String,
    },
    /// Reach the file's state, changing only what differs.
    Apply {
        /// The desired state (TOML: [[pf]] with num_vfs and [[pf.vf]] settings).
        #[arg(value_name = "FILE.toml")]
        file: PathBuf,
    },
    /// `-device vfio-pci` arguments for the VFs bound to vfio-pci.
    QemuArgs,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cli: Cli) -> Result<(), String> {
    let Cli {
        sysfs_root,
        json,
        dry_run,
        command,
    } = cli;
    let sysfs = Sysfs::new(sysfs_root);
    let e = |e: SriovError| e.to_string();
    match command {
        Cmd::List => {
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
        Cmd::Show { device } => {
            let pf = resolve_pf(&sysfs, &device).map_err(e)?;
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
        Cmd::Apply { file } => {
            let desired = Desired::load(&file).map_err(e)?;
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
            let changes = match nl.as_mut() {
                Some(nl) => plan_vfs(&sysfs, &desired, nl).map_err(e)?,
                None => {
                    // A dry run: against the VFs as the count changes above leave them.
                    let mut after = AfterCounts {
                        recreated: counts
                            .iter()
                            .filter_map(|c| match c {
                                Change::NumVfs { pf, .. } => {
                                    resolve_pf(&sysfs, pf).ok().and_then(|p| p.netdev)
                                }
                                _ => None,
                            })
                            .collect(),
                        netlink: None,
                    };
                    plan_vfs(&sysfs, &desired, &mut after).map_err(e)?
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
            if dry_run
                && !counts.is_empty()
                && desired
                    .pfs
                    .iter()
                    .any(|p| p.vfs.iter().any(|v| v.driver.is_some()))
            {
                println!("# VF drivers are planned once the VFs exist (their PCI addresses come with them)");
            }
            Ok(())
        }
        Cmd::QemuArgs => {
            println!("{}", qemu_args(&sysfs).map_err(e)?.join(" "));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sriov-helper: {err}");
            ExitCode::FAILURE
        }
    }
}
