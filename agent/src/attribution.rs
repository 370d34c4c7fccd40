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
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), as
    /// read with this identity; with `uid` it tells this process from a later one on its pid.
    pub start_ticks: Option<u64>,
    /// The process had exited (a zombie, or being torn down) when it was read.
    pub exited: bool,
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
    /// `proc_root` is `/proc`, whose pids are the agent's own pid namespace's (pidfds name them).
    own_proc: bool,
    /// What was read of each pid, kept while its start time stays the same.
    known: HashMap<u32, Known>,
    pruned: Instant,
}

/// A process's identity as last read in full.
#[derive(Debug)]
struct Known {
    start_ticks: u64,
    identity: Identity,
    read: Instant,
    /// A pidfd of the process the identity was read from (only where `proc_root` is this pid
    /// namespace's `/proc`): while it does not poll readable, that process is alive and still
    /// holds the pid, so the identity is reused without reading `/proc` at all.
    pidfd: Option<std::os::fd::OwnedFd>,
}

/// At most this many pidfds are held; processes past it are checked through `stat`.
const PIDFDS_MAX: usize = 256;

/// Whether the process `fd` refers to is still running (its pidfd polls readable once it has
/// exited).
fn running(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(0))
}

/// A pidfd for `pid`, when the agent may hold one more.
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// How long a process's identity (uid, gids, cgroup) is reused before `status` and `cgroup`
/// are read again. Every read checks `stat` first, so a new process on a reused pid is never
/// taken for the old one; what this bounds is how late a live process's change of uid or
/// cgroup is seen.
const IDENTITY_TTL: Duration = Duration::from_secs(10);

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
            own_proc: proc_root == Path::new("/proc"),
            known: HashMap::new(),
            pruned: Instant::now(),
        }
    }
}

impl Attributor for ProcAttributor {
    fn identify(&mut self, pid: u32) -> Option<Identity> {
        let now = Instant::now();
        if now.duration_since(self.pruned) >= IDENTITY_TTL {
            // Pids not asked about for a while have left the cards.
            self.known
                .retain(|_, k| now.duration_since(k.read) < 2 * IDENTITY_TTL);
            self.pruned = now;
        }
        if let Some(k) = self.known.get(&pid)
            && now.duration_since(k.read) < IDENTITY_TTL
            && k.pidfd.as_ref().is_some_and(running)
        {
            return Some(k.identity.clone());
        }
        // Opened before `stat` is read: if the pidfd's process is still running after the
        // read, the read was of that process and not of a later one on the same pid.
        let pidfd = (self.own_proc && self.known.len() < PIDFDS_MAX)
            .then(|| open_pidfd(pid))
            .flatten();
        let dir = self.proc_root.join(pid.to_string());
        let Some((state, start_ticks)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            // A procfs without a readable `stat` (a restricted or partial mount): no start
            // time tells one process on the pid from the next, so nothing is reused.
            self.known.remove(&pid);
            return self.read_identity(&dir);
        };
        let exited = matches!(state, 'Z' | 'X' | 'x');
        let pidfd = pidfd.filter(|fd| !exited && running(fd));
        if let Some(k) = self.known.get_mut(&pid)
            && k.start_ticks == start_ticks
            && now.duration_since(k.read) < IDENTITY_TTL
        {
            k.pidfd = pidfd;
            return Some(Identity {
                exited,
                ..k.identity.clone()
            });
        }
        let identity = self.read_identity(&dir)?;
        let identity = Identity {
            start_ticks: Some(start_ticks),
            exited,
            ..identity
        };
        self.known.insert(
            pid,
            Known {
                start_ticks,
                identity: identity.clone(),
                read: now,
                pidfd,
            },
        );
        Some(identity)
    }
}

impl ProcAttributor {
    /// Reads `status` and `cgroup` of the process at `dir` and names its ids.
    fn read_identity(&mut self, dir: &Path) -> Option<Identity> {
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

/// State and start time from the text of `/proc/<pid>/stat`. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
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

    /// A procfs with `status` and `cgroup` but no `stat` (a partial mount) still names its
    /// processes, read afresh each time since no start time tells them apart.
    #[test]
    fn a_procfs_without_stat_still_names_processes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("4100001");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("status"),
            "Uid:\t1234\t1234\t1234\t1234\nGid:\t99\t99\t99\t99\n",
        )
        .unwrap();
        std::fs::write(dir.join("cgroup"), "0::/slurm/uid_1234/job_77/step_0\n").unwrap();
        let mut a = ProcAttributor::new(root.path());
        let id = a.identify(4_100_001).expect("named from status");
        assert_eq!((id.id.uid, id.start_ticks), (Some(1234), None));
        assert_eq!(id.slurm_job_id.as_deref(), Some("77"));
        std::fs::write(dir.join("status"), "Uid:\t4321\t4321\t4321\t4321\n").unwrap();
        assert_eq!(
            a.identify(4_100_001).unwrap().id.uid,
            Some(4321),
            "nothing reused"
        );
    }

    /// A process's identity is reused while its pidfd says it runs, and the reuse ends the
    /// moment it exits: the zombie is reported exited, and once reaped the pid is nobody's.
    #[test]
    fn a_reused_identity_ends_with_the_process() {
        let mut a = ProcAttributor::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let first = a.identify(pid).expect("the child's identity");
        assert!(!first.exited);
        let start = first.start_ticks.expect("its start time");
        assert!(a.known[&pid].pidfd.is_some(), "a pidfd is held for it");
        // Reused: the same identity, with no /proc read.
        assert_eq!(a.identify(pid).as_ref(), Some(&first));
        child.kill().unwrap();
        // Until the zombie shows, the pidfd may not have fired yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        let zombie = loop {
            let id = a.identify(pid).expect("a zombie still has a /proc entry");
            if id.exited || Instant::now() > deadline {
                break id;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(zombie.exited, "an exited process is reported so");
        assert_eq!(zombie.start_ticks, Some(start));
        assert!(
            a.known[&pid].pidfd.is_none(),
            "no pidfd vouches for a zombie"
        );
        child.wait().unwrap();
        assert_eq!(a.identify(pid), None, "a reaped pid is nobody's");
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
