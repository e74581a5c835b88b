//! The example rendered as a person or another tool takes it: libvirt domains that
//! libvirt's own schema accepts (virt-xml-validate), a shell script a shell parses, and
//! Graphviz.

use std::path::{Path, PathBuf};
use std::process::Command;

fn qemu_configs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qemu-configs"))
}

/// The switch example with placeholders filled with paths that need not exist.
fn example(dir: &Path) -> PathBuf {
    example_named(dir, "three-tier.toml")
}

/// `examples/NAME` with a guest filled in, written to `dir`.
fn example_named(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .unwrap()
    .replace("@KERNEL@", "/boot/vmlinuz")
    .replace("@INITRD@", "/boot/initrd.img")
    .replace("@ACCEL@", "kvm:tcg");
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

/// `qemu-configs down FILE --state-dir STATE`, run to its end.
fn down(file: &Path, state: &Path) -> std::process::Output {
    qemu_configs()
        .arg("down")
        .arg(file)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

fn render(file: &Path, format: &str) -> String {
    let out = qemu_configs()
        .args([
            "render",
            "--state-dir",
            "/run/qemu-configs/three-tier",
            "--format",
            format,
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn libvirt_domains_pass_libvirts_schema() {
    let dir = tempfile::tempdir().unwrap();
    // app1 with a second NIC, on db.
    let file = example(dir.path());
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "echo app1 > /www/index.html && httpd -p 8080 -h /www\"\n",
        "echo app1 > /www/index.html && httpd -p 8080 -h /www\"\n\
         [[vm.nic]]\nnetwork = \"db\"\naddress = \"10.10.3.20/24\"\n",
    );
    std::fs::write(&file, text).unwrap();
    let xml = render(&file, "libvirt");
    let app1 = xml
        .split("<domain")
        .find(|d| d.contains("<name>app1</name>"))
        .unwrap();
    assert_eq!(
        app1.matches("<interface type='vhostuser'>").count(),
        2,
        "{app1}"
    );
    assert!(
        app1.contains("path='/run/qemu-configs/three-tier/app1.eth1.sock'"),
        "{app1}"
    );
    assert!(
        xml.starts_with("<!-- the switch these domains need"),
        "{xml}"
    );
    let domains: Vec<&str> = xml.split("<domain").skip(1).collect();
    assert_eq!(domains.len(), 5, "{xml}");
    for (i, d) in domains.iter().enumerate() {
        assert!(d.contains("<interface type='vhostuser'>"), "{d}");
        let path = dir.path().join(format!("vm{i}.xml"));
        std::fs::write(&path, format!("<domain{d}")).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (libvirt-clients, from ci/install-deps.sh)");
        assert!(
            out.status.success(),
            "domain {i} refused: {}{}\n<domain{d}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `script`, written to `dir`, passes `sh -n`.
#[track_caller]
fn assert_shell_parses(dir: &Path, script: &str) {
    let path = dir.join("up.sh");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_script_parses_and_starts_the_switch_before_the_vms() {
    let dir = tempfile::tempdir().unwrap();
    let script = render(&example(dir.path()), "script");
    assert_shell_parses(dir.path(), &script);
    let switch = script
        .find("--config /run/qemu-configs/three-tier/switch.toml &")
        .unwrap();
    let first_vm = script.find("qemu-system-x86_64 -name web1").unwrap();
    assert!(switch < first_vm, "{script}");
    assert!(
        script.contains("[[balancer]]") && script.contains("name = \"web-80\""),
        "{script}"
    );
}

#[test]
fn the_script_of_kernel_bridges_builds_its_networks_and_takes_them_down() {
    let dir = tempfile::tempdir().unwrap();
    let script = render(
        &example_named(dir.path(), "three-tier-bridges.toml"),
        "script",
    );
    assert_shell_parses(dir.path(), &script);
    let net = "/run/qemu-configs/three-tier/net.toml";
    let up = script.find(&format!("net up {net}\n")).expect("net up");
    let first_vm = script.find("qemu-system-x86_64 -name web1").unwrap();
    assert!(up < first_vm, "{script}");
    assert!(script.contains(&format!("net down {net};")), "{script}");
    // The networks written are the ones `bridge-plugin net` reads, every check passed.
    let (_, rest) = script.split_once("<<'NET'\n").unwrap();
    let (file, _) = rest.split_once("\nNET\n").unwrap();
    let written = dir.path().join("net.toml");
    std::fs::write(&written, file).unwrap();
    let nets = bridge_plugin::net::NetFile::load(&written).unwrap();
    assert_eq!(nets.table, "qemu_configs_three_tier");
    let bridges: Vec<&str> = nets.networks.iter().map(|n| n.bridge.as_str()).collect();
    assert_eq!(bridges, ["tt-web", "tt-app", "tt-db"]);
    assert!(!nets.allows.is_empty());
}

#[test]
fn a_down_while_an_up_holds_the_state_folder_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = example(dir.path());
    let state = dir.path().join("state");
    // What a running `up` holds.
    let lock = qemu_configs::run::lock_state(&qemu_configs::render::Layout {
        qemu_version: (10, 0),
        state_dir: state.clone(),
        helper: "qemu-bridge-plugin".into(),
        switch: "vhost-net-backend".into(),
    })
    .unwrap();
    let console = state.join("web1.console");
    std::fs::write(&console, "").unwrap();
    let down = || down(&file, &state);
    let refused = down();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("in use by another qemu-configs up or down of this topology"),
        "{err}"
    );
    assert!(
        console.exists(),
        "a refused down removed the running up's files"
    );
    drop(lock);
    let done = down();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!console.exists(), "down left the console socket");
}

#[test]
fn the_graph_has_every_network_and_flow() {
    let dir = tempfile::tempdir().unwrap();
    let file = example(dir.path());
    let out_path = dir.path().join("t.dot");
    let out = qemu_configs()
        .arg("graph")
        .arg(&file)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dot = std::fs::read_to_string(&out_path).unwrap();
    for want in [
        "label=\"web 10.10.1.1/24\"",
        "label=\"db 10.10.3.1/24\"",
        "label=\"tcp/8080\"",
        "label=\"tcp/5432\"",
        "host:8080 -> 80 (balanced)",
        "label=\"nat\"",
    ] {
        assert!(dot.contains(want), "{want}\n{dot}");
    }
}

#[test]
fn check_passes_the_example_and_names_a_qemu_without_vhost_user() {
    let dir = tempfile::tempdir().unwrap();
    let file = example(dir.path());
    let check = |file: &Path| qemu_configs().arg("check").arg(file).output().unwrap();
    let out = check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 VMs"));
    // A QEMU that runs but lists no vhost-user backend (here: one that prints nothing).
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[guest]\n", "[guest]\nqemu = \"/bin/true\"\n");
    std::fs::write(&file, &text).unwrap();
    let out = check(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("qemu =")).unwrap() + 1;
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}:{line}:8: [guest] qemu: /bin/true has no vhost-user network backend",
            file.display()
        )) && err.contains("qemu-system-x86"),
        "{err}"
    );
}

#[test]
fn down_stops_a_vm_renamed_in_the_file_since_up_and_nothing_its_pid_file_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = example(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // What `up` left of a VM called `oldweb` then (the file calls it otherwise now): its
    // QEMU (a stand-in whose command line names it as QEMU's does), pid file and console;
    // and a pid file naming a process that is not that VM's QEMU.
    let fake = |name: &str| {
        Command::new("sh")
            .args(["-c", "while :; do sleep 0.1; done", "-name", name])
            .spawn()
            .unwrap()
    };
    let mut renamed = fake("oldweb");
    let mut bystander = fake("someone-else");
    std::fs::write(state.join("oldweb.pid"), renamed.id().to_string()).unwrap();
    std::fs::write(state.join("stranger.pid"), bystander.id().to_string()).unwrap();
    std::fs::write(state.join("oldweb.console"), "").unwrap();
    let out = down(&file, &state);
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        renamed.try_wait().unwrap().is_some()
    });
    let spared = bystander.try_wait().unwrap().is_none();
    let _ = renamed.kill();
    let _ = bystander.kill();
    let _ = (renamed.wait(), bystander.wait());
    assert!(out.status.success(), "{err}");
    assert!(gone, "the renamed VM's QEMU still runs after down:\n{err}");
    assert!(
        err.contains("oldweb"),
        "down does not say it stopped oldweb:\n{err}"
    );
    assert!(
        spared,
        "down killed a process its VM's pid file did not name"
    );
    assert!(!state.join("oldweb.pid").exists() && !state.join("oldweb.console").exists());
}
