//! Eight ports, four senders each to a receiver of its own, 64 B frames: a thread per
//! queue pair against one pool worker (`--workers 1`), started in turn (interleaved
//! rounds, so a drift of the machine reaches both), the backend on CPU 1 as elsewhere.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::frames::{mac, udp_frame, BROADCAST};
use integration::frontend::ALL_FEATURES;
use integration::testbed::backend_binary;
use integration::{DeviceOptions, VirtioNetDevice};
use serde::Serialize;
use vhost_net_backend::virtio::{features as f, NetHdr};

pub const CASE: &str = "8 ports";
const PORTS: usize = 8;
const ROUNDS: usize = 3;

#[derive(Serialize)]
pub struct ManyPortsRun {
    /// Mpps summed over the four receivers, per round: a thread per queue pair.
    pub per_queue_mpps: Vec<f64>,
    /// The same with `--workers 1`.
    pub one_worker_mpps: Vec<f64>,
    /// Medians' ratio, one worker over a thread per queue pair.
    pub ratio: f64,
}

/// Mpps through the backend started with `extra`, for `seconds`.
fn run(extra: &[&str], seconds: f64, queue_size: u16) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sock = |i: usize| dir.path().join(format!("p{i}.sock"));
    let mut cmd = Command::new(backend_binary());
    for i in 0..PORTS {
        cmd.arg("--port")
            .arg(format!("name=p{i},socket={}", sock(i).display()));
    }
    cmd.args(extra).stderr(Stdio::null());
    super::on_cpu1(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("backend: {e}"))?;
    let result = (|| {
        let rx_opts = DeviceOptions {
            features: ALL_FEATURES & !f::MRG_RXBUF,
            queue_size,
            auto_repost: false,
            polling: true,
            hugepages: true,
            ..Default::default()
        };
        let tx_opts = DeviceOptions {
            queue_size,
            polling: true,
            hugepages: true,
            ..Default::default()
        };
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for pair in 0..PORTS / 2 {
            senders.push(VirtioNetDevice::connect_retry(
                sock(2 * pair),
                tx_opts.clone(),
            ));
            let mut r = VirtioNetDevice::connect_retry(sock(2 * pair + 1), rx_opts.clone());
            r.post_rx(0, usize::from(queue_size))
                .map_err(|e| e.to_string())?;
            receivers.push(r);
        }
        std::thread::sleep(Duration::from_millis(200));
        // Each learned, so the frames are unicast.
        for (k, (s, r)) in senders.iter_mut().zip(receivers.iter_mut()).enumerate() {
            let (from, to) = (2 * k as u8 + 1, 2 * k as u8 + 2);
            r.send(0, &NetHdr::default(), &udp_frame(mac(to), BROADCAST, 60))
                .map_err(|e| e.to_string())?;
            s.send(0, &NetHdr::default(), &udp_frame(mac(from), BROADCAST, 60))
                .map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(100));
        for (k, (s, r)) in senders.iter_mut().zip(receivers.iter_mut()).enumerate() {
            let _ = r.recv_all(0, Duration::from_millis(20));
            let _ = s.recv_all(0, Duration::from_millis(20));
            s.reclaim_tx(1);
            r.reclaim_tx(1);
            let (from, to) = (2 * k as u8 + 1, 2 * k as u8 + 2);
            s.tx_fill(0, &NetHdr::default(), &udp_frame(mac(from), mac(to), 64))
                .map_err(|e| e.to_string())?;
        }
        let start = Instant::now();
        let mut frames = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            for s in senders.iter_mut() {
                s.tx_burst(0, 256);
            }
            for r in receivers.iter_mut() {
                frames += r.rx_drain(0).0;
            }
        }
        Ok(frames as f64 / start.elapsed().as_secs_f64() / 1e6)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `ROUNDS` interleaved rounds of both; medians.
pub fn compare(seconds: f64, queue_size: u16) -> Result<ManyPortsRun, String> {
    let (mut per_queue, mut pooled) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        per_queue.push(run(&[], seconds, queue_size)?);
        pooled.push(run(&["--workers", "1"], seconds, queue_size)?);
    }
    let ratio = match (
        super::median(per_queue.clone()),
        super::median(pooled.clone()),
    ) {
        (Some(a), Some(b)) if a > 0.0 => b / a,
        _ => 0.0,
    };
    Ok(ManyPortsRun {
        per_queue_mpps: per_queue,
        one_worker_mpps: pooled,
        ratio,
    })
}
