//! The nftables rules of the bridge helper itself (per-tap rate limits), over hostnet's
//! `nft -j` runner.

use serde_json::json;

pub use hostnet::nft::{apply, iifname, list, oifname, table_exists, NftError};

/// Every table this crate creates carries this name, so `down` removes exactly those.
pub const TABLE: &str = "bridge_plugin";

/// Limits what a VM sends into the bridge through `tap` to `mbit` Mbit/s (a bridge-family
/// rule: this kernel has no tc policing). Replaces an older rule for the same name.
pub fn limit_tap_egress(tap: &str, mbit: u32) -> Result<(), NftError> {
    let chain = "vm_egress";
    let mut cmds = vec![
        json!({"add": {"table": {"family": "bridge", "name": TABLE}}}),
        json!({"add": {"chain": {"family": "bridge", "table": TABLE, "name": chain,
            "type": "filter", "hook": "prerouting", "prio": 0, "policy": "accept"}}}),
    ];
    apply(std::mem::take(&mut cmds))?;
    // A tap name is reused once QEMU closes the old tap: drop the old rule first.
    for item in list(&["chain", "bridge", TABLE, chain])? {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        if rule.to_string().contains(&format!("\"right\":\"{tap}\"")) {
            cmds.push(
                json!({"delete": {"rule": {"family": "bridge", "table": TABLE,
                "chain": chain, "handle": rule["handle"]}}}),
            );
        }
    }
    // Mbit/s to bytes/s, rounded up, at least 1.
    let kbytes = (u64::from(mbit) * 1000).div_ceil(8).max(1);
    cmds.push(
        json!({"add": {"rule": {"family": "bridge", "table": TABLE, "chain": chain,
        "expr": [iifname(tap),
                 {"limit": {"rate": kbytes, "rate_unit": "kbytes", "per": "second", "inv": true}},
                 {"counter": null}, {"drop": null}]}}}),
    );
    apply(cmds)
}
