//! The network modes, built inside namespaces: veth pairs stand in for VM NICs, a namespace
//! plays the outside world, and every promise is checked both ways: what must reach does,
//! what must not does not.

mod common;

use std::process::{Child, Command};

use common::{bin, Netns};

const SERVER: &str = "import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(16)
while True:
    c, a = s.accept(); c.sendall((a[0] + '\\n').encode()); c.close()";

const CLIENT: &str = "import socket,sys
s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print(s.recv(64).decode().strip())";

/// TCP servers started in namespaces; killed when dropped.
struct Servers(Vec<Child>);

impl Servers {
    fn start(&mut self, ns: &Netns, port: u16) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "python3",
                "-c",
                SERVER,
                &port.to_string(),
            ])
            .spawn()
            .unwrap();
        self.0.push(child);
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Connects from `ns` to `ip:port`; the peer address the server saw, if it connected.
fn connect(ns: &Netns, ip: &str, port: u16) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "python3",
            "-c",
            CLIENT,
            ip,
            &port.to_string(),
        ])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A namespace standing in for a VM: one NIC plugged into `bridge` in `host`.
fn vm(host: &Netns, name: &str, bridge: &str, addr: &str, gw: Option<&str>) -> Netns {
    let ns = Netns::new(name);
    let port = format!("v{}", &ns.name[ns.name.len().saturating_sub(8)..]).replace('-', "");
    host.sh(&format!(
        "ip link add {port} type veth peer name eth0 netns {}",
        ns.name
    ));
    host.sh(&format!("ip link set {port} master {bridge} up"));
    ns.sh(&format!(
        "ip addr add {addr} dev eth0 && ip link set eth0 up"
    ));
    if let Some(gw) = gw {
        ns.sh(&format!("ip route add default via {gw}"));
    }
    ns
}

fn plugin(host: &Netns, args: &str) -> std::process::Output {
    host.try_sh(&format!("{} {args}", bin("bridge-plugin")))
}

const NETWORKS: &str = r#"
[[network]]
name = "web"
mode = "nat"
bridge = "bp-web"
address = "10.1.0.1/24"
uplink = "up0"
[[network.forward]]
proto = "tcp"
host_port = 8080
guest = "10.1.0.10"
guest_port = 80

[[network]]
name = "app"
mode = "host-only"
bridge = "bp-app"
address = "10.2.0.1/24"

[[network]]
name = "db"
mode = "host-only"
bridge = "bp-db"
address = "10.3.0.1/24"

[[network]]
name = "lab"
mode = "internal"
bridge = "bp-lab"

[[allow]]
from = "web"
to = "app"
proto = "tcp"
port = 8080

[[allow]]
from = "app"
to = "db"
proto = "tcp"
port = 5432
"#;

#[test]
fn nat_segments_default_deny_internal_and_host_only() {
    let (host, outside) = Netns::host_with_outside("host");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.toml");
    std::fs::write(&file, NETWORKS).unwrap();
    let f = file.display();

    let up = plugin(&host, &format!("net up {f}"));
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let again = plugin(&host, &format!("net up {f}"));
    assert!(
        again.status.success(),
        "up is idempotent: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    let web1 = vm(&host, "web1", "bp-web", "10.1.0.10/24", Some("10.1.0.1"));
    let app1 = vm(&host, "app1", "bp-app", "10.2.0.10/24", Some("10.2.0.1"));
    let db1 = vm(&host, "db1", "bp-db", "10.3.0.10/24", Some("10.3.0.1"));
    let lab1 = vm(&host, "lab1", "bp-lab", "10.9.0.1/24", None);
    let lab2 = vm(&host, "lab2", "bp-lab", "10.9.0.2/24", None);
    let mut servers = Servers(Vec::new());
    servers.start(&outside, 9000);
    servers.start(&web1, 80);
    servers.start(&app1, 8080);
    servers.start(&app1, 9999);
    servers.start(&db1, 5432);
    std::thread::sleep(std::time::Duration::from_millis(700));

    // NAT: web reaches the outside, masqueraded behind the host's uplink address.
    assert_eq!(
        connect(&web1, "192.0.2.2", 9000).as_deref(),
        Some("192.0.2.1")
    );
    // The outside reaches only the forwarded port.
    assert!(
        connect(&outside, "192.0.2.1", 8080).is_some(),
        "port forward 8080 -> web1:80"
    );
    assert!(connect(&outside, "192.0.2.1", 8081).is_none());
    // Segments: only the listed flows.
    assert!(
        connect(&web1, "10.2.0.10", 8080).is_some(),
        "web -> app:8080 is allowed"
    );
    assert!(
        connect(&web1, "10.2.0.10", 9999).is_none(),
        "web -> app:9999 is not"
    );
    assert!(
        connect(&web1, "10.3.0.10", 5432).is_none(),
        "web -> db is not"
    );
    assert!(
        connect(&app1, "10.3.0.10", 5432).is_some(),
        "app -> db:5432 is allowed"
    );
    assert!(
        connect(&db1, "10.2.0.10", 8080).is_none(),
        "db -> app is not"
    );
    // Host-only: the host answers, nothing is forwarded beyond.
    assert!(app1.try_sh("ping -c 1 -W 1 10.2.0.1").status.success());
    assert!(connect(&app1, "192.0.2.2", 9000).is_none());
    // Internal: VM to VM only.
    assert!(lab1.try_sh("ping -c 1 -W 2 10.9.0.2").status.success());
    assert!(!lab2.try_sh("ping -c 1 -W 1 10.1.0.1").status.success());

    // What was allowed and dropped is counted.
    let show = plugin(&host, &format!("net show {f} --json"));
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let count = |rule: &str| {
        v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == rule)
            .map(|r| r["packets"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no rule {rule}: {v}"))
    };
    assert!(count("deny from segments") > 0);
    assert!(count("allow web -> app tcp/8080") > 0);
    assert!(v["networks"][0]["up"].as_bool().unwrap());

    // down removes exactly what up made.
    host.sh("nft add table inet mine");
    let down = plugin(&host, &format!("net down {f}"));
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let tables = host.sh("nft list tables");
    assert!(
        tables.contains("inet mine") && !tables.contains("bridge_plugin"),
        "{tables}"
    );
    assert!(!host.try_sh("ip link show bp-web").status.success());
    assert!(host.try_sh("ip link show up0").status.success());
    drop(servers);
}

#[test]
fn bridged_mode_puts_guests_on_the_lan() {
    let host = Netns::new("bhost");
    let lan = Netns::new("lan");
    host.link_to(&lan, "lan0", None, "192.168.77.1/24");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.toml");
    std::fs::write(&file, "[[network]]\nname = \"lan\"\nmode = \"bridged\"\nbridge = \"bp-lan\"\nuplink = \"lan0\"\nmtu = 1500\n").unwrap();
    // A NIC the host reaches its LAN through would cut the host off as a bridge port:
    // refused, naming what it carries, with nothing changed.
    host.sh("ip addr add 192.168.77.2/24 dev lan0 && ip route add 10.77.0.0/16 via 192.168.77.1");
    let up = plugin(&host, &format!("net up {}", file.display()));
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(!up.status.success());
    assert!(
        err.contains("192.168.77.2/24") && err.contains("10.77.0.0/16 via 192.168.77.1"),
        "{err}"
    );
    assert!(host.link_json("lan0")["master"].is_null());
    assert!(!host.try_sh("ip link show bp-lan").status.success());
    host.sh("ip addr flush dev lan0");
    let up = plugin(&host, &format!("net up {}", file.display()));
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(host.link_json("lan0")["master"], "bp-lan");
    let guest = vm(&host, "bvm", "bp-lan", "192.168.77.10/24", None);
    assert!(guest.try_sh("ping -c 2 -W 2 192.168.77.1").status.success());
    assert!(plugin(&host, &format!("net down {}", file.display()))
        .status
        .success());
    assert!(!host.try_sh("ip link show bp-lan").status.success());
    assert!(host.link_json("lan0")["master"].is_null());

    // On a bridge that was there before, down takes the NIC out again and keeps the bridge.
    host.sh("ip link add bp-lan type bridge");
    assert!(plugin(&host, &format!("net up {}", file.display()))
        .status
        .success());
    assert_eq!(host.link_json("lan0")["master"], "bp-lan");
    assert!(plugin(&host, &format!("net down {}", file.display()))
        .status
        .success());
    assert!(host.link_json("lan0")["master"].is_null());
    assert!(host.try_sh("ip link show bp-lan").status.success());
}

#[test]
fn down_removes_only_what_up_made() {
    // A host bridge the file names is adopted by up, not made: down leaves it and the
    // address it had, and removes the address up added to it.
    let host = Netns::new("adopt");
    host.sh("ip link add hostbr type bridge && ip addr add 10.9.0.1/24 dev hostbr && ip link set hostbr up");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.toml");
    std::fs::write(
        &file,
        "[[network]]\nname = \"mgmt\"\nmode = \"host-only\"\nbridge = \"hostbr\"\naddress = \"10.9.1.1/24\"\n\n\
         [[network]]\nname = \"lab\"\nmode = \"internal\"\nbridge = \"bp-lab\"\n",
    )
    .unwrap();
    for _ in 0..2 {
        // Twice: a second up changes nothing, and does not make the adopted bridge ours.
        let up = plugin(&host, &format!("net up {}", file.display()));
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
    }
    let addrs = host.sh("ip -4 -o addr show dev hostbr");
    assert!(
        addrs.contains("10.9.0.1/24") && addrs.contains("10.9.1.1/24"),
        "{addrs}"
    );
    let down = plugin(&host, &format!("net down {}", file.display()));
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!host.try_sh("ip link show bp-lab").status.success());
    let addrs = host.sh("ip -4 -o addr show dev hostbr");
    assert!(
        addrs.contains("10.9.0.1/24") && !addrs.contains("10.9.1.1/24"),
        "{addrs}"
    );
    assert!(!host.sh("nft list tables").contains("bridge_plugin"));
}

#[test]
fn bad_files_and_missing_privileges_are_one_clear_line() {
    let host = Netns::new("bad");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.toml");
    std::fs::write(&file, NETWORKS.replace("uplink = \"up0\"", "")).unwrap();
    let out = plugin(&host, &format!("net up {}", file.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("network 'web'") && err.contains("needs uplink"),
        "{err}"
    );

    std::fs::write(&file, NETWORKS).unwrap();
    let out = host.try_sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all {} net up {}",
        bin("bridge-plugin"),
        file.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}

#[test]
fn a_second_file_never_replaces_another_files_rules() {
    let host = Netns::new("tbl");
    let dir = tempfile::tempdir().unwrap();
    let net = |name: &str, table: &str| {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!("{table}[[network]]\nname = \"{name}\"\nmode = \"internal\"\nbridge = \"bp-{name}\"\n"),
        )
        .unwrap();
        file.display().to_string()
    };
    let ok = |args: &str| {
        let out = plugin(&host, args);
        assert!(
            out.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let refused = |args: &str| {
        let out = plugin(&host, args);
        assert!(!out.status.success(), "{args} must be refused");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let a = net("a", "");
    ok(&format!("net up {a}"));
    // Same default table: up and down of b would remove a's rules, so both are refused.
    let b = net("b", "");
    let err = refused(&format!("net up {b}"));
    assert!(
        err.contains("inet bridge_plugin") && err.contains("(a)") && err.contains("table ="),
        "{err}"
    );
    assert!(refused(&format!("net down {b}")).contains("(a)"));
    assert!(
        !host.try_sh("ip link show bp-b").status.success(),
        "nothing of b was made"
    );
    assert!(host
        .sh("nft list table inet bridge_plugin")
        .contains("within a"));
    // With a table of its own, b lives beside a; its down leaves a's table.
    let b = net("b", "table = \"second\"\n");
    ok(&format!("net up {b}"));
    ok(&format!("net down {b}"));
    let tables = host.sh("nft list tables");
    assert!(
        tables.contains("inet bridge_plugin") && !tables.contains("inet second"),
        "{tables}"
    );
    ok(&format!("net up {a}"));
    ok(&format!("net down {a}"));
    // A table name nftables or a shell would take apart is refused before anything.
    let bad = net("c", "table = \"x; drop\"\n");
    assert!(refused(&format!("net up {bad}")).contains("table name"));
}

#[test]
fn down_takes_down_what_up_made_from_a_file_refused_since() {
    // `down` removes what `up` recorded: an edit since `up` (or a check added since) that
    // makes the file refused must not leave the networks standing.
    let host = Netns::new("edited");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("net.toml");
    let lab = "[[network]]\nname = \"lab\"\nmode = \"internal\"\nbridge = \"bp-lab\"\n";
    std::fs::write(&file, lab).unwrap();
    let up = plugin(&host, &format!("net up {}", file.display()));
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(host.try_sh("ip link show bp-lab").status.success());
    std::fs::write(&file, format!("{lab}\n{lab}")).unwrap();
    let refused = plugin(&host, &format!("net up {}", file.display()));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("two networks have this name"),
        "{err}"
    );
    let down = plugin(&host, &format!("net down {}", file.display()));
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!host.try_sh("ip link show bp-lab").status.success());
    // The table's name is still checked: it names nftables objects and the state file.
    std::fs::write(&file, format!("table = \"bad name\"\n{lab}")).unwrap();
    let bad = plugin(&host, &format!("net down {}", file.display()));
    assert!(!bad.status.success());
}
