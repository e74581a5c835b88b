//! Ports in client mode: the frontend listens (QEMU with `server=on`, libvirt's
//! `mode='server'`), the switch connects, and connects again after a restart.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame, BROADCAST};
use integration::{TestSwitch, VirtioNetDevice};
use vhost_net_backend::virtio::NetHdr;
use vhost_net_backend::{PortConfig, PortMode, Server, SwitchConfig};

const WAIT: Duration = Duration::from_secs(5);

/// Sends `frame` from `from` until `to` gets it (the port's workers pick up its queues
/// asynchronously after the handshake).
fn exchange(from: &mut VirtioNetDevice, to: &mut VirtioNetDevice, frame: &[u8]) {
    let end = Instant::now() + WAIT;
    loop {
        from.send(0, &NetHdr::default(), frame).unwrap();
        if to
            .recv(0, Duration::from_millis(50))
            .is_some_and(|g| g.frame == frame)
        {
            return;
        }
        assert!(Instant::now() < end, "the frame never arrived");
    }
}

#[test]
fn a_client_port_connects_to_the_frontend_and_again_after_a_switch_restart() {
    let config = SwitchConfig {
        ports: vec![
            PortConfig {
                name: "a".into(),
                ..Default::default()
            },
            PortConfig {
                name: "q".into(),
                mode: PortMode::Client,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut sw = TestSwitch::start_config(config);
    // The switch started before the frontend listens: it keeps trying.
    std::thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(sw.socket("q")).unwrap();
    let mut q = VirtioNetDevice::accept(&listener, Default::default(), WAIT)
        .expect("the switch connects to the frontend's socket");
    q.post_rx(0, 64).unwrap();
    let mut a = sw.attach("a");
    exchange(&mut a, &mut q, &udp_frame(mac(1), BROADCAST, 100));
    exchange(&mut q, &mut a, &udp_frame(mac(2), mac(1), 200));
    let ports: serde_json::Value = serde_json::from_str(&sw.server().command("ports")).unwrap();
    let q_row = ports["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "q")
        .cloned()
        .unwrap();
    assert_eq!(q_row["mode"], "client", "{ports}");
    assert_eq!(q_row["connected"], true, "{ports}");
    assert_eq!(
        q_row["socket"].as_str(),
        Some(sw.socket("q").to_str().unwrap()),
        "{ports}"
    );

    // The switch restarts: it connects again to the socket the frontend kept.
    sw.server.take().unwrap().stop();
    assert!(
        sw.socket("q").exists(),
        "the frontend's socket is not ours to remove"
    );
    let restarted = Instant::now();
    sw.server = Some(Server::start(&sw.config).expect("switch starts again"));
    let mut q = VirtioNetDevice::accept(&listener, Default::default(), WAIT)
        .expect("the restarted switch connects again");
    eprintln!(
        "client port reconnected {} ms after the switch started again",
        restarted.elapsed().as_millis()
    );
    q.post_rx(0, 64).unwrap();
    let mut a = sw.attach("a");
    exchange(&mut a, &mut q, &udp_frame(mac(1), BROADCAST, 300));

    // The frontend goes away and comes back (QEMU restarted): served again.
    drop(q);
    drop(listener);
    std::fs::remove_file(sw.socket("q")).unwrap();
    let listener = UnixListener::bind(sw.socket("q")).unwrap();
    let mut q = VirtioNetDevice::accept(&listener, Default::default(), WAIT)
        .expect("the switch connects to the new frontend");
    q.post_rx(0, 64).unwrap();
    exchange(&mut a, &mut q, &udp_frame(mac(1), BROADCAST, 400));
}

#[test]
fn client_mode_refuses_socket_ownership_settings() {
    let spec = "name=q,socket=/tmp/q.sock,mode=client,socket_mode=0660";
    let mut config = SwitchConfig::default();
    config.ports.push(PortConfig::parse_spec(spec).unwrap());
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("in mode client QEMU creates the socket"), "{e}");
    let e = PortConfig::parse_spec("name=q,socket=/tmp/q.sock,mode=listen")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mode 'listen' is not server or client"), "{e}");
}
