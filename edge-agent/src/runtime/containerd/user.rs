//! Who a container runs as: the image config's `USER` (`user`, `user:group`, each a name or
//! a number) resolved against the image's own `/etc/passwd` and `/etc/group`, as Docker and
//! containerd do. Pure: the caller reads the two files (only when [`UserSpec::needs_files`])
//! and hands their text in.
//!
//! - A user name gives the uid and primary gid of its `/etc/passwd` line; a name the file
//!   does not hold (or an image without the file) is an error, never root.
//! - A numeric uid is taken as is; its gid is the primary gid of its `/etc/passwd` line, or
//!   0 without one.
//! - A group, by name (from `/etc/group`) or number, replaces the primary gid.
//! - Without an explicit group, the groups of `/etc/group` that list the user's name are
//!   added as supplementary groups, after the primary gid.

/// A user or group as `USER` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    Num(u32),
    Name(String),
}

impl Id {
    fn parse(s: &str) -> Self {
        s.parse().map_or_else(|_| Id::Name(s.to_string()), Id::Num)
    }
}

/// A parsed `USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: Id,
    pub group: Option<Id>,
}

/// The credentials a container's process gets (OCI `process.user`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary gid first); empty for root by default.
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("invalid user {0:?}: expected user or user:group, each a name or a number")]
    Invalid(String),
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("user {0:?} cannot be resolved: the image has no /etc/passwd")]
    NoPasswd(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    #[error("group {0:?} cannot be resolved: the image has no /etc/group")]
    NoGroupFile(String),
}

impl UserSpec {
    /// Parses a `USER` value; `None` when it is empty (root).
    pub fn parse(s: &str) -> Result<Option<Self>, UserError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let invalid = || UserError::Invalid(s.to_string());
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let bad = |p: &str| p.is_empty() || p.contains([':', '\n', '\0']);
        if bad(user) || group.is_some_and(bad) {
            return Err(invalid());
        }
        Ok(Some(Self {
            user: Id::parse(user),
            group: group.map(Id::parse),
        }))
    }

    /// Whether resolving needs the image's files (not for `uid:gid`, both numbers).
    pub fn needs_files(&self) -> bool {
        !matches!((&self.user, &self.group), (Id::Num(_), Some(Id::Num(_))))
    }
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The entries of an `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`); blank,
/// comment and malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    fields(text)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// The entries of an `/etc/group` (`name:password:gid:member,member`); blank, comment and
/// malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    fields(text)
        .filter_map(|f| {
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .into_iter()
                    .flat_map(|m| m.split(','))
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

fn fields(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.first().is_some_and(|n| !n.is_empty()))
}

/// Resolves `spec` against the image's `/etc/passwd` and `/etc/group` (`None`: the image
/// has no such file).
pub fn resolve(
    spec: &UserSpec,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ProcessUser, UserError> {
    let users = passwd.map(parse_passwd);
    let groups = group.map(parse_group).unwrap_or_default();
    let (uid, mut gid, name) = match &spec.user {
        Id::Name(n) => {
            let users = users.ok_or_else(|| UserError::NoPasswd(n.clone()))?;
            let e = users
                .into_iter()
                .find(|e| &e.name == n)
                .ok_or_else(|| UserError::UnknownUser(n.clone()))?;
            (e.uid, e.gid, Some(e.name))
        }
        Id::Num(uid) => match users.into_iter().flatten().find(|e| e.uid == *uid) {
            Some(e) => (e.uid, e.gid, Some(e.name)),
            None => (*uid, 0, None),
        },
    };
    let mut additional_gids = Vec::new();
    match &spec.group {
        Some(Id::Num(g)) => gid = *g,
        Some(Id::Name(n)) => {
            if group.is_none() {
                return Err(UserError::NoGroupFile(n.clone()));
            }
            gid = groups
                .iter()
                .find(|g| &g.name == n)
                .map(|g| g.gid)
                .ok_or_else(|| UserError::UnknownGroup(n.clone()))?;
        }
        None => {
            if let Some(name) = &name {
                additional_gids.push(gid);
                for g in groups.iter().filter(|g| g.members.contains(name)) {
                    if !additional_gids.contains(&g.gid) {
                        additional_gids.push(g.gid);
                    }
                }
            }
        }
    }
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment, then a blank line and a broken one

broken:x:nope:1::/:/bin/false
app:x:1234:1234::/home/app:/bin/sh
daemon:x:1:1::/usr/sbin:/usr/sbin/nologin
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
app:x:1234:
sensors:x:2000:daemon,app
video:x:44: app , root
staff:x:50
";

    fn user(uid: u32, gid: u32, additional: &[u32]) -> ProcessUser {
        ProcessUser {
            uid,
            gid,
            additional_gids: additional.to_vec(),
        }
    }

    fn spec(user: Id, group: Option<Id>) -> Option<UserSpec> {
        Some(UserSpec { user, group })
    }

    #[test]
    fn user_strings_are_parsed() {
        let name = |s: &str| Id::Name(s.into());
        let table = [
            ("", None),
            ("  ", None),
            ("app", spec(name("app"), None)),
            ("app:grp", spec(name("app"), Some(name("grp")))),
            ("1000", spec(Id::Num(1000), None)),
            ("1000:1000", spec(Id::Num(1000), Some(Id::Num(1000)))),
            ("app:0", spec(name("app"), Some(Id::Num(0)))),
            // Too large for a uid: only a name could match it.
            ("99999999999", spec(name("99999999999"), None)),
        ];
        for (s, want) in table {
            assert_eq!(UserSpec::parse(s), Ok(want), "{s:?}");
        }
        for bad in [":", ":1000", "app:", "a:b:c"] {
            assert_eq!(
                UserSpec::parse(bad),
                Err(UserError::Invalid(bad.into())),
                "{bad:?}"
            );
        }
        let needs = |s: &str| UserSpec::parse(s).ok().flatten().map(|u| u.needs_files());
        assert_eq!(needs("1000:1000"), Some(false));
        for s in ["1000", "app", "1000:grp", "app:0"] {
            assert_eq!(needs(s), Some(true), "{s:?}");
        }
    }

    #[test]
    fn files_are_parsed_leniently() {
        let users = parse_passwd(PASSWD);
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["root", "app", "daemon"]);
        assert_eq!(
            users[1],
            PasswdEntry {
                name: "app".into(),
                uid: 1234,
                gid: 1234
            }
        );
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 6);
        assert_eq!(groups[3].members, ["daemon", "app"]);
        assert_eq!(groups[4].members, ["app", "root"]);
        assert!(groups[5].members.is_empty(), "no member field at all");
    }

    /// `USER`, (`/etc/passwd`, `/etc/group`), outcome.
    type Case = (
        &'static str,
        (Option<&'static str>, Option<&'static str>),
        Result<ProcessUser, UserError>,
    );

    #[test]
    fn users_resolve_against_the_image_files() {
        let files = (Some(PASSWD), Some(GROUP));
        let table: [Case; 14] = [
            // A name: uid and primary gid from passwd, its groups from /etc/group.
            ("app", files, Ok(user(1234, 1234, &[1234, 2000, 44]))),
            ("root", files, Ok(user(0, 0, &[0, 44]))),
            // A number: its passwd line's gid and groups when there is one, else gid 0.
            ("1234", files, Ok(user(1234, 1234, &[1234, 2000, 44]))),
            ("4242", files, Ok(user(4242, 0, &[]))),
            ("4242", (None, None), Ok(user(4242, 0, &[]))),
            // An explicit group replaces the primary one; no supplementary groups then.
            ("app:sensors", files, Ok(user(1234, 2000, &[]))),
            ("app:7", files, Ok(user(1234, 7, &[]))),
            ("1000:1000", (None, None), Ok(user(1000, 1000, &[]))),
            ("1234:video", files, Ok(user(1234, 44, &[]))),
            // Never root by accident.
            (
                "nobody-here",
                files,
                Err(UserError::UnknownUser("nobody-here".into())),
            ),
            (
                "app",
                (None, Some(GROUP)),
                Err(UserError::NoPasswd("app".into())),
            ),
            (
                "app:nogroup",
                files,
                Err(UserError::UnknownGroup("nogroup".into())),
            ),
            (
                "app:sensors",
                (Some(PASSWD), None),
                Err(UserError::NoGroupFile("sensors".into())),
            ),
            // Without /etc/group: the primary gid alone.
            ("app", (Some(PASSWD), None), Ok(user(1234, 1234, &[1234]))),
        ];
        for (s, (passwd, group), want) in table {
            let spec = UserSpec::parse(s).ok().flatten();
            let got = spec.map(|spec| resolve(&spec, passwd, group));
            assert_eq!(got, Some(want), "{s:?}");
        }
    }

    #[test]
    fn errors_quote_the_value() {
        let e = UserError::UnknownUser("nobody-here".into()).to_string();
        assert_eq!(e, r#"user "nobody-here" is not in the image's /etc/passwd"#);
    }
}
