//! A tiny guest image built from Debian packages: the cloud kernel, its virtio-net modules,
//! a static busybox, and iperf3 and ethtool with their libraries, in an initramfs whose
//! init configures the NICs from the kernel command line and then runs commands read from
//! the serial console. Built once and cached.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// What goes into an image: which Debian kernel, which modules (their dependencies are
/// found and loaded first; there is no modprobe in the image) and which host programs.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// Cache folder name under `cache_root()`.
    pub name: &'static str,
    /// The Debian metapackage naming the current kernel (`linux-image-cloud-amd64`).
    pub kernel: &'static str,
    /// Module names, loaded in this order after their dependencies.
    pub modules: Vec<&'static str>,
    /// Host programs copied in at their own paths, with their shared libraries.
    pub programs: Vec<PathBuf>,
}

impl ImageSpec {
    /// The virtio-net guest the end-to-end suites boot: the cloud kernel, its virtio-net
    /// driver, iperf3, ethtool and ping.
    pub fn virtio_net() -> ImageSpec {
        ImageSpec {
            name: "guest",
            kernel: "linux-image-cloud-amd64",
            // button and evdev: the ACPI power button, for a clean poweroff from the host.
            modules: vec!["virtio_pci", "virtio_net", "button", "evdev"],
            programs: ["/usr/bin/iperf3", "/usr/sbin/ethtool", "/usr/bin/ping"]
                .map(PathBuf::from)
                .to_vec(),
        }
    }
}

/// Bump when the image layout or init changes, so caches are rebuilt.
const IMAGE_VERSION: &str = "11";

pub const READY_MARKER: &str = "VNET-GUEST-READY";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run
dmesg -n 1
for m in MODULES; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
# The ACPI power button (QEMU's system_powerdown) powers the guest off: busybox acpid maps
# the button's key event to PWRF/00000080 under /etc/acpi.
if [ -e /lib/modules/button.ko ]; then
    mkdir -p /etc/acpi/PWRF /var/log
    printf '#!/bin/sh\nexec poweroff -f\n' > /etc/acpi/PWRF/00000080
    chmod +x /etc/acpi/PWRF/00000080
    acpid -l /run/acpid.log -p /run/acpid.pid
fi
arg() { sed -n "s/.*vnet\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
ip link set lo up
mtu=$(arg mtu)
i=0
for a in $(arg ip | tr , ' '); do
    [ -n "$mtu" ] && ip link set eth$i mtu $mtu
    ip link set eth$i up
    ip addr add $a dev eth$i
    i=$((i+1))
done
# Without vnet.ip=, every NIC asks DHCP for its address, gateway and MTU (4 tries a
# second apart; udhcpc stays in the background to renew).
if [ -z "$(arg ip)" ]; then
    cat > /run/udhcpc.sh <<'SCRIPT'
#!/bin/sh
case "$1" in
bound|renew)
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    # IPv4 only: the IPv6 addresses (link-local, SLAAC from router advertisements) are
    # the kernel's.
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] || exit 0
    # The default route goes through the first NIC; every NIC answers from its own
    # address through its own router (a table per NIC), so a reply never leaves by
    # another NIC with an address that port does not own.
    [ "$interface" = eth0 ] && ip route replace default via "${router%% *}" dev "$interface"
    t=$((100 + $(cat /sys/class/net/$interface/ifindex)))
    ip rule del from "$ip" table $t 2>/dev/null
    ip rule add from "$ip" table $t
    ip route replace "$(ip route show dev "$interface" scope link proto kernel | head -n 1 | cut -d' ' -f1)" dev "$interface" table $t
    ip route replace default via "${router%% *}" dev "$interface" table $t
    ;;
deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
esac
SCRIPT
    chmod +x /run/udhcpc.sh
    for n in /sys/class/net/eth*; do
        [ -e "$n" ] || continue
        n=${n##*/}
        udhcpc -i $n -s /run/udhcpc.sh -t 4 -T 1 -n -O mtu > /run/udhcpc.$n.log 2>&1
    done
fi
gw=$(arg gw)
[ -n "$gw" ] && ip route add default via $gw
# A command to start at boot (a service), base64-encoded so it fits one cmdline word.
run=$(arg run)
if [ -n "$run" ]; then
    echo "$run" | base64 -d > /run/vnet-run.sh
    sh /run/vnet-run.sh > /dev/null 2>&1 &
fi
if grep -q 'vnet.shell=1' /proc/cmdline; then
    echo "guest ready: $(ip -o -4 addr show | awk '{print $2, $4}' | tr '\n' ' ')(poweroff -f to leave)"
    exec setsid cttyhack sh
fi
stty -echo
echo READY
while read -r line; do eval "$line"; done
poweroff -f
"#;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{what} failed: {detail} (are the packages from ci/install-deps.sh installed?)")]
    Command { what: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Missing(String),
}

/// A bootable guest: kernel and initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Command {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where cached artefacts (guest image, unpacked QEMU 10) live: `VNET_CACHE`, or
/// `target/vnet-cache` of this workspace.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("VNET_CACHE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("vnet-cache"),
    }
}

/// Builds the virtio-net guest image under `cache_root()/guest`, or returns the cached one.
pub fn guest_image() -> Result<GuestImage, ImageError> {
    build_image(&ImageSpec::virtio_net())
}

/// Builds the image `spec` describes under `cache_root()/NAME` unless a complete one is
/// already there. Safe to call from several processes at once (a file lock serialises it).
pub fn build_image(spec: &ImageSpec) -> Result<GuestImage, ImageError> {
    let dir = &cache_root().join(spec.name);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
    };
    let stamp = dir.join("version");
    let version = format!(
        "{IMAGE_VERSION} {} {:?} {:?}",
        spec.kernel, spec.modules, spec.programs
    );
    let lock_path = dir.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    // SAFETY: flock on a file we hold open; released when `lock` is closed.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if fs::read_to_string(&stamp).ok().as_deref() == Some(version.as_str())
        && image.kernel.exists()
        && image.initrd.exists()
    {
        return Ok(image);
    }

    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_err(&work))?;
    let deb = download_kernel(&work, spec.kernel)?;
    let kx = work.join("kernel");
    run(
        "dpkg -x (kernel package)",
        Command::new("dpkg").arg("-x").arg(&deb).arg(&kx),
    )?;
    let (vmlinuz, modules) = find_kernel(&kx)?;
    fs::copy(&vmlinuz, &image.kernel).map_err(io_err(&vmlinuz))?;

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib64",
        "usr",
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "lib/modules",
    ] {
        cpio.dir(d);
    }
    let busybox = Path::new("/bin/busybox");
    // ldd fails on a static binary, which is what the image needs.
    if run("ldd /bin/busybox", Command::new("ldd").arg(busybox)).is_ok() {
        return Err(ImageError::Missing(
            "/bin/busybox is not static: install busybox-static".into(),
        ));
    }
    cpio.file("bin/busybox", &read(busybox)?, 0o755);
    let index = module_index(&modules)?;
    let mut order = Vec::new();
    for m in &spec.modules {
        resolve_module(&index, m, &mut order, 0)?;
    }
    let mut names = Vec::new();
    for name in &order {
        cpio.file(
            &format!("lib/modules/{name}.ko"),
            &read(&index[name])?,
            0o644,
        );
        names.push(name.clone());
    }
    let mut libs = std::collections::BTreeSet::new();
    for p in &spec.programs {
        let prog = p.to_string_lossy();
        if let Some(parent) = Path::new(prog.trim_start_matches('/')).parent() {
            cpio.dir_all(parent);
        }
        cpio.file(prog.trim_start_matches('/'), &read(p)?, 0o755);
        let ldd = run(&format!("ldd {prog}"), Command::new("ldd").arg(p))?;
        for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
            libs.insert(lib.to_string());
        }
    }
    for lib in &libs {
        let real = fs::canonicalize(lib).map_err(io_err(Path::new(lib)))?;
        let rel = lib.trim_start_matches('/');
        if let Some(parent) = Path::new(rel).parent() {
            cpio.dir_all(parent);
        }
        cpio.file(rel, &read(&real)?, 0o755);
    }
    let init = INIT
        .replace("MODULES", &names.join(" "))
        .replace("echo READY", &format!("echo {READY_MARKER}"));
    cpio.file("init", init.as_bytes(), 0o755);

    let tmp = dir.join("initrd.cpio.tmp");
    fs::write(&tmp, cpio.finish()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &image.initrd).map_err(io_err(&image.initrd))?;
    fs::write(&stamp, &version).map_err(io_err(&stamp))?;
    let _ = fs::remove_dir_all(&work);
    Ok(image)
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(io_err(path))
}

/// Fetches the kernel package the metapackage `meta` currently names into `work`.
fn download_kernel(work: &Path, meta: &str) -> Result<PathBuf, ImageError> {
    let deps = run(
        &format!("apt-cache depends {meta}"),
        Command::new("apt-cache").args(["depends", meta]),
    )?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            ImageError::Missing(format!(
                "{meta} names no kernel package: run apt-get update"
            ))
        })?
        .to_string();
    run(
        &format!("apt-get download {pkg}"),
        Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(work),
    )?;
    fs::read_dir(work)
        .map_err(io_err(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::Missing(format!("apt-get download {pkg} left no .deb")))
}

/// The vmlinuz and the module tree of an unpacked kernel package.
fn find_kernel(root: &Path) -> Result<(PathBuf, PathBuf), ImageError> {
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Missing("kernel package has no vmlinuz".into()))?;
    let version = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let modules = root.join("lib/modules").join(version).join("kernel");
    Ok((vmlinuz, modules))
}

/// Module name (dashes as underscores) to its file, for a kernel's module tree.
fn module_index(root: &Path) -> Result<std::collections::HashMap<String, PathBuf>, ImageError> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok())
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(stem.replace('-', "_"), p);
            }
        }
    }
    Ok(index)
}

/// A module's dependencies, from the `depends=` entry of its `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// Appends `name` to `order` after its dependencies (each once).
fn resolve_module(
    index: &std::collections::HashMap<String, PathBuf>,
    name: &str,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), ImageError> {
    let name = name.replace('-', "_");
    if order.contains(&name) {
        return Ok(());
    }
    // Built-in modules have no file: nothing to load.
    let Some(path) = index.get(&name) else {
        return if depth == 0 {
            Err(ImageError::Missing(format!(
                "kernel module {name} is not in the package"
            )))
        } else {
            Ok(())
        };
    };
    if depth > 32 {
        return Err(ImageError::Missing(format!(
            "module dependencies of {name} loop"
        )));
    }
    for dep in module_depends(&read(path)?) {
        resolve_module(index, &dep, order, depth + 1)?;
    }
    order.push(name);
    Ok(())
}

/// A `newc` cpio archive, the initramfs format the kernel unpacks.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        let mut hdr = String::from("070701");
        for f in fields {
            hdr.push_str(&format!("{f:08x}"));
        }
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    pub fn dir_all(&mut self, path: &Path) {
        let mut acc = PathBuf::new();
        for c in path.components() {
            acc.push(c);
            self.dir(&acc.to_string_lossy());
        }
    }

    pub fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF....license=GPL\0depends=dca,i2c-algo-bit\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["dca", "i2c_algo_bit"]);
        assert!(module_depends(b"license=GPL\0depends=\0").is_empty());
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("net")).unwrap();
        std::fs::write(d.path().join("net/a.ko"), b"depends=b,c\0").unwrap();
        std::fs::write(d.path().join("net/b.ko"), b"depends=c\0").unwrap();
        std::fs::write(d.path().join("c.ko"), b"depends=\0").unwrap();
        let index = module_index(d.path()).unwrap();
        let mut order = Vec::new();
        resolve_module(&index, "a", &mut order, 0).unwrap();
        assert_eq!(order, vec!["c", "b", "a"]);
        assert!(resolve_module(&index, "zz", &mut order, 0).is_err());
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir_all(Path::new("lib/x86_64-linux-gnu"));
        c.file("init", b"#!/bin/sh\n", 0o755);
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert!(out.len().is_multiple_of(4));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("lib/x86_64-linux-gnu\0"));
        assert!(text.contains("TRAILER!!!"));
        // The file's mode field: regular file 0755.
        assert!(text.contains(&format!("{:08x}", 0o100755)));
    }
}
