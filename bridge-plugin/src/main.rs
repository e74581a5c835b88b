//! `bridge-plugin`: the kernel network modes for QEMU/KVM guests.

fn main() {
    eprintln!("bridge-plugin: the `net` and `tap` subcommands are not built yet; qemu-bridge-plugin is the bridge helper");
    std::process::exit(2);
}
