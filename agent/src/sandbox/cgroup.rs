//! Per-run cgroups: a memory limit for the whole tree of a run (RLIMIT_AS is per process, so
//! a run that spreads its memory over children needs this) and a process count limit that is
//! the run's own (RLIMIT_NPROC counts every process of the uid, shared by all runs).
//!
//! Supports cgroup v2 (a unified hierarchy at `/sys/fs/cgroup` with `cgroup.controllers`) and
//! v1 (separate `memory` and `pids` hierarchies). Everything lives under a `lull` group.

use super::SandboxError;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const ROOT: &str = "/sys/fs/cgroup";

/// The directories one run's cgroup consists of.
#[derive(Debug, Clone)]
pub(super) struct RunCgroup {
    dirs: Vec<PathBuf>,
    /// Where `memory.events` / `memory.oom_control` say whether the OOM killer struck.
    memory_dir: PathBuf,
    v2: bool,
    /// Held open for a pooled group ([`RunCgroup::hold_files`]); `None`: opened by path.
    files: Option<Arc<HeldFiles>>,
}

/// The files of a pooled group that each run writes or reads, open from the group's first run
/// on: a pooled group serves many runs, and opening a cgroup file (a walk of its path, kernfs's
/// open, the close) costs more than the write or read itself. A run's process inherits them
/// until the sandbox's last step closes every descriptor it does not need.
///
/// Not the lists of members: v1 builds a `tasks` or `cgroup.procs` list once per open file and
/// serves that list again to later reads for a while (up to a second after its last use), so
/// whether a group is empty is read from a file opened for the purpose. Counters such as
/// `memory.oom_control` are made anew by each read from the start.
#[derive(Debug)]
struct HeldFiles {
    /// Per directory, the file a single-threaded process joins through (`tasks` on v1,
    /// `cgroup.procs` on v2), then `memory.events` (v2) or `memory.oom_control` (v1). Taken
    /// only by the drop.
    files: Option<Vec<File>>,
    /// The process that opened them, the only one that closes them: a forked child's copies
    /// go with the rest of its descriptors (the sandbox closes them all, and the number may
    /// name another file by the time a copy would be dropped).
    opener: u32,
}

impl HeldFiles {
    fn open(dirs: &[PathBuf], memory_dir: &Path, v2: bool) -> Result<HeldFiles, SandboxError> {
        let open = |path: PathBuf, write: bool| {
            fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(&path)
                .map_err(failed_on(&path))
        };
        let (joins, events) = if v2 {
            ("cgroup.procs", "memory.events")
        } else {
            ("tasks", "memory.oom_control")
        };
        let mut files = dirs
            .iter()
            .map(|dir| open(dir.join(joins), true))
            .collect::<Result<Vec<_>, _>>()?;
        files.push(open(memory_dir.join(events), false)?);
        Ok(HeldFiles {
            files: Some(files),
            opener: std::process::id(),
        })
    }

    fn all(&self) -> &[File] {
        self.files.as_deref().unwrap_or_default()
    }

    /// The join file of each directory, in the order of [`RunCgroup::dirs`].
    fn joins(&self) -> &[File] {
        self.all().split_last().map_or(&[], |(_, joins)| joins)
    }

    fn memory_events(&self) -> Option<&File> {
        self.all().last()
    }
}

impl Drop for HeldFiles {
    fn drop(&mut self) {
        if let Some(files) = self.files.take()
            && std::process::id() != self.opener
        {
            std::mem::forget(files);
        }
    }
}

fn is_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// An I/O error on a cgroup file or directory, naming it.
fn failed_on(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |e| SandboxError::Cgroup(format!("{}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    fs::write(path, value).map_err(failed_on(path))
}

fn run_dir_name(name: &str) -> String {
    format!("run-{name}")
}

/// Creates a run's cgroup directory anew. A left-over one of the same name (an agent killed
/// mid-run, a pid reused in a container) is removed first: its counters (an old OOM kill)
/// must not be read as this run's.
fn fresh_dir(dir: &Path) -> Result<(), SandboxError> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(failed_on(dir))?;
    }
    let _ = fs::remove_dir(dir);
    fs::create_dir(dir).map_err(failed_on(dir))
}

/// Removes the empty run cgroups agents that are gone left behind (named `run-{pid}-{run}`).
pub fn sweep_stale() {
    for parent in ["lull", "memory/lull", "pids/lull"] {
        let Ok(entries) = fs::read_dir(Path::new(ROOT).join(parent)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("run-"))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
}

/// Sets a v1 memory limit and its memory+swap twin, in the order the kernel accepts
/// (memory+swap may never be below memory).
fn set_v1_memory(dir: &Path, bytes: u64) -> Result<(), SandboxError> {
    let memory = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    let value = bytes.to_string();
    if write(&memory, &value).is_err() {
        // A lower memory+swap limit is in the way: raise it first.
        let _ = fs::write(&memsw, &value);
        write(&memory, &value)?;
    }
    // Absent without swap accounting; then swap is not limited per run.
    let _ = fs::write(&memsw, &value);
    Ok(())
}

impl RunCgroup {
    /// Creates the run's cgroup with its limits. The caller then joins it, before forking
    /// the run, so every process of the run is born inside.
    pub(super) fn create(
        name: &str,
        memory_bytes: u64,
        max_processes: u64,
    ) -> Result<RunCgroup, SandboxError> {
        let group = if is_v2() {
            let parent = Path::new(ROOT).join("lull");
            fs::create_dir_all(&parent).map_err(failed_on(&parent))?;
            // Controllers must be enabled from the root down to our parent.
            write(
                &Path::new(ROOT).join("cgroup.subtree_control"),
                "+memory +pids",
            )?;
            write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
            let dir = parent.join(run_dir_name(name));
            fresh_dir(&dir)?;
            RunCgroup {
                memory_dir: dir.clone(),
                dirs: vec![dir],
                v2: true,
                files: None,
            }
        } else {
            let memory = Path::new(ROOT).join("memory/lull").join(run_dir_name(name));
            let pids = Path::new(ROOT).join("pids/lull").join(run_dir_name(name));
            for dir in [&memory, &pids] {
                fresh_dir(dir)?;
            }
            RunCgroup {
                memory_dir: memory.clone(),
                dirs: vec![memory, pids],
                v2: false,
                files: None,
            }
        };
        if let Err(err) = group.set_limits(memory_bytes, max_processes) {
            group.remove();
            return Err(err);
        }
        Ok(group)
    }

    /// Sets the memory (and memory+swap) and process-count limits: at creation, and again
    /// for each run that reuses the group.
    pub(super) fn set_limits(
        &self,
        memory_bytes: u64,
        max_processes: u64,
    ) -> Result<(), SandboxError> {
        if self.v2 {
            let dir = &self.memory_dir;
            write(&dir.join("memory.max"), &memory_bytes.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            write(&dir.join("pids.max"), &max_processes.to_string())
        } else {
            set_v1_memory(&self.memory_dir, memory_bytes)?;
            let pids = self.dirs.last().unwrap_or(&self.memory_dir);
            write(&pids.join("pids.max"), &max_processes.to_string())
        }
    }

    /// Whether nothing runs in the group any more (so it may be reused or removed).
    pub(super) fn is_empty(&self) -> bool {
        // Opened anew each time (see [`HeldFiles`]); one byte says whether it lists anyone.
        self.dirs.iter().all(|dir| {
            File::open(dir.join("cgroup.procs"))
                .and_then(|mut procs| procs.read(&mut [0u8; 1]))
                .is_ok_and(|read| read == 0)
        })
    }

    /// Keeps the files each run writes or reads open from now on (see [`HeldFiles`]): for a
    /// group that serves many runs. Without them, each is opened by path when needed.
    pub(super) fn hold_files(&mut self) -> Result<(), SandboxError> {
        if self.files.is_none() {
            self.files = Some(Arc::new(HeldFiles::open(
                &self.dirs,
                &self.memory_dir,
                self.v2,
            )?));
        }
        Ok(())
    }

    /// The descriptors of the files the group holds open (a child forked ahead of its run
    /// keeps them while it closes the others).
    pub(super) fn held_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        use std::os::fd::AsRawFd;
        self.files
            .iter()
            .flat_map(|held| held.all())
            .map(AsRawFd::as_raw_fd)
    }

    /// Removes the group's directories (it must be empty).
    pub(super) fn remove(&self) {
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }

    /// Moves the calling process into the run's cgroup ("0" is the writer, whatever PID
    /// namespace it is in).
    ///
    /// On v1 a single-threaded process moves its one thread through `tasks`: the same move,
    /// but the kernel then skips the global lock a whole process's move takes
    /// (`cgroup_threadgroup_rwsem`), whose writer waits for an RCU grace period when the lock
    /// was quiet: 10-25 ms on this VM, against under a millisecond (`bench/cgroup_move.py`).
    /// A process with more threads (none of ours: the zygote and the launcher are
    /// single-threaded) moves through `cgroup.procs`, which takes all of them.
    pub(super) fn join(&self) -> Result<(), SandboxError> {
        self.join_counted(thread_count() == Some(1))
    }

    /// [`RunCgroup::join`] for a process just forked, which has one thread whatever its
    /// parent had (`fork` copies only the calling thread): no need to count them, which
    /// costs a `stat` of `/proc/self/task`, the kernel making the new process's `/proc`
    /// entries (~1 % of a batch's CPU in the zygote's runs).
    pub(super) fn join_forked(&self) -> Result<(), SandboxError> {
        self.join_counted(true)
    }

    fn join_counted(&self, one_thread: bool) -> Result<(), SandboxError> {
        let single = self.v2 || one_thread;
        match &self.files {
            Some(held) if single => {
                for (dir, mut joins) in self.dirs.iter().zip(held.joins()) {
                    joins.write_all(b"0").map_err(failed_on(dir))?;
                }
            }
            _ => {
                let file = if single && !self.v2 {
                    "tasks"
                } else {
                    "cgroup.procs"
                };
                for dir in &self.dirs {
                    write(&dir.join(file), "0")?;
                }
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed something in the run for lack of memory.
    pub(super) fn oom_killed(&self) -> bool {
        self.oom_kills() > 0
    }

    /// How many processes the OOM killer has killed in this group since it was made.
    pub(super) fn oom_kills(&self) -> u64 {
        // A few lines of counters (v2: low, high, max, oom, oom_kill, oom_group_kill).
        let mut text = [0u8; 512];
        let read = match self.files.as_deref().and_then(HeldFiles::memory_events) {
            Some(held) => held.read_at(&mut text, 0),
            None => {
                let file = if self.v2 {
                    "memory.events"
                } else {
                    "memory.oom_control"
                };
                File::open(self.memory_dir.join(file)).and_then(|mut f| f.read(&mut text))
            }
        };
        let Ok(read) = read else {
            return 0;
        };
        std::str::from_utf8(&text[..read])
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    }
}

/// The calling process's threads: `/proc/self/task` has a link for each, besides its own two
/// (one `stat`), or the `Threads:` line of `/proc/self/status` where the links do not say.
/// `None` if neither can be read.
pub fn thread_count() -> Option<u64> {
    threads_of(Path::new("/proc/self"))
}

/// The threads of the process whose `/proc` directory is `proc`.
fn threads_of(proc: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    if let Ok(task) = fs::metadata(proc.join("task"))
        && let Some(threads) = task.nlink().checked_sub(2).filter(|n| *n > 0)
    {
        return Some(threads);
    }
    fs::read_to_string(proc.join("status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Removes a run's cgroup directories (they must be empty: the run is over). Safe to call
/// for a run that had none.
pub fn remove_run(name: &str) {
    let name = run_dir_name(name);
    for dir in [
        Path::new(ROOT).join("lull").join(&name),
        Path::new(ROOT).join("memory/lull").join(&name),
        Path::new(ROOT).join("pids/lull").join(&name),
    ] {
        let _ = fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_threaded_process_counts_one_thread() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let counted = threads_of(&Path::new("/proc").join(sleeper.id().to_string()));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(counted, Some(1));
    }

    fn host_has_cgroups() -> bool {
        let v2 = fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
            .is_ok_and(|c| c.contains("memory") && c.contains("pids"));
        let v1 = Path::new(ROOT).join("memory/tasks").exists()
            && Path::new(ROOT).join("pids/tasks").exists();
        nix::unistd::geteuid().is_root() && (v1 || v2)
    }

    /// The cgroups of each thread of the calling process that a run's cgroup sets (v2: the
    /// unified one; v1: memory and pids, a hybrid host's unified hierarchy left out), a line
    /// per thread.
    fn cgroups_of_threads() -> String {
        let mut tasks: Vec<_> = fs::read_dir("/proc/self/task")
            .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        tasks.sort();
        let v2 = is_v2();
        let mut lines = Vec::new();
        for task in tasks {
            let text = fs::read_to_string(task.join("cgroup")).unwrap_or_default();
            let mut ours: Vec<&str> = text
                .lines()
                .filter(|line| {
                    if v2 {
                        line.starts_with("0::")
                    } else {
                        line.contains(":memory:") || line.contains(":pids:")
                    }
                })
                .filter_map(|line| line.split(':').nth(2))
                .collect();
            ours.sort_unstable();
            lines.push(ours.join(" "));
        }
        lines.join("\n")
    }

    /// Forks a child that starts `threads - 1` more threads, joins `group` and reports where
    /// each of its threads is.
    fn join_with_threads(group: &RunCgroup, threads: usize) -> String {
        use std::io::{Read as _, Write as _};
        let (reader, writer) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child starts threads, writes files and a pipe and leaves by `_exit`,
        // never returning into the test harness; glibc's fork leaves the allocator usable in
        // the child of a threaded process.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                drop(reader);
                let parked: Vec<_> = (1..threads)
                    .map(|_| std::thread::spawn(std::thread::park))
                    .collect();
                let report = match group.join() {
                    Ok(()) => cgroups_of_threads(),
                    Err(err) => format!("join failed: {err}"),
                };
                let _ = fs::File::from(writer).write_all(report.as_bytes());
                drop(parked);
                // SAFETY: ends the forked child at once, without the harness's exit path.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(writer);
                let mut report = String::new();
                let read = fs::File::from(reader).read_to_string(&mut report);
                let _ = nix::sys::wait::waitpid(child, None);
                read.expect("the child's report");
                report
            }
        }
    }

    #[test]
    fn every_thread_of_a_joining_process_lands_in_the_run_cgroup() {
        if !host_has_cgroups() {
            eprintln!("skipped: needs root and the memory and pids cgroup controllers");
            return;
        }
        // A lone thread (v1: through `tasks`), and a process of three (`cgroup.procs`); each
        // with the group's files opened by path, and held open as a pooled group's are.
        for (threads, held) in [(1, false), (3, false), (1, true), (3, true)] {
            let name = format!("{}-join-test-{threads}-{held}", std::process::id());
            let mut group = RunCgroup::create(&name, 256 << 20, 64).expect("a cgroup");
            if held {
                group.hold_files().expect("the group's files");
            }
            let report = join_with_threads(&group, threads);
            group.remove();
            let lines: Vec<&str> = report.lines().collect();
            assert_eq!(lines.len(), threads, "a line per thread:\n{report}");
            for line in &lines {
                assert!(
                    line.split(' ')
                        .all(|path| path.ends_with(&run_dir_name(&name))),
                    "{threads} thread(s), each in the run's groups:\n{report}"
                );
            }
        }
    }

    /// Forks a child that joins `group` and stays there until told to go; returns whether
    /// `group` was empty while the child was in it, and once it was reaped.
    fn emptiness_around_a_member(group: &RunCgroup) -> (bool, bool) {
        use std::io::{Read as _, Write as _};
        let (joined_reader, joined_writer) = nix::unistd::pipe().expect("pipe");
        let (go_reader, go_writer) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child writes a file and a pipe, reads a pipe and leaves by `_exit`,
        // never returning into the test harness; glibc's fork leaves the allocator usable in
        // the child of a threaded process.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                drop(joined_reader);
                drop(go_writer);
                let said: &[u8] = if group.join().is_ok() { b"y" } else { b"n" };
                let _ = fs::File::from(joined_writer).write_all(said);
                let _ = fs::File::from(go_reader).read(&mut [0u8; 1]);
                // SAFETY: ends the forked child at once, without the harness's exit path.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(joined_writer);
                drop(go_reader);
                let mut said = [0u8; 1];
                let read = fs::File::from(joined_reader).read_exact(&mut said);
                let while_in = group.is_empty();
                drop(go_writer);
                let _ = nix::sys::wait::waitpid(child, None);
                read.expect("the child's word");
                assert_eq!(&said, b"y", "the child could not join");
                (while_in, group.is_empty())
            }
        }
    }

    #[test]
    fn a_group_serves_one_member_after_another_through_the_files_it_holds() {
        if !host_has_cgroups() {
            eprintln!("skipped: needs root and the memory and pids cgroup controllers");
            return;
        }
        let name = format!("{}-held-test", std::process::id());
        let mut group = RunCgroup::create(&name, 256 << 20, 64).expect("a cgroup");
        group.hold_files().expect("the group's files");
        let empty_at_first = group.is_empty();
        // A pooled group: the same open files join each run and see it gone.
        let rounds: Vec<(bool, bool)> = (0..3).map(|_| emptiness_around_a_member(&group)).collect();
        let oom_kills = group.oom_kills();
        group.remove();
        assert!(empty_at_first, "a new group is empty");
        assert_eq!(
            rounds,
            vec![(false, true); 3],
            "(empty while a member is in it, empty once it was reaped), per round"
        );
        assert_eq!(oom_kills, 0);
    }

    #[test]
    fn a_test_process_counts_its_threads() {
        // The harness runs this test on a thread of its own, besides the main one.
        let counted = std::thread::spawn(thread_count).join().expect("thread");
        assert!(counted.is_some_and(|n| n >= 2), "{counted:?}");
    }
}
