//! Bringing a topology up (host networks, then one QEMU per VM) and down again (VMs, then
//! networks), and finding what an earlier `up` left behind.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use log::{info, warn};
use thiserror::Error;

use crate::render::{qemu_args, shell_line, Layout};
use crate::topology::Topology;

#[derive(Debug, Error)]
pub enum UpError {
    #[error("{what} {path} does not exist: {fix}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host networks: {0}")]
    Network(#[from] bridge_plugin::net::NetError),
    #[error("{0} already exist(s): another topology (or bridge-plugin net file) or the host uses it, and `down` would remove it; if an earlier `up` of this file left it, run `qemu-configs down FILE`, or choose other bridge names")]
    Taken(String),
    #[error("{0} is in use by another qemu-configs up or down of this topology")]
    Busy(PathBuf),
    #[error("cannot start {qemu} for vm {vm}: {source} (set [guest] qemu = \"PATH\")")]
    Spawn {
        vm: String,
        qemu: String,
        source: std::io::Error,
    },
    #[error("vm {vm}: QEMU exited at once ({status}): {stderr}")]
    Exited {
        vm: String,
        status: ExitStatus,
        stderr: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpError + '_ {
    move |source| UpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A topology that is up: its networks exist and its VMs run.
pub struct Running {
    topo: Topology,
    layout: Layout,
    vms: Vec<(String, Child)>,
    /// Held while up: a second `up` or a `down` of the same state folder is refused.
    _lock: fs::File,
}

/// Locks the state folder (created if needed) for one `up` or `down` at a time.
pub fn lock_state(layout: &Layout) -> Result<fs::File, UpError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&layout.state_dir)
        .map_err(io(&layout.state_dir))?;
    let path = layout.state_dir.join("lock");
    let file = fs::File::create(&path).map_err(io(&path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(UpError::Busy(layout.state_dir.clone()));
    }
    Ok(file)
}

/// Brings `topo` up. On any failure, what was already made is taken down again.
pub fn up(topo: &Topology, layout: &Layout) -> Result<Running, UpError> {
    let g = &topo.guest;
    for (what, path, fix) in [
        (
            "kernel",
            &g.kernel,
            "build the guest (vnet-guest image) or fix [guest] kernel",
        ),
        ("initrd", &g.initrd, "fix [guest] initrd"),
        ("disk", &g.disk, "fix [guest] disk"),
    ] {
        if let Some(p) = path.as_ref().filter(|p| !p.exists()) {
            return Err(UpError::Missing {
                what,
                path: p.clone(),
                fix,
            });
        }
    }
    if !layout.helper.exists() {
        return Err(UpError::Missing {
            what: "bridge helper",
            path: layout.helper.clone(),
            fix: "build qemu-bridge-plugin (cargo build -p bridge-plugin) or pass --helper PATH",
        });
    }
    let lock = lock_state(layout)?;
    let net = topo.net_file();
    // `down` removes the bridges and the table: only take over none of someone else's.
    let taken = net.existing()?;
    if !taken.is_empty() {
        return Err(UpError::Taken(taken.join(", ")));
    }
    let acl = layout.acl();
    fs::write(&acl, Layout::acl_text(topo)).map_err(io(&acl))?;

    if let Err(e) = net.up() {
        // Whatever it made before failing is ours (nothing existed): take it down again.
        let _ = net.down();
        let _ = fs::remove_file(&acl);
        return Err(e.into());
    }
    info!("{}: networks up", topo.name);
    let mut running = Running {
        topo: topo.clone(),
        layout: layout.clone(),
        vms: Vec::new(),
        _lock: lock,
    };
    for vm in &topo.vms {
        match running.start(vm) {
            Ok(child) => running.vms.push((vm.name.clone(), child)),
            Err(e) => {
                running.down();
                return Err(e);
            }
        }
    }
    // A QEMU that refuses its arguments exits within moments: report it as the cause.
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        if let Some((vm, status)) = running.exited() {
            let stderr = running.qemu_log_tail(&vm);
            running.down();
            return Err(UpError::Exited { vm, status, stderr });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(running)
}

impl Running {
    fn start(&self, vm: &crate::topology::Vm) -> Result<Child, UpError> {
        let args = qemu_args(&self.topo, vm, &self.layout);
        let qemu = &self.topo.guest.qemu;
        info!("vm {}: {}", vm.name, shell_line(qemu, &args));
        let log_path = self.qemu_log(&vm.name);
        let log = fs::File::create(&log_path).map_err(io(&log_path))?;
        let mut cmd = Command::new(qemu);
        // Its own process group: a Ctrl-C meant for `up` reaches `up`, which stops the VMs
        // in order, not every QEMU at once.
        cmd.process_group(0);
        // SAFETY: only prctl between fork and exec. The VMs end with this process even when
        // it is killed outright (its networks stay until `qemu-configs down`).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(&log_path))?)
            .stderr(log)
            .spawn()
            .map_err(|source| UpError::Spawn {
                vm: vm.name.clone(),
                qemu: qemu.clone(),
                source,
            })?;
        let pid_path = self.layout.state_dir.join(format!("{}.pid", vm.name));
        fs::write(&pid_path, child.id().to_string()).map_err(io(&pid_path))?;
        Ok(child)
    }

    fn qemu_log(&self, vm: &str) -> PathBuf {
        self.layout.state_dir.join(format!("{vm}.qemu.log"))
    }

    fn qemu_log_tail(&self, vm: &str) -> String {
        let text = fs::read_to_string(self.qemu_log(vm)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The first VM found to have exited since the last call, taken off the list.
    pub fn exited(&mut self) -> Option<(String, ExitStatus)> {
        let i = self
            .vms
            .iter_mut()
            .position(|(_, c)| matches!(c.try_wait(), Ok(Some(_))))?;
        let (name, mut child) = self.vms.remove(i);
        let status = child.wait().ok()?;
        let _ = fs::remove_file(self.layout.state_dir.join(format!("{name}.pid")));
        Some((name, status))
    }

    pub fn vm_names(&self) -> Vec<String> {
        self.vms.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Logs a VM that stopped, with why QEMU says it did.
    pub fn report_exit(&self, vm: &str, status: ExitStatus) {
        warn!(
            "vm {vm} stopped ({status}); QEMU said: {}",
            self.qemu_log_tail(vm)
        );
    }

    /// Stops every VM (QEMU gets SIGTERM, then SIGKILL after 10 s), then takes the networks
    /// down and removes the consoles' sockets.
    pub fn down(mut self) {
        for (_, child) in &self.vms {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let end = Instant::now() + Duration::from_secs(10);
        for (name, child) in &mut self.vms {
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > end {
                    warn!("vm {name}: QEMU ignored SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        clean_state(&self.topo, &self.layout);
    }
}

/// Takes the networks down and removes the consoles' sockets and pid files (logs stay).
fn clean_state(topo: &Topology, layout: &Layout) {
    if let Err(e) = topo.net_file().down() {
        warn!("{}: taking the networks down: {e}", topo.name);
    }
    for vm in &topo.vms {
        let _ = fs::remove_file(layout.console(&vm.name));
        let _ = fs::remove_file(layout.state_dir.join(format!("{}.pid", vm.name)));
    }
    let _ = fs::remove_file(layout.acl());
    info!("{}: down", topo.name);
}

/// Undoes an `up` that did not end cleanly: stops the QEMUs its pid files name (only if
/// they are still this topology's VMs), then takes the networks down.
pub fn down_leftovers(topo: &Topology, layout: &Layout) -> Result<Vec<String>, UpError> {
    let _lock = lock_state(layout)?;
    let mut stopped = Vec::new();
    for vm in &topo.vms {
        let pid_path = layout.state_dir.join(format!("{}.pid", vm.name));
        let Some(pid) = fs::read_to_string(&pid_path)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let mut cmdline = Vec::new();
        let ours = fs::File::open(format!("/proc/{pid}/cmdline"))
            .and_then(|mut f| f.read_to_end(&mut cmdline))
            .is_ok()
            && cmdline
                .split(|b| *b == 0)
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == b"-name" && w[1] == vm.name.as_bytes());
        if ours {
            // SAFETY: kill(2) on a pid whose command line names this VM.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            stopped.push(vm.name.clone());
        }
    }
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && stopped.iter().any(|vm| alive(layout, vm)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for vm in stopped.iter().filter(|vm| alive(layout, vm)) {
        warn!("vm {vm}: QEMU ignored SIGTERM for 10 s; killing it");
        if let Some(pid) = pid_of(layout, vm) {
            // SAFETY: kill(2) on the pid checked above to be this VM's QEMU.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    clean_state(topo, layout);
    Ok(stopped)
}

fn pid_of(layout: &Layout, vm: &str) -> Option<u32> {
    fs::read_to_string(layout.state_dir.join(format!("{vm}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Running, not a zombie waiting for its parent.
fn alive(layout: &Layout, vm: &str) -> bool {
    pid_of(layout, vm).is_some_and(|pid| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    })
}
