//! What the QEMU binary of a topology is: its version (the vhost-user options differ by
//! version) and whether it has what VMs on the switch need (vhost-user network backends,
//! memfd memory), asked of QEMU itself (`--version`, `-netdev help`, `-object help`).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `qemu ARGS`' standard output, if it runs and ends within 5 s.
fn output(qemu: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    let end = Instant::now() + Duration::from_secs(5);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{qemu} {} did not answer within 5 s",
                args.join(" ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text).map_err(|e| e.to_string())?;
    }
    Ok(text)
}

/// The version `qemu --version` prints, as (major, minor); None if it does not run, or
/// does not answer within 5 s.
pub fn qemu_version(qemu: &str) -> Option<(u32, u32)> {
    let text = output(qemu, &["--version"]).ok()?;
    let rest = text.split("version ").nth(1)?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Whether `qemu` runs and has what a VM on the switch needs; else what it lacks and the
/// fix.
pub fn switch_ready(qemu: &str) -> Result<(), String> {
    let install = "install Debian's qemu-system-x86, or give [guest] qemu = \"PATH\" of one \
                   that has it";
    let netdevs = output(qemu, &["-netdev", "help"]).map_err(|e| format!("{e}: {install}"))?;
    if !netdevs.lines().any(|l| l.trim() == "vhost-user") {
        return Err(format!(
            "{qemu} has no vhost-user network backend (-netdev help does not list it), which \
             VMs on the switch use: {install}"
        ));
    }
    let objects = output(qemu, &["-object", "help"]).map_err(|e| format!("{e}: {install}"))?;
    if !objects.lines().any(|l| l.trim() == "memory-backend-memfd") {
        return Err(format!(
            "{qemu} has no memory-backend-memfd (-object help does not list it): the switch \
             maps a VM's memory through a shared memfd; {install}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in QEMU that prints `netdevs` for -netdev help and `objects` else.
    fn fake(dir: &std::path::Path, netdevs: &str, objects: &str) -> String {
        let path = dir.join(format!("qemu-{}", netdevs.len() + objects.len()));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nif [ \"$1\" = -netdev ]; then printf '{netdevs}'; else printf '{objects}'; fi\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn a_qemu_without_vhost_user_or_memfd_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let good = fake(
            dir.path(),
            "Available netdev backend types:\\ntap\\nvhost-user\\n",
            "List of user creatable objects:\\n  memory-backend-memfd\\n",
        );
        switch_ready(&good).unwrap();
        let no_vu = fake(dir.path(), "tap\\nuser\\n", "  memory-backend-memfd\\n");
        let e = switch_ready(&no_vu).unwrap_err();
        assert!(
            e.contains("has no vhost-user network backend") && e.contains("qemu-system-x86"),
            "{e}"
        );
        let no_memfd = fake(dir.path(), "vhost-user\\n", "  memory-backend-file\\n");
        let e = switch_ready(&no_memfd).unwrap_err();
        assert!(e.contains("has no memory-backend-memfd"), "{e}");
        let e = switch_ready("/nonexistent/qemu").unwrap_err();
        assert!(e.starts_with("cannot run /nonexistent/qemu"), "{e}");
    }
}
