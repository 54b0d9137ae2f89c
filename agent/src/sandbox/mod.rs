//! The sandbox every run executes in. The only module of Lull with `unsafe` (one `fork`).
//!
//! Setup is a fixed sequence of small named steps, each failing with an error that names it
//! ([`SandboxError`]). One entry point, [`confine_run`], for a **single-threaded** process (the
//! cold launcher `lull-sandbox`, or a zygote child), per run: own session; death with the
//! parent; a cgroup; new PID, mount, network, IPC and UTS namespaces (the process forks: the
//! child is PID 1 of the new namespace and runs the code, the parent waits and exits with the
//! run's status, so when PID 1 ends, or is killed, the kernel kills everything left in it — a
//! double-forked, `setsid` daemon included; no network, no SysV IPC or abstract socket shared
//! with any other run); private tmpfs on `/tmp` (the working directory), `/var/tmp`,
//! `/dev/shm` and `/run`; a minimal `/dev`; a fresh `/proc`; the host read-only; rlimits; an
//! unprivileged uid/gid without supplementary groups; `no_new_privs`; every other fd closed
//! (a zygote run keeps one, its report socket on [`REPORT_FD`]); a seccomp filter last.
//!
//! The zygote takes the same steps through [`ForkedRun`], as the watcher of its runs itself:
//! it forks each run straight into a new PID namespace (one fork instead of two), lends it
//! a cgroup and a network namespace from [`RunPools`], and lets it copy its mounts from a
//! [`MountTemplate`] built once.
//!
//! Which steps apply is decided once, by [`probe`]: it runs the whole setup in a throwaway
//! launcher for the strongest protections first and settles on the first that works. What
//! the probe could not apply is reported in [`Protections::missing`], never pretended.
//!
//! Architecture Invariant: nothing here runs in a multi-threaded process. The agent never
//! calls [`confine_run`] itself; it starts `lull-sandbox` or asks the zygote.
#![allow(unsafe_code)]

mod cgroup;
mod seccomp;

pub use cgroup::{
    remove_run as remove_run_cgroup, sweep_stale as sweep_stale_cgroups, thread_count,
};

use lull_shared::{Protections, RunId, SandboxLevel};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, getpid, getppid, setresgid, setresuid, setsid};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A sandbox step that failed; the message names the step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("new session: {0}")]
    Session(nix::Error),
    #[error("parent-death signal: {0}")]
    DeathSignal(nix::Error),
    #[error("namespaces: {0}")]
    Namespaces(nix::Error),
    #[error("fork into the new PID namespace: {0}")]
    Fork(nix::Error),
    #[error("mount {what}: {source}")]
    Mount {
        what: &'static str,
        source: nix::Error,
    },
    #[error("hostname: {0}")]
    Hostname(nix::Error),
    #[error("working directory {path}: {source}")]
    WorkDir { path: String, source: nix::Error },
    #[error("rlimit {what}: {source}")]
    Rlimit {
        what: &'static str,
        source: nix::Error,
    },
    #[error("drop to uid {uid} gid {gid}: {source}")]
    DropUser {
        uid: u32,
        gid: u32,
        source: nix::Error,
    },
    #[error("dumpable: {0}")]
    Dumpable(nix::Error),
    #[error("no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("closing inherited files: {0}")]
    CloseFds(std::io::Error),
    #[error("the descriptor the run reports its end on: {0}")]
    ReportFd(std::io::Error),
    #[error("signal mask: {0}")]
    SignalMask(nix::Error),
    #[error("refusing to fork a process that is not single-threaded: {0}")]
    Threads(String),
    #[error("standard streams: {0}")]
    Stdio(std::io::Error),
}

/// What one run is allowed, and which protections to apply. Crosses process boundaries
/// (agent → launcher, agent → zygote) as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPolicy {
    pub run_id: RunId,
    pub protections: Protections,
    pub uid: u32,
    pub gid: u32,
    /// Address space per process, and the run's cgroup memory limit.
    pub memory_mb: u64,
    pub cpu_seconds: u64,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub max_open_files: u64,
    /// Size of the run's private `/tmp` (its working directory).
    pub disk_mb: u64,
    /// Inodes of the run's private `/tmp`.
    pub max_files: u64,
    /// Working directory when there is no private `/tmp` (no namespaces): made by the agent.
    pub workdir: Option<PathBuf>,
    /// The run's cgroup name: unique on this host (run ids are only unique per coordinator,
    /// and one host may run agents of several).
    pub cgroup: String,
    /// Directories the run must be able to read although an ancestor is closed to its uid
    /// (the interpreter's prefix under `/root`, as pyenv installs it). See [`expose`].
    #[serde(default)]
    pub expose: Vec<PathBuf>,
}

/// The agent's sandbox settings (from its configuration), shared by every run.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSettings {
    /// uid/gid runs execute as when the agent is root.
    pub uid: u32,
    pub gid: u32,
    /// Directories runs must read (the interpreter's prefix); see [`RunPolicy::expose`].
    pub expose: Vec<PathBuf>,
    pub max_processes: u64,
    pub max_file_bytes: u64,
    pub max_open_files: u64,
    pub disk_mb: u64,
    pub max_files: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            uid: 65534,
            gid: 65534,
            expose: Vec::new(),
            max_processes: 64,
            max_file_bytes: 64 * 1024 * 1024,
            max_open_files: 256,
            disk_mb: 256,
            max_files: 16_384,
        }
    }
}

/// A cgroup name no other run on this host has: the agent's pid (run ids are unique only per
/// coordinator, and one host may run agents of several), the run id (for people reading
/// `/sys/fs/cgroup`), and a sequence number (within one agent, probes and warm-up runs reuse
/// run ids).
fn cgroup_name(run_id: RunId) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{run_id}-{seq}", std::process::id())
}

impl RunPolicy {
    /// The policy for one run: its memory from the task's resources, its CPU time from the
    /// task's timeout (rounded up, plus one second so the wall clock usually speaks first).
    pub fn for_job(
        run_id: RunId,
        protections: &Protections,
        settings: &SandboxSettings,
        memory_mb: f64,
        timeout: Duration,
        workdir: Option<PathBuf>,
    ) -> RunPolicy {
        RunPolicy {
            run_id,
            protections: protections.clone(),
            uid: settings.uid,
            gid: settings.gid,
            memory_mb: memory_mb.ceil().max(16.0) as u64,
            cpu_seconds: timeout.as_secs_f64().ceil() as u64 + 1,
            max_processes: settings.max_processes,
            max_file_bytes: settings.max_file_bytes,
            max_open_files: settings.max_open_files,
            disk_mb: settings.disk_mb,
            max_files: settings.max_files,
            workdir,
            cgroup: cgroup_name(run_id),
            expose: settings.expose.clone(),
        }
    }

    /// Where the run's code starts and what HOME/TMPDIR are.
    pub fn home(&self) -> PathBuf {
        match (&self.workdir, self.protections.namespaces) {
            (_, true) | (None, false) => PathBuf::from("/tmp"),
            (Some(dir), false) => dir.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Setup, in a single-threaded process
// ---------------------------------------------------------------------------------------------

/// Does once, in a long-lived process that forks runs (the zygote), the setup work that is
/// the same for every run, so that its children inherit it instead of repeating it.
pub fn prepare() -> Result<(), SandboxError> {
    // What an earlier zygote that was killed left behind.
    cgroup::sweep_stale();
    seccomp::programs().map(|_| ())
}

/// The namespaces a run gets besides its PID namespace.
const RUN_NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS);

/// Confines the calling process for one run; see the module docs. Returns only in the
/// process that must now run the code. With namespaces, the calling process becomes the
/// run's watcher: it never returns, and exits with the run's status.
pub fn confine_run(policy: &RunPolicy) -> Result<(), SandboxError> {
    // Built first: a filter that cannot be built fails the run before anything changed.
    let filters = filters_for(policy)?;
    new_session()?;
    die_with_parent()?;
    let mut cgroup = join_new_cgroup(policy)?;
    confine_in_cgroup(policy, cgroup.as_mut(), filters, CloneFlags::empty())
}

/// Where a forked run's process finds the descriptor it reports its own end on (see
/// [`ForkedRun::confine`]): the one descriptor above 2 it keeps, close-on-exec.
pub const REPORT_FD: RawFd = 3;

/// The run's cgroup, made for `policy` (its name and limits) and joined, if it gets one.
fn join_new_cgroup(policy: &RunPolicy) -> Result<Option<cgroup::RunCgroup>, SandboxError> {
    if !policy.protections.cgroups {
        return Ok(None);
    }
    let group = cgroup::RunCgroup::create(
        &policy.cgroup,
        policy.memory_mb.saturating_mul(1024 * 1024),
        policy.max_processes,
    )?;
    group.join()?;
    Ok(Some(group))
}

/// The cgroup of the cold launcher `pid` started ahead of its run: named after the launcher,
/// so that [`sweep_stale_cgroups`] removes it once that process is gone, whatever became of
/// the agent (a restart keeps the agent's pid).
pub fn spare_cgroup_name(pid: u32) -> String {
    format!("{pid}-spare")
}

/// What a cold launcher started ahead of its run holds while it waits: see
/// [`prepare_launch`].
#[derive(Debug)]
pub struct PreparedLaunch {
    cgroup: Option<cgroup::RunCgroup>,
    /// Namespaces already made while waiting ([`AHEAD_NAMESPACES`], or none).
    made: CloneFlags,
}

/// The namespaces a cold launcher started ahead of its run makes while it waits: fresh and
/// unused (nothing ran in them yet), exactly what the run would get at its start, minus the
/// time. A new network namespace is most of it (a few ms of kernel work); the mount and PID
/// namespaces are made at the run's start as before (the PID namespace needs the fork that
/// only the run's start does, and the mounts are the run's own).
const AHEAD_NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNET
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS);

/// What the agent sends a launcher started ahead of its run (`lull-sandbox --spare`), as
/// one line of JSON on its stdin: the run's policy (naming the cgroup the launcher made) and
/// what to exec, with the environment it gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub policy: RunPolicy,
    pub program: String,
    pub args: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
}

/// In a cold launcher started before its run (the agent keeps a few ready): its session, the
/// parent-death signal and its cgroup (named and first limited by `template`), the step that
/// can wait on the kernel for long: on cgroup v1 the first attach after a quiet spell waits
/// an RCU grace period (10-30 ms on a VM, against a few for the rest of the launcher's work).
/// [`PreparedLaunch::launch`] does the rest once the run is known.
pub fn prepare_launch(template: &RunPolicy) -> Result<PreparedLaunch, SandboxError> {
    new_session()?;
    die_with_parent()?;
    let cgroup = join_new_cgroup(template)?;
    let made = if template.protections.namespaces {
        unshare(AHEAD_NAMESPACES).map_err(SandboxError::Namespaces)?;
        AHEAD_NAMESPACES
    } else {
        CloneFlags::empty()
    };
    Ok(PreparedLaunch { cgroup, made })
}

impl PreparedLaunch {
    /// Confines this launcher for `request`'s run (its cgroup's limits set to the policy's) as
    /// [`launch`] would, and execs the program with exactly `request.env`. Returns only on
    /// failure.
    pub fn launch(mut self, request: &LaunchRequest) -> std::io::Error {
        use std::os::unix::process::CommandExt as _;
        let policy = &request.policy;
        let confined = (|| {
            let filters = filters_for(policy)?;
            if let Some(group) = &self.cgroup {
                group.set_limits(
                    policy.memory_mb.saturating_mul(1024 * 1024),
                    policy.max_processes,
                )?;
            }
            confine_in_cgroup(policy, self.cgroup.as_mut(), filters, self.made)
        })();
        if let Err(e) = confined {
            return std::io::Error::other(e.to_string());
        }
        default_signal_dispositions();
        Command::new(&request.program)
            .args(&request.args)
            .env_clear()
            .envs(&request.env)
            .exec()
    }
}

/// [`confine_run`] from the moment the process is in its cgroup. `made`: the namespaces this
/// process made fresh already (a launcher started ahead of its run), not made again.
fn confine_in_cgroup(
    policy: &RunPolicy,
    mut cgroup: Option<&mut cgroup::RunCgroup>,
    filters: &[seccompiler::BpfProgram],
    made: CloneFlags,
) -> Result<(), SandboxError> {
    let p = &policy.protections;
    if p.namespaces {
        if let Some(group) = cgroup.as_deref_mut() {
            // The watcher reads the OOM count at the end, in the mount namespace it shares
            // with the run, which no longer has the host's /sys by then: open beforehand.
            group.hold_files()?;
        }
        unshare((CloneFlags::CLONE_NEWPID | RUN_NAMESPACES).difference(made))
            .map_err(SandboxError::Namespaces)?;
        // The watcher must not be what the OOM killer picks in the run's cgroup: it reports
        // the kill and cleans up. PID 1 goes back to 0.
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
        fork_pid_one(policy, cgroup.as_deref())?;
        // From here on: PID 1 of the run's namespace.
        let _ = std::fs::write("/proc/self/oom_score_adj", "0");
        die_with_parent()?;
        private_mounts(policy)?;
        nix::unistd::sethostname("lull").map_err(SandboxError::Hostname)?;
    }
    confine_process(policy, filters, None).map(drop)
}

/// The steps every run's process takes last, after its namespaces and mounts: working
/// directory, rlimits, the uid drop, `no_new_privs`, no inherited fds (but `report`, moved to
/// [`REPORT_FD`]), seccomp.
fn confine_process(
    policy: &RunPolicy,
    filters: &[seccompiler::BpfProgram],
    report: Option<OwnedFd>,
) -> Result<Option<OwnedFd>, SandboxError> {
    enter_workdir(policy)?;
    limit_resources(policy)?;
    if policy.protections.drop_user {
        drop_user(policy.uid, policy.gid)?;
        // Changing credentials clears the parent-death signal and makes the process
        // non-dumpable (its own /proc/self unreadable): restore both.
        die_with_parent()?;
        nix::sys::prctl::set_dumpable(true).map_err(SandboxError::Dumpable)?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let report = match report {
        Some(fd) => {
            let kept = keep_as_report_fd(fd)?;
            close_range(REPORT_FD + 1, RawFd::MAX)?;
            Some(kept)
        }
        None => {
            close_inherited_fds()?;
            None
        }
    };
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(SandboxError::SignalMask)?;
    seccomp::install(filters)?;
    Ok(report)
}

/// The seccomp programs `policy`'s run installs: none without the `seccomp` protection.
fn filters_for(policy: &RunPolicy) -> Result<&'static [seccompiler::BpfProgram], SandboxError> {
    if policy.protections.seccomp {
        seccomp::programs()
    } else {
        Ok(&[])
    }
}

/// One run forked by a long-lived, single-threaded parent (the zygote) that is the run's
/// watcher itself: one fork per run instead of [`confine_run`]'s two. The parent makes the
/// run's cgroup and a fresh PID namespace for its next child ([`ForkedRun::prepare`]), forks,
/// takes its own PID namespace back for later children ([`ForkedRun::restore`]); the child,
/// born PID 1 of the new namespace, confines itself ([`ForkedRun::confine`]); once the parent
/// has reaped it, [`ForkedRun::finish`] says what only the parent could see and gives the
/// cgroup and network namespace back to the [`RunPools`]. When PID 1 ends, the kernel kills
/// everything else in its namespace.
#[derive(Debug)]
pub struct ForkedRun {
    cgroup: Option<LentCgroup>,
    /// A network namespace lent by the pool (see [`NetworkPool`]), which the child enters.
    network: Option<std::fs::File>,
    /// The mount template (see [`MountTemplate`]) the child copies its mounts from.
    mounts: Option<std::fs::File>,
    /// The parent's own PID namespace, while its next child is to be born in a new one.
    parent_pid_ns: Option<std::fs::File>,
}

/// What a long-lived parent keeps for its runs between them: see [`CgroupPool`] and
/// [`NetworkPool`].
#[derive(Debug, Default)]
pub struct RunPools {
    cgroups: CgroupPool,
    networks: NetworkPool,
    mounts: MountTemplate,
}

/// The part of a run's mount namespace that holds nothing of any run ([`shared_mounts`]: the
/// host read-only, an empty `/run`, a minimal `/dev`, the exposed interpreter), built once by
/// a long-lived parent (the zygote) in a namespace of its own that it keeps open. Each run
/// enters it and at once unshares a private copy (`setns` + `unshare`, which the kernel makes
/// from the template's mount list), then mounts only what is its own ([`run_mounts`]): about
/// thirty fewer mount, mknod and mkdir calls per run than building it all. A run never stays
/// in the template itself, and cannot return to it (it holds no descriptor of it, and seccomp
/// refuses `setns`), so nothing a run does reaches another run.
#[derive(Debug, Default)]
pub struct MountTemplate {
    /// The template and what it was built for: the directories it exposes (the only part of
    /// a policy it depends on; empty when runs keep root's uid).
    built: Option<(Vec<PathBuf>, std::fs::File)>,
    /// A template could not be built (said once): runs then build all their mounts themselves.
    failed: bool,
}

impl MountTemplate {
    /// The template for `policy`, built now if needed; `None` (said once on stderr) when this
    /// host would not let the parent build one, and the run builds its mounts itself.
    fn lend(&mut self, policy: &RunPolicy) -> Option<std::fs::File> {
        let exposed = if policy.protections.drop_user {
            policy.expose.clone()
        } else {
            Vec::new()
        };
        if self
            .built
            .as_ref()
            .is_none_or(|(built_for, _)| *built_for != exposed)
        {
            if self.failed {
                return None;
            }
            match build_mount_template(policy) {
                Ok(template) => self.built = Some((exposed, template)),
                Err(err) => {
                    self.failed = true;
                    self.built = None;
                    let _ = writeln!(
                        std::io::stderr(),
                        "lull sandbox: no shared mount template ({err}); each run builds its own mounts"
                    );
                    return None;
                }
            }
        }
        self.built
            .as_ref()
            .and_then(|(_, template)| template.try_clone().ok())
    }
}

/// Builds the mount template in a new mount namespace of the calling (single-threaded)
/// process, and returns to the caller's own namespace and working directory whatever happens.
/// An error while returning is fatal to the caller (it would stay in the template).
fn build_mount_template(policy: &RunPolicy) -> Result<std::fs::File, SandboxError> {
    let io = |e: std::io::Error| {
        SandboxError::Namespaces(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    };
    let own = std::fs::File::open("/proc/self/ns/mnt").map_err(io)?;
    let cwd = std::fs::File::open(".").map_err(io)?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(SandboxError::Namespaces)?;
    // Opened before the mounts are made: they detach the host's /proc (the file names the
    // namespace, whatever is mounted in it later).
    let built = std::fs::File::open("/proc/self/ns/mnt")
        .map_err(io)
        .and_then(|template| shared_mounts(policy).map(|()| template));
    if let Err(err) = nix::sched::setns(&own, CloneFlags::CLONE_NEWNS) {
        let _ = writeln!(
            std::io::stderr(),
            "lull sandbox: could not leave the mount template: {err}"
        );
        exit_now(125);
    }
    // Entering a mount namespace moves the caller to its root.
    let _ = nix::unistd::fchdir(&cwd);
    built
}

/// Empty network namespaces a long-lived parent (the zygote, as root) reuses, one run at a
/// time each: making one and tearing it down costs more CPU than any other step of a run's
/// sandbox. A network namespace has nothing of a run left in it once the run's PID namespace
/// is gone: sockets (abstract Unix ones included) close with the last process holding them,
/// loopback stays down (TCP cannot even leave `TIME_WAIT` behind), and a run, unprivileged,
/// can change none of its settings. So only runs that drop to an unprivileged user share the
/// pool; the others get a namespace of their own. Each run still has its own mount, IPC,
/// UTS and PID namespaces.
#[derive(Debug, Default)]
pub struct NetworkPool {
    free: Vec<std::fs::File>,
}

impl NetworkPool {
    fn lend(&mut self) -> Result<std::fs::File, SandboxError> {
        if let Some(namespace) = self.free.pop() {
            return Ok(namespace);
        }
        let io = |e: std::io::Error| {
            SandboxError::Namespaces(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        };
        let own = std::fs::File::open("/proc/self/ns/net").map_err(io)?;
        unshare(CloneFlags::CLONE_NEWNET).map_err(SandboxError::Namespaces)?;
        let made = std::fs::File::open("/proc/self/ns/net").map_err(io);
        // Back to its own, whatever happened: the parent stays out of its runs' namespaces.
        nix::sched::setns(&own, CloneFlags::CLONE_NEWNET).map_err(SandboxError::Namespaces)?;
        made
    }

    fn take_back(&mut self, namespace: std::fs::File) {
        self.free.push(namespace);
    }
}

/// A run's cgroup, lent by a [`CgroupPool`] for one run.
#[derive(Debug)]
struct LentCgroup {
    group: cgroup::RunCgroup,
    /// The group's OOM kills before this run: the kernel's counter only ever grows.
    oom_kills_before: u64,
    /// The group's OOM kills once the run is reaped, read by [`ForkedRun::finish`].
    oom_kills_after: Option<u64>,
    /// The memory and process limits the group holds.
    limits: (u64, u64),
    reusable: bool,
    /// Whether the run could not have changed the limits (it dropped to an unprivileged user).
    limits_kept: bool,
}

/// A group waiting in a [`CgroupPool`], with what is known of it without asking the kernel.
#[derive(Debug)]
struct PooledCgroup {
    group: cgroup::RunCgroup,
    /// The limits it holds, when known for sure.
    limits: Option<(u64, u64)>,
    oom_kills: u64,
}

/// The run cgroups a long-lived parent (the zygote) reuses: making and removing a memory and a
/// pids cgroup costs about as much CPU as the rest of a run's sandbox. A group is lent to one
/// run at a time, and taken back only when the run had its own PID namespace (so nothing of
/// it can be left inside once PID 1 is reaped) and the group is empty; its limits are set
/// anew for each run, unless the last run asked for the same and could not change them (it
/// dropped to an unprivileged user; the files are root's), and an OOM kill counts for a run only if it happened during it. Runs without
/// namespaces get a fresh group each, removed after them. Dropping the pool removes the
/// groups it holds; groups of a pool whose process died are swept as stale (their names carry
/// its pid).
#[derive(Debug, Default)]
pub struct CgroupPool {
    free: Vec<PooledCgroup>,
    made: u64,
}

impl CgroupPool {
    fn lend(&mut self, policy: &RunPolicy) -> Result<LentCgroup, SandboxError> {
        let limits = (
            policy.memory_mb.saturating_mul(1024 * 1024),
            policy.max_processes,
        );
        let reusable = policy.protections.namespaces;
        let limits_kept = policy.protections.drop_user;
        if reusable && let Some(pooled) = self.reuse(limits) {
            return Ok(LentCgroup {
                group: pooled.group,
                oom_kills_before: pooled.oom_kills,
                oom_kills_after: None,
                limits,
                reusable,
                limits_kept,
            });
        }
        let group = if reusable {
            self.made += 1;
            let name = format!("{}-pool-{}", std::process::id(), self.made);
            let mut group = cgroup::RunCgroup::create(&name, limits.0, limits.1)?;
            // It will serve many runs. Should its files not open now, they are opened by
            // path each time, as for a group of one run.
            let _ = group.hold_files();
            group
        } else {
            cgroup::RunCgroup::create(&policy.cgroup, limits.0, limits.1)?
        };
        Ok(LentCgroup {
            oom_kills_before: group.oom_kills(),
            oom_kills_after: None,
            group,
            limits,
            reusable,
            limits_kept,
        })
    }

    /// A pooled group set to `limits`, if one is free and can take them.
    fn reuse(&mut self, limits: (u64, u64)) -> Option<PooledCgroup> {
        while let Some(pooled) = self.free.pop() {
            if pooled.limits == Some(limits) {
                return Some(pooled);
            }
            match pooled.group.set_limits(limits.0, limits.1) {
                Ok(()) => return Some(pooled),
                // Memory it cannot give back under the new limit: start afresh.
                Err(_) => pooled.group.remove(),
            }
        }
        None
    }

    fn take_back(&mut self, lent: LentCgroup) {
        match lent.oom_kills_after {
            Some(oom_kills) if lent.reusable && lent.group.is_empty() => {
                self.free.push(PooledCgroup {
                    group: lent.group,
                    limits: lent.limits_kept.then_some(lent.limits),
                    oom_kills,
                })
            }
            _ => lent.group.remove(),
        }
    }
}

impl Drop for CgroupPool {
    fn drop(&mut self) {
        for pooled in self.free.drain(..) {
            pooled.group.remove();
        }
    }
}

impl ForkedRun {
    /// In the parent, right before it forks the run.
    pub fn prepare(policy: &RunPolicy, pools: &mut RunPools) -> Result<ForkedRun, SandboxError> {
        let p = &policy.protections;
        let cgroup = if p.cgroups {
            Some(pools.cgroups.lend(policy)?)
        } else {
            None
        };
        let mut run = ForkedRun {
            cgroup,
            network: None,
            mounts: None,
            parent_pid_ns: None,
        };
        if p.namespaces {
            run.mounts = pools.mounts.lend(policy);
        }
        if p.namespaces && p.drop_user {
            match pools.networks.lend() {
                Ok(namespace) => run.network = Some(namespace),
                Err(err) => {
                    run.give_back(pools);
                    return Err(err);
                }
            }
        }
        if p.namespaces {
            let entered = std::fs::File::open("/proc/self/ns/pid")
                .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
                .and_then(|own| unshare(CloneFlags::CLONE_NEWPID).map(|()| own));
            match entered {
                Ok(own) => run.parent_pid_ns = Some(own),
                Err(err) => {
                    run.give_back(pools);
                    return Err(SandboxError::Namespaces(err));
                }
            }
        }
        Ok(run)
    }

    /// In the parent, right after the fork (whether it worked or not): its later children are
    /// born in its own PID namespace again. An error here is fatal to the parent: every later
    /// run would land in this run's namespace, or fail to make its own.
    pub fn restore(&mut self) -> Result<(), SandboxError> {
        match self.parent_pid_ns.take() {
            Some(own) => {
                nix::sched::setns(&own, CloneFlags::CLONE_NEWPID).map_err(SandboxError::Namespaces)
            }
            None => Ok(()),
        }
    }

    /// In the forked child: the rest of the sandbox. Returns in the process that must now run
    /// the code (this one: it is PID 1 of the run's namespace when there are namespaces).
    /// `report`, if given, is the one descriptor above 2 the run keeps, on [`REPORT_FD`]:
    /// where it says how it ended once its code is done, before its exit (whose teardown
    /// takes a while), so that the parent need not wait for the kernel's reap.
    pub fn confine(
        &self,
        policy: &RunPolicy,
        report: Option<OwnedFd>,
    ) -> Result<Option<OwnedFd>, SandboxError> {
        self.enter_cgroup()?;
        self.enter_namespaces(policy)?;
        confine_process(policy, filters_for(policy)?, report)
    }

    /// In the forked child, first: the parent-death signal, then the run's cgroup. Joining a
    /// cgroup can block for an RCU grace period (on cgroup v1, the first attach after a quiet
    /// spell waits one: 10-30 ms on a VM, far longer than the rest of a run's start), so a
    /// parent may fork a run's process ahead of its run and have it do this step while it
    /// waits (the zygote's spare); [`ForkedRun::enter_ahead`] and
    /// [`ForkedRun::confine_after_ahead`] do the rest.
    pub fn enter_cgroup(&self) -> Result<(), SandboxError> {
        die_with_parent()?;
        if let Some(lent) = &self.cgroup {
            lent.group.join_forked()?;
        }
        Ok(())
    }

    /// In a child forked ahead of its run, first: closes every descriptor it inherited but
    /// 0-2, `keep`, and what it will enter or join (its network namespace, mount template and
    /// cgroup's files). It must hold nothing of other runs while it waits: a pipe's reader
    /// sees its end only once every copy of the write end is closed, and the parent's copies
    /// of other runs' pipes came with the fork.
    pub fn close_other_fds(&self, keep: RawFd) -> Result<(), SandboxError> {
        let mut own: Vec<RawFd> = [&self.network, &self.mounts]
            .into_iter()
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .chain(self.cgroup.iter().flat_map(|lent| lent.group.held_fds()))
            .chain([keep])
            .collect();
        own.sort_unstable();
        let mut from = 3;
        for fd in own.into_iter().filter(|fd| *fd >= 3) {
            if fd > from {
                close_range(from, fd - 1)?;
            }
            from = fd + 1;
        }
        close_range(from, RawFd::MAX)
    }

    /// In the forked child, after [`ForkedRun::enter_cgroup`]: the run's namespaces (its
    /// pooled network namespace, a private copy of the mount template with its own `/tmp`,
    /// `/var/tmp`, `/dev/shm` and `/proc`, new IPC and UTS namespaces) or, without them, a
    /// session of its own. Nothing here depends on the run but what [`ForkedRun::fits`]
    /// compares, so a process forked ahead of its run (the zygote's spare) does it while it
    /// waits ([`ForkedRun::enter_ahead`]).
    fn enter_namespaces(&self, policy: &RunPolicy) -> Result<(), SandboxError> {
        let p = &policy.protections;
        if !p.namespaces {
            // Its own process group, which the parent kills as a whole. PID 1 of a namespace
            // needs none (everything in the namespace dies with it) and must not be a group
            // leader, or the code could not `setsid()` as it can under `python3 -c`; it stays
            // in the parent's session, which has no controlling terminal (the zygote's own).
            return new_session();
        }
        let mut fresh = RUN_NAMESPACES;
        if let Some(namespace) = &self.network {
            nix::sched::setns(namespace, CloneFlags::CLONE_NEWNET)
                .map_err(SandboxError::Namespaces)?;
            fresh.remove(CloneFlags::CLONE_NEWNET);
        }
        if let Some(template) = &self.mounts {
            // Into the template: the unshare below leaves it at once for a private copy.
            nix::sched::setns(template, CloneFlags::CLONE_NEWNS)
                .map_err(SandboxError::Namespaces)?;
        }
        unshare(fresh).map_err(SandboxError::Namespaces)?;
        if self.mounts.is_some() {
            run_mounts(policy)?;
        } else {
            private_mounts(policy)?;
        }
        nix::unistd::sethostname("lull").map_err(SandboxError::Hostname)
    }

    /// In a child forked ahead of its run, after [`ForkedRun::enter_cgroup`], while it waits:
    /// what depends on nothing of the run but what [`ForkedRun::fits`] compares — its
    /// namespaces (`enter_namespaces`) and `no_new_privs` with the seccomp filter
    /// (the same program for every run with `seccomp` among its protections; installing it
    /// costs the kernel a conversion and a JIT compile, ~2 % of a batch's CPU). The filter
    /// refuses nothing the rest of the setup calls (`chdir`, `setrlimit`, the uid drop,
    /// `prctl`, `close_range`) nor the wait itself (`recvmsg`). Then
    /// [`ForkedRun::confine_after_ahead`], once the run is known.
    pub fn enter_ahead(&self, policy: &RunPolicy) -> Result<(), SandboxError> {
        self.enter_namespaces(policy)?;
        seccomp::install(filters_for(policy)?)
    }

    /// In the forked child, after [`ForkedRun::enter_ahead`]: the rest of the sandbox (working
    /// directory, uid, limits, descriptors) for `policy`'s run (which may be a later run's
    /// than the one this was prepared for, if [`ForkedRun::fits`] said so).
    pub fn confine_after_ahead(
        &self,
        policy: &RunPolicy,
        report: Option<OwnedFd>,
    ) -> Result<Option<OwnedFd>, SandboxError> {
        confine_process(policy, &[], report)
    }

    /// In the parent: whether a process forked with this (prepared for `made_for`) can take
    /// `policy`'s run instead, its cgroup set to `policy`'s limits if they differ. Only with
    /// pooled (reusable) cgroups and namespaces: what [`ForkedRun::prepare`] lent then depends
    /// on nothing of a run but the protections and the exposed directories, and what
    /// [`ForkedRun::enter_ahead`] makes (the process may have made it already) on those
    /// and the size of the run's `/tmp`.
    pub fn fits(&mut self, made_for: &RunPolicy, policy: &RunPolicy) -> bool {
        let (p, q) = (&made_for.protections, &policy.protections);
        // What [`ForkedRun::enter_namespaces`] made for `made_for` must be `policy`'s too.
        let same_mounts = made_for.expose == policy.expose
            && made_for.disk_mb == policy.disk_mb
            && made_for.max_files == policy.max_files;
        if p != q || !q.namespaces || !same_mounts {
            return false;
        }
        let Some(lent) = &mut self.cgroup else {
            return !q.cgroups;
        };
        if !lent.reusable {
            return false;
        }
        let limits = (
            policy.memory_mb.saturating_mul(1024 * 1024),
            policy.max_processes,
        );
        if lent.limits != limits {
            if lent.group.set_limits(limits.0, limits.1).is_err() {
                // Perhaps half set: the pool must not trust what it holds.
                lent.limits_kept = false;
                return false;
            }
            lent.limits = limits;
        }
        true
    }

    /// In the parent, once the run's process is reaped (`status` is how it ended): what only
    /// the parent can tell, as a line for the run's stderr, and the status to report — a run
    /// the OOM killer hit fails even when PID 1 went on to exit 0. Gives the cgroup back.
    pub fn finish(
        mut self,
        policy: &RunPolicy,
        status: WaitStatus,
        pools: &mut RunPools,
    ) -> (WaitStatus, Option<String>) {
        let verdict = self.verdict(policy, status);
        self.give_back(pools);
        verdict
    }

    /// [`ForkedRun::finish`]'s verdict without giving anything back: for a run whose process
    /// said how it ended (on its [`REPORT_FD`]) and was killed at once, before it is reaped.
    /// `finish` still follows once it is, and reads the cgroup's OOM count again (a process
    /// the run left may have been killed in between), for the group's next run.
    pub fn verdict(
        &mut self,
        policy: &RunPolicy,
        status: WaitStatus,
    ) -> (WaitStatus, Option<String>) {
        let oom = self.cgroup.as_mut().is_some_and(|lent| {
            let after = lent.group.oom_kills();
            lent.oom_kills_after = Some(after);
            after > lent.oom_kills_before
        });
        let note = limit_note(policy, oom, Some(&status));
        let status = match status {
            WaitStatus::Exited(pid, 0) if oom => WaitStatus::Exited(pid, 137),
            other => other,
        };
        (status, note)
    }

    /// Only once the run's process is reaped: with it, everything of the run is gone.
    fn give_back(self, pools: &mut RunPools) {
        if let Some(lent) = self.cgroup {
            pools.cgroups.take_back(lent);
        }
        if let Some(namespace) = self.network {
            pools.networks.take_back(namespace);
        }
    }
}

/// What a run's end says about the limits it hit, that the run itself could not print.
fn limit_note(policy: &RunPolicy, oom: bool, status: Option<&WaitStatus>) -> Option<String> {
    if oom {
        return Some(format!("memory limit {} MB exceeded", policy.memory_mb));
    }
    match status {
        Some(WaitStatus::Signaled(_, Signal::SIGXCPU, _)) => Some(format!(
            "cpu time limit of {} s exceeded",
            policy.cpu_seconds
        )),
        Some(WaitStatus::Signaled(_, Signal::SIGXFSZ, _)) => Some(format!(
            "file size limit of {} bytes exceeded",
            policy.max_file_bytes
        )),
        _ => None,
    }
}

fn new_session() -> Result<(), SandboxError> {
    match setsid() {
        // Already a session leader (EPERM) is fine: it is its own session then.
        Ok(_) | Err(nix::Error::EPERM) => Ok(()),
        Err(e) => Err(SandboxError::Session(e)),
    }
}

fn die_with_parent() -> Result<(), SandboxError> {
    let parent = getppid();
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(SandboxError::DeathSignal)?;
    // The parent may have died before the request took effect.
    if getppid() != parent {
        exit_now(137);
    }
    Ok(())
}

/// Forks the run's PID 1. The parent (the watcher) waits for it, reports what only it can
/// see (the OOM killer, a limit's signal), cleans the cgroup and exits with the run's status.
fn fork_pid_one(
    policy: &RunPolicy,
    cgroup: Option<&cgroup::RunCgroup>,
) -> Result<(), SandboxError> {
    // SAFETY: the sandbox's entry points are only called in single-threaded processes (the
    // `lull-sandbox` launcher, a zygote child): no other thread can hold a lock the child
    // would need, so the child may do anything, not only async-signal-safe calls.
    match unsafe { nix::unistd::fork() }.map_err(SandboxError::Fork)? {
        ForkResult::Child => Ok(()),
        ForkResult::Parent { child } => {
            ignore_sigterm();
            watch_run(child, policy, cgroup)
        }
    }
}

/// The watcher outlives a SIGTERM meant for the run (a graceful stop sends it to every
/// process of the run, the watcher included): dying of it would SIGKILL PID 1 at once,
/// with no grace. SIGKILL still ends the watcher, and the run with it.
fn ignore_sigterm() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, sigaction};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs SIG_IGN, no handler code: nothing can run in a signal context. Only
    // the watcher is affected: PID 1 was forked before, with the default disposition.
    let _ = unsafe { sigaction(Signal::SIGTERM, &ignore) };
}

fn watch_run(child: Pid, policy: &RunPolicy, cgroup: Option<&cgroup::RunCgroup>) -> ! {
    let status = loop {
        match waitpid(child, None) {
            Err(nix::Error::EINTR) => continue,
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break Some(s),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    // What only the watcher can tell, as the run's last line of stderr: the agent reports a
    // run's last stderr line as its error. The memory limit fails the run even when the
    // OOM killer chose a child and PID 1 went on to exit 0.
    let oom = cgroup.is_some_and(cgroup::RunCgroup::oom_killed);
    let note = limit_note(policy, oom, status.as_ref());
    if let Some(note) = note {
        let _ = writeln!(std::io::stderr(), "lull: {note}");
    }
    match status {
        Some(WaitStatus::Exited(_, 0)) if oom => exit_now(137),
        Some(WaitStatus::Exited(_, code)) => exit_now(code),
        Some(WaitStatus::Signaled(_, signal, _)) => die_by(signal),
        _ => exit_now(1),
    }
}

/// Ends the watcher with the same signal that ended the run, so its parent sees the run's
/// own status.
fn die_by(signal: Signal) -> ! {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, sigaction};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs the default disposition, no handler code: nothing can run in a
    // signal context as a result.
    let _ = unsafe { sigaction(signal, &default) };
    let mut only = SigSet::empty();
    only.add(signal);
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
    let _ = kill(getpid(), signal);
    // A signal whose default is to continue (SIGCHLD, SIGWINCH, ...) lands here.
    exit_now(128 + signal as i32)
}

/// Exits without running the atexit handlers or flushing the stdio of the process it was
/// forked from (a zygote's, whose buffers must not reach the run's stderr).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes a plain integer and never returns; it touches no memory of ours,
    // which is the point (no destructors, no atexit handlers, no stdio flush).
    unsafe { libc::_exit(code) }
}

/// Mounts a fresh tmpfs at `path`; a failure names the step as `what`.
fn tmpfs<P: ?Sized + nix::NixPath>(
    what: &'static str,
    path: &P,
    flags: MsFlags,
    options: &str,
) -> Result<(), SandboxError> {
    mount(Some("tmpfs"), path, Some("tmpfs"), flags, Some(options))
        .map_err(|source| SandboxError::Mount { what, source })
}

/// Every mount a run needs, in a fresh mount namespace: [`shared_mounts`], then
/// [`run_mounts`].
fn private_mounts(policy: &RunPolicy) -> Result<(), SandboxError> {
    shared_mounts(policy)?;
    run_mounts(policy)
}

/// The part of a run's mounts that holds nothing of the run: the host read-only, an empty
/// `/run`, a minimal `/dev`, the exposed interpreter. The same for every run of a policy, so
/// the zygote makes it once, in a [`MountTemplate`], which its runs copy.
fn shared_mounts(policy: &RunPolicy) -> Result<(), SandboxError> {
    let m = |what: &'static str| move |source| SandboxError::Mount { what, source };
    // Nothing we mount here may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(m("/ private"))?;
    // Read while the host's /proc is still there: detached below.
    let host_mounts = mount_points()?;
    // The host's /dev and /proc, with what is mounted under them (devpts, shm, ...), are
    // covered for every run (a minimal /dev below, the run's own /proc in `run_mounts`), so
    // nothing in them can be reached: detached, they are not in each run's copy of the mount
    // tree, which the run's unshare copies and its exit tears down (6 of 29 mounts here).
    // The host's /sys goes too, with its cgroup and tracing mounts under it (13 of the 24
    // left here): it told a run the host's network interfaces and their addresses, and
    // every other run's cgroup with its memory use; a run needs none of it (glibc counts the
    // CPUs from /proc when /sys is not there), and its cgroup is joined before its mounts.
    // Best effort: where one cannot be detached it stays, as unreachable as before (/sys:
    // readable, not writable, as before).
    const HIDDEN: [&str; 3] = ["/dev", "/proc", "/sys"];
    for hidden in HIDDEN {
        let _ = nix::mount::umount2(hidden, nix::mount::MntFlags::MNT_DETACH);
    }
    // The host's other mounts read-only too, before anything of ours covers them: the
    // remount of `/` at the end changes `/` alone, and a host with a file system of its own
    // at `/home`, `/var` or `/srv` left its world-writable directories writable by every run.
    for point in host_mounts.iter().filter(|point| {
        point.as_path() != Path::new("/") && !HIDDEN.iter().any(|hidden| point.starts_with(hidden))
    }) {
        read_only(point)?;
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // The host's sockets live under /run (databases, D-Bus, the resolver): a network
    // namespace does not hide path-bound Unix sockets, an empty /run does.
    if Path::new("/run").is_dir() {
        tmpfs(
            "/run",
            "/run",
            flags | MsFlags::MS_NOEXEC,
            "size=1m,mode=0755",
        )?;
    }
    minimal_dev()?;
    if policy.protections.drop_user && !policy.expose.is_empty() {
        // `expose` stages its bind mount under /tmp: a scratch tmpfs, gone again at once, so
        // that nothing is written to the host's /tmp and nothing of it is left for the run.
        tmpfs("/tmp (scratch)", "/tmp", flags, "size=1m,mode=0700")?;
        expose(&policy.expose)?;
        nix::mount::umount2("/tmp", nix::mount::MntFlags::MNT_DETACH)
            .map_err(m("/tmp (scratch) unmount"))?;
    }
    // The host's files read-only at most: world-writable corners (`/run/lock`, a directory
    // someone left 0777) included. Only the run's own tmpfs mounts stay writable.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(m("/ read-only"))
}

/// Where the calling process's mount namespace has mounts (`/proc/self/mountinfo`, its fifth
/// field, with the kernel's octal escapes undone), in the kernel's order.
fn mount_points() -> Result<Vec<PathBuf>, SandboxError> {
    let table =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| SandboxError::Mount {
            what: "/proc/self/mountinfo",
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .collect())
}

/// A path as `/proc/self/mountinfo` writes it: space, tab, newline and backslash as `\NNN`.
fn unescape_mount_path(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Remounts the mount at `point` read-only, keeping its other flags (`nosuid`, `nodev`,
/// `noexec`, its atime handling: a user namespace's mount must keep those it was given). A
/// point that is no longer a mount (gone meanwhile, or under one detached) is left alone.
fn read_only(point: &Path) -> Result<(), SandboxError> {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let kept = match statvfs(point) {
        Ok(stat) => stat.flags(),
        Err(nix::Error::ENOENT | nix::Error::ENOTDIR) => return Ok(()),
        Err(source) => {
            return Err(SandboxError::Mount {
                what: "a host mount read-only",
                source,
            });
        }
    };
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (has, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if kept.contains(has) {
            flags |= keep;
        }
    }
    if !kept.intersects(FsFlags::ST_NOATIME | FsFlags::ST_RELATIME) {
        // Neither: strict atime, which a remount that names none would turn into relatime.
        flags |= MsFlags::MS_STRICTATIME;
    }
    match mount(None::<&str>, point, None::<&str>, flags, None::<&str>) {
        Ok(()) | Err(nix::Error::ENOENT | nix::Error::EINVAL) => Ok(()),
        Err(source) => Err(SandboxError::Mount {
            what: "a host mount read-only",
            source,
        }),
    }
}

/// The part of a run's mounts that is the run's own: fresh, empty, size-limited `/tmp` (its
/// working directory), `/var/tmp` and `/dev/shm`, and a `/proc` of its PID namespace.
fn run_mounts(policy: &RunPolicy) -> Result<(), SandboxError> {
    let m = |what: &'static str| move |source| SandboxError::Mount { what, source };
    let tmpfs_opts = format!(
        "size={}m,nr_inodes={},mode=1777",
        policy.disk_mb, policy.max_files
    );
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    tmpfs("/tmp", "/tmp", flags, tmpfs_opts.as_str())?;
    if Path::new("/var/tmp").is_dir() {
        tmpfs("/var/tmp", "/var/tmp", flags, tmpfs_opts.as_str())?;
    }
    tmpfs("/dev/shm", "/dev/shm", flags, tmpfs_opts.as_str())?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(m("/proc"))
}

/// A `/dev` with only what programs expect (null, zero, full, random, urandom, tty, the fd
/// links, and `shm`, where each run mounts its own tmpfs), instead of the host's, which holds
/// its devices and `/dev/log`.
fn minimal_dev() -> Result<(), SandboxError> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let m = |what: &'static str| move |source| SandboxError::Mount { what, source };
    // Device nodes need a mount without `nodev`; nothing but these nodes is created in it.
    tmpfs(
        "/dev",
        "/dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "size=64k,mode=0755",
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = Path::new("/dev").join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(m("/dev node"))?;
        // The mode given to mknod is filtered by the umask.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &path,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(m("/dev node mode"))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, Path::new("/dev").join(link)).map_err(|e| {
            SandboxError::Mount {
                what: "/dev link",
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        })?;
    }
    let shm = Path::new("/dev/shm");
    nix::unistd::mkdir(shm, Mode::from_bits_truncate(0o1777)).map_err(m("/dev/shm"))?;
    // The tmpfs itself read-only: no new nodes or files in /dev.
    mount(
        None::<&str>,
        "/dev",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(m("/dev read-only"))
}

/// Makes each of `dirs` reachable for an unprivileged uid where an ancestor is closed to
/// others (as `/root`, mode 0700, is to the interpreter pyenv installs under it): the closed
/// ancestor is covered by an empty tmpfs — so the run sees nothing else of it — and the
/// directory alone is put back, read-only. Every directory is staged before any cover goes on,
/// and a closed directory inside another one is not covered again: one cover over `/root`
/// would otherwise hide a directory exposed under it before (`/root/.pyenv/...` and a virtual
/// environment in `/root/project`). Runs in the run's private mount namespace (or its
/// template), with a scratch tmpfs on `/tmp` for staging.
fn expose(dirs: &[PathBuf]) -> Result<(), SandboxError> {
    use std::os::unix::fs::PermissionsExt as _;
    let m = |what: &'static str| move |source| SandboxError::Mount { what, source };
    let io = |source: std::io::Error| SandboxError::Mount {
        what: "expose",
        source: nix::Error::from_raw(source.raw_os_error().unwrap_or(libc::EIO)),
    };
    // Read on the host's tree as it is, before any cover.
    let closed_ancestor = |dir: &Path| {
        dir.ancestors()
            .skip(1)
            .filter(|a| a.parent().is_some())
            .find(|a| std::fs::metadata(a).is_ok_and(|md| md.permissions().mode() & 0o001 == 0))
            .map(Path::to_path_buf)
    };
    let mut exposed: Vec<&Path> = Vec::new();
    let mut closed: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if let Some(ancestor) = closed_ancestor(dir)
            && !exposed.contains(&dir.as_path())
        {
            exposed.push(dir);
            closed.push(ancestor);
        }
    }
    if exposed.is_empty() {
        return Ok(());
    }
    closed.sort_by_key(|dir| dir.components().count());
    let mut covers: Vec<PathBuf> = Vec::new();
    for dir in closed {
        if !covers.iter().any(|cover| dir.starts_with(cover)) {
            covers.push(dir);
        }
    }

    let staging = Path::new("/tmp/.lull-expose");
    let staged: Vec<PathBuf> = (0..exposed.len())
        .map(|i| staging.join(i.to_string()))
        .collect();
    for (dir, stage) in exposed.iter().zip(&staged) {
        std::fs::create_dir_all(stage).map_err(io)?;
        mount(
            Some(*dir),
            stage,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(m("expose: stage"))?;
    }
    for cover in &covers {
        tmpfs(
            "expose: cover",
            cover,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755,size=1m",
        )?;
    }
    for (dir, stage) in exposed.iter().zip(&staged) {
        std::fs::create_dir_all(dir).map_err(io)?;
        mount(
            Some(stage),
            *dir,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(m("expose: move"))?;
        mount(
            None::<&str>,
            *dir,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(m("expose: read-only"))?;
        std::fs::remove_dir(stage).map_err(io)?;
    }
    // Leave the covers read-only too: nothing of the run is to be kept there.
    for cover in &covers {
        mount(
            None::<&str>,
            cover,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(m("expose: cover read-only"))?;
    }
    Ok(())
}

fn enter_workdir(policy: &RunPolicy) -> Result<(), SandboxError> {
    let dir = policy.home();
    nix::unistd::chdir(&dir).map_err(|source| SandboxError::WorkDir {
        path: dir.display().to_string(),
        source,
    })
}

fn limit_resources(policy: &RunPolicy) -> Result<(), SandboxError> {
    let set = |what: &'static str, resource: Resource, value: u64| {
        setrlimit(resource, value, value).map_err(|source| SandboxError::Rlimit { what, source })
    };
    set(
        "address space",
        Resource::RLIMIT_AS,
        policy.memory_mb.saturating_mul(1024 * 1024),
    )?;
    set("cpu time", Resource::RLIMIT_CPU, policy.cpu_seconds)?;
    set("file size", Resource::RLIMIT_FSIZE, policy.max_file_bytes)?;
    set("open files", Resource::RLIMIT_NOFILE, policy.max_open_files)?;
    set("core dumps", Resource::RLIMIT_CORE, 0)?;
    // Per uid, so shared by every run of this agent: a backstop only when no cgroup limits
    // the run's own process count.
    let nproc = if policy.protections.cgroups {
        policy.max_processes.saturating_mul(16)
    } else {
        policy.max_processes
    };
    set("processes", Resource::RLIMIT_NPROC, nproc)
}

fn drop_user(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let err = |source| SandboxError::DropUser { uid, gid, source };
    nix::unistd::setgroups(&[]).map_err(err)?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid)).map_err(err)?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).map_err(err)
}

/// Moves `fd` to [`REPORT_FD`], close-on-exec (a program the run starts does not get it).
/// Whatever was on [`REPORT_FD`] is replaced: the caller closes every other descriptor above
/// 2 right after, and holds none it will use again.
fn keep_as_report_fd(fd: OwnedFd) -> Result<OwnedFd, SandboxError> {
    let raw = fd.as_raw_fd();
    // SAFETY: integer-only calls, no pointers: FD_CLOEXEC on `fd`, or a close-on-exec copy
    // of it on REPORT_FD.
    let done = unsafe {
        if raw == REPORT_FD {
            libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC)
        } else {
            libc::dup3(raw, REPORT_FD, libc::O_CLOEXEC)
        }
    };
    if done < 0 {
        return Err(SandboxError::ReportFd(std::io::Error::last_os_error()));
    }
    if raw == REPORT_FD {
        return Ok(fd);
    }
    drop(fd);
    // SAFETY: dup3 just made REPORT_FD a copy of `fd` that nothing else in this process owns
    // (any owner of the descriptor it replaced is never used again: see the doc above).
    Ok(unsafe { OwnedFd::from_raw_fd(REPORT_FD) })
}

fn close_inherited_fds() -> Result<(), SandboxError> {
    close_range(3, RawFd::MAX)
}

/// Closes the descriptors `first..=last` (those that are open).
fn close_range(first: RawFd, last: RawFd) -> Result<(), SandboxError> {
    let (Ok(low), Ok(high)) = (u32::try_from(first), u32::try_from(last)) else {
        return Ok(());
    };
    // SAFETY: close_range takes no pointers; closing these descriptors is what the caller
    // asks for, and nothing of ours uses one of them after this point.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, low, high, 0u32) };
    if closed == 0 {
        return Ok(());
    }
    // Kernels before 5.9 lack close_range: list and close them one by one.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(SandboxError::CloseFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| (first..=last).contains(fd))
        .collect();
    for fd in fds {
        // The directory handle itself is among them and already closed: errors are expected.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The probe, from the agent
// ---------------------------------------------------------------------------------------------

/// Candidate protections, strongest first.
fn candidates() -> Vec<Protections> {
    let mut out = Vec::new();
    for (namespaces, drop_user, cgroups) in [
        (true, true, true),
        (true, true, false),
        // No "namespaces but the agent's own user": with root that would be root with every
        // capability inside the run, and without root there are no namespaces anyway.
        (false, true, true),
        (false, true, false),
        (false, false, false),
    ] {
        let mut p = Protections {
            level: SandboxLevel::None,
            launcher: true,
            namespaces,
            drop_user,
            seccomp: true,
            cgroups,
            missing: Vec::new(),
        };
        p.level = p.derived_level();
        out.push(p);
    }
    out
}

/// Finds the strongest protections this host applies at or below `max` (the operator's
/// `--max-sandbox-level`), by trying each candidate in full in a throwaway
/// `lull-sandbox --check` (which also checks from inside that they hold).
pub async fn probe(
    launcher: Option<&Path>,
    settings: &SandboxSettings,
    python: &str,
    max: SandboxLevel,
) -> Protections {
    let capped = |mut found: Protections| {
        if max < SandboxLevel::Full {
            found.missing.insert(
                0,
                format!("capped at {} by --max-sandbox-level", max.as_str()),
            );
        }
        found
    };
    if max == SandboxLevel::None {
        return capped(Protections::none(
            "runs get a process group and a clean environment only",
        ));
    }
    let Some(launcher) = launcher.filter(|p| p.exists()) else {
        return capped(Protections::none(format!(
            "the lull-sandbox launcher was not found{}; runs get a process group and a clean environment only",
            launcher
                .map(|p| format!(" at {}", p.display()))
                .unwrap_or_default()
        )));
    };
    sweep_stale_cgroups();
    let mut failures: Vec<String> = Vec::new();
    for candidate in candidates().into_iter().filter(|c| c.level <= max) {
        // A run id no coordinator hands out, so probes never meet a real run's cgroup.
        let policy = RunPolicy::for_job(
            -1,
            &candidate,
            settings,
            256.0,
            Duration::from_secs(5),
            Some(std::env::temp_dir()),
        );
        match check(launcher, &policy, python).await {
            Ok(()) => {
                let mut found = candidate;
                // Below `isolated` by the cap, the cap is the reason (said first).
                if !found.namespaces && max >= SandboxLevel::Isolated {
                    found.missing.push(namespace_reason(&failures));
                }
                if !found.drop_user {
                    found.missing.push(
                        "runs keep the agent's user (dropping to an unprivileged uid needs root)"
                            .into(),
                    );
                }
                if !found.cgroups {
                    found.missing.push(
                        "no per-run cgroup (memory and process limits are per process only)".into(),
                    );
                }
                found
                    .missing
                    .extend(failures.into_iter().map(|f| format!("tried: {f}")).take(3));
                return capped(found);
            }
            Err(e) => failures.push(format!("{}: {e}", describe(&candidate))),
        }
    }
    let mut none = Protections::none("no sandbox setup worked on this host");
    none.missing.extend(failures);
    capped(none)
}

fn namespace_reason(failures: &[String]) -> String {
    let first = failures
        .iter()
        .find(|f| f.contains("namespaces"))
        .cloned()
        .unwrap_or_default();
    format!("no namespaces: runs share the host's network, /tmp and process table ({first})")
}

fn describe(p: &Protections) -> String {
    format!(
        "{} (namespaces={}, drop_user={}, cgroups={})",
        p.level, p.namespaces, p.drop_user, p.cgroups
    )
}

async fn check(launcher: &Path, policy: &RunPolicy, python: &str) -> Result<(), String> {
    let json = serde_json::to_string(policy).map_err(|e| e.to_string())?;
    let out = tokio::process::Command::new(launcher)
        .arg("--check")
        .arg(json)
        .arg(python)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    remove_run_cgroup(&policy.cgroup);
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(stderr.lines().last().unwrap_or("failed").trim().to_string())
    }
}

/// What `lull-sandbox --check` runs inside the sandbox to confirm the protections hold and
/// that the interpreter still starts under them.
pub fn self_check(policy: &RunPolicy, python: &str) -> Result<(), String> {
    let started = Command::new(python)
        .args([
            "-I",
            "-c",
            "import sys, os; sys.exit(0 if os.getcwd() else 1)",
        ])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{python} does not start in the sandbox: {e}"))?;
    if !started.success() {
        return Err(format!("{python} does not run in the sandbox ({started})"));
    }
    let p = &policy.protections;
    if p.drop_user && nix::unistd::getuid().as_raw() != policy.uid {
        return Err("still running as the original user".into());
    }
    if p.namespaces {
        if getpid().as_raw() != 1 {
            return Err(format!("not PID 1 of a new namespace (pid {})", getpid()));
        }
        // A refused connection proves nothing (the host would refuse it too): the run's
        // namespace must hold no interface but loopback.
        let interfaces = std::fs::read_to_string("/proc/self/net/dev")
            .map_err(|e| format!("/proc/self/net/dev: {e}"))?;
        let names: Vec<&str> = interfaces
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        if names != ["lo"] {
            return Err(format!("the run sees network interfaces {names:?}"));
        }
    }
    if p.seccomp && unshare(CloneFlags::CLONE_NEWUTS).is_ok() {
        return Err("unshare was not refused".into());
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

/// Where the launcher is by default: next to the running executable.
pub fn default_launcher() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(|d| d.join("lull-sandbox"))
}

/// Runs `program` under the sandbox in the launcher: used by `lull-sandbox`.
pub fn launch(policy: &RunPolicy, program: &str, args: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    if let Err(e) = confine_run(policy) {
        return std::io::Error::other(e.to_string());
    }
    default_signal_dispositions();
    Command::new(program).args(args).exec()
}

/// Forks the calling process, which must have one thread (checked first: a fork copies only
/// the calling thread, and a lock another one held would stay locked in the child). `None`
/// in the child, the child's pid in the parent. For a process that forks runs without an
/// interpreter of its own (the zygote as a launcher of fresh interpreters).
pub fn fork_single_threaded() -> Result<Option<Pid>, SandboxError> {
    match thread_count() {
        Some(1) => {}
        Some(n) => return Err(SandboxError::Threads(format!("{n} threads"))),
        None => return Err(SandboxError::Threads("cannot count them".to_string())),
    }
    // SAFETY: this process has one thread (checked above, and nothing here starts one), so
    // the child has every lock in the state its only thread left it: it may call anything,
    // not only async-signal-safe functions.
    match unsafe { nix::unistd::fork() }.map_err(SandboxError::Fork)? {
        ForkResult::Child => Ok(None),
        ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// In a run's process, before it is confined: `stdout` and `stderr` (descriptors it holds,
/// received for the run) on fds 1 and 2. The sandbox's last steps close the originals.
pub fn redirect_stdio(stdout: RawFd, stderr: RawFd) -> Result<(), SandboxError> {
    for (from, to) in [(stdout, 1), (stderr, 2)] {
        // SAFETY: dup2 takes plain numbers and touches no memory of ours; what it replaces on
        // 1 and 2 are the copies of the parent's streams the fork gave this process, which
        // nothing here uses again.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(SandboxError::Stdio(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// One non-blocking write of all of `bytes` to `fd` (a pipe this process holds open, as a
/// plain number received for a run): a pipe nobody drains cannot stall the writer. A short
/// write is an error.
pub fn write_nonblocking(fd: RawFd, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes and returns plain integers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the pointer and length are those of a live slice, which write only reads.
    let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    match usize::try_from(written) {
        Err(_) => Err(std::io::Error::last_os_error()),
        Ok(n) if n < bytes.len() => Err(std::io::Error::other(format!(
            "wrote {n} of {} bytes",
            bytes.len()
        ))),
        Ok(_) => Ok(()),
    }
}

/// In a confined run's process: execs `program` with `args` and exactly `env`, every signal
/// at its default first (see [`default_signal_dispositions`]). Returns only on failure.
pub fn exec_program(
    program: &str,
    args: &[&str],
    env: &std::collections::BTreeMap<String, String>,
) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    default_signal_dispositions();
    Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .exec()
}

/// Every signal's disposition back to its default before a run's program is exec'd, as a
/// program started from a login shell has them: the launcher inherits the agent's (a shell's
/// `nohup` or `&` ignores SIGHUP, SIGINT or SIGQUIT), and an ignored signal stays ignored
/// across exec (a `python3` started so would not even install its SIGINT handler). The
/// signal mask is emptied by the sandbox's last steps.
fn default_signal_dispositions() {
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler, so nothing of ours can run in a signal context;
        // the process is single-threaded and execs right after.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
    }
}

/// Signals the whole process group of `pid` (used to stop a run that has no namespace).
pub fn kill_group(pid: i32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// What the kernel kept of a reaped child: the CPU it and the descendants it reaped used, and
/// the largest resident set among them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChildUsage {
    pub cpu_seconds: f64,
    pub max_rss_mb: f64,
}

/// Reaps the exited child `pid` (blocking until it has exited) and returns its resource
/// usage: `wait4`, which no safe wrapper offers. For a long-lived parent that forks runs (the
/// zygote), where doing this through Python's `os.wait4` wrote to dozens of pages per run
/// that every later fork then had to fault back in.
pub fn reap_child(pid: Pid) -> Result<ChildUsage, nix::Error> {
    let mut status: libc::c_int = 0;
    // All zeroes is a valid `rusage`: it stays meaningful even if the kernel wrote nothing.
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    loop {
        // SAFETY: `status` and `usage` are live, writable and of the types `wait4` writes, for
        // the whole call; nothing else refers to them.
        let reaped = unsafe { libc::wait4(pid.as_raw(), &mut status, 0, usage.as_mut_ptr()) };
        if reaped != -1 {
            break;
        }
        match nix::Error::last() {
            nix::Error::EINTR => continue,
            err => return Err(err),
        }
    }
    // SAFETY: zero-initialised above, and possibly filled by `wait4`: a valid `rusage` either way.
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(ChildUsage {
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        // Linux reports ru_maxrss in kilobytes.
        max_rss_mb: usage.ru_maxrss as f64 / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_the_kernel_s_escapes_undone() {
        assert_eq!(
            unescape_mount_path(r"/srv/a\040b\011c\012d\134e"),
            PathBuf::from("/srv/a b\tc\nd\\e")
        );
        // Not an escape: kept as written.
        assert_eq!(unescape_mount_path(r"/x\9y\04"), PathBuf::from(r"/x\9y\04"));
        assert_eq!(unescape_mount_path("/"), PathBuf::from("/"));
    }

    #[test]
    fn a_process_forked_ahead_fits_only_runs_whose_namespaces_it_could_have_made() {
        let mut protections = Protections::none("test");
        protections.namespaces = true;
        let made_for = RunPolicy::for_job(
            1,
            &protections,
            &SandboxSettings::default(),
            512.0,
            Duration::from_secs(5),
            None,
        );
        let mut forked = ForkedRun {
            cgroup: None,
            network: None,
            mounts: None,
            parent_pid_ns: None,
        };
        // Another run of the same kind, with a memory limit and run id of its own: it fits.
        let next = RunPolicy {
            run_id: 2,
            memory_mb: 256,
            ..made_for.clone()
        };
        assert!(forked.fits(&made_for, &next));
        // Its /tmp made ahead would be the wrong size, or hold the wrong number of files.
        for other in [
            RunPolicy {
                disk_mb: made_for.disk_mb * 2,
                ..next.clone()
            },
            RunPolicy {
                max_files: made_for.max_files + 1,
                ..next.clone()
            },
            RunPolicy {
                expose: vec![PathBuf::from("/opt/python")],
                ..next.clone()
            },
        ] {
            assert!(!forked.fits(&made_for, &other), "{other:?}");
        }
    }
}
