//! What `net up` made, so that `net down` removes that and nothing else: a bridge that was
//! there before `up` (a host bridge it adopted) stays, with the addresses it had.
//!
//! Kept in `/run/bridge-plugin/NETNS-TABLE.json`, one file per network namespace and
//! nftables table, because that is what one `up` owns; `/run` empties at boot, as the
//! kernel's bridges do.

use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

const DIR: &str = "/run/bridge-plugin";

#[derive(Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Made {
    /// Bridges `up` created.
    pub bridges: Vec<String>,
    /// Addresses `up` added, as (link, address, prefix length).
    pub addresses: Vec<(String, IpAddr, u8)>,
    /// Host NICs `up` made ports of a bridge, as (NIC, bridge).
    pub ports: Vec<(String, String)>,
}

impl Made {
    fn path(table: &str) -> std::io::Result<PathBuf> {
        // The namespace is named by its inode: "net:[4026531840]".
        let ns = std::fs::read_link("/proc/self/ns/net")?;
        let ns = ns.to_string_lossy();
        let id: String = ns.chars().filter(char::is_ascii_digit).collect();
        Ok(PathBuf::from(DIR).join(format!("{id}-{table}.json")))
    }

    /// What earlier `up`s of `table` made here (nothing if none did, or a file that does
    /// not parse: then `down` removes no bridge).
    pub fn load(table: &str) -> std::io::Result<Made> {
        match std::fs::read(Made::path(table)?) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Made::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, table: &str) -> std::io::Result<()> {
        let path = Made::path(table)?;
        if *self == Made::default() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        std::fs::create_dir_all(DIR)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("plain data"))?;
        std::fs::rename(&tmp, &path)
    }
}
