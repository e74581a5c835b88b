//! Launches QEMU guests with vhost-user NICs and runs commands in them over the serial
//! console.
//!
//! Version facts the launcher knows: QEMU 7.2 (Debian 12) crashes under TCG as soon as a
//! vhost-user virtio-net device starts with MSI-X, so there the NICs get `vectors=0`
//! (legacy INTx); QEMU 9.2 and later spell the chardev reconnect option `reconnect-ms`.
//! `VNET_QEMU=7.2` or `VNET_QEMU=10` selects that version: the system QEMU if it is that
//! version, else the one `ci/install-deps.sh` unpacked beside it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::guest_image::{cache_root, GuestImage, READY_MARKER};

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("the system QEMU is not {0} and none is unpacked at {1}: run ci/install-deps.sh (it unpacks the version the system lacks there)")]
    NotUnpacked(String, PathBuf),
    #[error("VNET_QEMU={0}: expected 7.2, 10 or system")]
    UnknownVersion(String),
    #[error("cannot tell the version of {0} from '{1}'")]
    Version(String, String),
    #[error("guest {name} did not {what} within {secs} s; console so far:\n{console}")]
    Timeout {
        name: String,
        what: String,
        secs: u64,
        console: String,
    },
    #[error("guest {0}: QEMU exited: {1}\n{2}")]
    Exited(String, String, String),
    #[error("guest {0}: console write failed: {1}")]
    Console(String, std::io::Error),
}

/// Hardware acceleration to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A QEMU binary and how to run it.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: PathBuf,
    pub version: (u32, u32),
    /// Module and firmware folders of an unpacked QEMU.
    pub module_dir: Option<PathBuf>,
    pub data_dirs: Vec<PathBuf>,
}

impl Qemu {
    /// The QEMU chosen by `VNET_QEMU`: unset or `system` for the system QEMU, `7.2` or `10`
    /// for that version.
    pub fn from_env() -> Result<Qemu, QemuError> {
        match std::env::var("VNET_QEMU").ok().as_deref() {
            None | Some("") | Some("system") => Self::system(),
            Some(v) => Self::version(v),
        }
    }

    /// The `qemu-system-x86_64` on PATH.
    pub fn system() -> Result<Qemu, QemuError> {
        Self::at(PathBuf::from("qemu-system-x86_64"), None, Vec::new())
    }

    /// QEMU `7.2` or `10`: the system one if it is that version, else the one unpacked
    /// under the cache.
    pub fn version(name: &str) -> Result<Qemu, QemuError> {
        let wanted = match name {
            "7.2" => (7, Some(2)),
            "10" => (10, None),
            _ => return Err(QemuError::UnknownVersion(name.to_string())),
        };
        let matches = |v: (u32, u32)| v.0 == wanted.0 && wanted.1.is_none_or(|m| v.1 == m);
        if let Ok(system) = Self::system() {
            if matches(system.version) {
                return Ok(system);
            }
        }
        let root = cache_root().join(format!("qemu{name}"));
        match Self::unpacked(&root)? {
            Some(q) if matches(q.version) => Ok(q),
            _ => Err(QemuError::NotUnpacked(name.to_string(), root)),
        }
    }

    /// A QEMU unpacked with `dpkg -x` into `root`, if there is one.
    fn unpacked(root: &Path) -> Result<Option<Qemu>, QemuError> {
        let binary = root.join("usr/bin/qemu-system-x86_64");
        if !binary.exists() {
            return Ok(None);
        }
        // Its own firmware first, then the system's seabios (bios-256k.bin), iPXE option
        // ROMs (its own links to them point inside the unpacked tree) and data.
        let data = vec![
            root.join("usr/share/qemu"),
            PathBuf::from("/usr/share/seabios"),
            PathBuf::from("/usr/lib/ipxe/qemu"),
            PathBuf::from("/usr/share/qemu"),
        ];
        Self::at(
            binary,
            Some(root.join("usr/lib/x86_64-linux-gnu/qemu")),
            data,
        )
        .map(Some)
    }

    fn at(
        binary: PathBuf,
        module_dir: Option<PathBuf>,
        data_dirs: Vec<PathBuf>,
    ) -> Result<Qemu, QemuError> {
        let name = binary.display().to_string();
        let mut cmd = Command::new(&binary);
        if let Some(m) = &module_dir {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        let out = cmd
            .arg("--version")
            .output()
            .map_err(|e| QemuError::Spawn(name.clone(), e))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let version = parse_version(&text).ok_or_else(|| QemuError::Version(name, text.clone()))?;
        Ok(Qemu {
            binary,
            version,
            module_dir,
            data_dirs,
        })
    }

    /// QEMU 7.x crashes under TCG with MSI-X on vhost-user NICs.
    pub fn needs_intx(&self, accel: Accel) -> bool {
        accel == Accel::Tcg && self.version < (8, 0)
    }

    fn reconnect_option(&self) -> &'static str {
        if self.version >= (9, 2) {
            "reconnect-ms=1000"
        } else {
            "reconnect=1"
        }
    }

    /// A command for this QEMU with its module and firmware folders set.
    pub fn command(&self) -> Command {
        self.command_in(None, &[])
    }

    /// The same, run inside a network namespace and through a wrapper program.
    pub fn command_in(&self, netns: Option<&str>, wrapper: &[String]) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        argv.extend(wrapper.iter().map(Into::into));
        argv.push(self.binary.clone().into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if let Some(m) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        for d in &self.data_dirs {
            cmd.arg("-L").arg(d);
        }
        // An unpacked QEMU would probe the host's audio backends through modules it lacks;
        // `-audio none` without a model is accepted from 8.2 on.
        if self.version >= (8, 2) && self.module_dir.is_some() {
            cmd.args(["-audio", "none"]);
        }
        cmd
    }
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// One NIC of a guest: a vhost-user socket of the switch.
#[derive(Clone, Debug)]
pub struct Nic {
    pub backend: NicBackend,
    pub mac: [u8; 6],
    pub queues: u16,
}

/// Where a NIC's frames go.
#[derive(Clone, Debug)]
pub enum NicBackend {
    /// A vhost-user socket of the switch.
    VhostUser(PathBuf),
    /// A vhost-user socket QEMU listens on (`server=on`), for a switch port in client mode.
    VhostUserServer(PathBuf),
    /// A tap on a kernel bridge, made by a bridge helper (`-netdev bridge`).
    Bridge { bridge: String, helper: String },
    /// A `-netdev` with this id that the command's `wrapper` adds (multi-queue taps).
    Provided(String),
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub name: String,
    pub nics: Vec<Nic>,
    /// Address (CIDR) of each NIC, in order.
    pub addrs: Vec<String>,
    pub mtu: Option<u16>,
    pub mem_mb: u32,
    pub cpus: u32,
    /// An interactive shell on the console instead of the command loop (for people).
    pub shell: bool,
    /// Network namespace to run QEMU in.
    pub netns: Option<String>,
    /// A program QEMU is started through (it gets QEMU's command line as its arguments).
    pub wrapper: Vec<String>,
    /// QEMU machine type (`pc`, or `q35` for PCIe devices such as igb with SR-IOV).
    pub machine: String,
    /// More QEMU arguments (devices), and more kernel command-line words.
    pub extra_args: Vec<String>,
    pub kernel_args: String,
}

impl GuestSpec {
    pub fn new(name: &str, socket: &Path, mac_last: u8, addr: &str) -> GuestSpec {
        GuestSpec {
            name: name.to_string(),
            nics: vec![Nic {
                backend: NicBackend::VhostUser(socket.to_path_buf()),
                mac: [0x52, 0x54, 0x00, 0x00, 0x00, mac_last],
                queues: 1,
            }],
            addrs: vec![addr.to_string()],
            mtu: None,
            mem_mb: 256,
            cpus: 1,
            shell: false,
            netns: None,
            wrapper: Vec::new(),
            machine: "pc".into(),
            extra_args: Vec::new(),
            kernel_args: String::new(),
        }
    }
}

/// The full QEMU argument list for a guest.
pub fn guest_args(qemu: &Qemu, accel: Accel, image: &GuestImage, spec: &GuestSpec) -> Vec<String> {
    let mem = spec.mem_mb;
    let mut args: Vec<String> = vec![
        "-machine".into(),
        format!("{},accel={}", spec.machine, accel.name()),
        "-cpu".into(),
        if accel == Accel::Kvm { "host" } else { "max" }.into(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        image.kernel.display().to_string(),
        "-initrd".into(),
        image.initrd.display().to_string(),
    ];
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
    if !spec.addrs.is_empty() {
        cmdline.push_str(&format!(" vnet.ip={}", spec.addrs.join(",")));
    }
    if let Some(mtu) = spec.mtu {
        cmdline.push_str(&format!(" vnet.mtu={mtu}"));
    }
    if spec.shell {
        cmdline.push_str(" vnet.shell=1");
    }
    if !spec.kernel_args.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&spec.kernel_args);
    }
    args.push("-append".into());
    args.push(cmdline);
    for (i, nic) in spec.nics.iter().enumerate() {
        let m = nic.mac;
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        let mut dev = format!("virtio-net-pci,netdev=net{i},mac={mac}");
        match &nic.backend {
            NicBackend::VhostUser(socket) | NicBackend::VhostUserServer(socket) => {
                let side = match &nic.backend {
                    NicBackend::VhostUserServer(_) => "server=on,wait=off",
                    _ => qemu.reconnect_option(),
                };
                args.push("-chardev".into());
                args.push(format!("socket,id=chr{i},path={},{side}", socket.display()));
                args.push("-netdev".into());
                args.push(format!(
                    "vhost-user,id=net{i},chardev=chr{i},queues={}",
                    nic.queues
                ));
                if nic.queues > 1 {
                    dev.push_str(",mq=on");
                }
                if qemu.needs_intx(accel) {
                    dev.push_str(",vectors=0");
                } else {
                    dev.push_str(&format!(",vectors={}", 2 * nic.queues + 2));
                }
            }
            NicBackend::Provided(id) => {
                dev = format!("virtio-net-pci,netdev={id},mac={mac}");
                if nic.queues > 1 {
                    dev.push_str(&format!(",mq=on,vectors={}", 2 * nic.queues + 2));
                }
            }
            NicBackend::Bridge { bridge, helper } => {
                // QemuOpts: a comma inside a value is written twice.
                args.push("-netdev".into());
                args.push(format!(
                    "bridge,id=net{i},br={bridge},helper={}",
                    helper.replace(',', ",,")
                ));
            }
        }
        if let Some(mtu) = spec.mtu {
            dev.push_str(&format!(",host_mtu={mtu}"));
        }
        args.push("-device".into());
        args.push(dev);
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

static ACCEL: OnceLock<Accel> = OnceLock::new();

/// KVM when `/dev/kvm` boots our guest quickly, TCG otherwise (on our machines /dev/kvm
/// exists but hangs stock kernels). `VNET_ACCEL=kvm|tcg` skips the probe.
pub fn detect_accel(qemu: &Qemu, image: &GuestImage) -> Accel {
    *ACCEL.get_or_init(|| match std::env::var("VNET_ACCEL").ok().as_deref() {
        Some("kvm") => Accel::Kvm,
        Some("tcg") => Accel::Tcg,
        _ => {
            if !Path::new("/dev/kvm").exists() {
                return Accel::Tcg;
            }
            let spec = GuestSpec {
                name: "kvm-probe".into(),
                nics: Vec::new(),
                addrs: Vec::new(),
                mtu: None,
                mem_mb: 128,
                cpus: 1,
                shell: false,
                netns: None,
                wrapper: Vec::new(),
                machine: "pc".into(),
                extra_args: Vec::new(),
                kernel_args: String::new(),
            };
            match Guest::boot_with(qemu, Accel::Kvm, image, &spec, Duration::from_secs(8)) {
                Ok(g) => {
                    drop(g);
                    Accel::Kvm
                }
                Err(e) => {
                    log::info!(
                        "KVM probe failed, using TCG: {}",
                        e.to_string().lines().next().unwrap_or("")
                    );
                    Accel::Tcg
                }
            }
        }
    })
}

/// Console output collected from the guest, with a condition variable for waiters.
struct Console {
    text: Mutex<String>,
    changed: Condvar,
}

/// The result of a command run in a guest.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: i32,
    pub output: String,
}

/// A running guest. Dropping it kills QEMU if it is still running.
pub struct Guest {
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    stderr: Arc<Mutex<String>>,
    /// Where in the console text the next command's output starts.
    read_pos: usize,
}

static NONCE: AtomicU64 = AtomicU64::new(1);

impl Guest {
    /// Boots a guest and waits until its init is ready for commands.
    pub fn boot(
        qemu: &Qemu,
        accel: Accel,
        image: &GuestImage,
        spec: &GuestSpec,
    ) -> Result<Guest, QemuError> {
        let timeout = if accel == Accel::Kvm { 30 } else { 90 };
        Self::boot_with(qemu, accel, image, spec, Duration::from_secs(timeout))
    }

    fn boot_with(
        qemu: &Qemu,
        accel: Accel,
        image: &GuestImage,
        spec: &GuestSpec,
        timeout: Duration,
    ) -> Result<Guest, QemuError> {
        let mut cmd = qemu.command_in(spec.netns.as_deref(), &spec.wrapper);
        cmd.args(guest_args(qemu, accel, image, spec))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| QemuError::Spawn(qemu.binary.display().to_string(), e))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr_pipe = child.stderr.take().expect("piped");
        let console = Arc::new(Console {
            text: Mutex::new(String::new()),
            changed: Condvar::new(),
        });
        let c = console.clone();
        thread::spawn(move || {
            let mut stdout = stdout;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut text = c.text.lock().unwrap();
                // The serial line ends lines with \r\n.
                text.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
                c.changed.notify_all();
            }
            c.changed.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let e = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                let mut s = e.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut guest = Guest {
            name: spec.name.clone(),
            child,
            stdin,
            console,
            stderr,
            read_pos: 0,
        };
        let pos = guest.wait_for(READY_MARKER, 0, timeout, "boot")?;
        guest.read_pos = pos;
        Ok(guest)
    }

    /// Waits until `needle` appears in the console after `from`; returns the position after it.
    fn wait_for(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
        what: &str,
    ) -> Result<usize, QemuError> {
        let end = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        loop {
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return Ok(from + i + needle.len());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = self.stderr.lock().unwrap().clone();
                return Err(QemuError::Exited(
                    self.name.clone(),
                    status.to_string(),
                    format!("{stderr}\n{text}"),
                ));
            }
            let now = Instant::now();
            if now >= end {
                return Err(QemuError::Timeout {
                    name: self.name.clone(),
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    console: format!(
                        "{}\nQEMU stderr:\n{}",
                        tail(&text, 3000),
                        self.stderr.lock().unwrap()
                    ),
                });
            }
            let wait = (end - now).min(Duration::from_millis(200));
            text = self.console.changed.wait_timeout(text, wait).unwrap().0;
        }
    }

    /// Runs a shell command in the guest; returns its output and exit status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CmdOutput, QemuError> {
        let n = NONCE.fetch_add(1, Ordering::Relaxed);
        let start_mark = format!("@@S{n}@@");
        let end_mark = format!("@@E{n}:");
        // The markers are built by the shell so the echoed command line never matches them.
        let line =
            format!("echo @@S{n}\"@@\"; ( {command} ) </dev/null 2>&1; echo \"@@E{n}\"\":$?@@\"\n");
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|e| QemuError::Console(self.name.clone(), e))?;
        let what = format!("finish `{command}`");
        let begin = self.wait_for(&start_mark, self.read_pos, timeout, &what)?;
        let end = self.wait_for(&end_mark, begin, timeout, &what)?;
        let status_end = self.wait_for("@@", end, timeout, &what)?;
        let text = self.console.text.lock().unwrap();
        let output = text[begin..end - end_mark.len()]
            .trim_matches('\n')
            .to_string();
        let status = text[end..status_end - 2].trim().parse().unwrap_or(-1);
        drop(text);
        self.read_pos = status_end;
        Ok(CmdOutput { status, output })
    }

    /// Runs a command that must succeed; panics with its output otherwise (for tests).
    pub fn ok(&mut self, command: &str, timeout: Duration) -> String {
        match self.run(command, timeout) {
            Ok(out) if out.status == 0 => out.output,
            Ok(out) => panic!(
                "guest {}: `{command}` exited {}:\n{}",
                self.name, out.status, out.output
            ),
            Err(e) => panic!("{e}"),
        }
    }

    /// Powers the guest off and waits for QEMU to exit; kills it after `timeout`.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        let _ = self.stdin.write_all(b"poweroff -f\n");
        let _ = self.stdin.flush();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu(version: (u32, u32)) -> Qemu {
        Qemu {
            binary: "qemu-system-x86_64".into(),
            version,
            module_dir: None,
            data_dirs: Vec::new(),
        }
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            Some((7, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian)"),
            Some((10, 0))
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn arguments_follow_the_version_quirks() {
        let image = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let mut spec = GuestSpec::new("g", Path::new("/s.sock"), 1, "10.0.0.1/24");
        spec.nics[0].queues = 2;
        spec.mtu = Some(9000);
        let old = guest_args(&qemu((7, 2)), Accel::Tcg, &image, &spec).join(" ");
        assert!(old.contains("vectors=0"), "{old}");
        assert!(old.contains("reconnect=1"));
        assert!(old.contains("share=on"));
        assert!(old.contains("queues=2") && old.contains("mq=on"));
        assert!(old.contains("host_mtu=9000") && old.contains("vnet.mtu=9000"));
        let new = guest_args(&qemu((10, 0)), Accel::Tcg, &image, &spec).join(" ");
        assert!(new.contains("vectors=6"), "{new}");
        assert!(new.contains("reconnect-ms=1000"));
        let kvm = guest_args(&qemu((7, 2)), Accel::Kvm, &image, &spec).join(" ");
        assert!(kvm.contains("vectors=6") && kvm.contains("accel=kvm"));
    }
}
