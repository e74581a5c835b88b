//! The policy stage through real vhost-user frontends: rules on IPv4 and IPv6, replies of
//! allowed flows, default deny, anti-spoofing, a full flow table, the flow log, run-time
//! rule changes and reloads, and `ctl` against the binary.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use integration::frames::{mac, BROADCAST};
use integration::testbed::{ctl, BackendProcess};
use integration::{TestSwitch, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;
use vhost_net_backend::{DropReason, MacAddr, PortConfig, SwitchConfig};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYNACK: u8 = 0x12;

/// A guest: its port, MAC and addresses (10.0.0.N, fd00::N).
#[derive(Clone, Copy)]
struct Host {
    n: u8,
}

const WEB: Host = Host { n: 1 };
const APP: Host = Host { n: 2 };
const DB: Host = Host { n: 3 };

impl Host {
    fn mac(self) -> [u8; 6] {
        mac(self.n)
    }
    fn v4(self) -> [u8; 4] {
        [10, 0, 0, self.n]
    }
    fn v6(self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = self.n;
        a
    }
}

fn ip_builder(
    from: Host,
    to: Host,
    v6: bool,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let b = PacketBuilder::ethernet2(from.mac(), to.mac());
    if v6 {
        b.ipv6(from.v6(), to.v6(), 64)
    } else {
        b.ipv4(from.v4(), to.v4(), 64)
    }
}

fn tcp(from: Host, to: Host, v6: bool, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = ip_builder(from, to, v6).tcp(sport, dport, 1000, 64000);
    if flags & SYN != 0 {
        t = t.syn();
    }
    if flags & ACK != 0 {
        t = t.ack(1);
    }
    if flags & 0x01 != 0 {
        t = t.fin();
    }
    let mut out = Vec::new();
    t.write(&mut out, &[]).unwrap();
    out
}

fn udp(from: Host, to: Host, v6: bool, sport: u16, dport: u16) -> Vec<u8> {
    udp_sized(from, to, v6, sport, dport, 32)
}

fn udp_sized(from: Host, to: Host, v6: bool, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    ip_builder(from, to, v6)
        .udp(sport, dport)
        .write(&mut out, &vec![7; payload])
        .unwrap();
    out
}

fn ping(from: Host, to: Host, v6: bool, reply: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let b = ip_builder(from, to, v6);
    match (v6, reply) {
        (false, false) => b.icmpv4_echo_request(77, 1).write(&mut out, &[1; 16]),
        (false, true) => b.icmpv4_echo_reply(77, 1).write(&mut out, &[1; 16]),
        (true, false) => b.icmpv6_echo_request(77, 1).write(&mut out, &[1; 16]),
        (true, true) => b.icmpv6_echo_reply(77, 1).write(&mut out, &[1; 16]),
    }
    .unwrap();
    out
}

/// An ARP request from `from`'s MAC claiming `sender_ip`.
fn arp(from: Host, sender_ip: [u8; 4]) -> Vec<u8> {
    let mut f = BROADCAST.to_vec();
    f.extend_from_slice(&from.mac());
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&from.mac());
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 99]);
    f
}

/// A neighbour advertisement from `from`'s link-local address claiming `target`.
fn neighbour_advert(from: Host, target: [u8; 16]) -> Vec<u8> {
    let mut ll = [0u8; 16];
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[15] = from.n;
    let all_nodes = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(from.mac(), [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(ll, all_nodes, 255)
        .icmpv6_raw(136, 0, [0x20, 0, 0, 0])
        .write(&mut out, &target)
        .unwrap();
    out
}

const RULES: &str = r#"
[[rule]]
name = "web-app"
action = "allow"
from = "web"
to = "app"
proto = "tcp"
ports = 8080

[[rule]]
name = "app-db"
action = "allow"
from = "app"
to = "db"
proto = "udp"
ports = "5432-5433"

[[rule]]
name = "ping-db"
action = "allow"
from = "web"
to = "db"
proto = ["icmp"]
"#;

fn three_tier(text: &str) -> SwitchConfig {
    let mut c = SwitchConfig::from_toml(text).expect("policy parses");
    c.rules.push(vhost_net_backend::config::RuleConfig {
        name: Some("ping6-db".into()),
        action: vhost_net_backend::config::Action::Allow,
        from: vhost_net_backend::config::policy::OneOrMany::One("web".into()),
        to: vhost_net_backend::config::policy::OneOrMany::One("db".into()),
        proto: Some(vhost_net_backend::config::policy::OneOrMany::One(
            "icmpv6".into(),
        )),
        ports: None,
        rate: None,
    });
    c.ports = tier_ports();
    c
}

fn tier_ports() -> Vec<PortConfig> {
    [(WEB, "web"), (APP, "app"), (DB, "db")]
        .iter()
        .map(|(h, g)| PortConfig {
            name: format!("{g}1"),
            mac: Some(MacAddr(h.mac())),
            groups: vec![g.to_string()],
            addresses: vec![IpAddr::from(h.v4()), IpAddr::from(h.v6())],
            ..Default::default()
        })
        .collect()
}

fn send(d: &mut VirtioNetDevice, frame: &[u8]) {
    d.send(0, &NetHdr::default(), frame).unwrap();
}

#[track_caller]
fn arrives(d: &mut VirtioNetDevice, frame: &[u8], what: &str) {
    let got = d
        .recv(0, WAIT)
        .unwrap_or_else(|| panic!("{what}: nothing arrived"));
    assert_eq!(got.frame, frame, "{what}: another frame arrived");
}

#[track_caller]
fn nothing(d: &mut VirtioNetDevice, what: &str) {
    if let Some(f) = d.recv(0, QUIET) {
        panic!("{what}: a frame of {} bytes passed", f.frame.len());
    }
}

#[test]
fn rules_allow_one_way_with_replies_and_deny_the_rest_on_ipv4_and_ipv6() {
    let sw = TestSwitch::start_config(three_tier(RULES));
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));
    let mut denied = [0u64; 3];
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let port = 40000 + u16::from(v6);
        // web -> app tcp/8080 is allowed, and so are its replies.
        let f = tcp(WEB, APP, v6, port, 8080, SYN);
        send(&mut web, &f);
        arrives(&mut app, &f, &format!("{fam} web->app SYN"));
        let f = tcp(APP, WEB, v6, 8080, port, SYNACK);
        send(&mut app, &f);
        arrives(&mut web, &f, &format!("{fam} app->web SYN-ACK"));
        let f = tcp(WEB, APP, v6, port, 8080, ACK);
        send(&mut web, &f);
        arrives(&mut app, &f, &format!("{fam} web->app ACK"));
        // The other way round as a new connection, another port, another tier: denied.
        send(&mut app, &tcp(APP, WEB, v6, port, 8080, SYN));
        nothing(&mut web, &format!("{fam} app->web SYN"));
        send(&mut web, &tcp(WEB, APP, v6, port + 10, 22, SYN));
        send(&mut web, &tcp(WEB, DB, v6, port, 8080, SYN));
        nothing(&mut app, &format!("{fam} web->app tcp/22"));
        nothing(&mut db, &format!("{fam} web->db tcp/8080"));
        denied[0] += 2;
        denied[1] += 1;

        // app -> db udp/5432-5433 with its replies; db may not start a flow to app.
        let f = udp(APP, DB, v6, 50000, 5433);
        send(&mut app, &f);
        arrives(&mut db, &f, &format!("{fam} app->db udp/5433"));
        let f = udp(DB, APP, v6, 5433, 50000);
        send(&mut db, &f);
        arrives(&mut app, &f, &format!("{fam} db->app reply"));
        send(&mut db, &udp(DB, APP, v6, 5433, 50001));
        nothing(&mut app, &format!("{fam} db->app new flow"));
        send(&mut app, &udp(APP, DB, v6, 50000, 5434));
        nothing(&mut db, &format!("{fam} app->db udp/5434"));
        denied[2] += 1;
        denied[1] += 1;

        // web may ping db, and gets the echo reply; db may not ping web.
        let f = ping(WEB, DB, v6, false);
        send(&mut web, &f);
        arrives(&mut db, &f, &format!("{fam} web->db echo request"));
        let f = ping(DB, WEB, v6, true);
        send(&mut db, &f);
        arrives(&mut web, &f, &format!("{fam} db->web echo reply"));
        send(&mut db, &ping(DB, WEB, v6, false));
        nothing(&mut web, &format!("{fam} db->web echo request"));
        denied[2] += 1;
    }
    for (port, n) in ["web1", "app1", "db1"].iter().zip(denied) {
        assert_eq!(
            sw.counters(port).drop_count(DropReason::PolicyDenied),
            n,
            "{port}'s denied frames"
        );
    }
    let rules: serde_json::Value = serde_json::from_str(&sw.server().command("rules")).unwrap();
    assert_eq!(rules["rules"][0]["name"], "web-app");
    assert_eq!(
        rules["rules"][0]["hits"], 2,
        "one flow each family: {rules}"
    );
    assert_eq!(rules["rules"][0]["packets"], 6);
    let flows: serde_json::Value =
        serde_json::from_str(&sw.server().command("flows port=web1 proto=tcp")).unwrap();
    let flows = flows["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 2);
    assert!(
        flows.iter().all(|f| f["state"] == "established"),
        "{flows:?}"
    );
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let sw = TestSwitch::start_config(three_tier(RULES));
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));
    // ARP for its own address reaches everyone; claiming app's address reaches no one.
    let own = arp(WEB, WEB.v4());
    send(&mut web, &own);
    arrives(&mut app, &own, "ARP from web's own address");
    arrives(&mut db, &own, "ARP from web's own address");
    send(&mut web, &arp(WEB, APP.v4()));
    nothing(&mut app, "ARP claiming app's address");
    // An allowed flow, but from an address web does not own, or from another MAC.
    let mut other_ip = tcp(WEB, APP, false, 40000, 8080, SYN);
    other_ip[14 + 15] = 9;
    send(&mut web, &other_ip);
    let mut other_mac = tcp(WEB, APP, false, 40001, 8080, SYN);
    other_mac[11] = 9;
    send(&mut web, &other_mac);
    let v6_other = tcp(Host { n: 9 }, APP, true, 40002, 8080, SYN);
    let mut v6_other = v6_other;
    v6_other[6..12].copy_from_slice(&WEB.mac());
    send(&mut web, &v6_other);
    nothing(&mut app, "spoofed TCP");
    // Neighbour advertisements: its own address passes, app's does not.
    let na = neighbour_advert(WEB, WEB.v6());
    send(&mut web, &na);
    arrives(&mut app, &na, "NA for web's own address");
    arrives(&mut db, &na, "NA for web's own address");
    send(&mut web, &neighbour_advert(WEB, APP.v6()));
    nothing(&mut app, "NA claiming app's address");
    nothing(&mut db, "NA claiming app's address");
    assert_eq!(sw.counters("web1").drop_count(DropReason::SpoofedIp), 5);
}

#[test]
fn a_port_that_used_its_share_of_flows_cannot_open_more_and_others_still_can() {
    let sw = TestSwitch::start_config(three_tier(
        "[policy]\nmax_flows_per_port = 3\n[[rule]]\naction = \"allow\"\nproto = \"udp\"\n",
    ));
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));
    for sport in 0..3 {
        let f = udp(WEB, APP, false, 1000 + sport, 53);
        send(&mut web, &f);
        arrives(&mut app, &f, "a flow within the share");
    }
    send(&mut web, &udp(WEB, APP, false, 2000, 53));
    nothing(&mut app, "a flow past the share");
    let f = udp(APP, DB, false, 3000, 53);
    send(&mut app, &f);
    arrives(&mut db, &f, "another port's new flow");
    let f = udp(WEB, APP, false, 1000, 53);
    send(&mut web, &f);
    arrives(&mut app, &f, "a tracked flow of the full port");
    let stats: serde_json::Value = serde_json::from_str(&sw.server().command("stats")).unwrap();
    assert_eq!(stats["flows_refused_port_full"], 1, "{stats}");
    assert_eq!(stats["flows"], 4);
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn wait_for_line(
    path: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(l) = read_lines(path).into_iter().find(|l| pred(l)) {
            return l;
        }
        assert!(
            Instant::now() < end,
            "no {what} in the flow log: {:?}",
            read_lines(path)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_flow_log_shows_allowed_flows_and_aggregated_denials() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flows.log");
    let sw = TestSwitch::start_config(three_tier(&format!(
        "[policy]\nflow_log = \"{}\"\nflow_log_interval_secs = 1\n{RULES}",
        log.display()
    )));
    let (mut web, mut app) = (sw.attach("web1"), sw.attach("app1"));
    let handshake = [
        (true, SYN),
        (false, SYNACK),
        (true, ACK),
        (true, ACK),
        (true, ACK),
    ];
    for (from_web, flags) in handshake {
        if from_web {
            let f = tcp(WEB, APP, false, 41000, 8080, flags);
            send(&mut web, &f);
            arrives(&mut app, &f, "allowed flow");
        } else {
            let f = tcp(APP, WEB, false, 8080, 41000, flags);
            send(&mut app, &f);
            arrives(&mut web, &f, "its reply");
        }
    }
    for sport in 0..7 {
        send(&mut app, &tcp(APP, WEB, false, 42000 + sport, 22, SYN));
    }
    nothing(&mut web, "denied SYNs");
    let allowed = wait_for_line(&log, "allowed flow", |l| l["dport"] == 8080);
    assert_eq!(allowed["verdict"], "allow");
    assert_eq!(allowed["rule"], "web-app");
    assert_eq!(allowed["src_port"], "web1");
    assert_eq!(allowed["dst_port"], "app1");
    assert_eq!(allowed["src_groups"][0], "web");
    assert_eq!(allowed["src"], "10.0.0.1");
    assert_eq!(allowed["proto"], "tcp");
    assert_eq!(
        (
            allowed["packets"].as_u64(),
            allowed["packets_back"].as_u64()
        ),
        (Some(4), Some(1))
    );
    assert_eq!(allowed["tcp_flags"], "SYN,ACK");
    let denied = wait_for_line(&log, "denied attempts", |l| l["verdict"] == "deny");
    assert_eq!(denied["src_port"], "app1");
    assert_eq!(denied["dport"], 22);
    assert_eq!(
        denied["packets"], 7,
        "one line for the seven SYNs: {denied}"
    );
    assert_eq!(denied["rule"], "default");
    // At shutdown each tracked flow gets its last line.
    drop(web);
    drop(app);
    let mut sw = sw;
    sw.server.take().unwrap().stop();
    let ended: Vec<_> = read_lines(&log)
        .into_iter()
        .filter(|l| l["event"] == "end")
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
}

#[test]
fn rules_change_at_run_time_and_a_bad_reload_keeps_the_running_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, RULES).unwrap();
    let sw = TestSwitch::start_config(three_tier(RULES));
    let read_again = file.clone();
    let ports = sw.config.ports.clone();
    sw.server().set_reloader(Box::new(move || {
        let mut c = three_tier(&std::fs::read_to_string(&read_again).map_err(|e| e.to_string())?);
        c.ports = ports.clone();
        Ok(c)
    }));
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));

    // app -> db traffic flows on while the rules change.
    fn stream(
        (app, db): (&mut VirtioNetDevice, &mut VirtioNetDevice),
        n: u16,
        sw: &TestSwitch,
        change: Option<&str>,
    ) {
        for i in 0..n {
            let f = udp(APP, DB, false, 50000, 5432);
            send(app, &f);
            if i == n / 2 {
                if let Some(c) = change {
                    let reply = sw.server().command(c);
                    assert!(reply.contains("\"ok\":true"), "{c}: {reply}");
                }
            }
            arrives(db, &f, "app->db during a change");
        }
    }
    stream(
        (&mut app, &mut db),
        20,
        &sw,
        Some("rule-add at=1 name=ssh action=allow from=app to=web proto=tcp ports=22"),
    );
    let f = tcp(APP, WEB, false, 43000, 22, SYN);
    send(&mut app, &f);
    arrives(&mut web, &f, "ssh after rule-add");
    stream((&mut app, &mut db), 20, &sw, Some("rule-remove ssh"));
    send(&mut app, &tcp(APP, WEB, false, 43000, 22, ACK));
    nothing(&mut web, "the ssh flow after its rule went");
    send(&mut app, &tcp(APP, WEB, false, 43001, 22, SYN));
    nothing(&mut web, "a new ssh flow after its rule went");

    // A file with an error: refused with where and why, the running rules stay.
    std::fs::write(&file, RULES.replace("to = \"db\"", "to = \"dbb\"")).unwrap();
    let e = sw.server().reload().unwrap_err();
    assert!(
        e.contains("rule 2 'app-db' (line 10, column 1)") && e.contains("'dbb'"),
        "{e}"
    );
    stream((&mut app, &mut db), 10, &sw, None);
    let f = tcp(WEB, APP, false, 44000, 8080, SYN);
    send(&mut web, &f);
    arrives(&mut app, &f, "web->app after the refused reload");
    // A good file: applied.
    std::fs::write(&file, RULES.replace("ports = 8080", "ports = 8081")).unwrap();
    sw.server().reload().unwrap();
    send(&mut web, &tcp(WEB, APP, false, 44001, 8080, SYN));
    nothing(&mut app, "tcp/8080 after the reload");
    let f = tcp(WEB, APP, false, 44002, 8081, SYN);
    send(&mut web, &f);
    arrives(&mut app, &f, "tcp/8081 after the reload");
    assert_eq!(sw.counters("db1").drop_count(DropReason::NoRxBuffer), 0);

    // A port's groups at run time: db joins web, and may now reach app on 8081.
    let reply = sw.server().command("port-set db1 groups=db,web");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let f = tcp(DB, APP, false, 45000, 8081, SYN);
    send(&mut db, &f);
    arrives(&mut app, &f, "db as a member of web");
    for (cmd, needle) in [
        ("rule-add action=maybe", "action 'maybe'"),
        ("rule-move nosuch 1", "no rule named or numbered 'nosuch'"),
        ("port-set nosuch groups=a", "no port named 'nosuch'"),
        ("launch", "unknown command 'launch'"),
    ] {
        let reply = sw.server().command(cmd);
        assert!(reply.contains(needle), "{cmd}: {reply}");
    }
}

#[test]
fn ctl_shows_rules_and_sighup_reloads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (config, control) = (
        dir.path().join("switch.toml"),
        dir.path().join("control.sock"),
    );
    let socket = |n: &str| -> PathBuf { dir.path().join(format!("{n}.sock")) };
    let write = |rules: &str| {
        let mut text = format!("control_socket = \"{}\"\n", control.display());
        for (n, g) in [("web1", "web"), ("app1", "app"), ("db1", "db")] {
            text.push_str(&format!(
                "[[port]]\nname = \"{n}\"\nsocket = \"{}\"\ngroups = [\"{g}\"]\n",
                socket(n).display()
            ));
        }
        std::fs::write(&config, format!("{text}{rules}")).unwrap();
    };
    write(RULES);
    let mut backend = BackendProcess::start(
        vec!["--config".into(), config.display().to_string()],
        vec![control.clone()],
        dir.path().join("backend.log"),
    );
    let out = ctl(&control, &["rules"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("policy on, default deny"), "{text}");
    assert!(
        text.contains("web-app") && text.contains("allow web -> app tcp 8080"),
        "{text}"
    );

    // A broken file on SIGHUP: logged, the rules stay.
    write("[[rule]]\naction = \"allow\"\nfrom = \"nowhere\"\n");
    let pid = backend.pid();
    integration::netns::sh(&format!("kill -HUP {pid}"));
    let end = Instant::now() + WAIT;
    while !std::fs::read_to_string(&backend.log)
        .unwrap()
        .contains("the running policy stays")
    {
        assert!(Instant::now() < end, "no reload error in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&backend.log).unwrap();
    assert!(log.contains("from 'nowhere' is not a group"), "{log}");
    let out = ctl(&control, &["--json", "rules"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), 3);
    // A good one: applied.
    write("[[rule]]\naction = \"allow\"\nfrom = \"app\"\n");
    integration::netns::sh(&format!("kill -HUP {pid}"));
    let end = Instant::now() + WAIT;
    loop {
        let out = ctl(&control, &["--json", "rules"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["rules"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < end, "the new rules never came: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Options after the command are options: a table before, JSON now.
    for command in ["rules", "flows", "stats"] {
        let out = ctl(&control, &[command, "--json"]);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Result<serde_json::Value, _> = serde_json::from_slice(&out.stdout);
        assert!(
            v.is_ok(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The rule has no name: removed by the one `rules` shows for it.
    let out = ctl(&control, &["rules"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("rule1"));
    let out = ctl(&control, &["rule-remove", "rule1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&control, &["--json", "rules"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), 0);
    // Errors exit non-zero, naming the problem.
    let out = ctl(&control, &["rule-remove", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule named or numbered 'nosuch'"));
    assert!(backend.stop(), "clean exit");
}

/// Sends `frame` from `tx` as fast as it goes for `secs`, while another thread counts what
/// `rx` receives; returns (frames, bytes) received and the seconds the sending took.
fn blast(
    tx: &mut VirtioNetDevice,
    rx: &mut VirtioNetDevice,
    frame: &[u8],
    secs: f64,
) -> (u64, u64, f64) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let counter = scope.spawn(|| {
            let (mut frames, mut bytes) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(f) = rx.recv(0, Duration::from_millis(20)) {
                    frames += 1;
                    bytes += f.frame.len() as u64;
                }
            }
            // What was in flight when the sender stopped.
            while let Some(f) = rx.recv(0, Duration::from_millis(200)) {
                frames += 1;
                bytes += f.frame.len() as u64;
            }
            (frames, bytes)
        });
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            if tx.send(0, &NetHdr::default(), frame).is_err() {
                // The TX ring is full: take back what the switch finished.
                tx.reclaim_tx(1);
            }
        }
        let took = start.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (frames, bytes) = counter.join().unwrap();
        (frames, bytes, took)
    })
}

#[track_caller]
fn within_5_percent(measured: f64, limit: f64, what: &str) {
    let ratio = measured / limit;
    println!("{what}: {measured:.0} measured, limit {limit:.0} ({ratio:.3})");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{what}: {measured:.0} against a limit of {limit:.0}"
    );
}

#[test]
fn rate_limits_hold_within_five_percent() {
    let mut config = three_tier(
        "[[rule]]\naction = \"allow\"\nproto = \"udp\"\nports = 7000\nrate = { packets_per_sec = 1500 }\n\
         [[rule]]\naction = \"allow\"\nproto = \"udp\"\n",
    );
    config.ports[0].rate_tx = Some(vhost_net_backend::config::RateConfig {
        bits_per_sec: Some(20_000_000),
        ..Default::default()
    });
    config.ports[2].rate_rx = Some(vhost_net_backend::config::RateConfig {
        packets_per_sec: Some(2000),
        ..Default::default()
    });
    let sw = TestSwitch::start_config(config);
    let secs = 2.0;
    // web sends at most 20 Mbit/s.
    let (mut web, mut app, mut db) = (sw.attach("web1"), sw.attach("app1"), sw.attach("db1"));
    let big = udp_sized(WEB, APP, false, 1, 5000, 1400);
    let (_, bytes, took) = blast(&mut web, &mut app, &big, secs);
    within_5_percent(bytes as f64 * 8.0 / took, 20e6, "web's rate_tx, bit/s");
    assert!(sw.counters("web1").drop_count(DropReason::RateLimited) > 0);
    // db receives at most 2000 packets/s, from whoever sends.
    let (frames, _, took) = blast(&mut app, &mut db, &udp(APP, DB, false, 2, 5000), secs);
    within_5_percent(frames as f64 / took, 2000.0, "db's rate_rx, packets/s");
    assert!(sw.counters("db1").drop_count(DropReason::RateLimited) > 0);
    assert_eq!(sw.counters("app1").drop_count(DropReason::RateLimited), 0);
    // The rule's rate: its flows share 1500 packets/s.
    let (frames, _, took) = blast(&mut app, &mut db, &udp(APP, DB, false, 3, 7000), secs);
    within_5_percent(frames as f64 / took, 1500.0, "the rule's rate, packets/s");
    assert!(sw.counters("app1").drop_count(DropReason::RateLimited) > 0);
}

/// Under a policy the switch decides a flow once per burst and shares the decision with
/// the flow's next frames there, also across other flows' frames; but not across a frame
/// that changed what the decision was taken on: here one that moves the destination's MAC
/// to the sender's own port, after which the flow's frames go nowhere.
#[test]
fn a_decision_shared_within_a_burst_ends_where_another_frame_moves_a_mac() {
    let mut c = SwitchConfig::from_toml(
        "[[rule]]\naction = \"allow\"\nfrom = \"web\"\nto = \"app\"\nproto = \"udp\"\n",
    )
    .unwrap();
    // No configured MACs or addresses: a MAC may move between these ports.
    c.ports = [("web1", "web"), ("app1", "app")]
        .iter()
        .map(|(name, g)| PortConfig {
            name: name.to_string(),
            groups: vec![g.to_string()],
            ..Default::default()
        })
        .collect();
    let sw = TestSwitch::start_config(c);
    let (mut web, mut app) = (sw.attach("web1"), sw.attach("app1"));
    // app's MAC learned on app's port.
    send(&mut app, &arp(APP, APP.v4()));
    arrives(&mut web, &arp(APP, APP.v4()), "app's ARP request");
    // A frame claiming app's MAC from web's port (a VM that took over an address: the MAC
    // moves).
    let claim = arp(APP, [10, 0, 0, 42]);
    let (a, b) = (
        &udp(WEB, APP, false, 40000, 2000),
        &udp(WEB, APP, false, 40001, 2000),
    );
    // Interleaved: each flow's frames after its first share its decision.
    web.send_burst(0, &[a, b, a, b, a]).unwrap();
    for (n, f) in [a, b, a, b, a].into_iter().enumerate() {
        arrives(&mut app, f, &format!("interleaved frame {n}"));
    }
    // The claim between two frames of a flow decided before it: the second is decided
    // again and goes nowhere (app's MAC is on the port it came from now).
    web.send_burst(0, &[a, &claim, a]).unwrap();
    arrives(&mut app, a, "the frame before the move");
    arrives(&mut app, &claim, "the claim, flooded");
    nothing(&mut app, "a frame to a MAC that moved to its sender's port");
}
