//! `ctl capture`: a port's frames, both ways, in a pcap file that tcpdump reads back.

use std::process::Command;
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame};
use integration::testbed::TestPort;
use integration::TestSwitch;
use vhost_net_backend::virtio::NetHdr;

const WAIT: Duration = Duration::from_secs(5);

fn command(sw: &TestSwitch, line: &str) -> serde_json::Value {
    serde_json::from_str(&sw.server().command(line)).expect("the reply is JSON")
}

/// What tcpdump reads in `file`: one line per frame.
fn tcpdump(file: &std::path::Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-e", "-r"])
        .arg(file)
        .output()
        .expect("tcpdump runs (apt-get install tcpdump)");
    assert!(
        out.status.success(),
        "tcpdump -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_capture_holds_what_the_port_sent_and_received_and_tcpdump_reads_it() {
    let sw = TestSwitch::start(vec![TestPort::new("a"), TestPort::new("b")], None);
    let (mut a, mut b) = (sw.attach("a"), sw.attach("b"));
    // Learned first, so that the captured frames are unicast both ways.
    let warm = udp_frame(mac(1), mac(2), 64);
    a.send(0, &NetHdr::default(), &warm).unwrap();
    b.recv(0, WAIT).expect("warm-up frame");
    let file = sw.dir.path().join("a.pcap");
    let reply = command(&sw, &format!("capture a {} count=4", file.display()));
    assert_eq!(reply["capturing"], "a", "{reply}");
    // A second capture of the same port, and bad requests, are refused.
    let again = command(&sw, &format!("capture a {}.2", file.display()));
    assert!(
        again["error"]
            .as_str()
            .unwrap_or("")
            .contains("being captured"),
        "{again}"
    );
    for (line, why) in [
        ("capture a relative.pcap", "absolute path"),
        ("capture nobody /tmp/x.pcap", "no port named 'nobody'"),
        ("capture a", "capture PORT FILE"),
    ] {
        let r = command(&sw, line);
        assert!(
            r["error"].as_str().unwrap_or("").contains(why),
            "{line}: {r}"
        );
    }
    let existing = command(&sw, &format!("capture b {}", file.display()));
    assert!(
        existing["error"].as_str().unwrap_or("").contains("exists"),
        "an existing file is never overwritten: {existing}"
    );

    // Two frames each way, the second pair 1400 bytes (over one TX buffer's head).
    for (n, len) in [(0u8, 100), (1, 1400)] {
        let out = udp_frame(mac(1), mac(2), len);
        a.send(0, &NetHdr::default(), &out).unwrap();
        assert_eq!(b.recv(0, WAIT).expect("a -> b").frame, out);
        let back = udp_frame(mac(2), mac(1), len + usize::from(n));
        b.send(0, &NetHdr::default(), &back).unwrap();
        assert_eq!(a.recv(0, WAIT).expect("b -> a").frame, back);
    }
    // Four frames: the capture ends by itself.
    let end = Instant::now() + WAIT;
    while sw
        .server()
        .datapath()
        .ports
        .by_name("a")
        .unwrap()
        .capture
        .active()
    {
        assert!(Instant::now() < end, "the capture never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = tcpdump(&file);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(
        lines[0].contains("52:54:00:00:00:01 > 52:54:00:00:00:02"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("52:54:00:00:00:02 > 52:54:00:00:00:01"),
        "{lines:#?}"
    );
    // Whole frames: the 1400-byte ones are there in full (tcpdump prints the length).
    let out = udp_frame(mac(1), mac(2), 1400);
    assert!(
        lines[2].contains(&format!("length {}", out.len())),
        "{lines:#?}"
    );
    // A frame after the end is not written.
    a.send(0, &NetHdr::default(), &out).unwrap();
    b.recv(0, WAIT).unwrap();
    assert_eq!(tcpdump(&file).len(), 4);
    // capture-stop ends one early, with a complete file.
    let second = sw.dir.path().join("b.pcap");
    command(&sw, &format!("capture b {}", second.display()));
    a.send(0, &NetHdr::default(), &out).unwrap();
    b.recv(0, WAIT).unwrap();
    let stopped = command(&sw, "capture-stop b");
    assert_eq!(stopped["stopped"], true, "{stopped}");
    let end = Instant::now() + WAIT;
    while tcpdump(&second).is_empty() {
        assert!(Instant::now() < end, "b's capture has no frame");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tcpdump(&second).len(), 1);
}
