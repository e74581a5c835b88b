//! The flow log: one JSON line per flow per interval and when it ends, and one per denied
//! aggregate (a port flooding denied packets makes one line per interval, not one per
//! packet), to a file rotated by size.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use log::warn;
use serde::Serialize;

use crate::packet::l3::FlowKey;
use crate::types::PortId;

use super::rules::Decider;

/// Denied aggregates kept per interval; past that they are counted in `denied_unlogged`.
const MAX_DENIED: usize = 4096;

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct FlowRecord<'a> {
    /// `interval`, `end` (an allowed flow) or `denied`.
    pub event: &'a str,
    pub start: u64,
    pub end: u64,
    pub src_port: &'a str,
    pub dst_port: &'a str,
    pub src_groups: Vec<&'a str>,
    pub dst_groups: Vec<&'a str>,
    pub segment: u16,
    pub proto: &'a str,
    pub src: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
    /// From the first packet's sender to its receiver, then back.
    pub packets: u64,
    pub bytes: u64,
    pub packets_back: u64,
    pub bytes_back: u64,
    pub tcp_flags: String,
    pub verdict: &'a str,
    pub rule: &'a str,
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        _ => "other",
    }
}

pub fn tcp_flags_text(f: u8) -> String {
    let names = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

/// What is kept of denied packets until the next interval.
#[derive(Clone, Copy, Debug)]
pub struct DeniedFlow {
    pub packets: u64,
    pub bytes: u64,
    pub first_unix: u64,
    pub last_unix: u64,
    pub rule: Decider,
}

/// Denied packets, aggregated by ports and flow (source port left out: a scan from one
/// source is one line per target port).
#[derive(Default)]
pub struct DeniedLog {
    flows: Mutex<HashMap<(PortId, PortId, FlowKey), DeniedFlow>>,
    /// Denied packets not aggregated: the table was full, or busy at that moment (the
    /// datapath never waits for it).
    pub unlogged: AtomicU64,
}

impl DeniedLog {
    pub fn record(
        &self,
        src: PortId,
        dst: PortId,
        key: &FlowKey,
        len: usize,
        rule: Decider,
        unix: u64,
    ) {
        let Ok(mut flows) = self.flows.try_lock() else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut key = *key;
        key.sport = 0;
        let full = flows.len() >= MAX_DENIED;
        match flows.get_mut(&(src, dst, key)) {
            Some(d) => {
                d.packets += 1;
                d.bytes += len as u64;
                d.last_unix = unix;
            }
            None if full => {
                self.unlogged.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                flows.insert(
                    (src, dst, key),
                    DeniedFlow {
                        packets: 1,
                        bytes: len as u64,
                        first_unix: unix,
                        last_unix: unix,
                        rule,
                    },
                );
            }
        }
    }

    pub fn take(&self) -> Vec<((PortId, PortId, FlowKey), DeniedFlow)> {
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.drain().collect()
    }
}

/// The log file.
pub struct FlowLog {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max_bytes: u64,
}

impl FlowLog {
    pub fn open(path: PathBuf, max_bytes: u64) -> std::io::Result<FlowLog> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(FlowLog {
            path,
            file: Some(file),
            written,
            max_bytes,
        })
    }

    pub fn write(&mut self, record: &FlowRecord<'_>) {
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if self.written + line.len() as u64 > self.max_bytes && self.written > 0 {
            self.rotate();
        }
        if let Some(f) = &mut self.file {
            match f.write_all(line.as_bytes()) {
                Ok(()) => self.written += line.len() as u64,
                Err(e) => {
                    warn!("flow log {}: {e}; logging stops", self.path.display());
                    self.file = None;
                }
            }
        }
    }

    /// FILE becomes FILE.1 (the previous FILE.1 is dropped) and a new FILE begins.
    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            warn!("flow log {}: cannot rotate: {e}", self.path.display());
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| warn!("flow log {}: {e}; logging stops", self.path.display()))
            .ok();
        self.written = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(src: String) -> FlowRecord<'a> {
        FlowRecord {
            event: "end",
            start: 1,
            end: 2,
            src_port: "a",
            dst_port: "b",
            src_groups: vec!["web"],
            dst_groups: vec![],
            segment: 0,
            proto: "tcp",
            src,
            dst: "10.0.0.2".into(),
            sport: 1,
            dport: 2,
            packets: 1,
            bytes: 60,
            packets_back: 0,
            bytes_back: 0,
            tcp_flags: tcp_flags_text(0x12),
            verdict: "allow",
            rule: "r",
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_whole_lines() {
        let dir = std::env::temp_dir().join(format!("flowlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.log");
        let mut log = FlowLog::open(path.clone(), 1000).unwrap();
        for i in 0..20 {
            log.write(&record(format!("10.0.0.{i}")));
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("flows.log.1")).unwrap();
        assert!(now.len() <= 1000 && old.len() <= 1000);
        let lines: Vec<serde_json::Value> = old
            .lines()
            .chain(now.lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.last().unwrap()["src"], "10.0.0.19");
        assert_eq!(lines[0]["tcp_flags"], "SYN,ACK");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn denied_packets_are_aggregated_and_bounded() {
        let d = DeniedLog::default();
        let mut k = FlowKey::default();
        for sport in 0..100 {
            k.sport = sport;
            d.record(0, 1, &k, 60, None, 5);
        }
        for dport in 0..(MAX_DENIED as u16 + 10) {
            k.dport = dport + 1;
            d.record(0, 1, &k, 60, None, 6);
        }
        let flows = d.take();
        assert_eq!(flows.len(), MAX_DENIED);
        let first = flows.iter().find(|(k, _)| k.2.dport == 0).unwrap().1;
        assert_eq!((first.packets, first.bytes), (100, 6000));
        assert_eq!(d.unlogged.load(Ordering::Relaxed), 11);
        assert!(d.take().is_empty());
    }
}
