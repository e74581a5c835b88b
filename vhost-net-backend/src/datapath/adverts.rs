//! The router's unsolicited advertisements: each second the ticker asks the router which
//! segments are due and sends theirs to the segments' VMs, as frames the switch made.

use std::time::Instant;

use super::burst::{self, Scratch};
use super::Datapath;
use crate::endpoint::SwitchPort;
use crate::types::VACANT;

/// The ticker's sender of advertisements, with buffers of its own.
pub struct Advertiser {
    scratch: Scratch,
    /// The sender the deliveries name: the router, no port of the table.
    router: SwitchPort,
    bytes: Vec<u8>,
}

impl Default for Advertiser {
    fn default() -> Self {
        Advertiser {
            scratch: Scratch::default(),
            router: SwitchPort::vacant(VACANT),
            bytes: Vec::new(),
        }
    }
}

impl Advertiser {
    /// Sends the advertisements due at `now`.
    pub fn tick(&mut self, dp: &Datapath, now: Instant) {
        self.bytes.clear();
        for (segment, at) in dp.router.adverts_due(now, &mut self.bytes) {
            burst::flood_made(
                dp,
                &self.router,
                segment,
                &self.bytes[at],
                &mut self.scratch,
            );
        }
    }
}
