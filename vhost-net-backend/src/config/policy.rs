//! The policy part of the switch configuration: `[policy]` and the ordered `[[rule]]`
//! list, as written; `policy::rules` compiles them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const DEFAULT_MAX_FLOWS: usize = 262_144;
pub const DEFAULT_MAX_FLOWS_PER_PORT: usize = 65_536;
pub const DEFAULT_FLOW_LOG_MAX_BYTES: u64 = 64 << 20;
pub const DEFAULT_FLOW_LOG_INTERVAL_SECS: u64 = 60;

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    #[default]
    Deny,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// One value or a list of them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A destination port or range: `443` or `"8000-8100"`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortItem {
    Number(u16),
    Text(String),
}

fn default_max_flows() -> usize {
    DEFAULT_MAX_FLOWS
}
fn default_max_flows_per_port() -> usize {
    DEFAULT_MAX_FLOWS_PER_PORT
}
fn default_log_bytes() -> u64 {
    DEFAULT_FLOW_LOG_MAX_BYTES
}
fn default_log_interval() -> u64 {
    DEFAULT_FLOW_LOG_INTERVAL_SECS
}

/// `[policy]`: present (or any `[[rule]]` present) turns the policy on.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// What happens to traffic no rule decides: `deny` unless set to `allow`.
    #[serde(default)]
    pub default: Action,
    /// Tracked connections, in all.
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// Tracked connections one port may open, so that one guest cannot take every entry.
    #[serde(default = "default_max_flows_per_port")]
    pub max_flows_per_port: usize,
    /// Flow log: one JSON line per flow per interval and when it ends.
    #[serde(default)]
    pub flow_log: Option<PathBuf>,
    /// The log is rotated (to `FILE.1`) past this size.
    #[serde(default = "default_log_bytes")]
    pub flow_log_max_bytes: u64,
    #[serde(default = "default_log_interval")]
    pub flow_log_interval_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            default: Action::Deny,
            max_flows: DEFAULT_MAX_FLOWS,
            max_flows_per_port: DEFAULT_MAX_FLOWS_PER_PORT,
            flow_log: None,
            flow_log_max_bytes: DEFAULT_FLOW_LOG_MAX_BYTES,
            flow_log_interval_secs: DEFAULT_FLOW_LOG_INTERVAL_SECS,
        }
    }
}

fn any() -> OneOrMany<String> {
    OneOrMany::One("any".into())
}

/// A rate as configured: `{ bits_per_sec = 100_000_000, burst_bytes = 125_000 }`,
/// `{ packets_per_sec = 10_000 }`, or both.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    #[serde(default)]
    pub bits_per_sec: Option<u64>,
    /// Bytes that may pass at once above the rate; at least (and by default) 10 ms at the
    /// rate and one 64 KiB segment: the switch takes frames in batches.
    #[serde(default)]
    pub burst_bytes: Option<u64>,
    #[serde(default)]
    pub packets_per_sec: Option<u64>,
    /// Packets that may pass at once; at least (and by default) 10 ms at the rate and 32.
    #[serde(default)]
    pub burst_packets: Option<u64>,
}

impl RateConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.bits_per_sec.is_none() && self.packets_per_sec.is_none() {
            return Err("a rate needs bits_per_sec or packets_per_sec".into());
        }
        if self.bits_per_sec == Some(0) || self.packets_per_sec == Some(0) {
            return Err(
                "a rate of 0 passes nothing: leave the port out of the policy \
                        or deny its traffic instead"
                    .into(),
            );
        }
        if self.bits_per_sec.is_none() && self.burst_bytes.is_some()
            || self.packets_per_sec.is_none() && self.burst_packets.is_some()
        {
            return Err("a burst needs the rate it belongs to".into());
        }
        Ok(())
    }
}

/// One `[[rule]]`: traffic `from` -> `to` of protocol `proto` to destination `ports`.
/// `from` and `to` name groups (ports' `groups`), CIDRs, `outside` (the uplink) or `any`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default = "any")]
    pub from: OneOrMany<String>,
    #[serde(default = "any")]
    pub to: OneOrMany<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or `any`, or a list of them.
    #[serde(default)]
    pub proto: Option<OneOrMany<String>>,
    #[serde(default)]
    pub ports: Option<OneOrMany<PortItem>>,
    /// A rate shared by every flow this rule allows.
    #[serde(default)]
    pub rate: Option<RateConfig>,
}

impl RuleConfig {
    /// The name tables, logs and commands know the rule by: its own, or `ruleN` for the
    /// `index`th (from 0) rule without one.
    pub fn shown_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("rule{}", index + 1))
    }
}
