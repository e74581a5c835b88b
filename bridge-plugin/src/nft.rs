//! nftables through its JSON interface (`nft -j`): no hand-made rule strings.
//!
//! `nft` is run from a fixed system path with an empty environment, never through PATH:
//! the setuid bridge helper runs it for callers who choose their own PATH.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use thiserror::Error;

/// Every table this crate creates carries this name, so `down` removes exactly those.
pub const TABLE: &str = "bridge_plugin";

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run {NFT} (install the nftables package): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    #[error("nft printed JSON that does not parse: {0}")]
    Json(String),
}

/// Where Debian (and every distribution we know of) installs nft.
const NFT: &str = "/usr/sbin/nft";

/// `nft` from its system path, with nothing of our caller's environment.
fn nft() -> Command {
    let mut cmd = Command::new(NFT);
    cmd.env_clear().current_dir("/");
    cmd
}

/// Applies a batch of commands (`{"add": ...}`, `{"delete": ...}`, ...) atomically.
pub fn apply(commands: Vec<Value>) -> Result<(), NftError> {
    let doc = json!({ "nftables": commands }).to_string();
    let mut child = nft()
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(doc.as_bytes())
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " "),
        ))
    }
}

/// `nft -j list ...` as JSON objects (the elements of the `nftables` array).
pub fn list(args: &[&str]) -> Result<Vec<Value>, NftError> {
    let out = nft()
        .arg("-j")
        .arg("list")
        .args(args)
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NftError::Json(e.to_string()))?;
    Ok(v["nftables"].as_array().cloned().unwrap_or_default())
}

/// Whether `table` exists in `family`.
pub fn table_exists(family: &str, table: &str) -> bool {
    list(&["table", family, table]).is_ok()
}

pub fn iifname(name: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}})
}

pub fn oifname(name: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": name}})
}

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
