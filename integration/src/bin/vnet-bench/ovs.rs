//! OVS-DPDK (Debian's openvswitch-switch-dpdk) as a reference backend: a private ovsdb and
//! ovs-vswitchd in a temporary directory, a netdev bridge with two dpdkvhostuser ports
//! (their sockets A and B), one PMD thread on CPU 1; the flows either NORMAL alone, or a
//! conntrack firewall in front of NORMAL (A may open connections, replies pass).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VSWITCHD: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// What the bridge does with the frames.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OvsFlows {
    Normal,
    /// ct(table=1) for IP; new connections from A committed, established ones passed,
    /// everything else dropped; then NORMAL.
    Conntrack,
}

pub struct Ovs {
    dir: tempfile::TempDir,
    vswitchd_pid: u32,
}

fn run(dir: &Path, program: &str, args: &[&str]) -> bool {
    let mut cmd = Command::new(program);
    // SAFETY: only sched_setaffinity between fork and exec. The benchmark pins itself to
    // CPU 0; OVS must see both CPUs to put its PMD thread on CPU 1.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::CPU_SET(1, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    cmd.args(args)
        .env("OVS_RUNDIR", dir)
        .env("OVS_LOGDIR", dir)
        .env("OVS_DBDIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Ovs {
    /// None where OVS-DPDK is not installed or does not start (it needs 256 MiB of 2 MiB
    /// huge pages).
    pub fn start() -> Option<Ovs> {
        if !Path::new(VSWITCHD).exists() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().to_path_buf();
        let d = path.as_path();
        let s = |p: &str| d.join(p).display().to_string();
        let db = format!("unix:{}", s("db.sock"));
        if !run(d, "ovsdb-tool", &["create", &s("conf.db"), SCHEMA])
            || !run(
                d,
                "ovsdb-server",
                &[
                    &s("conf.db"),
                    &format!("--remote=punix:{}", s("db.sock")),
                    &format!("--pidfile={}", s("ovsdb.pid")),
                    &format!("--unixctl={}", s("ovsdb.ctl")),
                    "--detach",
                    &format!("--log-file={}", s("ovsdb.log")),
                ],
            )
        {
            return None;
        }
        // Dropped on any way out: stops what was started.
        let mut ovs = Ovs {
            dir,
            vswitchd_pid: 0,
        };
        let vsctl = |args: &[&str]| {
            let mut all = vec!["--db", db.as_str(), "--timeout=20"];
            all.extend_from_slice(args);
            run(d, "ovs-vsctl", &all)
        };
        let started = vsctl(&["--no-wait", "init"])
            && vsctl(&[
                "--no-wait",
                "set",
                "Open_vSwitch",
                ".",
                "other_config:dpdk-init=true",
                "other_config:dpdk-extra=--no-pci",
                "other_config:dpdk-socket-mem=256",
                "other_config:dpdk-lcore-mask=0x1",
                "other_config:pmd-cpu-mask=0x2",
            ])
            && run(
                d,
                VSWITCHD,
                &[
                    &db,
                    &format!("--pidfile={}", s("vswitchd.pid")),
                    &format!("--unixctl={}", s("vswitchd.ctl")),
                    "--detach",
                    &format!("--log-file={}", s("vswitchd.log")),
                ],
            );
        ovs.vswitchd_pid = read_pid(&d.join("vswitchd.pid")).unwrap_or(0);
        if !started || ovs.vswitchd_pid == 0 {
            return None;
        }
        let bridged = vsctl(&[
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=netdev",
        ]) && vsctl(&[
            "add-port",
            "br0",
            "a",
            "--",
            "set",
            "Interface",
            "a",
            "type=dpdkvhostuser",
            "ofport_request=1",
        ]) && vsctl(&[
            "add-port",
            "br0",
            "b",
            "--",
            "set",
            "Interface",
            "b",
            "type=dpdkvhostuser",
            "ofport_request=2",
        ]);
        let end = Instant::now() + Duration::from_secs(15);
        while bridged && !(d.join("a").exists() && d.join("b").exists()) {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bridged.then_some(ovs)
    }

    /// Replaces the bridge's flows.
    pub fn set_flows(&self, flows: OvsFlows) -> bool {
        let d = self.dir.path();
        let bridge = format!("unix:{}", d.join("br0.mgmt").display());
        let ofctl = |args: &[&str]| {
            let mut all = vec![args[0], bridge.as_str()];
            all.extend_from_slice(&args[1..]);
            run(d, "ovs-ofctl", &all)
        };
        if !ofctl(&["del-flows"]) {
            return false;
        }
        let rules: &[&str] = match flows {
            OvsFlows::Normal => &["priority=0,actions=NORMAL"],
            OvsFlows::Conntrack => &[
                "table=0,priority=100,arp,actions=NORMAL",
                "table=0,priority=90,ip,actions=ct(table=1)",
                "table=0,priority=0,actions=drop",
                "table=1,priority=100,ip,ct_state=+trk+new,in_port=1,actions=ct(commit),NORMAL",
                "table=1,priority=90,ip,ct_state=+trk+est,actions=NORMAL",
                "table=1,priority=0,actions=drop",
            ],
        };
        rules.iter().all(|r| ofctl(&["add-flow", r]))
    }

    pub fn sock_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> u32 {
        self.vswitchd_pid
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        let d = self.dir.path();
        for ctl in ["vswitchd.ctl", "ovsdb.ctl"] {
            let target = d.join(ctl).display().to_string();
            let _ = run(d, "ovs-appctl", &["-t", &target, "exit"]);
        }
        for pid in ["vswitchd.pid", "ovsdb.pid"]
            .iter()
            .filter_map(|p| read_pid(&d.join(p)))
        {
            let end = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: signalling a process we started (its pid from its pidfile), still
                // there after it was asked to exit.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}
