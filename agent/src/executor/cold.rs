//! [`ColdExecutor`]: a fresh `python3 -I -u -c CODE` per run.
//!
//! Each run gets its own process group, a private empty working directory (removed afterwards),
//! a clean environment, capped stdout/stderr and a wall-clock timeout enforced here.
//!
//! Architecture Invariant: however a run ends (exit, timeout, cancel, the future dropped),
//! its whole process group is sent SIGKILL, so no grandchild outlives the run.
//!
//! Not yet here (the sandbox issue): rlimits, namespaces, per-run CPU and memory accounting
//! (`cpu_seconds` and `max_rss_mb` are reported as unknown), and catching descendants that
//! leave the process group with `setsid`.

use super::{Execution, Executor, Job, RunTimer, format_seconds, unix_now};
use crate::sandbox::{LaunchRequest, RunPolicy, SandboxSettings};
use lull_shared::Protections;
use lull_shared::RunOutcome;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The `PATH` runs get when the agent itself has none.
pub(super) const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Longer timeouts are treated as this one (keeps `Instant` arithmetic far from overflow).
pub(super) const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long output is still read after the run's process exited and its group was killed.
/// Only a descendant that escaped the group (`setsid`) can keep a pipe open that long.
pub(super) const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);
pub(super) const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Of a truncated stream, this much of the end is kept aside to find the error line in.
const ERROR_TAIL_BYTES: usize = 4096;
const MAX_ERROR_CHARS: usize = 1000;

/// Runs each job as `{python} -I -u -c CODE`.
///
/// `-I` (isolated mode) ignores `PYTHON*` variables, user site-packages and the working
/// directory on `sys.path`; because it ignores `PYTHONUNBUFFERED`, `-u` is what keeps output
/// unbuffered, so that a run killed at its timeout still reports what it printed.
#[derive(Debug, Clone)]
pub struct ColdExecutor {
    python: String,
    max_output_bytes: usize,
    path: OsString,
    sandbox: Option<ColdSandbox>,
    /// Launchers started ahead of their runs, shared by the executor's clones.
    spares: Arc<Mutex<Vec<Spare>>>,
}

/// A `lull-sandbox --spare` waiting for its run in a cgroup it made and joined: on cgroup
/// v1 the first attach after a quiet spell waits for an RCU grace period (10-30 ms on a VM,
/// `perf trace`), which a launcher started when its run comes would add to the run's start.
/// Used only with namespaces and cgroups (the run's cgroup and session are all it prepares;
/// without namespaces a run also needs a working directory on the host). Dropped unused, it
/// is killed; its empty cgroup (named after it) is swept when an agent next starts.
#[derive(Debug)]
struct Spare {
    child: Child,
    cgroup: String,
}

/// At most this many launchers wait: one per run that ran at once, as runs found none.
const MAX_SPARES: usize = 8;

/// How runs are confined: through the `lull-sandbox` launcher, with what the probe found.
#[derive(Debug, Clone)]
struct ColdSandbox {
    launcher: PathBuf,
    protections: Protections,
    settings: SandboxSettings,
}

/// A stream that goes this many times past its cap is a flood: the run is killed.
const FLOOD_FACTOR: u64 = 8;

impl ColdExecutor {
    /// `max_output_bytes` applies to stdout and stderr separately. Runs inherit the agent's
    /// `PATH` (so that `python` resolves the same way for them) and nothing else.
    pub fn new(python: impl Into<String>, max_output_bytes: usize) -> Self {
        let path = std::env::var_os("PATH")
            .filter(|path| !path.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.into());
        ColdExecutor {
            python: python.into(),
            max_output_bytes,
            path,
            sandbox: None,
            spares: Arc::default(),
        }
    }

    /// Confines every run with `protections` through `launcher` (`lull-sandbox`). Without a
    /// launcher in `protections`, runs get their own process group and a clean environment.
    pub fn with_sandbox(
        mut self,
        launcher: PathBuf,
        protections: Protections,
        settings: SandboxSettings,
    ) -> Self {
        self.sandbox = protections.launcher.then_some(ColdSandbox {
            launcher,
            protections,
            settings,
        });
        self
    }

    /// What every run of this executor gets.
    pub fn protections(&self) -> Protections {
        match &self.sandbox {
            Some(s) => s.protections.clone(),
            None => Protections::none("runs are not sandboxed (no launcher)"),
        }
    }

    /// The real interpreter behind `python` (its `sys.executable`), found once at start.
    ///
    /// `python3` is often a wrapper (pyenv's shims are shell scripts that run pyenv on every
    /// call): starting it per task would double the cost of a short task. When Python cannot
    /// say, the name is kept and the failure shows on the first run.
    pub async fn resolve_interpreter(python: &str) -> String {
        let probe = Command::new(python)
            .args(["-I", "-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match tokio::time::timeout(Duration::from_secs(30), probe).await {
            Ok(Ok(out)) if out.status.success() => {
                let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if path.is_empty() {
                    python.to_string()
                } else {
                    path
                }
            }
            _ => python.to_string(),
        }
    }

    /// The interpreter's installation prefixes (`sys.base_prefix`, and `sys.prefix` in a
    /// virtual environment): what a sandboxed run must be able to read.
    pub async fn interpreter_prefixes(python: &str) -> Vec<PathBuf> {
        let probe = Command::new(python)
            .args([
                "-I",
                "-c",
                "import sys; print(sys.base_prefix); print(sys.prefix)",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(30), probe).await else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| PathBuf::from(l.trim()))
            .filter(|p| p.is_absolute())
            .collect();
        dirs.dedup();
        dirs
    }

    /// The command for one run, and the name of its cgroup if it gets one.
    fn command(&self, job: &Job, workdir: &Path) -> (Command, Option<String>) {
        let (mut command, home, cgroup) = match &self.sandbox {
            Some(sandbox) => {
                let policy = RunPolicy::for_job(
                    job.run_id,
                    &sandbox.protections,
                    &sandbox.settings,
                    job.resources.memory,
                    job.timeout,
                    Some(workdir.to_path_buf()),
                );
                let mut command = Command::new(&sandbox.launcher);
                // Serialising plain data cannot fail; an empty policy would be refused loudly.
                command
                    .arg("--policy")
                    .arg(serde_json::to_string(&policy).unwrap_or_default())
                    .arg("--")
                    .arg(&self.python);
                let cgroup = policy.protections.cgroups.then(|| policy.cgroup.clone());
                (command, policy.home(), cgroup)
            }
            None => {
                let mut command = Command::new(&self.python);
                // Its own group, so the whole tree can be killed (the launcher makes a session).
                command.process_group(0);
                (command, workdir.to_path_buf(), None)
            }
        };
        command
            .args(python_args(job))
            .env_clear()
            .envs(self.run_environment(job, &home))
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        (command, cgroup)
    }

    /// Everything a run's environment holds.
    fn run_environment(&self, job: &Job, home: &Path) -> BTreeMap<String, String> {
        let text = |value: &std::ffi::OsStr| value.to_string_lossy().into_owned();
        let mut env = BTreeMap::from([
            ("PATH".to_string(), text(&self.path)),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("PYTHONIOENCODING".to_string(), "utf-8".to_string()),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
            ("HOME".to_string(), text(home.as_os_str())),
            ("TMPDIR".to_string(), text(home.as_os_str())),
            ("LULL_TASK_ID".to_string(), job.task_id.to_string()),
            ("LULL_RUN_ID".to_string(), job.run_id.to_string()),
        ]);
        env.extend(
            job.point
                .environment()
                .map(|(name, value)| (name.to_string(), value)),
        );
        env
    }

    /// The sandbox, when runs may start on a launcher started ahead (see [`Spare`]).
    fn spare_sandbox(&self) -> Option<&ColdSandbox> {
        self.sandbox
            .as_ref()
            .filter(|s| s.protections.namespaces && s.protections.cgroups)
    }

    /// Starts one more launcher ahead of its run, unless enough wait.
    fn add_spare(&self) {
        let Some(sandbox) = self.spare_sandbox() else {
            return;
        };
        let Ok(mut spares) = self.spares.lock() else {
            return;
        };
        if spares.len() >= MAX_SPARES {
            return;
        }
        // Its cgroup's first limits; the run's own limits replace these. The launcher names
        // its cgroup after itself (`spare_cgroup_name`).
        let template = RunPolicy::for_job(
            0,
            &sandbox.protections,
            &sandbox.settings,
            lull_shared::Resources::default().memory,
            Duration::from_secs(60),
            None,
        );
        let spawned = Command::new(&sandbox.launcher)
            .arg("--spare")
            .arg(serde_json::to_string(&template).unwrap_or_default())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => match child.id() {
                Some(pid) => spares.push(Spare {
                    child,
                    cgroup: crate::sandbox::spare_cgroup_name(pid),
                }),
                None => debug!("a launcher started ahead of its run exited at once"),
            },
            Err(err) => debug!(%err, "could not start a launcher ahead of its run"),
        }
    }

    /// Hands the run to a launcher started ahead of it, if one waits: the process and its
    /// cgroup's name.
    async fn start_on_spare(&self, job: &Job) -> Option<(Child, String)> {
        let sandbox = self.spare_sandbox()?;
        loop {
            let mut spare = self.spares.lock().ok()?.pop()?;
            let mut policy = RunPolicy::for_job(
                job.run_id,
                &sandbox.protections,
                &sandbox.settings,
                job.resources.memory,
                job.timeout,
                None,
            );
            policy.cgroup = spare.cgroup.clone();
            let request = LaunchRequest {
                env: self.run_environment(job, &policy.home()),
                policy,
                program: self.python.clone(),
                args: python_args(job),
            };
            // Serialising plain data cannot fail; an empty line would be refused loudly.
            let mut line = serde_json::to_vec(&request).unwrap_or_default();
            line.push(b'\n');
            let Some(mut stdin) = spare.child.stdin.take() else {
                continue;
            };
            if stdin.write_all(&line).await.is_ok() && stdin.flush().await.is_ok() {
                return Some((spare.child, spare.cgroup));
            }
            // It died waiting (dropping it reaps it): its cgroup is empty, or about to be.
            drop(spare.child);
            super::remove_run_cgroup_in_background(spare.cgroup);
        }
    }

    /// The run's process, its working directory on the host (none on a spare, whose runs
    /// have a private `/tmp`) and its cgroup's name.
    async fn start(&self, job: &Job) -> Result<(Child, Option<TempDir>, Option<String>), String> {
        if let Some((child, cgroup)) = self.start_on_spare(job).await {
            self.add_spare();
            return Ok((child, None, Some(cgroup)));
        }
        let workdir = self
            .make_workdir()
            .map_err(|err| format!("could not create a working directory: {err}"))?;
        let (mut command, cgroup) = self.command(job, workdir.path());
        match command.spawn() {
            Ok(child) => {
                self.add_spare();
                Ok((child, Some(workdir), cgroup))
            }
            Err(err) => {
                remove_workdir(workdir).await;
                // The interpreter, or the sandbox's launcher that would have started it.
                let program = command
                    .as_std()
                    .get_program()
                    .to_string_lossy()
                    .into_owned();
                Err(format!("could not start {program}: {err}"))
            }
        }
    }

    /// A working directory on the host, for runs without a private `/tmp`; handed to the
    /// sandbox's uid when runs drop to one.
    fn make_workdir(&self) -> io::Result<TempDir> {
        let dir = tempfile::Builder::new().prefix("lull-run-").tempdir()?;
        if let Some(sandbox) = &self.sandbox
            && sandbox.protections.drop_user
        {
            nix::unistd::chown(
                dir.path(),
                Some(nix::unistd::Uid::from_raw(sandbox.settings.uid)),
                Some(nix::unistd::Gid::from_raw(sandbox.settings.gid)),
            )
            .map_err(io::Error::from)?;
        }
        Ok(dir)
    }
}

impl Executor for ColdExecutor {
    fn kind(&self) -> &'static str {
        "cold"
    }

    fn protections(&self) -> Protections {
        ColdExecutor::protections(self)
    }

    async fn run(&self, job: Job, cancel: CancellationToken) -> Execution {
        let started_at = unix_now();
        let (mut child, workdir, cgroup) = match self.start(&job).await {
            Ok(started) => started,
            Err(error) => return Execution::not_started(started_at, error),
        };
        if let Some(pid) = child.id() {
            job.control.process.set(pid);
        }
        // process_group(0) made the child the leader of a new group whose id is its pid.
        let group = GroupKiller(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        );

        let mut stdout = Capture::new(self.max_output_bytes);
        let mut stderr = Capture::new(self.max_output_bytes);
        let ending = supervise(
            &mut child,
            &group,
            &mut stdout,
            &mut stderr,
            job.control.clock.timer(job.timeout.min(MAX_TIMEOUT)),
            &cancel,
        )
        .await;
        job.control.process.clear();
        // supervise killed the group; stop the drop guard from killing a recycled pgid later.
        group.disarm();
        let completed_at = unix_now();
        if let Some(workdir) = workdir {
            remove_workdir(workdir).await;
        }
        if let Some(cgroup) = cgroup {
            // Empty now: its last process, the run's watcher, has exited.
            super::remove_run_cgroup_in_background(cgroup);
        }

        // Per-run CPU and memory accounting: the zygote has it (wait4); cold has not yet.
        finished(
            ending,
            stdout,
            stderr,
            job.timeout,
            (started_at, completed_at),
            (None, None),
        )
    }
}

/// `python3 -I -u -c CODE`'s arguments.
fn python_args(job: &Job) -> Vec<String> {
    ["-I", "-u", "-c", job.code.as_str()]
        .map(String::from)
        .to_vec()
}

/// Why a supervised run stopped.
#[derive(Debug)]
pub(super) enum Ending {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
    /// A stream went far past its cap; the run was killed.
    Flooded(&'static str),
    WaitFailed(io::Error),
}

/// Waits for the run to exit, time out or be cancelled while reading both pipes, and kills
/// the process group in every case.
async fn supervise(
    child: &mut Child,
    group: &GroupKiller,
    stdout: &mut Capture,
    stderr: &mut Capture,
    mut timer: RunTimer,
    cancel: &CancellationToken,
) -> Ending {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let mut out_buf = vec![0u8; READ_CHUNK_BYTES];
    let mut err_buf = vec![0u8; READ_CHUNK_BYTES];
    let mut killed_because: Option<Ending> = None;
    let mut exited: Option<io::Result<ExitStatus>> = None;
    let mut drain_deadline: Option<Instant> = None;

    loop {
        if exited.is_some() && out_pipe.is_none() && err_pipe.is_none() {
            break;
        }
        tokio::select! {
            read = read_chunk(&mut out_pipe, &mut out_buf), if out_pipe.is_some() => match read {
                Ok(n) if n > 0 => {
                    stdout.push(&out_buf[..n]);
                    if stdout.is_flood() && killed_because.is_none() && exited.is_none() {
                        group.kill(child);
                        killed_because = Some(Ending::Flooded("stdout"));
                    }
                }
                _ => out_pipe = None,
            },
            read = read_chunk(&mut err_pipe, &mut err_buf), if err_pipe.is_some() => match read {
                Ok(n) if n > 0 => {
                    stderr.push(&err_buf[..n]);
                    if stderr.is_flood() && killed_because.is_none() && exited.is_none() {
                        group.kill(child);
                        killed_because = Some(Ending::Flooded("stderr"));
                    }
                }
                _ => err_pipe = None,
            },
            status = child.wait(), if exited.is_none() => {
                // Whatever the program left running in its group dies with it.
                group.kill(child);
                exited = Some(status);
                drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
            }
            () = timer.expired(), if exited.is_none() && killed_because.is_none() => {
                group.kill(child);
                killed_because = Some(Ending::TimedOut);
            }
            () = cancel.cancelled(), if exited.is_none() && killed_because.is_none() => {
                group.kill(child);
                killed_because = Some(Ending::Cancelled);
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)),
                if drain_deadline.is_some() => {
                warn!("a process that left the run's group still holds its output open; not waiting for it");
                break;
            }
        }
    }

    match (killed_because, exited) {
        (Some(reason), _) => reason,
        (None, Some(Ok(status))) => Ending::Exited(status),
        (None, Some(Err(err))) => Ending::WaitFailed(err),
        (None, None) => {
            Ending::WaitFailed(io::Error::other("the run ended without an exit status"))
        }
    }
}

pub(super) async fn read_chunk<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The execution of a run that ended as `ending`, with what it wrote and the usage known of
/// it (CPU seconds, peak RSS in MB). Shared by both executors, so both report alike.
pub(super) fn finished(
    ending: Ending,
    stdout: Capture,
    stderr: Capture,
    timeout: Duration,
    (started_at, completed_at): (f64, f64),
    (cpu_seconds, max_rss_mb): (Option<f64>, Option<f64>),
) -> Execution {
    let (outcome, exit_code, error) = verdict(ending, &stderr, timeout);
    Execution {
        outcome,
        exit_code,
        stdout: stdout.into_text(),
        stderr: stderr.into_text(),
        error,
        started_at,
        completed_at,
        cpu_seconds,
        max_rss_mb,
    }
}

/// The outcome, exit code and one-line error of a run that ended as `ending`.
fn verdict(
    ending: Ending,
    stderr: &Capture,
    timeout: Duration,
) -> (RunOutcome, Option<i32>, Option<String>) {
    match ending {
        Ending::Flooded(stream) => (
            RunOutcome::Failed,
            None,
            Some(format!(
                "output limit exceeded: more than {} bytes on {stream}",
                stderr.limit as u64 * FLOOD_FACTOR
            )),
        ),
        Ending::Cancelled => (RunOutcome::Cancelled, None, Some("cancelled".to_string())),
        Ending::TimedOut => (
            RunOutcome::Failed,
            None,
            Some(format!("timed out after {} s", format_seconds(timeout))),
        ),
        Ending::WaitFailed(err) => (
            RunOutcome::Failed,
            None,
            Some(format!("could not wait for the run's process: {err}")),
        ),
        Ending::Exited(status) => match (status.code(), status.signal()) {
            (Some(0), _) => (RunOutcome::Completed, Some(0), None),
            (Some(code), _) => {
                let error = stderr
                    .last_line()
                    .map(|line| {
                        line.strip_prefix("lull: ")
                            .map(str::to_string)
                            .unwrap_or(line)
                    })
                    .unwrap_or_else(|| format!("exit code {code}"));
                (RunOutcome::Failed, Some(code), Some(error))
            }
            (None, Some(signal)) => {
                // The sandbox's watcher explains limits it saw fire ("lull: memory limit ...").
                let error = match stderr
                    .last_line()
                    .and_then(|l| l.strip_prefix("lull: ").map(str::to_string))
                {
                    Some(explained) => explained,
                    None => {
                        let name = Signal::try_from(signal).map_or("unknown", Signal::as_str);
                        format!("killed by signal {signal} ({name})")
                    }
                };
                (RunOutcome::Failed, None, Some(error))
            }
            (None, None) => (
                RunOutcome::Failed,
                None,
                Some(format!("ended oddly: {status}")),
            ),
        },
    }
}

/// Kills a run's process group: on demand, and when dropped unless disarmed, so that a run
/// whose future is dropped half-way leaves nothing behind.
struct GroupKiller(Option<Pid>);

impl GroupKiller {
    fn kill(&self, child: &mut Child) {
        if let Some(group) = self.0 {
            kill_group(group);
        }
        // The child itself too: with a launcher, the group only exists once the launcher has
        // called setsid, and a kill that lands before would otherwise be lost. (Safe against
        // pid reuse: tokio has not reaped the child while it holds it.)
        let _ = child.start_kill();
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            kill_group(group);
        }
    }
}

fn kill_group(group: Pid) {
    match killpg(group, Signal::SIGKILL) {
        // ESRCH: every process of the group is already gone.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => warn!(%err, pgid = group.as_raw(), "could not kill the run's process group"),
    }
}

pub(super) async fn remove_workdir(workdir: TempDir) {
    let path = workdir.path().display().to_string();
    match tokio::task::spawn_blocking(move || workdir.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(path, %err, "could not remove the run's working directory"),
        Err(err) => warn!(path, %err, "could not remove the run's working directory"),
    }
}

/// One output stream: the first `limit` bytes kept, the rest counted and discarded (but for a
/// short tail, to find the error line in).
#[derive(Debug)]
pub(super) struct Capture {
    limit: usize,
    kept: Vec<u8>,
    discarded: u64,
    tail: Vec<u8>,
}

impl Capture {
    pub(super) fn new(limit: usize) -> Self {
        Capture {
            limit,
            kept: Vec::new(),
            discarded: 0,
            tail: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        let (keep, rest) = chunk.split_at(room.min(chunk.len()));
        self.kept.extend_from_slice(keep);
        if !rest.is_empty() {
            self.discarded = self.discarded.saturating_add(rest.len() as u64);
            self.tail.extend_from_slice(rest);
            let excess = self.tail.len().saturating_sub(ERROR_TAIL_BYTES);
            self.tail.drain(..excess);
        }
    }

    fn is_truncated(&self) -> bool {
        self.discarded > 0
    }

    pub(super) fn is_flood(&self) -> bool {
        self.discarded > (self.limit as u64).saturating_mul(FLOOD_FACTOR - 1)
    }

    /// The last non-empty line (Python's exception line, when it died of one).
    fn last_line(&self) -> Option<String> {
        let source = if self.is_truncated() {
            &self.tail
        } else {
            &self.kept
        };
        let text = String::from_utf8_lossy(source);
        let line = text.lines().map(str::trim).rfind(|line| !line.is_empty())?;
        Some(match line.char_indices().nth(MAX_ERROR_CHARS) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line.to_string(),
        })
    }

    pub(super) fn into_text(self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.is_truncated() {
            let _ = write!(
                text,
                "\n[lull: output truncated after {} bytes]",
                self.limit
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::RunPoint;
    use lull_shared::Resources;
    use std::path::PathBuf;

    const MAX_OUTPUT: usize = 1024 * 1024;

    fn job(code: &str, timeout_secs: f64) -> Job {
        Job {
            task_id: 7,
            run_id: 42,
            code: code.to_string(),
            timeout: Duration::from_secs_f64(timeout_secs),
            resources: Resources::default(),
            point: RunPoint { index: 2, of: 3 },
            control: Default::default(),
        }
    }

    async fn run(code: &str) -> Execution {
        ColdExecutor::new("python3", MAX_OUTPUT)
            .run(job(code, 60.0), CancellationToken::new())
            .await
    }

    /// True while `pid` exists and is not a zombie (a reaper may be slow to collect it).
    fn is_running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X'),
        }
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn hello_world_completes_with_its_output() {
        let execution = run("print('Hello World')").await;

        assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
        assert_eq!(execution.stdout, "Hello World\n");
        assert_eq!(execution.exit_code, Some(0));
        assert_eq!(execution.error, None);
        assert!(execution.started_at <= execution.completed_at);
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_its_code() {
        let execution = run("import sys; sys.exit(3)").await;

        assert_eq!(execution.outcome, RunOutcome::Failed);
        assert_eq!(execution.exit_code, Some(3));
        assert_eq!(execution.error.as_deref(), Some("exit code 3"));
    }

    #[tokio::test]
    async fn an_exception_fails_with_its_last_line() {
        let execution = run("1/0").await;

        assert_eq!(execution.outcome, RunOutcome::Failed);
        assert_eq!(execution.exit_code, Some(1));
        assert_eq!(
            execution.error.as_deref(),
            Some("ZeroDivisionError: division by zero")
        );
        assert!(execution.stderr.contains("Traceback"));
    }

    #[tokio::test]
    async fn a_signal_death_names_the_signal() {
        let execution = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)").await;

        assert_eq!(execution.outcome, RunOutcome::Failed);
        assert_eq!(execution.exit_code, None);
        assert_eq!(
            execution.error.as_deref(),
            Some("killed by signal 9 (SIGKILL)")
        );
    }

    #[tokio::test]
    async fn a_missing_interpreter_fails_the_run() {
        let execution = ColdExecutor::new("/nonexistent/python3", MAX_OUTPUT)
            .run(job("print(1)", 60.0), CancellationToken::new())
            .await;

        assert_could_not_start(execution, "/nonexistent/python3");
    }

    /// The run failed before it began, its error naming `program`.
    fn assert_could_not_start(execution: Execution, program: &str) {
        assert_eq!(execution.outcome, RunOutcome::Failed);
        let error = execution.error.unwrap_or_default();
        assert!(
            error.starts_with(&format!("could not start {program}: ")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_missing_launcher_is_named_not_the_interpreter() {
        let mut protections = Protections::none("a test of the launcher's absence");
        protections.launcher = true;
        let execution = ColdExecutor::new("python3", MAX_OUTPUT)
            .with_sandbox(
                PathBuf::from("/nonexistent/lull-sandbox"),
                protections,
                SandboxSettings::default(),
            )
            .run(job("print(1)", 60.0), CancellationToken::new())
            .await;

        assert_could_not_start(execution, "/nonexistent/lull-sandbox");
    }

    // Three seconds, not one: the code must have printed before the timeout fires, and a
    // loaded machine can take over a second to start python3.
    #[tokio::test]
    async fn the_timeout_kills_the_run() {
        let execution = ColdExecutor::new("python3", MAX_OUTPUT)
            .run(
                job(
                    "print('before', flush=True); import time; time.sleep(60)",
                    3.0,
                ),
                CancellationToken::new(),
            )
            .await;

        assert_eq!(execution.outcome, RunOutcome::Failed);
        assert_eq!(execution.exit_code, None);
        assert_eq!(execution.error.as_deref(), Some("timed out after 3 s"));
        assert_eq!(execution.stdout, "before\n");
    }

    #[tokio::test]
    async fn a_timeout_kills_grandchildren_too() {
        let code = "import subprocess, time\n\
                    child = subprocess.Popen(['sleep', '300'])\n\
                    print(child.pid, flush=True)\n\
                    time.sleep(60)\n";
        let execution = ColdExecutor::new("python3", MAX_OUTPUT)
            .run(job(code, 3.0), CancellationToken::new())
            .await;

        assert_eq!(execution.error.as_deref(), Some("timed out after 3 s"));
        let pid: i32 = execution
            .stdout
            .trim()
            .parse()
            .expect("the task printed a pid");
        wait_until("the grandchild is dead", || !is_running(pid)).await;
    }

    #[tokio::test]
    async fn leftovers_die_when_the_program_exits() {
        let code = "import subprocess\n\
                    child = subprocess.Popen(['sleep', '300'])\n\
                    print(child.pid)\n";
        let execution = run(code).await;

        assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
        let pid: i32 = execution
            .stdout
            .trim()
            .parse()
            .expect("the task printed a pid");
        wait_until("the background child is dead", || !is_running(pid)).await;
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let pid_file = scratch.path().join("grandchild.pid");
        let code = format!(
            "import subprocess, time\n\
             child = subprocess.Popen(['sleep', '300'])\n\
             open({path:?}, 'w').write(str(child.pid))\n\
             time.sleep(60)\n",
            path = pid_file.display().to_string()
        );
        let cancel = CancellationToken::new();
        let executor = ColdExecutor::new("python3", MAX_OUTPUT);
        let running = tokio::spawn({
            let cancel = cancel.clone();
            async move { executor.run(job(&code, 120.0), cancel).await }
        });

        let mut pid = None;
        wait_until("the task has started its grandchild", || {
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            pid.is_some()
        })
        .await;
        cancel.cancel();
        let execution = running.await.expect("executor task");

        assert_eq!(execution.outcome, RunOutcome::Cancelled);
        assert_eq!(execution.exit_code, None);
        let pid = pid.expect("pid read above");
        wait_until("the grandchild is dead", || !is_running(pid)).await;
    }

    #[tokio::test]
    async fn output_over_the_cap_is_truncated_with_a_marker() {
        // Past the cap, but short of a flood (8 times the cap).
        let code = "import sys\n\
                    sys.stdout.write('x' * 5000)\n\
                    sys.stderr.write('y' * 3000 + '\\nValueError: the end\\n')\n\
                    sys.exit(2)\n";
        let execution = ColdExecutor::new("python3", 1000)
            .run(job(code, 60.0), CancellationToken::new())
            .await;

        let marker = "\n[lull: output truncated after 1000 bytes]";
        assert_eq!(execution.stdout, format!("{}{marker}", "x".repeat(1000)));
        assert_eq!(execution.stderr, format!("{}{marker}", "y".repeat(1000)));
        assert_eq!(execution.exit_code, Some(2));
        assert_eq!(execution.error.as_deref(), Some("ValueError: the end"));
    }

    #[tokio::test]
    async fn a_run_that_floods_its_output_is_killed() {
        for (stream, code) in [
            ("stdout", "while True: print('x' * 1000)"),
            (
                "stderr",
                "import sys\nwhile True: sys.stderr.write('y' * 1000)",
            ),
        ] {
            let execution = ColdExecutor::new("python3", 1000)
                .run(job(code, 120.0), CancellationToken::new())
                .await;
            assert_eq!(execution.outcome, RunOutcome::Failed, "{stream}");
            assert_eq!(
                execution.error.as_deref(),
                Some(format!("output limit exceeded: more than 8000 bytes on {stream}").as_str())
            );
        }
    }

    const SECRET_VAR: &str = "LULL_AGENT_TEST_SECRET";

    /// The environment check needs a variable set in the test process; setting one needs
    /// `unsafe` (`std::env::set_var`), so the test re-runs itself with the variable set.
    #[tokio::test]
    async fn the_task_sees_a_clean_environment_and_a_private_workdir() {
        if std::env::var_os(SECRET_VAR).is_none() {
            let test_name = format!(
                "{}::the_task_sees_a_clean_environment_and_a_private_workdir",
                module_path!()
                    .split_once("::")
                    .map_or("", |(_crate, path)| path)
            );
            let exe = std::env::current_exe().expect("test binary path");
            let output = std::process::Command::new(exe)
                .args([test_name.as_str(), "--exact", "--nocapture"])
                .env(SECRET_VAR, "hunter2")
                .env("LULL_TOKEN", "agent-secret-token")
                .output()
                .expect("re-run the test binary");
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "{report}");
            assert!(report.contains("1 passed"), "{report}");
            return;
        }

        let code = "import json, os\n\
                    print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))\n";
        let execution = run(code).await;
        assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
        let seen: serde_json::Value =
            serde_json::from_str(&execution.stdout).expect("the task printed json");
        let env = seen["env"].as_object().expect("env object");
        let cwd = PathBuf::from(seen["cwd"].as_str().expect("cwd"));

        assert!(!env.contains_key(SECRET_VAR), "{env:?}");
        assert!(!env.contains_key("LULL_TOKEN"), "{env:?}");
        assert_eq!(env["LULL_TASK_ID"], "7");
        assert_eq!(env["LULL_RUN_ID"], "42");
        assert_eq!(env["LULL_POINT_INDEX"], "2");
        assert_eq!(env["LULL_POINTS"], "3");
        assert_eq!(env["LANG"], "C.UTF-8");
        assert_eq!(env["HOME"].as_str().map(PathBuf::from), Some(cwd.clone()));
        assert_eq!(env["TMPDIR"].as_str().map(PathBuf::from), Some(cwd.clone()));
        let dir_name = cwd.file_name().map(|n| n.to_string_lossy().into_owned());
        assert!(
            dir_name.is_some_and(|n| n.starts_with("lull-run-")),
            "{cwd:?}"
        );
        assert!(
            !cwd.exists(),
            "the working directory {cwd:?} outlived the run"
        );
    }

    #[test]
    fn capture_keeps_the_head_and_finds_the_last_line_in_the_tail() {
        let mut capture = Capture::new(4);
        capture.push(b"ab");
        capture.push(b"cdef\n");
        capture.push(b"Error: boom\n\n");

        assert_eq!(capture.last_line().as_deref(), Some("Error: boom"));
        assert_eq!(
            capture.into_text(),
            "abcd\n[lull: output truncated after 4 bytes]"
        );
    }
}
