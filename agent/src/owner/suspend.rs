//! Suspending and resuming one run, its whole tree, from the agent (root, outside the run).
//!
//! A run is named by the host pid of its process ([`crate::executor::RunProcess`]). Where
//! that process sits in a run cgroup of a pure cgroup v2 host, the cgroup is frozen
//! (`cgroup.freeze`): atomic, and the run cannot tell. Otherwise every process of the run
//! gets SIGSTOP (SIGCONT to resume): the processes of its v1 `pids` cgroup when it has one
//! (with PID namespaces, everything a run starts stays in its cgroup), else its process
//! tree. SIGSTOP cannot be caught or ignored, and reaches a PID namespace's init from
//! outside; a process forked between listing and signalling is caught by listing again
//! until a round finds nothing new.
//!
//! Architecture Invariant: only runs are signalled — never the agent, its executors, or a
//! cgroup that is not a run's (`lull/run-*`).

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Listing rounds before giving up on a run that keeps forking while it is being stopped
/// (each round stops all it found, so only a race with a fork needs another).
const MAX_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SuspendError {
    #[error("the signalling task ended: {0}")]
    Gone(String),
    #[error("signalling pid {pid} with {signal}: {errno}")]
    Signal {
        pid: u32,
        signal: Signal,
        errno: Errno,
    },
    #[error("{path}: {source}")]
    Freeze {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a run's processes are, as seen from its process.
#[derive(Debug)]
enum Scope {
    /// A cgroup v2 run group: frozen as a whole.
    Freezable(PathBuf),
    /// A v1 run group: its `cgroup.procs` lists the run.
    Listed(PathBuf),
    /// No run cgroup: the process and its descendants.
    Tree(u32),
}

/// A run cgroup's path relative to a hierarchy's root, from `/proc/PID/cgroup` (`None`
/// unless it is one of Lull's run groups).
fn run_group(cgroups: &str, want: impl Fn(&str) -> bool) -> Option<&str> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        (want(controllers) && path.starts_with("/lull/run-")).then_some(path)
    })
}

fn scope_of(pid: u32) -> Scope {
    let Ok(cgroups) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Scope::Tree(pid);
    };
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        if let Some(path) = run_group(&cgroups, str::is_empty) {
            let dir = root.join(path.trim_start_matches('/'));
            if dir.join("cgroup.freeze").exists() {
                return Scope::Freezable(dir);
            }
        }
    } else if let Some(path) = run_group(&cgroups, |c| c.split(',').any(|c| c == "pids")) {
        return Scope::Listed(root.join("pids").join(path.trim_start_matches('/')));
    }
    Scope::Tree(pid)
}

fn processes_in(scope: &Scope) -> Vec<u32> {
    match scope {
        Scope::Freezable(_) => Vec::new(),
        Scope::Listed(dir) => fs::read_to_string(dir.join("cgroup.procs"))
            .map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default(),
        Scope::Tree(root) => super::meter::descendants(*root),
    }
}

fn signal(pid: u32, signal: Signal) -> Result<(), SuspendError> {
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(());
    };
    match kill(Pid::from_raw(raw), signal) {
        // Gone already: nothing left to stop or resume.
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(errno) => Err(SuspendError::Signal { pid, signal, errno }),
    }
}

/// Sends `sig` to every process of the run, listing again until nothing new appears.
fn signal_all(scope: &Scope, sig: Signal) -> Result<usize, SuspendError> {
    let mut done = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let fresh: Vec<u32> = processes_in(scope)
            .into_iter()
            .filter(|pid| !done.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            signal(pid, sig)?;
            done.insert(pid);
        }
    }
    Ok(done.len())
}

fn freeze(dir: &Path, frozen: bool) -> Result<(), SuspendError> {
    let path = dir.join("cgroup.freeze");
    fs::write(&path, if frozen { "1" } else { "0" })
        .map_err(|source| SuspendError::Freeze { path, source })
}

/// Stops the run whose process is `pid`, its whole tree. Returns how it was done.
pub(crate) fn suspend(pid: u32) -> Result<&'static str, SuspendError> {
    match scope_of(pid) {
        Scope::Freezable(dir) => freeze(&dir, true).map(|()| "cgroup freezer"),
        scope => signal_all(&scope, Signal::SIGSTOP).map(|_| "SIGSTOP"),
    }
}

/// Every process of the run (its cgroup's members, or its tree).
fn members(scope: &Scope) -> Vec<u32> {
    match scope {
        Scope::Freezable(dir) => processes_in(&Scope::Listed(dir.clone())),
        other => processes_in(other),
    }
}

/// Whether `pid` has a handler for SIGTERM (`SigCgt` in `/proc/PID/status`): a run that
/// ignores it or leaves it at its default does not.
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (Signal::SIGTERM as u32 - 1)) != 0)
}

/// Sends SIGTERM to every process of the run whose process is `pid`. Answers whether any
/// of them handles it (only then is a grace worth waiting: the others die of it, or, as a
/// PID namespace's init, ignore it).
pub(crate) fn terminate(pid: u32) -> Result<bool, SuspendError> {
    let scope = scope_of(pid);
    let processes = members(&scope);
    let handled = processes.iter().any(|p| catches_sigterm(*p));
    for p in processes {
        signal(p, Signal::SIGTERM)?;
    }
    Ok(handled)
}

/// Lets the run whose process is `pid` go on.
pub(crate) fn resume(pid: u32) -> Result<&'static str, SuspendError> {
    match scope_of(pid) {
        Scope::Freezable(dir) => freeze(&dir, false).map(|()| "cgroup freezer"),
        scope => signal_all(&scope, Signal::SIGCONT).map(|_| "SIGCONT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lull_run_groups_are_taken() {
        let v1 = "12:pids:/lull/run-7-pool-1\n4:memory:/lull/run-7-pool-1\n0::/\n";
        assert_eq!(
            run_group(v1, |c| c.split(',').any(|c| c == "pids")),
            Some("/lull/run-7-pool-1")
        );
        let agents_own = "12:pids:/system.slice/lull-agent.service\n";
        assert_eq!(run_group(agents_own, |c| c == "pids"), None);
        let v2 = "0::/lull/run-9-3-0\n";
        assert_eq!(run_group(v2, str::is_empty), Some("/lull/run-9-3-0"));
    }
}
