//! Prometheus metrics: the counters the switch keeps, read at each scrape and encoded by
//! `prometheus-client` (OpenMetrics text, which Prometheus reads), served over HTTP on an
//! address the operator gives (`--metrics`, `metrics_address`; loopback unless told).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::warn;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::counters::{QueueSnapshot, BURST_BUCKETS};
use crate::datapath::Datapath;
use crate::endpoint::Endpoint;
use crate::fault;

/// Reads the datapath's counters at each scrape; holds nothing else.
struct SwitchCollector(Arc<Datapath>);

impl std::fmt::Debug for SwitchCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwitchCollector")
    }
}

/// One metric family: a name, its help, and (labels, value) per series.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some(first) = series.peek() else {
        return Ok(());
    };
    let kind = first.1.metric_type();
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SwitchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dp = &self.0;
        let ports = dp.ports.in_use();
        let snapshots: Vec<_> = ports
            .iter()
            .map(|p| {
                let kind = match p.endpoint {
                    Endpoint::Tap(_) => "tap",
                    _ => "vm",
                };
                let labels = vec![("port", p.name.clone()), ("kind", kind.to_string())];
                (labels, p.counters.snapshot(), p)
            })
            .collect();
        let counter = |f: &dyn Fn(&crate::counters::CounterSnapshot) -> u64| {
            snapshots
                .iter()
                .map(|(l, s, _)| (l.clone(), ConstCounter::new(f(s))))
                .collect::<Vec<_>>()
        };
        let e = &mut encoder;
        family(
            e,
            "vnet_port_rx_packets",
            "Frames delivered to the port (to its guest, or out of the tap)",
            counter(&|s| s.rx_packets),
        )?;
        family(
            e,
            "vnet_port_rx_bytes",
            "Bytes delivered to the port",
            counter(&|s| s.rx_bytes),
        )?;
        family(
            e,
            "vnet_port_tx_packets",
            "Frames the port sent into the switch",
            counter(&|s| s.tx_packets),
        )?;
        family(
            e,
            "vnet_port_tx_bytes",
            "Bytes the port sent into the switch",
            counter(&|s| s.tx_bytes),
        )?;
        family(
            e,
            "vnet_port_dropped",
            "Frames dropped, by the port they are counted on and the reason",
            snapshots.iter().flat_map(|(l, s, _)| {
                s.drops.iter().map(move |(reason, n)| {
                    let mut labels = l.clone();
                    labels.push(("reason", reason.to_string()));
                    (labels, ConstCounter::new(*n))
                })
            }),
        )?;
        family(
            e,
            "vnet_port_connected",
            "1 when a guest is attached (always for the tap)",
            snapshots
                .iter()
                .map(|(l, _, p)| (l.clone(), ConstGauge::new(i64::from(p.connected())))),
        )?;
        family(
            e,
            "vnet_port_rx_queues",
            "RX queues the port's guest has enabled (0 for the tap)",
            snapshots
                .iter()
                .map(|(l, _, p)| (l.clone(), ConstGauge::new(p.rx_queues_published() as i64))),
        )?;
        family(
            e,
            "vnet_port_macs",
            "MAC addresses learned on the port",
            snapshots.iter().map(|(l, _, p)| {
                (
                    l.clone(),
                    ConstGauge::new(dp.switch.macs.count_of(p.id) as i64),
                )
            }),
        )?;
        // Per queue pair: its RX and TX traffic, and its worker (a thread per queue pair;
        // the tap's reader for the tap's one queue). The first pair always, others once
        // they carried something: a port offers 16, most guests use a few.
        let queues: Vec<_> = snapshots
            .iter()
            .flat_map(|(l, _, p)| {
                (0..usize::from(p.queue_pairs.max(1))).filter_map(move |q| {
                    let snapshot = p.counters.queue(q).snapshot();
                    if q > 0 && snapshot == QueueSnapshot::default() {
                        return None;
                    }
                    let mut labels = l.clone();
                    labels.push(("queue", q.to_string()));
                    Some((labels, snapshot))
                })
            })
            .collect();
        let per_queue = |f: &dyn Fn(&QueueSnapshot) -> u64| {
            queues
                .iter()
                .map(|(l, s)| (l.clone(), ConstCounter::new(f(s))))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "vnet_queue_rx_packets",
            "Frames delivered to the queue pair's RX queue",
            per_queue(&|s| s.rx_packets),
        )?;
        family(
            e,
            "vnet_queue_rx_bytes",
            "Bytes delivered to the queue pair's RX queue",
            per_queue(&|s| s.rx_bytes),
        )?;
        family(
            e,
            "vnet_queue_tx_packets",
            "Frames taken from the queue pair's TX queue",
            per_queue(&|s| s.tx_packets),
        )?;
        family(
            e,
            "vnet_queue_tx_bytes",
            "Bytes taken from the queue pair's TX queue",
            per_queue(&|s| s.tx_bytes),
        )?;
        family(
            e,
            "vnet_worker_bursts",
            "TX bursts the queue pair's worker took, by size in frames",
            queues.iter().flat_map(|(l, s)| {
                let mut low = 1;
                BURST_BUCKETS.iter().zip(s.tx_bursts).map(move |(high, n)| {
                    let size = match *high {
                        usize::MAX => format!("{low}+"),
                        h if h == low => h.to_string(),
                        h => format!("{low}-{h}"),
                    };
                    low = high.saturating_add(1);
                    let mut labels = l.clone();
                    labels.push(("size", size));
                    (labels, ConstCounter::new(n))
                })
            }),
        )?;
        family(
            e,
            "vnet_worker_busy_seconds",
            "Time the queue pair's worker spent taking its TX bursts in and switching them",
            queues
                .iter()
                .map(|(l, s)| (l.clone(), ConstCounter::new(s.busy_ns as f64 / 1e9))),
        )?;
        let none = Vec::new;
        family(
            e,
            "vnet_mac_table_entries",
            "Entries in the MAC table",
            [(none(), ConstGauge::new(dp.switch.macs.len() as i64))],
        )?;
        family(
            e,
            "vnet_flows",
            "Connections the policy tracks",
            [(none(), ConstGauge::new(dp.policy.conntrack.len() as i64))],
        )?;
        let c = &dp.policy.counters;
        family(
            e,
            "vnet_flows_refused",
            "New connections refused because the table or the port's share was full",
            [
                ("table_full", c.table_full.load(Ordering::Relaxed)),
                ("port_full", c.port_full.load(Ordering::Relaxed)),
            ]
            .map(|(why, n)| (vec![("reason", why.to_string())], ConstCounter::new(n))),
        )?;
        let routes = dp.router.route_counts();
        family(
            e,
            "vnet_route_packets",
            "Frames the router forwarded, by route (a segment's subnets, or a static route)",
            routes
                .iter()
                .map(|(r, p, _)| (vec![("route", r.clone())], ConstCounter::new(*p))),
        )?;
        family(
            e,
            "vnet_route_bytes",
            "Bytes the router forwarded, by route",
            routes
                .iter()
                .map(|(r, _, b)| (vec![("route", r.clone())], ConstCounter::new(*b))),
        )?;
        family(
            e,
            "vnet_contained_panics",
            "Panics (bugs) caught in the datapath; each cost one frame or one connection",
            [(none(), ConstCounter::new(fault::caught_count()))],
        )?;
        Ok(())
    }
}

/// The metrics page of `dp`, as served.
pub fn render(dp: &Arc<Datapath>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SwitchCollector(dp.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug of ours.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// `PORT` alone means 127.0.0.1:PORT: metrics stay on the host unless asked otherwise.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("metrics address '{s}' is not ADDRESS:PORT or PORT (e.g. 127.0.0.1:9465, 9465)")
    })
}

/// Serves `GET /metrics` (and `/`) on `listener` until `stop`.
pub fn spawn(
    dp: Arc<Datapath>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Err(e) = answer(&dp, conn) {
                            warn!("metrics: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        warn!("metrics: accept failed: {e}");
                        thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
}

/// One request, one answer, then the connection is closed.
fn answer(dp: &Arc<Datapath>, conn: TcpStream) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(&conn);
    let mut request = String::new();
    reader.by_ref().take(8192).read_line(&mut request)?;
    // The headers are read and ignored (a client waits until they are consumed).
    let mut line = String::new();
    while reader.by_ref().take(8192).read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, kind, body) = match (request.split_whitespace().next(), path) {
        (Some("GET"), "/metrics" | "/") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(dp),
        ),
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain",
            "the metrics are at /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let mut w = &conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}
