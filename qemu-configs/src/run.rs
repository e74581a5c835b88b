//! Bringing a topology up (host networks, then one QEMU per VM) and down again (VMs, then
//! networks), and finding what an earlier `up` left behind.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
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
    #[error("{0}")]
    Switch(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpError + '_ {
    move |source| UpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A topology that is up: its networks exist (or its switch runs) and its VMs run.
pub struct Running {
    topo: Topology,
    layout: Layout,
    vms: Vec<(String, Child)>,
    switch: Option<Child>,
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
    if topo.on_switch() {
        return up_on_switch(topo, layout);
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
    start_vms(Running {
        topo: topo.clone(),
        layout: layout.clone(),
        vms: Vec::new(),
        switch: None,
        _lock: lock,
    })
}

/// `up` of a topology on the switch: the switch first (its config written to the state
/// folder), then the VMs on its sockets.
fn up_on_switch(topo: &Topology, layout: &Layout) -> Result<Running, UpError> {
    if !layout.switch.exists() {
        return Err(UpError::Missing {
            what: "switch",
            path: layout.switch.clone(),
            fix: "build vhost-net-backend (cargo build -p vhost-net-backend) or pass --switch PATH",
        });
    }
    let config = crate::switch::checked_config(topo, layout).map_err(UpError::Switch)?;
    let lock = lock_state(layout)?;
    let tap = topo.uplink_tap();
    if Path::new("/sys/class/net").join(&tap).exists() {
        return Err(UpError::Taken(format!("interface {tap}")));
    }
    let path = layout.switch_config();
    let text = toml::to_string(&config).map_err(|e| UpError::Switch(e.to_string()))?;
    fs::write(&path, text).map_err(io(&path))?;
    let log_path = layout.switch_log();
    let log = fs::File::create(&log_path).map_err(io(&log_path))?;
    let child = supervised(&layout.switch)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| UpError::Switch(format!("cannot start {}: {e}", layout.switch.display())))?;
    let pid_path = layout.state_dir.join("switch.pid");
    fs::write(&pid_path, child.id().to_string()).map_err(io(&pid_path))?;
    let mut running = Running {
        topo: topo.clone(),
        layout: layout.clone(),
        vms: Vec::new(),
        switch: Some(child),
        _lock: lock,
    };
    info!(
        "{}: switch starting ({}, log {})",
        topo.name,
        path.display(),
        log_path.display()
    );
    let end = Instant::now() + Duration::from_secs(15);
    while !config.ports.iter().all(|p| p.socket.exists()) || !layout.switch_control().exists() {
        if running.switch_exited().is_some() || Instant::now() > end {
            let why = tail(&log_path, 5);
            running.abort();
            return Err(UpError::Switch(format!(
                "the switch did not come up: {why}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("{}: switch up, {} ports", topo.name, config.ports.len());
    start_vms(running)
}

/// A command for a process `up` supervises (a QEMU, the switch): in its own process group,
/// so that a Ctrl-C meant for `up` reaches `up`, which stops them in order, not all at
/// once; and ending with `up` even when it is killed outright (SIGTERM on its death; what
/// they leave is for `qemu-configs down`).
fn supervised(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.process_group(0);
    // SAFETY: only prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd
}

/// The last `n` lines of a log, on one line.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts every VM of `running`; on a failure, takes everything down again.
fn start_vms(mut running: Running) -> Result<Running, UpError> {
    let topo = running.topo.clone();
    for vm in &topo.vms {
        match running.start(vm) {
            Ok(child) => running.vms.push((vm.name.clone(), child)),
            Err(e) => {
                running.abort();
                return Err(e);
            }
        }
    }
    // A QEMU that refuses its arguments exits within moments: report it as the cause.
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        if let Some((vm, status)) = running.exited() {
            let stderr = running.qemu_log_tail(&vm);
            running.abort();
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
        let child = supervised(qemu)
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
        tail(&self.qemu_log(vm), 5)
    }

    /// The switch's exit status, if it has stopped (it should not while up).
    pub fn switch_exited(&mut self) -> Option<ExitStatus> {
        self.switch.as_mut()?.try_wait().ok().flatten()
    }

    /// Why the switch stopped, from its log.
    pub fn switch_log_tail(&self) -> String {
        tail(&self.layout.switch_log(), 5)
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

    /// Stops every VM (the ACPI power button, then SIGTERM after `shutdown_secs`, then
    /// SIGKILL after 10 s more), then takes the networks down and removes the VMs' sockets.
    pub fn down(self) {
        let secs = self.topo.guest.shutdown_secs;
        self.stop(secs);
    }

    /// Undoes an `up` that failed: its guests have only begun to boot (nothing to flush,
    /// and no power button handler yet), so they get SIGTERM at once.
    fn abort(self) {
        self.stop(0);
    }

    fn stop(mut self, shutdown_secs: u64) {
        let vms: Vec<(String, u32)> = self
            .vms
            .iter()
            .map(|(name, child)| (name.clone(), child.id()))
            .collect();
        // Our children stay zombies, their pids ours, until waited for below.
        stop_vms(&self.layout, &vms, shutdown_secs);
        for (_, child) in &mut self.vms {
            let _ = child.wait();
        }
        if let Some(mut switch) = self.switch.take() {
            stop_switch(switch.id());
            let _ = switch.wait();
        }
        clean_state(&self.topo, &self.layout, &[]);
    }
}

/// Stops the QEMUs `vms` (name, pid) as a host shutting down would: each guest's ACPI power
/// button is pressed over QMP and it gets `shutdown_secs` to power off (so a guest with a
/// disk flushes it); one still running then gets SIGTERM, and SIGKILL 10 s later. With
/// `shutdown_secs` 0 no button is pressed.
fn stop_vms(layout: &Layout, vms: &[(String, u32)], shutdown_secs: u64) {
    let mut pressed = Vec::new();
    for (name, pid) in vms.iter().filter(|_| shutdown_secs > 0) {
        match press_power_button(&layout.qmp(name)) {
            Ok(()) => pressed.push(name),
            Err(e) if running(*pid) => {
                warn!("vm {name}: cannot press its power button over QMP ({e}); it gets SIGTERM")
            }
            Err(_) => {}
        }
    }
    let left = |vms: &[(String, u32)]| -> Vec<(String, u32)> {
        vms.iter()
            .filter(|(_, pid)| running(*pid))
            .cloned()
            .collect()
    };
    if !pressed.is_empty() {
        let end = Instant::now() + Duration::from_secs(shutdown_secs);
        while Instant::now() < end && !left(vms).is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let still = left(vms);
    for (name, _) in vms.iter().filter(|vm| !still.contains(vm)) {
        if pressed.contains(&name) {
            info!("vm {name}: powered off");
        }
    }
    for (name, pid) in &still {
        if pressed.contains(&name) {
            warn!("vm {name}: still running {shutdown_secs} s after its power button; sending SIGTERM");
        }
        // SAFETY: kill(2) on a pid checked to be this VM's QEMU (our child, or a leftover
        // whose command line names the VM).
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
    }
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && !left(&still).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, pid) in left(&still) {
        warn!("vm {name}: QEMU ignored SIGTERM for 10 s; killing it");
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// Presses the guest's ACPI power button through QEMU's QMP socket at `path`.
fn press_power_button(path: &Path) -> Result<(), String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let timeout = Some(Duration::from_secs(2));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let mut line = String::new();
    // The greeting, then each command's answer (events in between are skipped).
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    for command in ["qmp_capabilities", "system_powerdown"] {
        writeln!(writer, "{{\"execute\":\"{command}\"}}").map_err(|e| e.to_string())?;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return Err("QMP closed the connection".into()),
                Ok(_) if line.contains("\"return\"") => break,
                Ok(_) if line.contains("\"error\"") => return Err(line.trim().to_string()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(())
}

/// Stops the switch: SIGTERM (it removes its sockets and the host side of its uplink),
/// SIGKILL if it is still there 10 s later.
fn stop_switch(pid: u32) {
    // SAFETY: kill(2) on the switch's pid (our child, or a leftover checked to be it).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    while running(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running(pid) {
        warn!("the switch ignored SIGTERM for 10 s; killing it");
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    } else {
        info!("switch stopped");
    }
}

/// Takes the networks down and removes the consoles' sockets and pid files (logs stay) of
/// the topology's VMs and of `others` (VMs `up` started that the file no longer names).
fn clean_state(topo: &Topology, layout: &Layout, others: &[String]) {
    if topo.on_switch() {
        for nic in topo.vms.iter().flat_map(|vm| topo.nics(vm)) {
            let _ = fs::remove_file(layout.vm_socket(&nic.port));
        }
        let _ = fs::remove_file(layout.switch_control());
        let _ = fs::remove_file(layout.state_dir.join("switch.pid"));
    } else if let Err(e) = topo.net_file().down() {
        warn!("{}: taking the networks down: {e}", topo.name);
    }
    for name in topo.vms.iter().map(|vm| &vm.name).chain(others) {
        let _ = fs::remove_file(layout.console(name));
        let _ = fs::remove_file(layout.qmp(name));
        let _ = fs::remove_file(layout.state_dir.join(format!("{name}.pid")));
    }
    let _ = fs::remove_file(layout.acl());
    info!("{}: down", topo.name);
}

/// The VMs whose pid files `up` left in the state folder: also those the file no longer
/// names (renamed or removed since), which `down` must stop all the same.
fn recorded_vms(layout: &Layout) -> Vec<String> {
    let Ok(entries) = fs::read_dir(&layout.state_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".pid").map(str::to_string))
        .filter(|name| !name.is_empty() && name != "switch")
        .collect();
    names.sort();
    names
}

/// Undoes an `up` that did not end cleanly: stops the QEMUs its pid files name (the VMs of
/// the file and any other `up` recorded, each only if its process is still that VM's QEMU),
/// then takes the networks down.
pub fn down_leftovers(topo: &Topology, layout: &Layout) -> Result<Vec<String>, UpError> {
    let _lock = lock_state(layout)?;
    let others: Vec<String> = recorded_vms(layout)
        .into_iter()
        .filter(|name| !topo.vms.iter().any(|vm| &vm.name == name))
        .collect();
    let mut stopped = Vec::new();
    for name in topo.vms.iter().map(|vm| &vm.name).chain(&others) {
        let pid_path = layout.state_dir.join(format!("{name}.pid"));
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
                .any(|w| w[0] == b"-name" && w[1] == name.as_bytes());
        if ours {
            stopped.push((name.clone(), pid as u32));
        }
    }
    stop_vms(layout, &stopped, topo.guest.shutdown_secs);
    // The switch, if its pid file names a process that runs this topology's config.
    let switch_pid = fs::read_to_string(layout.state_dir.join("switch.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|w| w == layout.switch_config().as_os_str().as_encoded_bytes())
            })
        });
    if let Some(pid) = switch_pid {
        stop_switch(pid);
        stopped.push(("switch".into(), pid));
    }
    clean_state(topo, layout, &others);
    Ok(stopped.into_iter().map(|(name, _)| name).collect())
}

/// Running, not a zombie waiting for its parent.
pub fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}
