//! `bridge-plugin tap`: a multi-queue tap attached like the helper's, handed to a QEMU we
//! start as inherited fds (`-netdev tap,fds=...`), the way libvirt does; the helper
//! protocol carries one fd only.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::netlink::Netlink;
use crate::port::{attach, PortSettings};
use crate::tap::Tap;

/// What to start: the bridge, queues, tap settings and the QEMU command line.
pub struct Launch {
    pub bridge: String,
    pub queues: usize,
    pub netdev_id: String,
    pub settings: PortSettings,
    pub qemu: Vec<String>,
}

/// The `-netdev` value for the inherited fds.
pub fn netdev_arg(id: &str, tap_fds: &[i32], vhost_fds: &[i32]) -> String {
    let join = |fds: &[i32]| {
        fds.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut arg = format!("tap,id={id},fds={}", join(tap_fds));
    if vhost_fds.is_empty() {
        arg.push_str(",vhost=off");
    } else {
        arg.push_str(&format!(",vhost=on,vhostfds={}", join(vhost_fds)));
    }
    arg
}

fn inheritable(f: &File) -> std::io::Result<i32> {
    let fd = f.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on a descriptor we own, so QEMU inherits it.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl Launch {
    /// Creates and attaches the tap, then replaces this process with QEMU. Returns only on
    /// failure.
    pub fn exec(self) -> String {
        if self.qemu.is_empty() {
            return "no QEMU command line after --".into();
        }
        let tap = match Tap::open("tap%d", self.queues, true, false) {
            Ok(t) => t,
            Err(e) => return format!("cannot create a {}-queue tap: {e}", self.queues),
        };
        let mut nl = match Netlink::open() {
            Ok(n) => n,
            Err(e) => return e.to_string(),
        };
        if let Err(e) = attach(&mut nl, &tap.name, &self.bridge, &self.settings) {
            return format!("bridge {}: {e}", self.bridge);
        }
        // vhost-net moves the data path into the kernel where it exists.
        let vhost: Vec<File> = (0..self.queues)
            .map_while(|_| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/vhost-net")
                    .ok()
            })
            .collect();
        let vhost = if vhost.len() == self.queues {
            vhost
        } else {
            Vec::new()
        };
        let tap_fds: Result<Vec<i32>, _> = tap.queues.iter().map(inheritable).collect();
        let vhost_fds: Result<Vec<i32>, _> = vhost.iter().map(inheritable).collect();
        let (Ok(tap_fds), Ok(vhost_fds)) = (tap_fds, vhost_fds) else {
            return "cannot pass the tap fds on".into();
        };
        let err = Command::new(&self.qemu[0])
            .args(&self.qemu[1..])
            .arg("-netdev")
            .arg(netdev_arg(&self.netdev_id, &tap_fds, &vhost_fds))
            .exec();
        format!("cannot run {}: {err}", self.qemu[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netdev_argument() {
        assert_eq!(
            netdev_arg("n0", &[5, 6], &[]),
            "tap,id=n0,fds=5:6,vhost=off"
        );
        assert_eq!(
            netdev_arg("n0", &[5], &[9]),
            "tap,id=n0,fds=5,vhost=on,vhostfds=9"
        );
    }
}
