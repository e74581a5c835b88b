//! The switch's answer for one frame.

use crate::types::PortId;

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
    /// the burst's next hop number `hop` (a MAC the pipeline keeps). Numbered, not the MAC
    /// itself: a decision of 8 bytes is built in a register, one of 12 was built field by
    /// field on the stack and read back whole, a stall of 6 % of a routed frame's time.
    Routed {
        to: PortId,
        segment: u16,
        hop: u16,
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
