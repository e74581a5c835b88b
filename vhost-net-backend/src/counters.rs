//! Per-port counters, named from the guest's point of view like its virtio queues:
//! `tx_*` is what the guest sent into the switch, `rx_*` what the switch delivered to it.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::config::MAX_QUEUE_PAIRS;

/// Why a frame was not delivered. Counted on the port where the problem lies: the sender for
/// a malformed frame, the receiver for a full or missing RX queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The destination had no free RX buffer (or not enough for a mergeable frame).
    NoRxBuffer,
    /// The destination's single RX buffer was too small and it did not negotiate MRG_RXBUF.
    RxBufferTooSmall,
    /// The sender's TX descriptor chain was malformed.
    BadTxDescriptor,
    /// The receiver's RX descriptor chain was malformed.
    BadRxDescriptor,
    /// An 802.1Q-tagged frame arrived on an access port.
    VlanMismatch,
    /// Larger than the switch MTU.
    Oversize,
    /// Too short for a virtio-net header and an Ethernet header, or a multicast source MAC.
    Malformed,
    /// A checksum or GSO request the switch cannot honour (bad offsets, UFO, not TCP).
    BadOffload,
    /// The destination port has no guest attached or its queue is not enabled.
    PortDown,
    /// The source MAC is configured (`mac=`) on another port.
    SpoofedMac,
    /// The policy does not allow it (counted on the sender).
    PolicyDenied,
    /// From an IP address the port does not own, or claiming one in ARP or neighbour
    /// discovery, or from another MAC than the port's (with a policy configured).
    SpoofedIp,
    /// Over a rate limit: the sender's `rate_tx`, a rule's rate (counted on the sender),
    /// or the receiver's `rate_rx` (counted on the receiver).
    RateLimited,
    /// Sent to the gateway for an address in no routed subnet and no route.
    NoRoute,
    /// Routed with a hop limit (TTL) that ran out.
    HopLimit,
    /// Routed to a host whose MAC is not known yet (the switch asked for it).
    NoNeighbour,
    /// The switch panicked handling it (a bug): the frame was dropped, nothing else. Logged.
    InternalError,
}

impl DropReason {
    pub const ALL: [DropReason; 17] = [
        DropReason::NoRxBuffer,
        DropReason::RxBufferTooSmall,
        DropReason::BadTxDescriptor,
        DropReason::BadRxDescriptor,
        DropReason::VlanMismatch,
        DropReason::Oversize,
        DropReason::Malformed,
        DropReason::BadOffload,
        DropReason::PortDown,
        DropReason::SpoofedMac,
        DropReason::PolicyDenied,
        DropReason::SpoofedIp,
        DropReason::RateLimited,
        DropReason::NoRoute,
        DropReason::HopLimit,
        DropReason::NoNeighbour,
        DropReason::InternalError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRxBuffer => "no_rx_buffer",
            DropReason::RxBufferTooSmall => "rx_buffer_too_small",
            DropReason::BadTxDescriptor => "bad_tx_descriptor",
            DropReason::BadRxDescriptor => "bad_rx_descriptor",
            DropReason::VlanMismatch => "vlan_mismatch",
            DropReason::Oversize => "oversize",
            DropReason::Malformed => "malformed",
            DropReason::BadOffload => "bad_offload",
            DropReason::PortDown => "port_down",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::RateLimited => "rate_limited",
            DropReason::NoRoute => "no_route",
            DropReason::HopLimit => "hop_limit",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::InternalError => "internal_error",
        }
    }
}

/// Upper bounds of the TX burst sizes counted per queue pair (the last takes the rest).
pub const BURST_BUCKETS: [usize; 5] = [1, 4, 16, 64, usize::MAX];

/// One queue pair's counters: its RX queue's deliveries (by whichever worker wrote them),
/// and its TX queue's frames, bursts and the time its worker spent on them.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    /// TX bursts by size, `BURST_BUCKETS`.
    tx_bursts: [AtomicU64; BURST_BUCKETS.len()],
    /// Nanoseconds the queue's worker spent taking bursts in and delivering them.
    busy_ns: AtomicU64,
}

/// A queue pair's counters as read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_bursts: [u64; BURST_BUCKETS.len()],
    pub busy_ns: u64,
}

impl QueueCounters {
    pub fn add_rx(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Frames taken from the TX queue (or read from the tap), before they are switched.
    pub fn add_tx(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A TX burst of `frames` chains taken in and switched in `busy_ns`. Only the queue's
    /// own worker writes these.
    pub fn add_burst(&self, frames: usize, busy_ns: u64) {
        let b = BURST_BUCKETS.iter().position(|max| frames <= *max);
        self.tx_bursts[b.unwrap_or(BURST_BUCKETS.len() - 1)].fetch_add(1, Ordering::Relaxed);
        self.busy_ns.fetch_add(busy_ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueSnapshot {
            rx_packets: load(&self.rx_packets),
            rx_bytes: load(&self.rx_bytes),
            tx_packets: load(&self.tx_packets),
            tx_bytes: load(&self.tx_bytes),
            tx_bursts: std::array::from_fn(|i| load(&self.tx_bursts[i])),
            busy_ns: load(&self.busy_ns),
        }
    }
}

#[derive(Debug, Default)]
pub struct PortCounters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Traffic by queue pair (VM ports; the tap counts in pair 0), counted a burst's worth
    /// at once; the port's totals are their sums, read by `snapshot`.
    queues: [QueueCounters; MAX_QUEUE_PAIRS as usize],
}

impl PortCounters {
    /// Queue pair `qp`'s counters (the last pair's for an index beyond them, which the
    /// config never allows).
    #[inline]
    pub fn queue(&self, qp: usize) -> &QueueCounters {
        &self.queues[qp.min(self.queues.len() - 1)]
    }

    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sum = |field: fn(&QueueCounters) -> &AtomicU64| {
            self.queues.iter().map(|q| load(field(q))).sum()
        };
        CounterSnapshot {
            rx_packets: sum(|q| &q.rx_packets),
            rx_bytes: sum(|q| &q.rx_bytes),
            tx_packets: sum(|q| &q.tx_packets),
            tx_bytes: sum(|q| &q.tx_bytes),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name(), load(&self.drops[*r as usize])))
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
}

impl CounterSnapshot {
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for CounterSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rx {} pkts {} bytes, tx {} pkts {} bytes",
            self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes
        )?;
        for (name, n) in self.drops.iter().filter(|(_, n)| **n > 0) {
            write!(f, ", {name} {n}")?;
        }
        Ok(())
    }
}
