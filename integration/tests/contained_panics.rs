//! A panic in the datapath (a bug, injected here through the `fault-injection` hooks)
//! costs the port it happened on, never the others. Its own test binary: the hooks are
//! process-wide.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame, BROADCAST};
use integration::testbed::TestPort;
use integration::{TestSwitch, VirtioNetDevice};
use vhost_net_backend::fault;
use vhost_net_backend::virtio::NetHdr;
use vhost_net_backend::DropReason;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn send(d: &mut VirtioNetDevice, frame: &[u8]) {
    d.send(0, &NetHdr::default(), frame).unwrap();
}

fn arrives(d: &mut VirtioNetDevice, frame: &[u8], what: &str) {
    let end = Instant::now() + WAIT;
    loop {
        match d.recv(0, end.saturating_duration_since(Instant::now())) {
            Some(got) if got.frame == frame => return,
            Some(_) => continue,
            None => panic!("{what}: nothing arrived"),
        }
    }
}

#[test]
fn a_panic_delivering_to_a_port_or_in_its_worker_costs_that_port_only() {
    let sw = TestSwitch::start(
        vec![TestPort::new("a"), TestPort::new("b"), TestPort::new("c")],
        None,
    );
    let (mut a, mut b, mut c) = (sw.attach("a"), sw.attach("b"), sw.attach("c"));
    let id = |n: &str| -> u32 { sw.server().datapath().ports.by_name(n).unwrap().id.into() };

    // Every delivery to c panics, inside c's ring lock.
    fault::PANIC_DELIVERING_TO.store(id("c") + 1, Ordering::Relaxed);
    let hello = udp_frame(mac(1), BROADCAST, 100);
    send(&mut a, &hello);
    arrives(&mut b, &hello, "b, beside c, gets a's broadcast");
    assert!(c.recv(0, QUIET).is_none());
    for n in 0..5 {
        let f = udp_frame(mac(1), mac(2), 200 + n);
        send(&mut a, &f);
        arrives(&mut b, &f, "a -> b goes on");
        let f = udp_frame(mac(2), mac(1), 300 + n);
        send(&mut b, &f);
        arrives(&mut a, &f, "b -> a goes on");
    }
    let from_c = udp_frame(mac(3), mac(1), 120);
    send(&mut c, &from_c);
    arrives(&mut a, &from_c, "c still sends");
    assert!(sw.counters("c").drop_count(DropReason::InternalError) >= 1);
    assert!(fault::caught_count() >= 1);
    // The bug gone, c receives again: its ring was not poisoned.
    fault::PANIC_DELIVERING_TO.store(0, Ordering::Relaxed);
    let again = udp_frame(mac(1), BROADCAST, 140);
    send(&mut a, &again);
    arrives(&mut c, &again, "c, after the contained panics");

    // a's own TX worker panics: a's connection is reset, b and c go on.
    fault::PANIC_IN_TX_OF.store(id("a") + 1, Ordering::Relaxed);
    send(&mut a, &udp_frame(mac(1), mac(2), 160));
    let end = Instant::now() + WAIT;
    while a.sync().is_ok() {
        assert!(Instant::now() < end, "a's connection was not reset");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sw.counters("a").drop_count(DropReason::InternalError) >= 1);
    for n in 0..5 {
        let f = udp_frame(mac(2), mac(3), 200 + n);
        send(&mut b, &f);
        arrives(&mut c, &f, "b -> c goes on");
        let f = udp_frame(mac(3), mac(2), 300 + n);
        send(&mut c, &f);
        arrives(&mut b, &f, "c -> b goes on");
    }
    // a's guest connects again and is switched as before.
    fault::PANIC_IN_TX_OF.store(0, Ordering::Relaxed);
    drop(a);
    let mut a = VirtioNetDevice::connect_retry(sw.socket("a"), Default::default());
    a.post_rx(0, 64).unwrap();
    let end = Instant::now() + WAIT;
    let f = udp_frame(mac(1), mac(2), 180);
    loop {
        send(&mut a, &f);
        if b.recv(0, Duration::from_millis(100))
            .is_some_and(|g| g.frame == f)
        {
            break;
        }
        assert!(Instant::now() < end, "a never came back");
    }
}
