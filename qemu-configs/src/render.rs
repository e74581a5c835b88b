//! A topology's VMs as QEMU command lines: each NIC a tap on its network's bridge, handed
//! over by the bridge helper (`-netdev bridge,helper=...`), or a vhost-user port of the
//! switch (guest memory a shared memfd); the console on a socket that also logs to a file.

use std::path::{Path, PathBuf};

use crate::topology::{base64, Nic, Topology, Vm};

/// Where a running topology keeps its files, and the programs it runs.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The QEMU's version (`qemu --version`): the vhost-user options differ by version.
    pub qemu_version: (u32, u32),
    pub state_dir: PathBuf,
    /// `qemu-bridge-plugin` (it takes `--acl=`).
    pub helper: PathBuf,
    /// `vhost-net-backend`, the switch of `mode = "switch"` networks.
    pub switch: PathBuf,
}

impl Layout {
    /// `bridge-plugin` (its `net up|down`), beside the helper.
    pub fn bridge_plugin(&self) -> PathBuf {
        self.helper.with_file_name("bridge-plugin")
    }

    /// The helper's ACL: exactly the topology's bridges.
    pub fn acl(&self) -> PathBuf {
        self.state_dir.join("bridge.conf")
    }

    /// The console socket (`socat - UNIX-CONNECT:PATH` for a shell) and its log.
    pub fn console(&self, vm: &str) -> PathBuf {
        self.state_dir.join(format!("{vm}.console"))
    }

    /// QEMU's monitor (QMP), through which `down` presses the ACPI power button.
    pub fn qmp(&self, vm: &str) -> PathBuf {
        self.state_dir.join(format!("{vm}.qmp"))
    }

    /// The vhost-user socket of a NIC's port on the switch (`Nic::port`).
    pub fn vm_socket(&self, port: &str) -> PathBuf {
        self.state_dir.join(format!("{port}.sock"))
    }

    /// The switch's control socket (`vhost-net-backend ctl --socket PATH ...`).
    pub fn switch_control(&self) -> PathBuf {
        self.state_dir.join("switch.ctl")
    }

    /// The switch's configuration, as `up` wrote it, and its log.
    pub fn switch_config(&self) -> PathBuf {
        self.state_dir.join("switch.toml")
    }

    pub fn switch_log(&self) -> PathBuf {
        self.state_dir.join("switch.log")
    }

    pub fn console_log(&self, vm: &str) -> PathBuf {
        self.state_dir.join(format!("{vm}.log"))
    }

    pub fn acl_text(topo: &Topology) -> String {
        topo.networks
            .iter()
            .map(|n| format!("allow {}\n", n.bridge))
            .collect()
    }
}

/// `[guest] append` for `vm`: `{name}`, `{address}` (every NIC's, comma-separated, in
/// the guest's eth order), `{gateway}` (the first NIC's) and `{run}` (base64) filled in.
pub fn kernel_cmdline(topo: &Topology, vm: &Vm) -> String {
    let addresses: Vec<String> = topo.nics(vm).into_iter().map(|n| n.address).collect();
    topo.guest
        .append
        .replace("{name}", &vm.name)
        .replace("{address}", &addresses.join(","))
        .replace(
            "{gateway}",
            &topo.gateway(vm).map(|a| a.to_string()).unwrap_or_default(),
        )
        .replace(
            "{run}",
            &vm.run
                .as_deref()
                .map(|r| base64(r.as_bytes()))
                .unwrap_or_default(),
        )
}

/// QemuOpts escapes a comma inside a value by doubling it.
fn opt(value: &Path) -> String {
    value.display().to_string().replace(',', ",,")
}

/// The QEMU arguments for `vm` (without the binary).
pub fn qemu_args(topo: &Topology, vm: &Vm, layout: &Layout) -> Vec<String> {
    let g = &topo.guest;
    let mem = vm.memory_mib.unwrap_or(g.memory_mib);
    let mut args: Vec<String> = [
        "-name",
        &vm.name,
        "-machine",
        &format!("pc,accel={}", g.accel),
        "-cpu",
        "max",
        "-smp",
        &g.cpus.to_string(),
        "-m",
        &format!("{mem}M"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off,logfile={}",
            opt(&layout.console(&vm.name)),
            opt(&layout.console_log(&vm.name))
        ),
        "-serial",
        "chardev:console",
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt(&layout.qmp(&vm.name))),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(kernel) = &g.kernel {
        args.extend(["-kernel".into(), kernel.display().to_string()]);
        if let Some(initrd) = &g.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend(["-append".into(), kernel_cmdline(topo, vm)]);
    }
    if let Some(disk) = topo.disk(vm) {
        args.extend(["-drive".into(), format!("file={},if=virtio", opt(disk))]);
    }
    if topo.on_switch() {
        // The switch maps the guest's memory: a shared memfd, one for all its NICs.
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
        ]);
    }
    for nic in topo.nics(vm) {
        if topo.on_switch() {
            args.extend(vhost_user_nic(topo, &nic, layout));
        } else {
            args.extend(bridge_nic(topo, &nic, layout));
        }
    }
    args.extend(g.qemu_args.iter().cloned());
    args
}

/// A NIC on a kernel bridge: a tap the bridge helper makes and hands over.
fn bridge_nic(topo: &Topology, nic: &Nic, layout: &Layout) -> Vec<String> {
    let net = topo
        .network(&nic.network)
        .expect("validated: the NIC's network exists");
    // QEMU runs a helper string with spaces through /bin/sh: every path quoted.
    let helper = format!(
        "{} {}",
        shell_word(&layout.helper.display().to_string()),
        shell_word(&format!("--acl={}", layout.acl().display()))
    );
    let i = nic.index;
    vec![
        "-netdev".into(),
        format!(
            "bridge,id=net{i},br={},helper={}",
            net.bridge,
            helper.replace(',', ",,")
        ),
        "-device".into(),
        nic_device(topo, nic, ""),
    ]
}

/// The guest's virtio-net device of `nic`, with `extra` options (`,mq=on...`).
fn nic_device(topo: &Topology, nic: &Nic, extra: &str) -> String {
    let mut dev = format!(
        "virtio-net-pci,netdev=net{},mac={}{extra}",
        nic.index, nic.mac
    );
    if let Some(mtu) = topo.nic_mtu(nic) {
        dev.push_str(&format!(",host_mtu={mtu}"));
    }
    dev
}

/// A NIC on the switch: its port's socket with the reconnect option this QEMU spells
/// (9.2 renamed it), and MSI-X vectors for every queue, except QEMU 7.x under TCG, which
/// crashes with MSI-X on vhost-user NICs and gets legacy interrupts (`vectors=0`).
fn vhost_user_nic(topo: &Topology, nic: &Nic, layout: &Layout) -> Vec<String> {
    let queues = topo.switch.queues;
    let reconnect = if layout.qemu_version >= (9, 2) {
        "reconnect-ms=1000"
    } else {
        "reconnect=1"
    };
    let i = nic.index;
    let mq = if queues > 1 { ",mq=on" } else { "" };
    let vectors = if layout.qemu_version < (8, 0) && topo.guest.accel != "kvm" {
        0
    } else {
        2 * queues + 2
    };
    vec![
        "-chardev".into(),
        format!(
            "socket,id=chr{i},path={},{reconnect}",
            opt(&layout.vm_socket(&nic.port))
        ),
        "-netdev".into(),
        format!("vhost-user,id=net{i},chardev=chr{i},queues={queues}"),
        "-device".into(),
        nic_device(topo, nic, &format!("{mq},vectors={vectors}")),
    ]
}

/// One word as a shell takes it back.
pub fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// A command line a shell would take back as the same words.
pub fn shell_line(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(shell_word)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::THREE_TIER;

    fn layout() -> Layout {
        Layout {
            state_dir: "/run/qemu-configs/shop".into(),
            helper: "/usr/lib/qemu-bridge-plugin".into(),
            switch: "/usr/bin/vhost-net-backend".into(),
            qemu_version: (10, 0),
        }
    }

    #[test]
    fn renders_a_vm_on_its_bridge_with_its_boot_arguments() {
        let t = Topology::parse(THREE_TIER).unwrap();
        let args = qemu_args(&t, &t.vms[0], &layout());
        let line = shell_line("qemu-system-x86_64", &args);
        for want in [
            "-name web1",
            "-machine pc,accel=kvm:tcg",
            "-m 256M",
            "socket,id=console,path=/run/qemu-configs/shop/web1.console,server=on,wait=off,logfile=/run/qemu-configs/shop/web1.log",
            "-kernel /boot/vmlinuz -initrd /boot/initrd",
            // httpd -p 80, base64.
            "'console=ttyS0 vnet.ip=10.10.1.10/24 vnet.gw=10.10.1.1 vnet.run=aHR0cGQgLXAgODA='",
            "'bridge,id=net0,br=br-web,helper=/usr/lib/qemu-bridge-plugin --acl=/run/qemu-configs/shop/bridge.conf'",
            "-device virtio-net-pci,netdev=net0,mac=52:54:00:0a:00:01",
        ] {
            assert!(line.contains(want), "{want}\nnot in\n{line}");
        }
        // No run: an empty word, which the guest reads as nothing to start.
        let app = qemu_args(&t, &t.vms[1], &layout());
        assert!(app.iter().any(|a| a.ends_with("vnet.run=")), "{app:?}");
        assert_eq!(Layout::acl_text(&t), "allow br-web\nallow br-app\n");
    }

    #[test]
    fn the_helper_string_survives_the_shell_qemu_runs_it_through() {
        let t = Topology::parse(THREE_TIER).unwrap();
        let odd = Layout {
            state_dir: "/run/my vms/it's".into(),
            helper: "/opt/q b/qemu-bridge-plugin".into(),
            switch: "/usr/bin/vhost-net-backend".into(),
            qemu_version: (10, 0),
        };
        let args = qemu_args(&t, &t.vms[0], &odd);
        let netdev = args.iter().find(|a| a.starts_with("bridge,")).unwrap();
        assert_eq!(
            netdev,
            r"bridge,id=net0,br=br-web,helper='/opt/q b/qemu-bridge-plugin' '--acl=/run/my vms/it'\''s/bridge.conf'"
        );
    }

    #[test]
    fn commas_in_paths_are_escaped_for_qemu() {
        let text = THREE_TIER
            .replace(
                "kernel = \"/boot/vmlinuz\"\ninitrd = \"/boot/initrd\"",
                "disk = \"/vm/a,b.qcow2\"",
            )
            .replace(
                "network = \"app\"\n",
                "network = \"app\"\ndisk = \"/vm/app1.qcow2\"\n",
            );
        let t = Topology::parse(&text).unwrap();
        let args = qemu_args(&t, &t.vms[0], &layout());
        assert!(
            args.contains(&"file=/vm/a,,b.qcow2,if=virtio".to_string()),
            "{args:?}"
        );
        assert!(!args.contains(&"-kernel".to_string()));
    }

    #[test]
    fn a_vm_with_two_nics_on_the_switch_gets_a_port_and_a_vhost_user_nic_for_each() {
        let t = Topology::parse(&crate::topology::tests::two_nics()).unwrap();
        let app1 = &t.vms[1];
        let line = shell_line("q", &qemu_args(&t, app1, &layout()));
        for want in [
            "-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem -chardev",
            "socket,id=chr0,path=/run/qemu-configs/shop/app1.sock,reconnect-ms=1000",
            "vhost-user,id=net0,chardev=chr0,queues=2",
            "virtio-net-pci,netdev=net0,mac=52:54:00:0a:01:02,mq=on,vectors=6",
            "socket,id=chr1,path=/run/qemu-configs/shop/app1.eth1.sock,reconnect-ms=1000",
            "vhost-user,id=net1,chardev=chr1,queues=2",
            "virtio-net-pci,netdev=net1,mac=52:54:00:0a:00:02,mq=on,vectors=6",
        ] {
            assert!(line.contains(want), "{want}\nnot in\n{line}");
        }
        assert_eq!(line.matches("memory-backend-memfd").count(), 1, "{line}");
        // The switch: a port per NIC, in its network's group and segment.
        let c = crate::switch::switch_config(&t, &layout());
        let ports: Vec<(&str, Option<u16>, &[String])> = c
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.vlan, p.groups.as_slice()))
            .collect();
        let (web, app) = (["web".to_string()], ["app".to_string()]);
        assert_eq!(
            ports,
            [
                ("web1", Some(100), &web[..]),
                ("app1", Some(101), &app[..]),
                ("app1.eth1", Some(100), &web[..])
            ]
        );
        assert_eq!(
            c.ports[2].socket,
            Path::new("/run/qemu-configs/shop/app1.eth1.sock")
        );
        // The guest learns every address, in its eth order.
        let t = Topology::parse(&crate::topology::tests::two_nics().replace(
            "kernel = \"/boot/vmlinuz\"",
            "kernel = \"/k\"\nappend = \"vnet.ip={address}\"",
        ))
        .unwrap();
        assert_eq!(
            kernel_cmdline(&t, &t.vms[1]),
            "vnet.ip=10.10.2.10/24,10.10.1.20/24"
        );
    }

    #[test]
    fn a_vm_with_two_nics_on_bridges_gets_a_tap_on_each() {
        let text = THREE_TIER.replace(
            "address = \"10.10.2.10/24\"\n",
            "address = \"10.10.2.10/24\"\n[[vm.nic]]\nnetwork = \"web\"\naddress = \"10.10.1.20/24\"\n",
        );
        let t = Topology::parse(&text).unwrap();
        let line = shell_line("q", &qemu_args(&t, &t.vms[1], &layout()));
        for want in [
            "'bridge,id=net0,br=br-app,helper=",
            "-device virtio-net-pci,netdev=net0,mac=52:54:00:0a:01:02",
            "'bridge,id=net1,br=br-web,helper=",
            "-device virtio-net-pci,netdev=net1,mac=52:54:00:0a:00:02",
            "vnet.ip=10.10.2.10/24,10.10.1.20/24 vnet.gw=10.10.2.1",
        ] {
            assert!(line.contains(want), "{want}\nnot in\n{line}");
        }
    }

    #[test]
    fn shell_lines_quote_what_needs_it() {
        assert_eq!(
            shell_line(
                "q",
                &["a b".into(), "it's".into(), "x=1,y".into(), "".into()]
            ),
            r"q 'a b' 'it'\''s' x=1,y ''"
        );
    }
}
