//! The policy stage of the pipeline, between the switch's decision and delivery: which
//! frames a port may send to another. Like the switch it sees a frame's metadata and port
//! ids only. Empty for now (everything the switch forwards is allowed); ACLs, connection
//! tracking and rate limits come here, and cost nothing while none is configured.

use crate::packet::meta::FrameMeta;
use crate::types::PortId;

#[derive(Debug, Default)]
pub struct Policy {}

impl Policy {
    /// Whether a frame from port `src` may be delivered to port `dst`.
    #[inline(always)]
    pub fn allows(&self, _src: PortId, _dst: PortId, _meta: &FrameMeta) -> bool {
        true
    }
}
