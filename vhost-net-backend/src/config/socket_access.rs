//! Who may connect to a port's socket: its owner, group and mode, as set after it is
//! created (a QEMU running as its own user, as under libvirt, needs the socket's group or
//! mode to let it in; the process umask alone would not).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A user or group by name (from /etc/passwd or /etc/group) or number.
fn id_of(name: &str, file: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| format!("'{name}' is in no line of {file}; give a local name or a number"))
}

/// The access asked for a socket, resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub mode: Option<u32>,
}

impl SocketAccess {
    /// From the config's words: `owner` and `group` names or numbers, `mode` octal
    /// (`"0660"`).
    pub fn resolve(
        owner: Option<&str>,
        group: Option<&str>,
        mode: Option<&str>,
    ) -> Result<SocketAccess, String> {
        let mode = match mode {
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| format!("socket_mode '{m}' is not an octal mode like 0660"))?,
            ),
            None => None,
        };
        Ok(SocketAccess {
            owner: owner.map(|o| id_of(o, "/etc/passwd")).transpose()?,
            group: group.map(|g| id_of(g, "/etc/group")).transpose()?,
            mode,
        })
    }

    /// Sets them on the socket at `path`.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::chown(path, self.owner, self.group)?;
        }
        if let Some(mode) = self.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_modes_resolve_or_name_the_fix() {
        let a = SocketAccess::resolve(Some("root"), Some("0"), Some("0660")).unwrap();
        assert_eq!(
            a,
            SocketAccess {
                owner: Some(0),
                group: Some(0),
                mode: Some(0o660)
            }
        );
        assert_eq!(
            SocketAccess::resolve(None, None, Some("0o600"))
                .unwrap()
                .mode,
            Some(0o600)
        );
        let e = SocketAccess::resolve(Some("no-such-user-here"), None, None).unwrap_err();
        assert!(e.contains("/etc/passwd"), "{e}");
        let e = SocketAccess::resolve(None, None, Some("0999")).unwrap_err();
        assert!(e.contains("octal"), "{e}");
    }
}
