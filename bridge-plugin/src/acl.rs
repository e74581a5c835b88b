//! The bridge ACL file of `qemu-bridge-helper`: `allow BR`, `deny BR`, `allow all`,
//! `deny all`, `include FILE`, `#` comments. A bridge is denied unless a rule allows it,
//! and any matching deny wins.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Untrusted(#[from] crate::privilege::PrivilegeError),
    #[error("{path}:{line}: include loop through {target}")]
    IncludeLoop {
        path: PathBuf,
        line: usize,
        target: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Allow(String),
    AllowAll,
    Deny(String),
    DenyAll,
}

/// A rule and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub rule: Rule,
    pub path: PathBuf,
    pub line: usize,
}

/// The verdict for one bridge.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Denied by this entry.
    DeniedBy(AclEntry),
    /// No rule allows it.
    NotAllowed,
}

#[derive(Debug, Default)]
pub struct Acl {
    pub entries: Vec<AclEntry>,
}

impl Acl {
    /// Reads `path` and everything it includes.
    ///
    /// As with qemu-bridge-helper, an included file that the caller may not read is
    /// skipped: per-user files (`include /etc/qemu/alice.conf`, readable by alice only)
    /// apply to the users who can read them. Unlike it, a missing included file or a
    /// syntax error in one is an error naming the file and line, not a silent skip.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        Acl::load_as(path, false)
    }

    /// `load` for a helper running with privilege: every file read must be root's and
    /// writable by no one else, as must the folders above it.
    pub fn load_root_owned(path: &Path) -> Result<Acl, AclError> {
        Acl::load_as(path, true)
    }

    fn load_as(path: &Path, root_owned: bool) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut stack = Vec::new();
        acl.read(path, &mut stack, None, root_owned)?;
        Ok(acl)
    }

    fn read(
        &mut self,
        path: &Path,
        stack: &mut Vec<PathBuf>,
        from: Option<(&Path, usize)>,
        root_owned: bool,
    ) -> Result<(), AclError> {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if stack.contains(&canonical) {
            let (p, l) = from.expect("the first file cannot loop");
            return Err(AclError::IncludeLoop {
                path: p.to_path_buf(),
                line: l,
                target: path.to_path_buf(),
            });
        }
        let text = match std::fs::read_to_string(path) {
            Err(e) if from.is_some() && e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Ok(())
            }
            r => r,
        };
        let text = text.map_err(|e| AclError::Read {
            path: path.to_path_buf(),
            reason: match from {
                Some((p, l)) => format!("{e} (included from {}:{l})", p.display()),
                None => e.to_string(),
            },
        })?;
        if root_owned {
            crate::privilege::require_root_owned_path(path)?;
        }
        stack.push(canonical);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let syntax = |message: String| AclError::Syntax {
                path: path.to_path_buf(),
                line,
                message,
            };
            let mut words = content.split_whitespace();
            let (Some(cmd), Some(arg), None) = (words.next(), words.next(), words.next()) else {
                return Err(syntax(format!(
                    "'{content}' is not 'allow BRIDGE', 'deny BRIDGE', 'allow all', 'deny all' or 'include FILE'"
                )));
            };
            if arg.len() >= 16 && cmd != "include" {
                return Err(syntax(format!(
                    "bridge name '{arg}' is longer than 15 characters"
                )));
            }
            let rule = match (cmd, arg) {
                ("allow", "all") => Rule::AllowAll,
                ("deny", "all") => Rule::DenyAll,
                ("allow", br) => Rule::Allow(br.to_string()),
                ("deny", br) => Rule::Deny(br.to_string()),
                ("include", file) => {
                    let target = path.parent().unwrap_or(Path::new("/")).join(file);
                    self.read(&target, stack, Some((path, line)), root_owned)?;
                    continue;
                }
                _ => {
                    return Err(syntax(format!(
                        "unknown rule '{cmd}': use allow, deny or include"
                    )))
                }
            };
            self.entries.push(AclEntry {
                rule,
                path: path.to_path_buf(),
                line,
            });
        }
        stack.pop();
        Ok(())
    }

    pub fn check(&self, bridge: &str) -> Verdict {
        let mut allowed = false;
        for e in &self.entries {
            match &e.rule {
                Rule::DenyAll => return Verdict::DeniedBy(e.clone()),
                Rule::Deny(b) if b == bridge => return Verdict::DeniedBy(e.clone()),
                Rule::AllowAll => allowed = true,
                Rule::Allow(b) if b == bridge => allowed = true,
                _ => {}
            }
        }
        if allowed {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn allows_denies_and_deny_wins() {
        let d = tempfile::tempdir().unwrap();
        let main = write(
            d.path(),
            "bridge.conf",
            "# ours\nallow br0\ninclude extra.conf\nallow br2 # trailing\n",
        );
        write(d.path(), "extra.conf", "allow all\ndeny br1\n");
        let acl = Acl::load(&main).unwrap();
        assert_eq!(acl.check("br0"), Verdict::Allowed);
        assert_eq!(acl.check("brX"), Verdict::Allowed); // allow all
        match acl.check("br1") {
            Verdict::DeniedBy(e) => {
                assert_eq!(e.line, 2);
                assert!(e.path.ends_with("extra.conf"));
            }
            v => panic!("{v:?}"),
        }
        let only = write(d.path(), "only.conf", "allow br0\n");
        assert_eq!(Acl::load(&only).unwrap().check("br9"), Verdict::NotAllowed);
        let deny_all = write(d.path(), "deny.conf", "allow br0\ndeny all\n");
        assert!(matches!(
            Acl::load(&deny_all).unwrap().check("br0"),
            Verdict::DeniedBy(_)
        ));
        assert_eq!(Acl::default().check("br0"), Verdict::NotAllowed);
    }

    #[test]
    fn refusals_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let bad = write(d.path(), "bad.conf", "allow br0\npermit br1\n");
        let e = Acl::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.conf:2") && e.contains("permit"), "{e}");
        let bad = write(d.path(), "bad2.conf", "allow\n");
        assert!(Acl::load(&bad)
            .unwrap_err()
            .to_string()
            .contains("bad2.conf:1"));
        let long = write(d.path(), "long.conf", "allow averyveryverylongbridge\n");
        assert!(Acl::load(&long)
            .unwrap_err()
            .to_string()
            .contains("15 characters"));

        let a = write(d.path(), "a.conf", "allow br0\ninclude b.conf\n");
        write(d.path(), "b.conf", "include a.conf\n");
        let e = Acl::load(&a).unwrap_err();
        assert!(matches!(e, AclError::IncludeLoop { line: 1, .. }), "{e}");
        assert!(e.to_string().contains("b.conf:1"), "{e}");

        let m = write(d.path(), "m.conf", "include missing.conf\n");
        let e = Acl::load(&m).unwrap_err().to_string();
        assert!(e.contains("missing.conf") && e.contains("m.conf:1"), "{e}");
        assert!(Acl::load(&d.path().join("nope.conf"))
            .unwrap_err()
            .to_string()
            .contains("nope.conf"));
    }
}
