//! Builds the tiny guest image, and boots a guest by hand on a switch port.
//!
//!   vnet-guest image      (prints kernel, initrd, and the accelerator that boots them here)
//!   vnet-guest boot --socket /tmp/vnet/web1.sock --ip 10.0.0.1/24 [--mac 1] [--queues 2] [--mtu 9000]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use integration::guest_image::guest_image;
use integration::qemu::{detect_accel, guest_args, GuestSpec, Qemu};

fn usage() -> ExitCode {
    eprintln!(
        "usage:\n  vnet-guest image\n  vnet-guest boot --socket PATH --ip CIDR [--mac N] [--queues N] [--mtu N]\n\
         The guest gets an interactive shell on this terminal; `poweroff -f` ends it.\n\
         VNET_QEMU=7.2|10 picks the QEMU version (ci/install-deps.sh provides both); VNET_ACCEL=kvm|tcg skips the KVM probe."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let image = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vnet-guest: cannot build the guest image: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.first().map(String::as_str) {
        Some("image") => {
            // Which accelerator boots it here, for launchers of their own (ci/example.sh).
            let accel = match Qemu::from_env() {
                Ok(q) => detect_accel(&q, &image).name(),
                Err(e) => {
                    eprintln!("vnet-guest: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "kernel {}\ninitrd {}\naccel {accel}",
                image.kernel.display(),
                image.initrd.display()
            );
            ExitCode::SUCCESS
        }
        Some("boot") => {
            let (mut socket, mut ip, mut mac, mut queues, mut mtu) = (None, None, 1u8, 1u16, None);
            let mut it = args[1..].iter();
            while let Some(flag) = it.next() {
                let Some(value) = it.next() else {
                    return usage();
                };
                let ok = match flag.as_str() {
                    "--socket" => {
                        socket = Some(PathBuf::from(value));
                        true
                    }
                    "--ip" => {
                        ip = Some(value.clone());
                        true
                    }
                    "--mac" => value.parse().map(|v| mac = v).is_ok(),
                    "--queues" => value.parse().map(|v| queues = v).is_ok(),
                    "--mtu" => value.parse().map(|v| mtu = Some(v)).is_ok(),
                    _ => false,
                };
                if !ok {
                    eprintln!("vnet-guest: bad option {flag} {value}");
                    return usage();
                }
            }
            let (Some(socket), Some(ip)) = (socket, ip) else {
                return usage();
            };
            if !socket.exists() {
                eprintln!("vnet-guest: {} does not exist: start vhost-net-backend with a port on it first", socket.display());
                return ExitCode::FAILURE;
            }
            let qemu = match Qemu::from_env() {
                Ok(q) => q,
                Err(e) => {
                    eprintln!("vnet-guest: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let accel = detect_accel(&qemu, &image);
            let mut spec = GuestSpec::new("guest", &socket, mac, &ip);
            spec.nics[0].queues = queues;
            spec.cpus = u32::from(queues.max(1));
            spec.mtu = mtu;
            spec.shell = true;
            let err = qemu
                .command()
                .args(guest_args(&qemu, accel, &image, &spec))
                .exec();
            eprintln!("vnet-guest: cannot run {}: {err}", qemu.binary.display());
            ExitCode::FAILURE
        }
        _ => usage(),
    }
}
