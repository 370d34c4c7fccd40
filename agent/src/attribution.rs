//! Attribution: who a GPU process belongs to. Reads `/proc/<pid>` (uid, gid, groups, cgroup)
//! and names users and groups through the system's name service (NSS), so accounts from LDAP
//! or SSSD match `user:`/`group:` principals as local ones do; pure helpers extract Slurm job
//! ids, Kubernetes pod UIDs and container ids from cgroup paths. Pod and container names come
//! from the kubelet where the agent asks it (`crate::kubelet`, `crate::pods`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use gpumeter_proto::principal::{PrincipalSpec, ProcessIdentity};

/// A process's identity plus what the agent reports about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub id: ProcessIdentity,
    pub slurm_job_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// The pod and container the kubelet's pod-resources API allocated the process's card to,
    /// set only when the process's cgroup pod is that pod (`crate::pods`).
    pub k8s_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_container_name: Option<String>,
}

impl Identity {
    /// The key usage is reported under: `user:NAME`, else `uid:N`, else `unknown`.
    pub fn label(&self) -> String {
        match (&self.id.user, self.id.uid) {
            (Some(u), _) => format!("user:{u}"),
            (None, Some(uid)) => format!("uid:{uid}"),
            (None, None) => "unknown".to_string(),
        }
    }

    /// Builds an identity from a cgroup path and ids, filling the workload fields.
    pub fn from_parts(id: ProcessIdentity) -> Self {
        let cg = id.cgroup.clone().unwrap_or_default();
        Self {
            slurm_job_id: slurm_job_id(&cg),
            k8s_pod_uid: k8s_pod_uid(&cg),
            container_id: container_id(&cg),
            id,
            ..Default::default()
        }
    }
}

/// Maps a pid to who runs it. `None` when the process is gone or unreadable.
pub trait Attributor: Send + 'static {
    fn identify(&mut self, pid: u32) -> Option<Identity>;
}

/// Reads identities from a procfs mount (normally `/proc`; the host's, mounted elsewhere, when
/// the agent runs in a container) and names from the system's name service.
#[derive(Debug)]
pub struct ProcAttributor {
    proc_root: PathBuf,
    names: NameCache,
}

/// How long a name found is kept before it is asked for again (renames are rare; a cache keeps
/// a directory server from being asked once per process per sample).
const NAME_TTL: Duration = Duration::from_secs(300);
/// How long an id without a name (or a failed lookup) waits before it is asked for again.
const MISS_TTL: Duration = Duration::from_secs(30);

/// User and group names through NSS (`getpwuid_r`, `getgrgid_r` by way of `nix`): the
/// sources `/etc/nsswitch.conf` names — files, LDAP, SSSD, extrausers — so an account that
/// exists only in a directory is named as it is everywhere else on the host. Cached per id.
/// A lookup that fails (directory unreachable) keeps the name last known for the id.
#[derive(Debug, Default)]
struct NameCache {
    users: HashMap<u32, Cached>,
    groups: HashMap<u32, Cached>,
}

#[derive(Debug)]
struct Cached {
    name: Option<String>,
    until: Instant,
}

/// What one NSS lookup said: a name, no such id, or the service failed.
type Lookup = Result<Option<String>, nix::Error>;

fn cached(
    map: &mut HashMap<u32, Cached>,
    id: u32,
    lookup: impl FnOnce(u32) -> Lookup,
) -> Option<String> {
    let now = Instant::now();
    if let Some(c) = map.get(&id)
        && c.until > now
    {
        return c.name.clone();
    }
    let name = match lookup(id) {
        Ok(name) => name,
        Err(e) => {
            let stale = map.get(&id).and_then(|c| c.name.clone());
            tracing::debug!(id, error = %e, "name lookup failed; keeping the last known name");
            stale
        }
    };
    let ttl = if name.is_some() { NAME_TTL } else { MISS_TTL };
    map.insert(
        id,
        Cached {
            name: name.clone(),
            until: now + ttl,
        },
    );
    name
}

impl NameCache {
    fn user(&mut self, uid: u32) -> Option<String> {
        cached(&mut self.users, uid, |uid| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).map(|u| u.map(|u| u.name))
        })
    }

    fn group(&mut self, gid: u32) -> Option<String> {
        cached(&mut self.groups, gid, |gid| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).map(|g| g.map(|g| g.name))
        })
    }
}

/// Parses `/etc/passwd` or `/etc/group`: `name:x:id:...` per line.
pub fn parse_name_db(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _ = f.next()?;
            let id = f.next()?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

impl Default for ProcAttributor {
    fn default() -> Self {
        Self::new(Path::new("/proc"))
    }
}

impl ProcAttributor {
    /// Reads processes under `proc_root`. Pids are the driver's, which are the host's: an agent
    /// in a container needs the host's procfs here (and the host's pid namespace).
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            names: NameCache::default(),
        }
    }
}

impl Attributor for ProcAttributor {
    fn identify(&mut self, pid: u32) -> Option<Identity> {
        let dir = self.proc_root.join(pid.to_string());
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let st = parse_status(&status);
        let cgroup = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|t| parse_cgroup(&t));
        let user = st.uid.and_then(|u| self.names.user(u));
        let group = st.gid.and_then(|g| self.names.group(g));
        // The process's own supplementary groups (what the kernel checks), named through NSS;
        // not the user's groups in the directory (`getgrouplist`), which a process may have
        // dropped or never been given.
        let supplementary_groups = st
            .groups
            .iter()
            .filter_map(|g| self.names.group(*g))
            .collect();
        Some(Identity::from_parts(ProcessIdentity {
            uid: st.uid,
            gid: st.gid,
            user,
            group,
            supplementary_gids: st.groups,
            supplementary_groups,
            cgroup,
        }))
    }
}

/// Fields of `/proc/<pid>/status` that attribution needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real uid.
    pub uid: Option<u32>,
    /// Real gid.
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
}

pub fn parse_status(text: &str) -> ProcStatus {
    let mut st = ProcStatus::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            st.uid = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            st.gid = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            st.groups = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
        }
    }
    st
}

/// The process's cgroup path from `/proc/<pid>/cgroup`: the unified (v2) entry `0::PATH`, else
/// the first v1 entry naming a path other than `/`.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let mut v1 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            return Some(path.to_string());
        }
        if v1.is_none() && path != "/" {
            v1 = Some(path.to_string());
        }
    }
    v1
}

/// Slurm job id from paths like `/system.slice/slurmstepd.scope/job_1234/step_0` or
/// `/slurm/uid_1000/job_1234/step_batch`.
pub fn slurm_job_id(cgroup: &str) -> Option<String> {
    cgroup.split('/').find_map(|seg| {
        let id = seg.strip_prefix("job_")?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
    })
}

/// Kubernetes pod UID from paths like `/kubepods/burstable/pod<uid>/<container>` (cgroupfs) or
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/...`
/// (systemd driver, where the UID's dashes are written as underscores).
pub fn k8s_pod_uid(cgroup: &str) -> Option<String> {
    if !cgroup.contains("kubepods") {
        return None;
    }
    cgroup.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let pos = seg.rfind("pod")?;
        let uid = &seg[pos + 3..];
        let looks_like_uid = uid.len() == 36
            && uid
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
        looks_like_uid.then(|| uid.replace('_', "-"))
    })
}

/// Container id (64 hex characters) from the last path segment, as written by docker,
/// containerd (`cri-containerd-<id>.scope`) and CRI-O (`crio-<id>.scope`).
pub fn container_id(cgroup: &str) -> Option<String> {
    let last = cgroup.rsplit('/').next()?;
    let last = last.strip_suffix(".scope").unwrap_or(last);
    let id = last.rsplit(['-', ':']).next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// A fixed pid → identity table, for simulated cards.
#[derive(Debug, Default, Clone)]
pub struct TableAttributor {
    pub table: HashMap<u32, Identity>,
}

impl Attributor for TableAttributor {
    fn identify(&mut self, pid: u32) -> Option<Identity> {
        self.table.get(&pid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let st = parse_status(
            "Name:\tpython\nUid:\t1001\t1001\t1001\t1001\nGid:\t3000\t3000\t3000\t3000\nGroups:\t3000 3001 \n",
        );
        assert_eq!(
            st,
            ProcStatus {
                uid: Some(1001),
                gid: Some(3000),
                groups: vec![3000, 3001]
            }
        );
    }

    #[test]
    fn cgroup_paths() {
        assert_eq!(
            parse_cgroup(
                "12:cpu:/\n0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n"
            ),
            Some("/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0".into())
        );
        assert_eq!(
            slurm_job_id("/system.slice/slurmstepd.scope/job_4711/step_0"),
            Some("4711".into())
        );
        assert_eq!(slurm_job_id("/user.slice/job_x"), None);
        assert_eq!(
            k8s_pod_uid("/kubepods/burstable/pod3f2a1b4c-1111-2222-3333-444455556666/abc"),
            Some("3f2a1b4c-1111-2222-3333-444455556666".into())
        );
        assert_eq!(
            k8s_pod_uid(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f2a1b4c_1111_2222_3333_444455556666.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope"
            ),
            Some("3f2a1b4c-1111-2222-3333-444455556666".into())
        );
        assert_eq!(
            container_id(
                "/kubepods.slice/x.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope"
            )
            .as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(k8s_pod_uid("/user.slice/pod"), None);
    }

    #[test]
    fn reads_own_process() {
        let mut a = ProcAttributor::default();
        let me = a.identify(std::process::id()).expect("own /proc entry");
        let uid = parse_status(&std::fs::read_to_string("/proc/self/status").unwrap()).uid;
        assert_eq!(me.id.uid, uid);
        assert!(me.label().starts_with("user:") || me.label().starts_with("uid:"));
        assert_eq!(a.identify(u32::MAX), None);
    }

    #[test]
    fn name_db() {
        let db = parse_name_db(
            "root:x:0:0:root:/root:/bin/bash\n# c\nalice:x:1001:1001::/home/alice:/bin/sh\nbad\n",
        );
        assert_eq!(db.get(&1001).map(String::as_str), Some("alice"));
        assert_eq!(db.len(), 2);
    }
}
