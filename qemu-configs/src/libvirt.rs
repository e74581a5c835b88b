//! A topology's VMs as libvirt domain XML: on the switch, `<interface type='vhostuser'>`
//! on the VM's port socket (libvirt's QEMU is the client and reconnects) with the memory
//! shared through memfd, as vhost-user needs; on kernel bridges, `<interface
//! type='bridge'>`. The console is a UNIX socket, as `up` makes it.

use crate::render::{kernel_cmdline, Layout};
use crate::topology::{Nic, Topology, Vm};

/// `s` with the five XML specials escaped, for text and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The domain XML of `vm`.
pub fn domain(topo: &Topology, vm: &Vm, layout: &Layout) -> String {
    let g = &topo.guest;
    let mem = vm.memory_mib.unwrap_or(g.memory_mib);
    // kvm:tcg has no libvirt spelling: a domain is one or the other.
    let kind = if g.accel.starts_with("kvm") {
        "kvm"
    } else {
        "qemu"
    };
    let mut x = format!("<domain type='{kind}'>\n  <name>{}</name>\n", esc(&vm.name));
    x += &format!(
        "  <memory unit='MiB'>{mem}</memory>\n  <vcpu>{}</vcpu>\n",
        g.cpus
    );
    if topo.on_switch() {
        x += "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n";
    }
    x += "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n";
    if let Some(kernel) = &g.kernel {
        x += &format!(
            "    <kernel>{}</kernel>\n",
            esc(&kernel.display().to_string())
        );
        if let Some(initrd) = &g.initrd {
            x += &format!(
                "    <initrd>{}</initrd>\n",
                esc(&initrd.display().to_string())
            );
        }
        let cmdline = kernel_cmdline(topo, vm);
        x += &format!("    <cmdline>{}</cmdline>\n", esc(&cmdline));
    } else {
        x += "    <boot dev='hd'/>\n";
    }
    x += "  </os>\n";
    if kind == "kvm" {
        x += "  <cpu mode='host-passthrough'/>\n";
    }
    x += "  <devices>\n";
    if let Some(disk) = topo.disk(vm) {
        x += &format!(
            "    <disk type='file' device='disk'>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
            esc(&disk.display().to_string())
        );
    }
    for nic in topo.nics(vm) {
        x += &interface(topo, &nic, layout);
    }
    x += &format!(
        "    <serial type='unix'>\n      <source mode='bind' path='{}'/>\n      <target port='0'/>\n    </serial>\n",
        esc(&layout.console(&vm.name).display().to_string())
    );
    x += "  </devices>\n</domain>\n";
    x
}

/// A NIC's `<interface>`: on the switch, vhost-user on its port's socket; else a bridge.
fn interface(topo: &Topology, nic: &Nic, layout: &Layout) -> String {
    let mac = nic.mac;
    let mut x = if topo.on_switch() {
        let mut x = format!(
            "    <interface type='vhostuser'>\n      <mac address='{mac}'/>\n      <source type='unix' path='{}' mode='client'>\n        <reconnect enabled='yes' timeout='1'/>\n      </source>\n      <model type='virtio'/>\n",
            esc(&layout.vm_socket(&nic.port).display().to_string())
        );
        let queues = topo.switch.queues;
        if queues > 1 {
            x += &format!("      <driver queues='{queues}'/>\n");
        }
        x
    } else {
        let Some(net) = topo.network(&nic.network) else {
            return String::new();
        };
        format!(
            "    <interface type='bridge'>\n      <mac address='{mac}'/>\n      <source bridge='{}'/>\n      <model type='virtio'/>\n",
            esc(&net.bridge)
        )
    };
    if let Some(mtu) = topo.nic_mtu(nic) {
        x += &format!("      <mtu size='{mtu}'/>\n");
    }
    x + "    </interface>\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::THREE_TIER;

    #[test]
    fn a_switch_vm_gets_a_vhostuser_interface_and_shared_memory() {
        let text = THREE_TIER
            .replace("mode = \"nat\"\nbridge = \"br-web\"", "mode = \"switch\"")
            .replace("uplink = \"eth0\"\n", "")
            .replace(
                "mode = \"host-only\"\nbridge = \"br-app\"",
                "mode = \"switch\"",
            )
            .replace("guest = \"10.10.1.10\"\n", "")
            .replace("run = \"httpd -p 80\"", "run = \"echo '<a&b>'\"");
        let t = Topology::parse(&text).unwrap();
        let layout = Layout {
            state_dir: "/run/q".into(),
            helper: "/h".into(),
            switch: "/s".into(),
            qemu_version: (10, 0),
        };
        let x = domain(&t, &t.vms[0], &layout);
        for want in [
            "<domain type='kvm'>",
            "<source type='memfd'/>",
            "<access mode='shared'/>",
            "<interface type='vhostuser'>",
            "<source type='unix' path='/run/q/web1.sock' mode='client'>",
            "<mac address='52:54:00:0a:00:01'/>",
            "<source mode='bind' path='/run/q/web1.console'/>",
        ] {
            assert!(x.contains(want), "{want}\n{x}");
        }
        assert!(!x.contains("<a&b>"));
    }
}
