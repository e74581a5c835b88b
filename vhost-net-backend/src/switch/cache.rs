//! A worker's cache of recent forwarding decisions.

use super::forward::Forward;
use crate::types::{MacAddr, PortId};

/// A worker's recent forwarding decisions, reused while the MAC table's version stays the
/// same: a flow's frames come in bursts, and a hit skips the table's lock and two lookups.
/// A hit needs no refresh of the entries' `seen` time either: the clock has not moved since
/// the decision that refreshed them, or the version would have changed.
#[derive(Default)]
pub struct DecisionCache {
    pub(super) slots: [Option<CachedDecision>; DECISION_SLOTS],
}

pub(super) const DECISION_SLOTS: usize = 8;

#[derive(Clone, Copy)]
pub(super) struct CachedDecision {
    pub(super) version: u64,
    pub(super) src: PortId,
    pub(super) segment: u16,
    pub(super) src_mac: MacAddr,
    pub(super) dst_mac: MacAddr,
    pub(super) forward: Forward,
}
