//! nftables through its JSON interface (`nft -j`): no hand-made rule strings.
//!
//! `nft` is run from a fixed system path with an empty environment, never through PATH:
//! the setuid bridge helper runs it for callers who choose their own PATH, and the switch
//! runs as root.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use thiserror::Error;

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
