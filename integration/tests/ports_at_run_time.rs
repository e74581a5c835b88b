//! Ports added and deleted while the switch runs (`ctl port-add`, `port-del`, a reload
//! of the config file): the new port serves a guest at once, a deleted one is detached,
//! and the other ports' traffic goes on without a frame lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use integration::frames::{mac, udp_frame, BROADCAST};
use integration::testbed::{ctl, TestPort};
use integration::TestSwitch;
use vhost_net_backend::virtio::NetHdr;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn command(sw: &TestSwitch, line: &str) -> serde_json::Value {
    serde_json::from_str(&sw.server().command(line)).expect("the reply is JSON")
}

fn port_names(sw: &TestSwitch) -> Vec<String> {
    command(sw, "ports")["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn add(sw: &TestSwitch, spec: &str) {
    let reply = command(sw, &format!("port-add {spec}"));
    assert_eq!(reply["ok"], true, "port-add {spec}: {reply}");
}

#[test]
fn ports_come_and_go_while_the_others_lose_no_frame() {
    let sw = TestSwitch::start(vec![TestPort::new("a"), TestPort::new("b")], None);
    let mut a = sw.attach("a");
    let mut b = sw.attach("b");
    // a and b talk the whole time, one frame at a time, each checked at b.
    let stop = Arc::new(AtomicBool::new(false));
    let talking = stop.clone();
    let traffic = thread::spawn(move || {
        let (mut sent, mut lost) = (0u64, 0u64);
        while !talking.load(Ordering::Relaxed) {
            let frame = udp_frame(mac(1), mac(2), 100 + (sent % 1000) as usize);
            a.send(0, &NetHdr::default(), &frame).unwrap();
            match b.recv(0, WAIT) {
                Some(got) if got.frame == frame => {}
                _ => lost += 1,
            }
            sent += 1;
        }
        (sent, lost)
    });

    let sock = |n: &str| sw.socket(n).display().to_string();
    add(&sw, &format!("name=c,socket={},vlan=10", sock("c")));
    // `port add` is `port-add`.
    let reply = command(
        &sw,
        &format!("port add name=d,socket={},vlan=10", sock("d")),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(port_names(&sw), vec!["a", "b", "c", "d"]);
    let mut c = sw.attach("c");
    let mut d = sw.attach("d");
    let hello = udp_frame(mac(3), BROADCAST, 200);
    c.send(0, &NetHdr::default(), &hello).unwrap();
    assert_eq!(d.recv(0, WAIT).expect("d hears c").frame, hello);
    let reply = udp_frame(mac(4), mac(3), 300);
    d.send(0, &NetHdr::default(), &reply).unwrap();
    assert_eq!(c.recv(0, WAIT).expect("c hears d").frame, reply);

    // d deleted with its guest attached: the connection is closed, the socket removed,
    // and c's frames no longer reach it.
    let reply = command(&sw, "port del d");
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(d.sync().is_err(), "d's frontend was disconnected");
    assert!(!sw.socket("d").exists(), "d's socket is removed");
    assert_eq!(port_names(&sw), vec!["a", "b", "c"]);
    let stats = command(&sw, "stats");
    assert!(
        stats["ports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "d"),
        "{stats}"
    );

    // d again, in another VLAN: a new guest there gets nothing from c.
    add(&sw, &format!("name=d,socket={},vlan=20", sock("d")));
    let mut d = sw.attach("d");
    c.send(0, &NetHdr::default(), &hello).unwrap();
    assert!(
        d.recv(0, QUIET).is_none(),
        "VLAN 10's broadcast stays in VLAN 10"
    );
    let to_c = udp_frame(mac(5), mac(3), 100);
    d.send(0, &NetHdr::default(), &to_c).unwrap();
    assert!(c.recv(0, QUIET).is_none(), "c is in another VLAN");

    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = traffic.join().unwrap();
    assert!(sent > 50, "a and b exchanged {sent} frames");
    assert_eq!(lost, 0, "{lost} of {sent} frames between a and b lost");
}

#[test]
fn bad_port_changes_are_refused_with_the_reason_and_change_nothing() {
    let mut config = vhost_net_backend::SwitchConfig {
        max_ports: Some(3),
        ..Default::default()
    };
    for n in ["a", "b"] {
        config.ports.push(vhost_net_backend::PortConfig {
            name: n.into(),
            ..Default::default()
        });
    }
    let sw = TestSwitch::start_config(config);
    let sock = |n: &str| sw.socket(n).display().to_string();
    // What is at a path already is not replaced: a file, another program's socket.
    std::fs::write(sw.socket("file"), "not a socket").unwrap();
    let foreign = std::os::unix::net::UnixListener::bind(sw.socket("foreign")).unwrap();
    let cases = [
        (
            format!("port-add name=x,socket={}", sock("file")),
            "exists and is not a socket",
        ),
        (
            format!("port-add name=x,socket={}", sock("foreign")),
            "something listens on it already",
        ),
        (
            format!("port-add name=a,socket={}", sock("x")),
            "a port named 'a' exists",
        ),
        (
            format!("port-add name=x,socket={}", sock("a")),
            "is used by two ports",
        ),
        ("port-add name=x".to_string(), "socket"),
        (
            "port-add name=x,socket=/nonexistent/dir/x.sock".to_string(),
            "/nonexistent/dir/x.sock",
        ),
        ("port-del nobody".to_string(), "no port named 'nobody'"),
        (
            format!("port-add name=x,socket={},vlan=5000", sock("x")),
            "vlan 5000",
        ),
    ];
    for (line, why) in &cases {
        let reply = command(&sw, line);
        let e = reply["error"].as_str().unwrap_or_default();
        assert!(e.contains(why), "{line}: {reply}");
    }
    assert_eq!(port_names(&sw), vec!["a", "b"]);
    assert_eq!(
        std::fs::read_to_string(sw.socket("file")).unwrap(),
        "not a socket"
    );
    assert!(sw.socket("foreign").exists());
    drop(foreign);
    // One place is left: the first port added takes it, the next is told max_ports.
    add(&sw, &format!("name=x,socket={}", sock("x")));
    let reply = command(&sw, &format!("port-add name=y,socket={}", sock("y")));
    let e = reply["error"].as_str().unwrap_or_default();
    assert!(e.contains("max_ports is 3"), "{reply}");
    assert!(!sw.socket("y").exists());
    // The ports still work.
    let mut a = sw.attach("a");
    let mut x = sw.attach("x");
    let f = udp_frame(mac(1), BROADCAST, 64);
    a.send(0, &NetHdr::default(), &f).unwrap();
    assert_eq!(x.recv(0, WAIT).expect("x is switched").frame, f);
}

#[test]
fn sighup_applies_the_ports_of_the_file_and_ctl_adds_more() {
    use integration::testbed::BackendProcess;
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let (config, control) = (
        dir.path().join("switch.toml"),
        dir.path().join("control.sock"),
    );
    let socket = |n: &str| dir.path().join(format!("{n}.sock"));
    let write = |names: &[&str]| {
        let mut text = format!("control_socket = \"{}\"\n", control.display());
        for n in names {
            text.push_str(&format!(
                "[[port]]\nname = \"{n}\"\nsocket = \"{}\"\n",
                socket(n).display()
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    write(&["a", "b"]);
    let mut backend = BackendProcess::start(
        vec!["--config".into(), config.display().to_string()],
        vec![control.clone(), socket("a"), socket("b")],
        dir.path().join("backend.log"),
    );
    let names = || {
        let out = ctl(&control, &["--json", "ports"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // b leaves the file, c comes: SIGHUP applies both.
    write(&["a", "c"]);
    integration::netns::sh(&format!("kill -HUP {}", backend.pid()));
    let end = Instant::now() + WAIT;
    while names() != ["a", "c"] {
        assert!(
            Instant::now() < end,
            "the file's ports never came: {:?}",
            names()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(socket("c").exists() && !socket("b").exists());
    // The command line adds one more.
    let spec = format!("name=d,socket={}", socket("d").display());
    let out = ctl(&control, &["port", "add", &spec]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(socket("d").exists());
    // A guest on the new port is switched to one on a port of the file.
    let mut c = integration::VirtioNetDevice::connect_retry(socket("c"), Default::default());
    let mut d = integration::VirtioNetDevice::connect_retry(socket("d"), Default::default());
    c.post_rx(0, 16).unwrap();
    d.post_rx(0, 16).unwrap();
    let f = udp_frame(mac(7), BROADCAST, 80);
    let end = Instant::now() + WAIT;
    loop {
        d.send(0, &NetHdr::default(), &f).unwrap();
        if c.recv(0, Duration::from_millis(100))
            .is_some_and(|g| g.frame == f)
        {
            break;
        }
        assert!(Instant::now() < end, "c never heard d");
    }
    let out = ctl(&control, &["port-del", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no port named 'nosuch'"));
    drop((c, d));
    assert!(backend.stop(), "clean exit");
    for n in ["a", "c", "d"] {
        assert!(!socket(n).exists(), "{n}'s socket is removed at exit");
    }
}

#[test]
fn a_reload_whose_new_port_cannot_listen_applies_the_rest_and_keeps_the_rules_coherent() {
    // The file adds port x, in a directory that does not exist, with the only group a new
    // rule names: x is left out (the error says why) and the rule with it; a and b stay.
    let sw = TestSwitch::start(vec![TestPort::new("a"), TestPort::new("b")], None);
    let mut text = String::new();
    for n in ["a", "b"] {
        text.push_str(&format!(
            "[[port]]\nname = \"{n}\"\nsocket = \"{}\"\n",
            sw.socket(n).display()
        ));
    }
    text.push_str(
        "[[port]]\nname = \"x\"\nsocket = \"/nonexistent/dir/x.sock\"\ngroups = [\"newtier\"]\n\
         [[rule]]\naction = \"allow\"\nfrom = \"newtier\"\n",
    );
    let next = vhost_net_backend::SwitchConfig::from_toml(&text).unwrap();
    assert_eq!(next.rules.len(), 1);
    sw.server().set_reloader(Box::new(move || Ok(next.clone())));
    let reply = command(&sw, "reload");
    let e = reply["error"].as_str().unwrap_or_default();
    assert!(e.contains("/nonexistent/dir/x.sock"), "{reply}");
    assert_eq!(port_names(&sw), vec!["a", "b"]);
    let rules = command(&sw, "rules");
    assert_eq!(rules["rules"].as_array().unwrap().len(), 0, "{rules}");
    // The switch still works, and a good change after it applies.
    let mut a = sw.attach("a");
    let mut b = sw.attach("b");
    let f = udp_frame(mac(1), BROADCAST, 90);
    a.send(0, &NetHdr::default(), &f).unwrap();
    assert_eq!(b.recv(0, WAIT).expect("a -> b").frame, f);
    add(&sw, &format!("name=y,socket={}", sw.socket("y").display()));
    assert_eq!(port_names(&sw), vec!["a", "b", "y"]);
}
