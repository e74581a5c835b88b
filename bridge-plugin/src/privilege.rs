//! What the bridge helper does first when it runs with more privilege than its caller
//! (setuid root or file capabilities): keep CAP_NET_ADMIN and nothing else, become the
//! caller again, and check that the files it decides on belong to root.
//!
//! This is what QEMU's `qemu-bridge-helper` does with libcap-ng
//! (`capng_change_id(getuid(), getgid(), CAPNG_CLEAR_BOUNDING)` keeping CAP_NET_ADMIN), so
//! the ACL is read with the caller's own rights: a file the caller cannot read decides
//! nothing for it, which is how a group-owned `bridge.conf` limits the helper to a group.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error("cannot drop privileges ({step}): {reason}")]
    Drop { step: &'static str, reason: String },
    #[error(
        "{path} is {what}: a helper running with privilege decides only on files that root \
         owns and that no one else can write (chown root {path}; chmod go-w {path})"
    )]
    Untrusted { path: String, what: String },
}

/// Whether the kernel started this program with more privilege than its caller had
/// (setuid, setgid or file capabilities): AT_SECURE.
pub fn elevated() -> bool {
    // SAFETY: getauxval only reads the auxiliary vector.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// What went wrong at `step` of dropping privileges.
fn step<E: std::fmt::Display>(step: &'static str) -> impl Fn(E) -> PrivilegeError {
    move |e| PrivilegeError::Drop {
        step,
        reason: e.to_string(),
    }
}

fn check(r: libc::c_int, what: &'static str) -> Result<(), PrivilegeError> {
    if r < 0 {
        Err(step(what)(std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// prctl(2) with one integer argument.
fn prctl(op: libc::c_int, arg: libc::c_ulong, what: &'static str) -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    check(unsafe { libc::prctl(op, arg, 0, 0, 0) }, what)
}

/// Becomes the caller (real uid and gid) with CAP_NET_ADMIN as the only capability left,
/// in every set, bounding set included. CAP_NET_ADMIN is also made ambient so that the one
/// program the helper runs (nft, by absolute path, with an empty environment) has it too.
/// Does nothing when the caller is root already.
pub fn drop_to_caller() -> Result<(), PrivilegeError> {
    // SAFETY: these getters only read the process's credentials.
    let (uid, gid, euid) = unsafe { (libc::getuid(), libc::getgid(), libc::geteuid()) };
    let keep: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
    // No core dumps or ptrace by the caller while CAP_NET_ADMIN is held.
    prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")?;
    if uid != 0 && euid == 0 {
        // Setuid root: everything but CAP_NET_ADMIN leaves the bounding set while we
        // still have CAP_SETPCAP, then the ids change with the capabilities kept.
        for cap in caps::runtime::thread_all_supported() {
            if cap != Capability::CAP_NET_ADMIN {
                caps::drop(None, CapSet::Bounding, cap).map_err(step("bounding set"))?;
            }
        }
        prctl(libc::PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")?;
        // The supplementary groups stay: they are the caller's own (a setuid exec does not
        // change them) and decide, as for qemu-bridge-helper, which ACL files it may read.
        // SAFETY: plain id-changing syscalls with integer arguments.
        check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
        // SAFETY: as above.
        check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
        // The id change set dumpable back to fs.suid_dumpable (prctl(2)), 1 or 2 on many
        // hosts: off again at once, while CAP_NET_ADMIN is still held. (The capability
        // changes below only shrink the permitted set, which leaves it as it is.)
        prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")?;
        prctl(libc::PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")?;
    } else if uid == 0 {
        return Ok(());
    }
    caps::set(None, CapSet::Permitted, &keep).map_err(step("permitted set"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(step("effective set"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(step("inheritable set"))?;
    caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN).map_err(step("ambient set"))?;
    // Nothing may bring root back.
    // SAFETY: setuid with an integer argument; it must fail now.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::Drop {
            step: "check",
            reason: "setuid(0) still succeeds".into(),
        });
    }
    Ok(())
}

/// Refuses a file (or folder) that someone other than root owns or can write.
pub fn require_root_owned(path: &Path) -> Result<(), PrivilegeError> {
    let untrusted = |what: String| PrivilegeError::Untrusted {
        path: path.display().to_string(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| untrusted(format!("unreadable ({e})")))?;
    if meta.uid() != 0 {
        return Err(untrusted(format!(
            "owned by uid {}, not owned by root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "writable by its group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// `require_root_owned` for a file and every folder above it.
pub fn require_root_owned_path(path: &Path) -> Result<(), PrivilegeError> {
    let mut p = Some(path);
    while let Some(here) = p {
        if here.as_os_str().is_empty() {
            break;
        }
        require_root_owned(here)?;
        p = here.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test below, in the process it starts: a setuid-root helper's credentials
    /// (real uid nobody, effective root), then the drop.
    const AS_SETUID_CHILD: &str = "BRIDGE_PLUGIN_TEST_AS_SETUID";

    #[test]
    fn no_core_dumps_after_the_drop_whatever_suid_dumpable_says() {
        if std::env::var_os(AS_SETUID_CHILD).is_some() {
            // SAFETY: plain id-changing syscall with integer arguments.
            assert_eq!(unsafe { libc::setresuid(65534, 0, 0) }, 0);
            drop_to_caller().unwrap();
            // SAFETY: prctl with integer arguments only.
            let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            println!("dumpable={dumpable}");
            return;
        }
        // SAFETY: geteuid only reads credentials.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test runs as root (CI does)");
        const SYSCTL: &str = "/proc/sys/fs/suid_dumpable";
        /// Puts the host's setting back whatever happens to the test.
        struct Restore(String);
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = std::fs::write(SYSCTL, self.0.trim());
            }
        }
        let _restore = Restore(std::fs::read_to_string(SYSCTL).unwrap());
        std::fs::write(SYSCTL, "1").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "privilege::tests::no_core_dumps_after_the_drop_whatever_suid_dumpable_says",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(AS_SETUID_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("dumpable=0"), "{stdout}");
    }

    #[test]
    fn files_others_own_or_can_write_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("bridge.conf");
        std::fs::write(&f, "allow br0\n").unwrap();
        let mode =
            |m| std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(m));
        mode(0o644).unwrap();
        // SAFETY: geteuid only reads credentials.
        if unsafe { libc::geteuid() } == 0 {
            require_root_owned(&f).unwrap();
            mode(0o664).unwrap();
            let e = require_root_owned(&f).unwrap_err().to_string();
            assert!(e.contains("writable") && e.contains("664"), "{e}");
            mode(0o644).unwrap();
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            let e = require_root_owned(&f).unwrap_err().to_string();
            assert!(e.contains("uid 65534") && e.contains("bridge.conf"), "{e}");
        }
        let e = require_root_owned(&d.path().join("gone"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unreadable"), "{e}");
    }
}
