//! Builds the tiny guest image, and boots a guest by hand on a switch port.
//!
//!   vnet-guest image      (prints kernel, initrd, and the accelerator that boots them here)
//!   vnet-guest boot --socket /tmp/vnet/web1.sock --ip 10.0.0.1/24 [--mac 1] [--queues 2] [--mtu 9000]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use integration::guest_image::guest_image;
use integration::qemu::{detect_accel, guest_args, GuestSpec, Qemu};

/// Builds the tiny guest image, and boots a guest by hand on a switch port.
///
/// The guest gets an interactive shell on this terminal; `poweroff -f` ends it.
///
/// VNET_QEMU=7.2|10 picks the QEMU version (ci/install-deps.sh provides both);
/// VNET_ACCEL=kvm|tcg skips the KVM probe.
#[derive(Parser)]
#[command(name = "vnet-guest", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image and print kernel, initrd, and the accelerator that boots them here.
    Image,
    /// Boot a guest on a switch port with a shell on this terminal (`poweroff -f` ends it).
    ///
    /// vnet-guest boot --socket /tmp/vnet/web1.sock --ip 10.0.0.1/24 [--mac 1] [--queues 2]
    /// [--mtu 9000]
    Boot {
        /// The vhost-user socket of a vhost-net-backend port.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The guest's address.
        #[arg(long, value_name = "CIDR")]
        ip: String,
        /// Last byte of the guest's MAC address.
        #[arg(long, value_name = "N", default_value_t = 1)]
        mac: u8,
        /// Queue pairs of the NIC (the port needs `queues=N` or more); also the guest's CPUs.
        #[arg(long, value_name = "N", default_value_t = 1)]
        queues: u16,
        /// MTU of the guest's NIC (start the switch with the same `--mtu`).
        #[arg(long, value_name = "N")]
        mtu: Option<u16>,
    },
}

fn main() -> ExitCode {
    // Arguments first: `--help` and mistakes cost no image build.
    let cli = Cli::parse();
    let image = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vnet-guest: cannot build the guest image: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Cmd::Image => {
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
        Cmd::Boot {
            socket,
            ip,
            mac,
            queues,
            mtu,
        } => {
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
    }
}
