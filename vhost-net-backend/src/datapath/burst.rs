//! THE pipeline. Every frame that entered the switch (checked by `packet::ingress` in the
//! driver that took it in) goes through here, a burst at a time:
//!
//! decision (`switch`) -> policy -> delivery (`endpoint`) -> notification flush.
//!
//! It is the only place where a decision meets a delivery. Frames of a VM's TX burst that
//! go to one VM's RX queue one after another are written under one lock of it (a run).

use crate::counters::DropReason;
use crate::endpoint::frame::{Frame, TxFrame, MAX_HEAD};
use crate::endpoint::vm::{RxScratch, VmPort};
use crate::endpoint::{Endpoint, SwitchPort};
use crate::mem::Ram;
use crate::packet::l3::{self, L3};
use crate::packet::meta::FrameMeta;
use crate::policy::{PolicyCache, PolicyFrame, Verdict};
use crate::switch::{DecisionCache, Forward};
use crate::types::PortId;
use crate::virtio::chain::Segment;
use crate::virtio::copy::FrameSource;

use super::Datapath;

/// Frames taken in at once from one port.
#[derive(Clone, Copy)]
pub enum Burst<'a> {
    /// Frames still in a guest's TX buffers: its memory, the burst's buffers, the frames.
    Guest {
        ram: &'a Ram,
        segs: &'a [Segment],
        frames: &'a [TxFrame],
    },
    /// One frame in a local buffer (from the tap).
    Local(Frame<'a>),
}

impl<'a> Burst<'a> {
    fn len(&self) -> usize {
        match self {
            Burst::Guest { frames, .. } => frames.len(),
            Burst::Local(_) => 1,
        }
    }

    /// The Ethernet header of frame `i` and its segment (`segment`, that of the port it
    /// came in on, unless a local frame knows its own).
    #[inline]
    fn eth(&self, i: usize, segment: u16) -> (&'a [u8; 14], u16) {
        match *self {
            Burst::Guest { frames, .. } => (frames[i].eth(), segment),
            Burst::Local(f) => (f.eth(), f.segment),
        }
    }

    /// Frame `i`'s first bytes (up to `MAX_HEAD`, from its Ethernet header on) and its
    /// length, for the policy.
    #[inline]
    fn head(&self, i: usize) -> (&'a [u8], usize) {
        match *self {
            Burst::Guest { frames, .. } => (frames[i].head(), frames[i].len),
            Burst::Local(f) => match f.src {
                FrameSource::Local(b) => (&b[..b.len().min(MAX_HEAD)], b.len()),
                src => (f.head, src.len()),
            },
        }
    }

    /// Frame `i`, from a port in `segment` (a local frame knows its own).
    #[inline]
    fn frame(&self, i: usize, segment: u16) -> Frame<'a> {
        match *self {
            Burst::Guest { ram, segs, frames } => frames[i].frame(ram, segs, segment),
            Burst::Local(f) => f,
        }
    }
}

/// A worker's buffers and caches for the pipeline, allocated once.
#[derive(Default)]
pub struct Scratch {
    rx: RxScratch,
    decisions: DecisionCache,
    /// The decision for each frame of a burst.
    forwards: Vec<Forward>,
    policy: PolicyCache,
}

/// Decides and delivers a burst of frames that came in on `from`. The queues written are
/// interrupted by `flush`, which the caller runs once it holds nothing another port needs.
pub fn run(dp: &Datapath, from: &SwitchPort, burst: Burst<'_>, s: &mut Scratch) {
    s.forwards.clear();
    let policy = dp.policy.active();
    if policy {
        dp.policy.refresh(&mut s.policy);
    }
    for i in 0..burst.len() {
        let (eth, segment) = burst.eth(i, from.segment);
        let meta = FrameMeta::parse(eth);
        // Parsed where it is used, not kept per frame: a copy of it measured 5 % of the
        // time at 64 B. A flooded frame is parsed again.
        let (head, len) = burst.head(i);
        let parsed = if policy {
            l3::parse(head, segment)
        } else {
            L3::Other(0)
        };
        if policy {
            // Checked before the switch learns the source.
            if !dp
                .policy
                .source_allows(&s.policy, from.id, meta.src, &parsed)
            {
                s.forwards.push(Forward::SpoofedIp);
                continue;
            }
            if !dp.policy.tx_allows(&s.policy, from.id, len) {
                s.forwards.push(Forward::RateLimited);
                continue;
            }
        }
        let forward =
            dp.switch
                .decide_cached(&mut s.decisions, from.id, segment, meta.src, meta.dst);
        let forward = match forward {
            Forward::To(p) if policy => {
                let f = PolicyFrame {
                    l3: &parsed,
                    len,
                    group: meta.dst.is_multicast(),
                };
                police(dp, &mut s.policy, from.id, p, f, false)
            }
            f => f,
        };
        s.forwards.push(forward);
    }
    let mut i = 0;
    while i < burst.len() {
        let frame = burst.frame(i, from.segment);
        s.rx.next_frame();
        match s.forwards[i] {
            Forward::Local => {}
            Forward::Spoofed => from.counters.count_drop(DropReason::SpoofedMac),
            Forward::Denied => from.counters.count_drop(DropReason::PolicyDenied),
            Forward::SpoofedIp => from.counters.count_drop(DropReason::SpoofedIp),
            Forward::RateLimited => from.counters.count_drop(DropReason::RateLimited),
            Forward::Dropped => {}
            Forward::To(p) => {
                let dst = &dp.ports[usize::from(p)];
                if let (Some(vm), Burst::Guest { ram, segs, frames }) = (dst.as_vm(), burst) {
                    let run = s.forwards[i..]
                        .iter()
                        .take_while(|f| **f == Forward::To(p))
                        .count();
                    let done =
                        s.rx.deliver_run(vm, ram, segs, &frames[i..i + run], from.segment);
                    if done > 0 {
                        i += done;
                        continue;
                    }
                }
                deliver(from, dst, &frame, &mut s.rx);
            }
            Forward::Flood => {
                let (head, len) = burst.head(i);
                let parsed = if policy {
                    l3::parse(head, frame.segment)
                } else {
                    L3::Other(0)
                };
                let f = PolicyFrame {
                    l3: &parsed,
                    len,
                    group: frame.eth()[0] & 1 != 0,
                };
                for p in dp.switch.flood_targets(from.id, frame.segment) {
                    if policy && police(dp, &mut s.policy, from.id, p, f, true) != Forward::To(p) {
                        continue;
                    }
                    deliver(from, &dp.ports[usize::from(p)], &frame, &mut s.rx);
                }
            }
        }
        i += 1;
    }
}

/// The policy stage for frame `f` from port `from` to port `to`: `To(to)` if it passes.
/// `quiet`: a flooded copy.
#[inline]
fn police(
    dp: &Datapath,
    cache: &mut PolicyCache,
    from: PortId,
    to: PortId,
    f: PolicyFrame<'_>,
    quiet: bool,
) -> Forward {
    match dp.policy.verdict(cache, from, to, f, quiet) {
        Verdict::Allow if dp.policy.rx_allows(cache, to, f.len) => Forward::To(to),
        Verdict::Allow => {
            // Over the receiver's rate: counted there.
            dp.ports[usize::from(to)]
                .counters
                .count_drop(DropReason::RateLimited);
            Forward::Dropped
        }
        Verdict::Deny => Forward::Denied,
        Verdict::RateLimited => Forward::RateLimited,
    }
}

/// Delivers one frame to `dst`, whatever kind of port it is.
#[inline]
fn deliver(from: &SwitchPort, dst: &SwitchPort, frame: &Frame<'_>, rx: &mut RxScratch) {
    match &dst.endpoint {
        Endpoint::Vm(vm) => {
            let vm = VmPort {
                id: dst.id,
                name: &dst.name,
                counters: &dst.counters,
                vm,
            };
            rx.deliver(&from.counters, vm, frame)
        }
        Endpoint::Tap(tap) => {
            match tap.send(
                frame.hash,
                &frame.hdr,
                frame.src,
                frame.eth(),
                frame.segment,
            ) {
                Ok(()) => dst.counters.count_rx(frame.src.len()),
                Err(reason) => dst.counters.count_drop(reason),
            }
        }
    }
}

/// The pipeline's last stage: interrupts each RX queue written since the last flush once,
/// if its driver wants it. Call it with no lock held that another port needs.
pub fn flush(dp: &Datapath, s: &mut Scratch) {
    s.rx.flush(|id| dp.ports.get(usize::from(id)).and_then(|p| p.as_vm()));
}
