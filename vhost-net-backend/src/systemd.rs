//! systemd's side of a service, without libsystemd: sockets handed over by socket
//! activation (`LISTEN_FDS`, `LISTEN_FDNAMES`, from fd 3 on) and state reports to the
//! manager (`NOTIFY_SOCKET`: READY, STATUS, RELOADING, STOPPING, WATCHDOG).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const FIRST_FD: i32 = 3;

/// The sockets systemd passed this process, with their names (`FileDescriptorName=`), if
/// it passed any; the variables are cleared so that no child takes them for its own.
pub fn listen_fds() -> Result<Vec<(String, OwnedFd)>, String> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !ours {
        return Ok(Vec::new());
    }
    let n: i32 = count
        .and_then(|c| c.parse().ok())
        .filter(|n| (0..=1024).contains(n))
        .ok_or("LISTEN_FDS is not a count of descriptors")?;
    let names: Vec<&str> = names.split(':').collect();
    let mut fds = Vec::new();
    for i in 0..n {
        let fd = FIRST_FD + i;
        // SAFETY: F_GETFD/F_SETFD on a descriptor number only; no memory is touched.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(format!(
                "LISTEN_FDS says {n}, but descriptor {fd} is not open"
            ));
        }
        // SAFETY: systemd passed descriptors FIRST_FD.. to this process for this use (the
        // PID matched), each is open, and nothing else in the process claims them: the
        // variables naming them are gone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names
            .get(i as usize)
            .copied()
            .unwrap_or_default()
            .to_string();
        fds.push((name, owned));
    }
    Ok(fds)
}

/// Where to report, if the process runs under a manager that listens.
fn notify_socket() -> Option<SocketAddr> {
    let path = std::env::var("NOTIFY_SOCKET").ok()?;
    match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok(),
        None => SocketAddr::from_pathname(&path).ok(),
    }
}

/// Sends `state` (`READY=1`, `STATUS=...`, newline-separated) to the manager; nothing when
/// there is none.
pub fn notify(state: &str) {
    let Some(addr) = notify_socket() else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        log::warn!("cannot report '{state}' to the service manager: {e}");
    }
}

/// How often to tell the manager the process is alive (half its `WatchdogSec=`), if it
/// asks.
pub fn watchdog_interval() -> Option<Duration> {
    let pid_ok = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (pid_ok && usec > 0).then(|| Duration::from_micros(usec / 2))
}
