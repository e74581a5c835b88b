//! DPDK's testpmd as a foreign vhost-user frontend: two virtio-user ports (DPDK's virtio PMD
//! speaking vhost-user, as a DPDK application in a VM drives its NICs) connected to two
//! sockets of a backend, forwarding each other's frames (`mac` forwarding: what one port
//! receives leaves by the other with its own source MAC and the peer's as destination, so a
//! learning switch sees every MAC on one port only).
//!
//! Frames are injected once (`start tx_first`) and then circulate: A's frames come back
//! through B and go out again, so the figure is how fast backend and frontend together turn
//! them, with both directions busy. testpmd measures the rate itself (`show port stats`
//! over the interval between two calls) and, with `--record-core-cycles`, the forwarding
//! core's busy cycles per frame, which says whether the frontend was the bottleneck.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The installed DPDK's plug-in drivers (Debian's dpdk 22.11 packages).
pub const DPDK_PMDS: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// The MACs of the two virtio-user ports.
pub const PORT_MACS: [&str; 2] = ["02:64:70:64:6b:0a", "02:64:70:64:6b:0b"];

/// How each virtio-user port is set up (its devargs).
#[derive(Clone, Debug)]
pub struct VirtioUser {
    pub queue_size: u16,
    /// Ask for VIRTIO_F_IN_ORDER (the PMD's cheaper ring paths when the backend offers it).
    pub in_order: bool,
    pub mrg_rxbuf: bool,
    /// Ask for packed virtqueues (a backend without them gives split rings).
    pub packed_vq: bool,
    /// Queue pairs, each forwarded by a stream of its own; with more than one, the frames
    /// injected are of many flows (`--txonly-multi-flow`), so a backend spreading flows
    /// over the RX queues gives each of them some.
    pub queues: u16,
    /// The PMD listens on the socket and the backend connects (`server=1`; QEMU's
    /// `server=on`), rather than the other way round.
    pub server: bool,
}

impl Default for VirtioUser {
    /// What the measurements used: 1024-entry rings, in order, no mergeable RX.
    fn default() -> Self {
        VirtioUser {
            queue_size: 1024,
            in_order: true,
            mrg_rxbuf: false,
            packed_vq: false,
            queues: 1,
            server: false,
        }
    }
}

/// One forwarding run.
#[derive(Clone, Debug)]
pub struct ForwardRun {
    pub frame_bytes: usize,
    /// From the first frames until the first counter reading.
    pub warmup: Duration,
    /// Between the two counter readings.
    pub measure: Duration,
    /// CPU of the forwarding core; testpmd's main thread takes the other.
    pub forwarding_cpu: usize,
    /// Distinct per process that may run at the same time (DPDK's runtime files).
    pub file_prefix: String,
}

/// One port's counters at the end of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    /// Received frames a second over the measured interval.
    pub rx_pps: u64,
}

/// One forwarding stream's count: frames it took from an RX queue.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamStats {
    pub rx_port: usize,
    pub rx_queue: usize,
    pub rx_packets: u64,
}

#[derive(Clone, Debug)]
pub struct ForwardResult {
    pub ports: Vec<PortStats>,
    /// The streams that received frames, as `stop` last reported them (testpmd reports
    /// them stream by stream only with more than one per port).
    pub streams: Vec<StreamStats>,
    /// The forwarding core's busy cycles per frame (idle polls excluded) and its clock.
    pub cycles_per_frame: Option<(f64, f64)>,
    /// testpmd's whole output, for a failure message.
    pub output: String,
}

impl ForwardResult {
    /// The last `lines` lines of testpmd's output, for a failure message.
    pub fn tail(&self, lines: usize) -> String {
        let mut last: Vec<&str> = self.output.lines().rev().take(lines).collect();
        last.reverse();
        last.join("\n")
    }

    /// Frames a second, both ports' receive rates summed.
    pub fn mpps(&self) -> f64 {
        self.ports.iter().map(|p| p.rx_pps as f64).sum::<f64>() / 1e6
    }

    /// The forwarding core's busy time per frame.
    pub fn frontend_ns_per_frame(&self) -> Option<f64> {
        self.cycles_per_frame
            .map(|(cycles, mhz)| cycles * 1000.0 / mhz)
    }

    /// The share of the measured interval the forwarding core was busy: near 1, the
    /// frontend bounds the rate; well below, it waited for the backend (it polls in
    /// between, and testpmd counts polls that found nothing as idle).
    pub fn frontend_busy(&self) -> Option<f64> {
        self.frontend_ns_per_frame()
            .map(|ns| ns * self.mpps() / 1000.0)
    }
}

/// Whether testpmd and DPDK's virtio PMD are installed.
pub fn available() -> bool {
    Path::new(DPDK_PMDS).join("librte_net_virtio.so").exists()
        && Command::new("dpdk-testpmd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

/// Connects two virtio-user ports to `sockets`, forwards for `run`, and returns testpmd's
/// counters. An error names what failed, with testpmd's output.
pub fn forward(
    sockets: [&Path; 2],
    dev: &VirtioUser,
    run: &ForwardRun,
) -> Result<ForwardResult, String> {
    forward_across(sockets, dev, run, None)
}

/// The same, with `event` (a backend restarted, say) run once the frames circulate; then,
/// a warm-up later, frames are injected again (those in flight at the event may be lost)
/// and the rates measured after it.
pub fn forward_across(
    sockets: [&Path; 2],
    dev: &VirtioUser,
    run: &ForwardRun,
    event: Option<&mut dyn FnMut()>,
) -> Result<ForwardResult, String> {
    let other_cpu = if run.forwarding_cpu == 0 { 1 } else { 0 };
    let mut cmd = Command::new("dpdk-testpmd");
    cmd.arg("-l")
        .arg(format!(
            "{},{}",
            run.forwarding_cpu.min(other_cpu),
            run.forwarding_cpu.max(other_cpu)
        ))
        .arg("--main-lcore")
        .arg(other_cpu.to_string())
        .args(["--no-huge", "-m", "512", "--no-pci", "--file-prefix"])
        .arg(&run.file_prefix)
        .arg("-d")
        .arg(format!("{DPDK_PMDS}/librte_mempool_ring.so"))
        .arg("-d")
        .arg(format!("{DPDK_PMDS}/librte_net_virtio.so"));
    for (i, sock) in sockets.iter().enumerate() {
        cmd.arg("--vdev").arg(format!(
            "net_virtio_user{i},path={},server={},queues={},queue_size={},in_order={},mrg_rxbuf={},packed_vq={},mac={}",
            sock.display(),
            u8::from(dev.server),
            dev.queues,
            dev.queue_size,
            u8::from(dev.in_order),
            u8::from(dev.mrg_rxbuf),
            u8::from(dev.packed_vq),
            PORT_MACS[i],
        ));
    }
    cmd.args([
        "--",
        "-i",
        "--nb-cores=1",
        "--total-num-mbufs=32768",
        "--record-core-cycles",
    ])
    .args(
        (dev.queues > 1)
            .then(|| {
                [
                    format!("--rxq={}", dev.queues),
                    format!("--txq={}", dev.queues),
                    "--txonly-multi-flow".to_string(),
                ]
            })
            .into_iter()
            .flatten(),
    )
    .arg(format!("--eth-peer=0,{}", PORT_MACS[1]))
    .arg(format!("--eth-peer=1,{}", PORT_MACS[0]))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("dpdk-testpmd does not start: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    // testpmd's stdout is block-buffered into the pipe: read whole at the end.
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut say = |line: &str| {
        let _ = stdin.write_all(format!("{line}\n").as_bytes());
        let _ = stdin.flush();
    };
    // The ports connect before the prompt; their links come up once the backend has set
    // up the rings, which may be after testpmd's own start.
    std::thread::sleep(Duration::from_millis(1500));
    if run.frame_bytes > MBUF_DATA {
        // Jumbo frames: the ports' MTU raised (with the ports stopped, as testpmd wants),
        // and each frame sent as a chain of mbufs, so a chain of TX descriptors.
        say("port stop all");
        for port in 0..2 {
            say(&format!("port config mtu {port} {}", run.frame_bytes));
        }
        say("port start all");
        std::thread::sleep(Duration::from_millis(1000));
    }
    say("set fwd mac");
    say(&format!("set txpkts {}", tx_segments(run.frame_bytes)));
    say("start tx_first 16");
    std::thread::sleep(run.warmup);
    if let Some(event) = event {
        event();
        std::thread::sleep(run.warmup);
        say("stop");
        say("start tx_first 16");
        std::thread::sleep(run.warmup);
    }
    say("show port stats all");
    std::thread::sleep(run.measure);
    say("show port stats all");
    say("stop");
    say("quit");
    drop(stdin);
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = reader.join().unwrap_or_default();
    if status.is_none() {
        return Err(format!("dpdk-testpmd did not quit within 20 s:\n{output}"));
    }
    let output = without_echo(&output);
    let ports = port_stats(&output);
    if ports.len() != 2 {
        return Err(format!("no port counters in testpmd's output:\n{output}"));
    }
    Ok(ForwardResult {
        ports,
        streams: stream_stats(&output),
        cycles_per_frame: cycles_per_frame(&output),
        output,
    })
}

/// Data bytes of one of testpmd's default mbufs.
const MBUF_DATA: usize = 2048;

/// `set txpkts`'s argument for frames of `bytes`: one mbuf's worth a segment.
fn tx_segments(bytes: usize) -> String {
    let mut left = bytes;
    let mut parts = Vec::new();
    while left > 0 {
        let n = left.min(MBUF_DATA);
        parts.push(n.to_string());
        left -= n;
    }
    parts.join(",")
}

/// testpmd's output without its prompts and the echo of the commands typed: those are
/// written unbuffered, the rest is buffered and flushed in blocks, so an echo can land
/// inside a line of counters, even inside a number ("cycles/packet=7testpmd> quit\r\n3.41").
fn without_echo(output: &str) -> String {
    let mut out = String::with_capacity(output.len());
    let mut rest = output;
    while let Some(i) = rest.find("testpmd> ") {
        out.push_str(&rest[..i]);
        rest = rest[i..].split_once('\n').map_or("", |(_, after)| after);
    }
    out.push_str(rest);
    out
}

/// The last counter block of each port in testpmd's output.
fn port_stats(output: &str) -> Vec<PortStats> {
    let mut ports: Vec<PortStats> = Vec::new();
    for block in output.split("NIC statistics for port ").skip(1) {
        let Some(port) = block
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<usize>().ok())
        else {
            continue;
        };
        let stats = PortStats {
            rx_packets: field(block, "RX-packets:"),
            rx_bytes: field(block, "RX-bytes:"),
            tx_packets: field(block, "TX-packets:"),
            rx_errors: field(block, "RX-errors:"),
            rx_pps: field(block, "Rx-pps:"),
        };
        if ports.len() <= port {
            ports.resize(port + 1, PortStats::default());
        }
        ports[port] = stats;
    }
    ports
}

/// "Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 1/Queue= 1" blocks: the last one of
/// each RX queue.
fn stream_stats(output: &str) -> Vec<StreamStats> {
    let number = |s: &str| -> Option<usize> {
        s.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut streams: Vec<StreamStats> = Vec::new();
    for block in output.split("Forward Stats for RX Port=").skip(1) {
        let Some((port, rest)) = block.split_once("/Queue=") else {
            continue;
        };
        let (Some(rx_port), Some(rx_queue)) = (number(port), number(rest)) else {
            continue;
        };
        let stream = StreamStats {
            rx_port,
            rx_queue,
            rx_packets: field(block, "RX-packets:"),
        };
        match streams
            .iter_mut()
            .find(|s| (s.rx_port, s.rx_queue) == (rx_port, rx_queue))
        {
            Some(s) => *s = stream,
            None => streams.push(stream),
        }
    }
    streams
}

fn field(block: &str, name: &str) -> u64 {
    block
        .split(name)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// "CPU cycles/packet=127.96 (total cycles=... / total mac packets=...) at 2600 MHz Clock";
/// the echo of a command typed meanwhile may sit inside the line (it is written unbuffered).
fn cycles_per_frame(output: &str) -> Option<(f64, f64)> {
    let rest = output
        .rsplit("CPU cycles/packet=")
        .next()
        .filter(|r| r.len() < output.len())?;
    let number = |s: &str| -> Option<f64> {
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        s[..end].parse().ok()
    };
    let cycles = number(rest)?;
    let clock = rest.find(") at ").map(|i| &rest[i + 5..])?;
    let mhz = number(clock).filter(|_| clock.contains(" MHz"))?;
    Some((cycles, mhz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_cycles_are_read_from_the_last_blocks() {
        let out = "  ######################## NIC statistics for port 0  ########################
  RX-packets: 5          RX-missed: 0          RX-bytes:  320
  RX-errors: 0
  TX-packets: 7          TX-errors: 0          TX-bytes:  448
  Rx-pps:            1          Rx-bps:            0
  ######################## NIC statistics for port 1  ########################
  RX-packets: 6          RX-missed: 0          RX-bytes:  320
  RX-errors: 2
  TX-packets: 8          TX-errors: 0          TX-bytes:  448
  Rx-pps:            3          Rx-bps:            0
  ######################## NIC statistics for port 0  ########################
  RX-packets: 1223072    RX-missed: 0          RX-bytes:  78276608
  RX-errors: 0
  TX-packets: 1206688    TX-errors: 0          TX-bytes:  77228032
  Rx-pps:      2889829          Rx-bps:   1479592888
  CPU cycles/packet=22testpmd> quit\r
6.53 (total cycles=12450727095 / total mac packets=54962080) at 2600 MHz Clock
";
        let out = &without_echo(out);
        let ports = port_stats(out);
        assert_eq!(ports[0].rx_packets, 1223072);
        assert_eq!(ports[0].rx_bytes, 78276608);
        assert_eq!(ports[0].rx_pps, 2889829);
        assert_eq!(ports[1].rx_errors, 2);
        assert_eq!(ports[1].tx_packets, 8);
        assert_eq!(cycles_per_frame(out), Some((226.53, 2600.0)));
        let result = ForwardResult {
            ports,
            streams: Vec::new(),
            cycles_per_frame: cycles_per_frame(out),
            output: String::new(),
        };
        // 2.89 + 0.000003 Mpps at 226.53 cycles (87.1 ns) a frame: 25 % busy.
        let busy = result.frontend_busy().expect("cycles were read");
        assert!((busy - 0.2518).abs() < 0.001, "{busy}");
    }

    #[test]
    fn jumbo_frames_are_sent_as_chains_of_whole_mbufs() {
        assert_eq!(tx_segments(64), "64");
        assert_eq!(tx_segments(2048), "2048");
        assert_eq!(tx_segments(9000), "2048,2048,2048,2048,808");
    }

    #[test]
    fn each_rx_queues_last_stream_count_is_read() {
        let out = "
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 10             TX-packets: 10             TX-dropped: 0
  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 1/Queue= 1 -------
  RX-packets: 20             TX-packets: 20             TX-dropped: 0
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 1/Queue= 0 -------
  RX-packets: 4063872        TX-packets: 4063904        TX-dropped: 0
  RX-bursts : 663338 [80% of 0 pkts + 20% of 32 pkts]
";
        let stream = |rx_port, rx_queue, rx_packets| StreamStats {
            rx_port,
            rx_queue,
            rx_packets,
        };
        assert_eq!(
            stream_stats(out),
            vec![stream(0, 0, 4063872), stream(0, 1, 20)]
        );
    }
}
