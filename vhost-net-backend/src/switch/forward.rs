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
    /// Dropped and counted by the policy stage already (over the receiver's rate).
    Dropped,
}
