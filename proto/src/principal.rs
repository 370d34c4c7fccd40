//! The principal grammar: who a grant or card assignment lets run on a card, and whether a
//! process matches it.
//!
//! A spec is one or more terms joined by `;`, meaning "any of": `uid:1001`, `user:alice`,
//! `gid:3000`, `group:lab`, `cgroup:GLOB`. In a glob `*` matches any run of characters
//! (including `/`, so one star spans cgroup levels) and `?` exactly one character; there is no
//! escape, since cgroup paths never contain `*` or `?`. Whitespace and control characters are
//! rejected anywhere rather than trimmed: a spec is copied between CSV files, the database and
//! agents, and a silently trimmed name would match someone other than the operator meant.
//! Parsing is strict so that `Display` gives one canonical form that parses back to the same
//! spec.

use std::fmt;
use std::str::FromStr;

/// One alternative of a principal spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalTerm {
    /// `uid:N`: the process's real uid.
    Uid(u32),
    /// `user:NAME`: the user name of the process's uid.
    User(String),
    /// `gid:N`: the primary or a supplementary gid.
    Gid(u32),
    /// `group:NAME`: the name of the primary or a supplementary group.
    Group(String),
    /// `cgroup:GLOB`: the process's cgroup path (Slurm job, Kubernetes pod, container).
    Cgroup(String),
}

/// A principal spec: matches a process when any of its terms does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalSpec {
    pub terms: Vec<PrincipalTerm>,
}

/// Why a principal spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("principal is empty")]
    Empty,
    #[error("principal term {index} is empty (stray `;`)")]
    EmptyTerm { index: usize },
    #[error("principal {spec:?} contains whitespace or a control character")]
    Whitespace { spec: String },
    #[error("principal term {term:?} has no kind (expected uid:, user:, gid:, group: or cgroup:)")]
    MissingKind { term: String },
    #[error("unknown principal kind \"{kind}:\" (expected uid:, user:, gid:, group: or cgroup:)")]
    UnknownKind { kind: String },
    #[error("bad {kind} {value:?}: expected a decimal number from 0 to 4294967295")]
    BadId { kind: &'static str, value: String },
    #[error("empty name after \"{kind}:\"")]
    EmptyName { kind: &'static str },
    #[error("bad {kind} name {name:?}: a name may not contain `:`")]
    BadName { kind: &'static str, name: String },
}

/// Who a process runs as, read from /proc by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessIdentity {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub supplementary_gids: Vec<u32>,
    pub supplementary_groups: Vec<String>,
    pub cgroup: Option<String>,
}

impl PrincipalSpec {
    /// Whether any term matches the process. Gid and group terms match the primary group or
    /// any supplementary one, because lab members usually carry the lab group as a
    /// supplementary group. An unknown field of the identity matches nothing.
    pub fn matches(&self, id: &ProcessIdentity) -> bool {
        self.terms.iter().any(|t| t.matches(id))
    }
}

impl PrincipalTerm {
    /// Whether this one term matches the process.
    pub fn matches(&self, id: &ProcessIdentity) -> bool {
        match self {
            PrincipalTerm::Uid(uid) => id.uid == Some(*uid),
            PrincipalTerm::User(name) => id.user.as_deref() == Some(name.as_str()),
            PrincipalTerm::Gid(gid) => id.gid == Some(*gid) || id.supplementary_gids.contains(gid),
            PrincipalTerm::Group(name) => {
                id.group.as_deref() == Some(name.as_str())
                    || id.supplementary_groups.iter().any(|g| g == name)
            }
            PrincipalTerm::Cgroup(glob) => {
                id.cgroup.as_deref().is_some_and(|c| glob_match(glob, c))
            }
        }
    }
}

/// Whole-string glob match: `*` matches any run of characters (including `/`), `?` exactly one.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let pattern: Vec<char> = glob.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0usize, 0usize);
    // Where the last `*` was and which text position it is currently assumed to end at: on a
    // mismatch the star swallows one more character. Linear backtracking, no recursion, so a
    // hostile glob cannot blow the stack or take exponential time.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some('?') => {
                p += 1;
                t += 1;
            }
            Some(c) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

fn parse_id(kind: &'static str, value: &str) -> Result<u32, PrincipalError> {
    // `u32::from_str` accepts a leading `+`; ids are plain digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PrincipalError::BadId {
            kind,
            value: value.to_owned(),
        });
    }
    value.parse().map_err(|_| PrincipalError::BadId {
        kind,
        value: value.to_owned(),
    })
}

fn parse_name(kind: &'static str, value: &str) -> Result<String, PrincipalError> {
    if value.is_empty() {
        return Err(PrincipalError::EmptyName { kind });
    }
    // Unix user and group names cannot contain `:` (it separates passwd fields).
    if value.contains(':') {
        return Err(PrincipalError::BadName {
            kind,
            name: value.to_owned(),
        });
    }
    Ok(value.to_owned())
}

impl FromStr for PrincipalTerm {
    type Err = PrincipalError;

    fn from_str(term: &str) -> Result<Self, Self::Err> {
        let Some((kind, value)) = term.split_once(':') else {
            return Err(PrincipalError::MissingKind {
                term: term.to_owned(),
            });
        };
        match kind {
            "uid" => parse_id("uid", value).map(PrincipalTerm::Uid),
            "gid" => parse_id("gid", value).map(PrincipalTerm::Gid),
            "user" => parse_name("user", value).map(PrincipalTerm::User),
            "group" => parse_name("group", value).map(PrincipalTerm::Group),
            "cgroup" if value.is_empty() => Err(PrincipalError::EmptyName { kind: "cgroup" }),
            // Cgroup paths may contain `:` (e.g. `cri-containerd:…`), so the glob is kept whole.
            "cgroup" => Ok(PrincipalTerm::Cgroup(value.to_owned())),
            other => Err(PrincipalError::UnknownKind {
                kind: other.to_owned(),
            }),
        }
    }
}

impl FromStr for PrincipalSpec {
    type Err = PrincipalError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec.is_empty() {
            return Err(PrincipalError::Empty);
        }
        if spec.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PrincipalError::Whitespace {
                spec: spec.to_owned(),
            });
        }
        let terms = spec
            .split(';')
            .enumerate()
            .map(|(i, term)| {
                if term.is_empty() {
                    Err(PrincipalError::EmptyTerm { index: i + 1 })
                } else {
                    term.parse()
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PrincipalSpec { terms })
    }
}

impl fmt::Display for PrincipalTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrincipalTerm::Uid(v) => write!(f, "uid:{v}"),
            PrincipalTerm::User(v) => write!(f, "user:{v}"),
            PrincipalTerm::Gid(v) => write!(f, "gid:{v}"),
            PrincipalTerm::Group(v) => write!(f, "group:{v}"),
            PrincipalTerm::Cgroup(v) => write!(f, "cgroup:{v}"),
        }
    }
}

impl fmt::Display for PrincipalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(s: &str) -> PrincipalSpec {
        s.parse().unwrap()
    }

    fn err(s: &str) -> PrincipalError {
        s.parse::<PrincipalSpec>().unwrap_err()
    }

    #[test]
    fn principal_parses_every_kind() {
        let s = spec("uid:1001;user:alice;gid:3000;group:lab;cgroup:/slurm/uid_1001/job_*");
        assert_eq!(
            s.terms,
            vec![
                PrincipalTerm::Uid(1001),
                PrincipalTerm::User("alice".into()),
                PrincipalTerm::Gid(3000),
                PrincipalTerm::Group("lab".into()),
                PrincipalTerm::Cgroup("/slurm/uid_1001/job_*".into()),
            ]
        );
        assert_eq!(
            s.to_string(),
            "uid:1001;user:alice;gid:3000;group:lab;cgroup:/slurm/uid_1001/job_*"
        );
    }

    #[test]
    fn principal_canonical_form_drops_leading_zeros() {
        let s = spec("uid:007");
        assert_eq!(s.terms, vec![PrincipalTerm::Uid(7)]);
        assert_eq!(s.to_string(), "uid:7");
    }

    #[test]
    fn principal_cgroup_glob_keeps_colons() {
        assert_eq!(
            spec("cgroup:*cri-containerd:abc*").terms,
            vec![PrincipalTerm::Cgroup("*cri-containerd:abc*".into())]
        );
    }

    #[test]
    fn principal_errors_name_the_problem() {
        assert_eq!(err(""), PrincipalError::Empty);
        assert_eq!(err("uid:1;;user:a"), PrincipalError::EmptyTerm { index: 2 });
        assert_eq!(err("uid:1;"), PrincipalError::EmptyTerm { index: 2 });
        assert_eq!(
            err("foo:bar"),
            PrincipalError::UnknownKind { kind: "foo".into() }
        );
        assert!(err("foo:bar").to_string().contains("\"foo:\""));
        assert_eq!(
            err("uid:abc"),
            PrincipalError::BadId {
                kind: "uid",
                value: "abc".into()
            }
        );
        assert!(err("uid:abc").to_string().contains("\"abc\""));
        assert_eq!(
            err("gid:+5"),
            PrincipalError::BadId {
                kind: "gid",
                value: "+5".into()
            }
        );
        assert_eq!(
            err("uid:4294967296"),
            PrincipalError::BadId {
                kind: "uid",
                value: "4294967296".into()
            }
        );
        assert_eq!(
            err("uid:"),
            PrincipalError::BadId {
                kind: "uid",
                value: String::new()
            }
        );
        assert_eq!(err("user:"), PrincipalError::EmptyName { kind: "user" });
        assert_eq!(err("group:"), PrincipalError::EmptyName { kind: "group" });
        assert_eq!(err("cgroup:"), PrincipalError::EmptyName { kind: "cgroup" });
        assert_eq!(
            err("user:a:b"),
            PrincipalError::BadName {
                kind: "user",
                name: "a:b".into()
            }
        );
        assert_eq!(
            err("alice"),
            PrincipalError::MissingKind {
                term: "alice".into()
            }
        );
        assert_eq!(
            err("uid:1; user:a"),
            PrincipalError::Whitespace {
                spec: "uid:1; user:a".into()
            }
        );
        assert!(matches!(err(" uid:1"), PrincipalError::Whitespace { .. }));
        assert!(matches!(
            err("user:a\tb"),
            PrincipalError::Whitespace { .. }
        ));
        assert!(matches!(err("UID:1"), PrincipalError::UnknownKind { .. }));
    }

    #[test]
    fn principal_matches_uid_and_user() {
        let id = ProcessIdentity {
            uid: Some(1001),
            user: Some("alice".into()),
            ..Default::default()
        };
        assert!(spec("uid:1001").matches(&id));
        assert!(!spec("uid:1002").matches(&id));
        assert!(spec("user:alice").matches(&id));
        assert!(!spec("user:bob").matches(&id));
        assert!(spec("user:bob;uid:1001").matches(&id));
        assert!(!spec("user:bob;uid:1002").matches(&id));
    }

    #[test]
    fn principal_matches_primary_and_supplementary_groups() {
        let id = ProcessIdentity {
            uid: Some(1001),
            gid: Some(100),
            group: Some("users".into()),
            supplementary_gids: vec![3000, 3001],
            supplementary_groups: vec!["lab".into(), "gpu".into()],
            ..Default::default()
        };
        assert!(spec("gid:100").matches(&id));
        assert!(spec("gid:3001").matches(&id));
        assert!(!spec("gid:3002").matches(&id));
        assert!(spec("group:users").matches(&id));
        assert!(spec("group:gpu").matches(&id));
        assert!(!spec("group:other").matches(&id));
        // A gid term is not a uid term.
        assert!(!spec("gid:1001").matches(&id));
    }

    #[test]
    fn principal_unknown_identity_matches_nothing() {
        let id = ProcessIdentity::default();
        assert!(!spec("uid:0").matches(&id));
        assert!(!spec("gid:0").matches(&id));
        assert!(!spec("user:root").matches(&id));
        assert!(!spec("group:root").matches(&id));
        assert!(!spec("cgroup:*").matches(&id));
    }

    #[test]
    fn principal_cgroup_glob_matches_across_levels() {
        let id = ProcessIdentity {
            cgroup: Some("/kubepods.slice/kubepods-pod1234.slice/cri-containerd-ab12.scope".into()),
            ..Default::default()
        };
        assert!(spec("cgroup:*pod1234*").matches(&id));
        assert!(spec("cgroup:/kubepods.slice/*").matches(&id));
        assert!(spec("cgroup:/kubepods.slice/kubepods-pod????.slice/*").matches(&id));
        assert!(!spec("cgroup:/kubepods.slice/kubepods-pod???.slice/*").matches(&id));
        assert!(!spec("cgroup:*pod9999*").matches(&id));
        // Anchored at both ends.
        assert!(!spec("cgroup:/kubepods.slice").matches(&id));
        assert!(!spec("cgroup:kubepods.slice/*").matches(&id));
    }

    #[test]
    fn principal_glob_edge_cases() {
        assert!(glob_match("*", ""));
        assert!(glob_match("**", "abc"));
        assert!(!glob_match("?", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("a*b*c", "abcbc"));
        assert!(!glob_match("a*b*c", "abcb"));
        assert!(glob_match("*/job_?", "/slurm/uid_1/job_7"));
        assert!(!glob_match("*/job_?", "/slurm/uid_1/job_77"));
        assert!(glob_match("한*", "한국"));
        assert!(glob_match("?국", "한국"));
        // Pathological pattern stays fast (linear backtracking).
        let text = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*a*a*b", &text));
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_.-]{0,15}"
    }

    fn term() -> impl Strategy<Value = PrincipalTerm> {
        prop_oneof![
            any::<u32>().prop_map(PrincipalTerm::Uid),
            name().prop_map(PrincipalTerm::User),
            any::<u32>().prop_map(PrincipalTerm::Gid),
            name().prop_map(PrincipalTerm::Group),
            "[a-zA-Z0-9/._:*?-]{1,30}".prop_map(PrincipalTerm::Cgroup),
        ]
    }

    proptest! {
        #[test]
        fn principal_display_round_trips(terms in proptest::collection::vec(term(), 1..6)) {
            let spec = PrincipalSpec { terms };
            let text = spec.to_string();
            let back: PrincipalSpec = text.parse().unwrap();
            prop_assert_eq!(&back, &spec);
            prop_assert_eq!(back.to_string(), text);
        }

        #[test]
        fn principal_plain_glob_matches_only_itself(
            glob in "[a-z0-9/._-]{0,12}",
            other in "[a-z0-9/._-]{0,12}",
        ) {
            prop_assert!(glob_match(&glob, &glob));
            prop_assert_eq!(glob_match(&glob, &other), glob == other);
            let longer = format!("{glob}x");
            prop_assert!(!glob_match(&glob, &longer));
            let prefixed = format!("/{glob}");
            prop_assert!(!glob_match(&glob, &prefixed));
        }

        #[test]
        fn principal_star_glob_matches_any_infix(
            prefix in "[a-z/]{0,6}", middle in "[a-z/]{0,10}", suffix in "[a-z/]{0,6}",
        ) {
            let glob = format!("{prefix}*{suffix}");
            let text = format!("{prefix}{middle}{suffix}");
            prop_assert!(glob_match(&glob, &text));
        }
    }
}
