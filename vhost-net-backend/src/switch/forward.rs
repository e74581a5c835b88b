//! The switch's answer for one frame.

use crate::types::{MacAddr, PortId};

/// The forwarding decision for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    To(PortId),
    Flood,
    /// The destination sits behind the source port itself: nothing to do.
    Local,
    /// The source MAC is configured on another port: a spoofed frame.
    Spoofed,
    /// The policy does not let it through (set by the pipeline's policy stage).
    Denied,
    /// The port does not own the frame's source address (set by the policy stage).
    SpoofedIp,
    /// Over the sender's rate, or its flow's rule's (set by the policy stage).
    RateLimited,
    /// Dropped and counted already (by the policy stage, over the receiver's rate; by the
    /// router), or taken in by the router.
    Dropped,
    /// Routed (set by the router stage): to port `to` in `segment`, its head rewritten for
    /// the host at `mac`.
    Routed {
        to: PortId,
        mac: MacAddr,
        segment: u16,
    },
    /// The router's answer number `n` of the burst, back to the sender.
    Answer(u16),
    /// The router's question number `n` of the burst (who has the next hop?), flooded in
    /// `segment`.
    Ask {
        n: u16,
        segment: u16,
    },
}
