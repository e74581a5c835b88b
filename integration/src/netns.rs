//! Network namespaces for tests: created by the test, removed when dropped. Nothing is
//! ever created in the host's own namespace.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "bp-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Runs a shell command inside the namespace; panics unless it succeeds.
    pub fn sh(&self, cmd: &str) -> String {
        let out = self.try_sh(cmd);
        assert!(
            out.status.success(),
            "[{}] {cmd}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    /// A veth pair from this namespace (`local`, optionally addressed) to `peer`'s `eth0`
    /// (addressed `peer_addr`), both up.
    pub fn link_to(&self, peer: &Netns, local: &str, local_addr: Option<&str>, peer_addr: &str) {
        self.sh(&format!(
            "ip link add {local} type veth peer name eth0 netns {}",
            peer.name
        ));
        if let Some(a) = local_addr {
            self.sh(&format!("ip addr add {a} dev {local}"));
        }
        self.sh(&format!("ip link set {local} up"));
        peer.sh(&format!(
            "ip addr add {peer_addr} dev eth0 && ip link set eth0 up"
        ));
    }

    /// A host namespace and an "outside" one behind its uplink `up0` (192.0.2.1/24, the
    /// outside at 192.0.2.2/24).
    pub fn host_with_outside(tag: &str) -> (Netns, Netns) {
        let host = Netns::new(&format!("{tag}h"));
        let outside = Netns::new(&format!("{tag}o"));
        host.link_to(&outside, "up0", Some("192.0.2.1/24"), "192.0.2.2/24");
        (host, outside)
    }

    /// `ip -j -d link show dev NAME` as JSON.
    pub fn link_json(&self, dev: &str) -> serde_json::Value {
        let out = self.sh(&format!("ip -j -d link show dev {dev}"));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
