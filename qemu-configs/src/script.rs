//! A topology as a shell script a person can read and run: on the switch, its config (as
//! `up` writes it), the switch, and each VM's QEMU; without `up`'s checks and supervision,
//! and with a trap that stops what it started.

use crate::render::{qemu_args, shell_line, shell_word, Layout};
use crate::switch::switch_config;
use crate::topology::Topology;

pub fn script(topo: &Topology, layout: &Layout) -> String {
    let state = shell_word(&layout.state_dir.display().to_string());
    let mut s = format!(
        "#!/bin/sh\n# {}: {} VMs, as `qemu-configs up` starts them (without its checks, its\n\
         # supervision or its clean shutdown). Run as root; Ctrl-C stops what it started.\n\
         set -e\nmkdir -p -m 700 {state}\npids=\n\
         trap 'kill $pids 2>/dev/null' EXIT INT TERM\n",
        topo.name,
        topo.vms.len()
    );
    if topo.on_switch() {
        let config = switch_config(topo, layout);
        let socks: Vec<String> = config
            .ports
            .iter()
            .map(|p| shell_word(&p.socket.display().to_string()))
            .collect();
        let config = toml::to_string(&config).unwrap_or_default();
        let path = shell_word(&layout.switch_config().display().to_string());
        s += &format!("\n# The switch: one port per VM NIC, a segment per network.\ncat > {path} <<'SWITCH'\n{config}SWITCH\n");
        s += &format!(
            "{} --config {path} &\npids=\"$pids $!\"\n",
            shell_word(&layout.switch.display().to_string())
        );
        s += &format!(
            "for s in {}; do while [ ! -S \"$s\" ]; do sleep 0.1; done; done\n",
            socks.join(" ")
        );
    } else {
        // As `up` builds them, with bridge-plugin's command beside the helper; taken down
        // again (exactly what `net up` made) when the script ends.
        let net = toml::to_string(&topo.net_file()).unwrap_or_default();
        let path = shell_word(&layout.state_dir.join("net.toml").display().to_string());
        let plugin = shell_word(&layout.bridge_plugin().display().to_string());
        s += &format!(
            "\n# The networks: bridges, addresses, NAT and the rules between them; the VMs'\n\
             # taps come from qemu-bridge-plugin.\ncat > {path} <<'NET'\n{net}NET\n\
             {plugin} net up {path}\nnet_down() {{ {plugin} net down {path}; }}\n\
             trap 'kill $pids 2>/dev/null; net_down' EXIT INT TERM\n"
        );
        s += &format!(
            "printf '{}' > {}\n",
            crate::render::Layout::acl_text(topo).replace('\n', "\\n"),
            shell_word(&layout.acl().display().to_string())
        );
    }
    for vm in &topo.vms {
        s += &format!(
            "\n# {}\n{} &\npids=\"$pids $!\"\n",
            vm.name,
            shell_line(&topo.guest.qemu, &qemu_args(topo, vm, layout))
        );
    }
    s += "\nwait\n";
    s
}
