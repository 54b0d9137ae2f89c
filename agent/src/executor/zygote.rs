//! [`ZygoteExecutor`]: each run is a fork of a warm, single-threaded `lull-zygote` process
//! that embeds CPython, instead of a fresh `python3` (tens of milliseconds saved per run).
//!
//! The executor owns the zygote: it starts it (fork+exec, one end of a Unix socket as its
//! stdin, the protocol of [`super::zygote_protocol`]), demultiplexes its messages to the runs
//! waiting for them, and restarts it with a bounded backoff when it dies. Per run it makes the
//! stdout/stderr pipes (whose write ends travel to the zygote with the `run` message), reads
//! and caps the output, and enforces the wall clock itself; output handling, the timeout's
//! wording and the error line are the cold executor's, so both report the same run the same way.
//!
//! Architecture Invariant: a run the zygote took down with it is `Lost` ("zygote died; run
//! handed back"), never `Failed`: not the code's fault, so the coordinator retries it, counting
//! it against `max_attempts` as it does a run lost with its node. While no zygote can be
//! started, runs go to the cold executor.
//!
//! Architecture Invariant: the agent never forks Python itself; only the zygote does, and the
//! agent's only handle on a run's process is its pid for a process-group kill when the zygote
//! is gone (a process group's id cannot be reused while any member lives).

use super::cold::{
    Capture, DEFAULT_PATH, Ending, MAX_TIMEOUT, OUTPUT_DRAIN_GRACE, READ_CHUNK_BYTES, finished,
    read_chunk, remove_workdir,
};
use super::zygote_protocol::{FromZygote, ToZygote};
use super::{ColdExecutor, Execution, Executor, ExecutorKind, Job, unix_now};
use crate::sandbox::{RunPolicy, SandboxSettings};
use lull_shared::{Protections, RunId, RunOutcome};
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::unistd::{Pid, pipe2};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::pipe;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, warn};

/// What a run lost with its zygote reports (the coordinator requeues it).
pub const ZYGOTE_DIED: &str = "zygote died; run handed back";
/// Initialising CPython and the preloads; generous, since preloads may be heavy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed run's exit may take to be reported before the zygote is presumed stuck.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a run's output pipes stay out of the agent's event loop unless the run ends first.
/// Until then what the run writes waits in the pipe (64 KiB by default; a run that writes more
/// blocks until the agent reads) and wakes nobody: each write a watched pipe receives woke the
/// agent, which the kernel runs on the writer's CPU, taking it from the run that wrote (a
/// short run woke the agent ~1.5 times with its output and its end, beside the zygote's own
/// messages). The pipes are read once the zygote says the run ended, or from this long on.
const WATCH_OUTPUT_AFTER: Duration = Duration::from_millis(20);
/// After a zygote's death, what it may still have said is read for this long.
const LAST_WORDS_WAIT: Duration = Duration::from_secs(1);
/// A zygote that lived this long before dying was healthy: its restart backoff starts over.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(60);
const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(250);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The trivial task a new executor's first zygote must run.
const SMOKE_TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything needed to start a zygote.
#[derive(Debug, Clone)]
pub struct ZygoteSettings {
    /// The `lull-zygote` binary.
    pub binary: PathBuf,
    /// The interpreter runs must see as `sys.executable` (the real one, not a wrapper); the
    /// zygote refuses to start when it embeds another Python version.
    pub python: String,
    /// Modules imported once in the zygote, so that runs find them already loaded.
    pub preload: Vec<String>,
    /// What the probe found this host applies; the zygote applies the same per run.
    pub protections: Protections,
    pub sandbox: SandboxSettings,
    /// Per stream and per run, as for the cold executor.
    pub max_output_bytes: usize,
    /// Each run's process, once sandboxed, execs a fresh `python3 -I -u -c` instead of
    /// running the code in the fork: the cold executor's runs, with the zygote as their
    /// launcher (one long-lived process forking them, with its pools and mount template,
    /// instead of a `lull-sandbox` started per run). The executor then calls itself `cold`.
    pub fresh_interpreter: bool,
}

impl ZygoteSettings {
    /// `lull-zygote` next to the running executable.
    pub fn default_binary() -> Option<PathBuf> {
        std::env::current_exe()
            .ok()?
            .parent()
            .map(|dir| dir.join("lull-zygote"))
    }
}

/// Runs each job in a fork of a `lull-zygote`; see the module docs.
#[derive(Debug)]
pub struct ZygoteExecutor {
    settings: Arc<ZygoteSettings>,
    path: OsString,
    /// Asks the keeper task for a live zygote.
    zygotes: mpsc::Sender<oneshot::Sender<Result<Arc<Zygote>, String>>>,
    /// The zygote the keeper gave last, used while it lives without asking the keeper again,
    /// so that a run's message is queued for the zygote in the same turn that its slot
    /// freed (see `agent::execute`), not two task hand-offs later.
    last: std::sync::Mutex<Option<Arc<Zygote>>>,
    /// Where runs go while no zygote can be started.
    cold: ColdExecutor,
    /// True while runs are going to `cold`, so that this is said once per outage.
    on_cold: AtomicBool,
}

impl ZygoteExecutor {
    /// Starts a zygote and has it run a trivial task. An error says why the zygote cannot
    /// serve on this host (binary or libpython missing, another Python version, a sandbox step
    /// that fails in it); the caller then uses `cold` alone.
    pub async fn start(
        settings: ZygoteSettings,
        cold: ColdExecutor,
    ) -> Result<ZygoteExecutor, String> {
        let path = std::env::var_os("PATH")
            .filter(|path| !path.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.into());
        let settings = Arc::new(settings);
        let first = Zygote::spawn(&settings, &path).await?;
        let smoke = Job {
            task_id: 0,
            run_id: 0,
            code: "print(6 * 7)".to_string(),
            timeout: SMOKE_TEST_TIMEOUT,
            resources: lull_shared::Resources::default(),
            point: Default::default(),
            control: Default::default(),
        };
        let execution = run_on(&first, &settings, &path, smoke, CancellationToken::new()).await;
        if execution.outcome != RunOutcome::Completed || execution.stdout != "42\n" {
            return Err(format!(
                "a trivial task failed in the zygote: {}",
                execution
                    .error
                    .unwrap_or_else(|| format!("it printed {:?}", execution.stdout))
            ));
        }
        let (zygotes, requests) = mpsc::channel(64);
        tokio::spawn(keep_zygotes(
            Arc::clone(&settings),
            path.clone(),
            first,
            requests,
        ));
        Ok(ZygoteExecutor {
            settings,
            path,
            zygotes,
            last: std::sync::Mutex::new(None),
            cold,
            on_cold: AtomicBool::new(false),
        })
    }

    /// A live zygote, started or restarted if need be.
    async fn zygote(&self) -> Result<Arc<Zygote>, String> {
        if let Some(live) = self.last_alive() {
            return Ok(live);
        }
        let zygote = self.zygote_from_keeper().await?;
        *self.last_zygote() = Some(Arc::clone(&zygote));
        Ok(zygote)
    }

    fn last_zygote(&self) -> std::sync::MutexGuard<'_, Option<Arc<Zygote>>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The zygote the keeper gave last, while it has not died.
    fn last_alive(&self) -> Option<Arc<Zygote>> {
        self.last_zygote()
            .as_ref()
            .filter(|zygote| !zygote.gone.is_cancelled())
            .map(Arc::clone)
    }

    async fn zygote_from_keeper(&self) -> Result<Arc<Zygote>, String> {
        let (reply, answer) = oneshot::channel();
        self.zygotes
            .send(reply)
            .await
            .map_err(|_| "the zygote keeper has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the zygote keeper has stopped".to_string())?
    }
}

impl Executor for ZygoteExecutor {
    fn kind(&self) -> &'static str {
        if self.settings.fresh_interpreter {
            ExecutorKind::Cold.as_str()
        } else {
            ExecutorKind::Zygote.as_str()
        }
    }

    fn protections(&self) -> Protections {
        self.settings.protections.clone()
    }

    async fn run(&self, job: Job, cancel: CancellationToken) -> Execution {
        match self.zygote().await {
            Ok(zygote) => {
                if self.on_cold.swap(false, Ordering::SeqCst) {
                    info!("the zygote is back; runs use it again");
                }
                run_on(&zygote, &self.settings, &self.path, job, cancel).await
            }
            Err(err) => {
                if !self.on_cold.swap(true, Ordering::SeqCst) {
                    warn!(%err, "no zygote; runs use the cold executor until one starts");
                }
                self.cold.run(job, cancel).await
            }
        }
    }
}

/// Owns the current zygote and starts a new one, with backoff, when it has died.
async fn keep_zygotes(
    settings: Arc<ZygoteSettings>,
    path: OsString,
    first: Arc<Zygote>,
    mut requests: mpsc::Receiver<oneshot::Sender<Result<Arc<Zygote>, String>>>,
) {
    let mut current = Some(first);
    let mut failures: u32 = 0;
    let mut next_start = Instant::now();
    while let Some(reply) = requests.recv().await {
        if let Some(dead) = current.take_if(|zygote| zygote.gone.is_cancelled()) {
            if dead.born.elapsed() >= HEALTHY_LIFETIME {
                failures = 0;
            }
            failures += 1;
            next_start = Instant::now() + restart_delay(failures);
        }
        let answer = match &current {
            Some(zygote) => Ok(Arc::clone(zygote)),
            None if Instant::now() < next_start => Err(format!(
                "restarting it in {} ms",
                (next_start - Instant::now()).as_millis()
            )),
            None => match Zygote::spawn(&settings, &path).await {
                Ok(zygote) => {
                    info!(pid = zygote.pid, "zygote restarted");
                    current = Some(Arc::clone(&zygote));
                    Ok(zygote)
                }
                Err(err) => {
                    failures += 1;
                    next_start = Instant::now() + restart_delay(failures);
                    Err(err)
                }
            },
        };
        let _ = reply.send(answer);
    }
}

/// No wait after a first death; then 250 ms, doubling up to 30 s while deaths keep coming.
fn restart_delay(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => RESTART_BACKOFF_INITIAL
            .saturating_mul(1 << (n - 2).min(16))
            .min(RESTART_BACKOFF_MAX),
    }
}

/// What the zygote said about one run.
#[derive(Debug)]
enum RunEvent {
    Started(i32),
    Exited {
        status: ExitStatus,
        cpu_seconds: Option<f64>,
        max_rss_mb: Option<f64>,
    },
    /// The run did not start.
    Refused(String),
}

/// The runs a zygote holds, each with the channel its events go to. Closed (`None`) once
/// the zygote is gone: dropping the senders tells every run.
#[derive(Debug, Default)]
struct RunTable(Mutex<Option<HashMap<RunId, mpsc::UnboundedSender<RunEvent>>>>);

impl RunTable {
    fn open() -> Self {
        RunTable(Mutex::new(Some(HashMap::new())))
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<RunId, mpsc::UnboundedSender<RunEvent>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `None` when the zygote is gone or the run is already there.
    fn register(&self, run_id: RunId) -> Option<mpsc::UnboundedReceiver<RunEvent>> {
        let mut table = self.lock();
        let runs = table.as_mut()?;
        if runs.contains_key(&run_id) {
            return None;
        }
        let (events, receiver) = mpsc::unbounded_channel();
        runs.insert(run_id, events);
        Some(receiver)
    }

    fn deliver(&self, run_id: RunId, event: RunEvent) {
        match self.lock().as_ref().and_then(|runs| runs.get(&run_id)) {
            Some(events) => {
                let _ = events.send(event);
            }
            None => debug!(run_id, ?event, "zygote message for a run no longer waiting"),
        }
    }

    fn remove(&self, run_id: RunId) {
        if let Some(runs) = self.lock().as_mut() {
            runs.remove(&run_id);
        }
    }

    fn close(&self) {
        self.lock().take();
    }
}

/// One live `lull-zygote` process. Dropping the last handle kills it.
#[derive(Debug)]
struct Zygote {
    pid: Option<u32>,
    born: Instant,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    runs: Arc<RunTable>,
    /// Cancelled once the zygote has died.
    gone: CancellationToken,
    _kill_on_drop: DropGuard,
}

/// A message to the zygote and the descriptors that travel with it (closed once sent).
#[derive(Debug)]
struct Outgoing {
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Zygote {
    /// Starts `lull-zygote` and waits for its `ready`.
    async fn spawn(settings: &ZygoteSettings, path: &OsStr) -> Result<Arc<Zygote>, String> {
        let binary = settings.binary.display().to_string();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|err| format!("could not make the zygote's socket: {err}"))?;
        let ours = ours
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(ours))
            .map_err(|err| format!("could not use the zygote's socket: {err}"))?;
        let mut command = Command::new(&settings.binary);
        command.arg("--python").arg(&settings.python);
        if settings.fresh_interpreter {
            // Every run execs a fresh interpreter: the zygote needs none of its own, and forks
            // a small process instead of a copy of a warm CPython.
            command.arg("--launcher");
        } else if !settings.preload.is_empty() {
            command.arg("--preload").arg(settings.preload.join(","));
        }
        command
            .env_clear()
            .env("PATH", zygote_path(&settings.python, path))
            .env("LANG", "C.UTF-8")
            // Every symbol bound once, in the zygote: lazily bound, each run's first call of
            // a library function not yet called in the zygote resolved it again and wrote
            // the result to a page the fork shares (~5 % of a run's page faults). Runs do not
            // see it: the zygote replaces its environment with the runs' own. Nothing a run
            // imports binds differently: Python loads extension modules (and ctypes its
            // libraries) with RTLD_NOW already.
            .env("LD_BIND_NOW", "1")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|err| format!("could not start {binary}: {err}"))?;
        // Our copy of the zygote's end of the socket must close, or its death goes unseen.
        drop(command);

        let (read, write) = ours.into_split();
        let mut lines = BufReader::new(read).lines();
        let (child, version) = Zygote::wait_ready(&binary, child, &mut lines).await?;
        let pid = child.id();
        info!(pid, python = version, "zygote ready");
        let runs = Arc::new(RunTable::open());
        let gone = CancellationToken::new();
        let stop = CancellationToken::new();
        let (outgoing, to_send) = mpsc::unbounded_channel();
        tokio::spawn(write_messages(write, to_send));
        tokio::spawn(watch_zygote(
            child,
            lines,
            Arc::clone(&runs),
            gone.clone(),
            stop.clone(),
        ));
        Ok(Arc::new(Zygote {
            pid,
            born: Instant::now(),
            outgoing,
            runs,
            gone,
            _kill_on_drop: stop.drop_guard(),
        }))
    }

    async fn wait_ready(
        binary: &str,
        mut child: Child,
        lines: &mut tokio::io::Lines<BufReader<OwnedReadHalf>>,
    ) -> Result<(Child, String), String> {
        let first = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) => {
                let status = child
                    .wait()
                    .await
                    .map_or_else(|err| err.to_string(), |status| status.to_string());
                return Err(format!("{binary} exited before it was ready ({status})"));
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(format!(
                    "{binary} was not ready within {} s",
                    READY_TIMEOUT.as_secs()
                ));
            }
        };
        match serde_json::from_str(&line) {
            Ok(FromZygote::Ready { python_version }) => Ok((child, python_version)),
            _ => {
                let _ = child.kill().await;
                Err(format!("{binary} said {line:?} instead of ready"))
            }
        }
    }

    fn send(&self, message: &ToZygote, fds: Vec<OwnedFd>) -> bool {
        self.outgoing
            .send(Outgoing {
                line: message.to_line(),
                fds,
            })
            .is_ok()
    }
}

/// Sends queued messages until the zygote goes away.
async fn write_messages(write: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(message) = queue.recv().await {
        let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(err) = send_with_fds(write.as_ref(), &message.line, &fds).await {
            // The watcher sees the socket close and says what happened.
            debug!(%err, "could not write to the zygote");
            return;
        }
        // Our copies of the run's pipe ends close here; the zygote holds its own now.
        drop(message);
    }
}

/// Writes `line`; `fds` travel with its first byte.
async fn send_with_fds(socket: &UnixStream, line: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    while sent < line.len() {
        socket.writable().await?;
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        let rest = [IoSlice::new(&line[sent..])];
        match socket.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                socket.as_raw_fd(),
                &rest,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        }) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Reads the zygote's messages to the runs until it dies (or is no longer wanted), then
/// makes sure it is dead and tells every run it held.
async fn watch_zygote(
    mut child: Child,
    mut lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    runs: Arc<RunTable>,
    gone: CancellationToken,
    stop: CancellationToken,
) {
    let pid = child.id();
    let why = loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => route(&runs, &line),
                Ok(None) => break "it closed its socket".to_string(),
                Err(err) => break format!("its socket failed: {err}"),
            },
            status = child.wait() => {
                // What it said before dying still counts (a run's exit, say).
                let _ = tokio::time::timeout(LAST_WORDS_WAIT, async {
                    while let Ok(Some(line)) = lines.next_line().await {
                        route(&runs, &line);
                    }
                }).await;
                break match status {
                    Ok(status) => format!("it exited ({status})"),
                    Err(err) => format!("waiting for it failed: {err}"),
                };
            }
            () = stop.cancelled() => break String::new(),
        }
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    if why.is_empty() {
        debug!(pid, "zygote stopped");
    } else {
        let held = runs.lock().as_ref().map_or(0, HashMap::len);
        error!(pid, runs = held, "the zygote died: {why}");
    }
    gone.cancel();
    runs.close();
}

fn route(runs: &RunTable, line: &str) {
    let message = match serde_json::from_str::<FromZygote>(line) {
        Ok(message) => message,
        Err(err) => {
            warn!(%err, line, "unreadable message from the zygote");
            return;
        }
    };
    match message {
        FromZygote::Ready { .. } => {}
        FromZygote::Started { run_id, pid } => runs.deliver(run_id, RunEvent::Started(pid)),
        FromZygote::Exited {
            run_id,
            exit_code,
            signal,
            cpu_seconds,
            max_rss_mb,
        } => {
            let status = match (exit_code, signal) {
                (Some(code), _) => ExitStatus::from_raw((code & 0xff) << 8),
                (None, Some(signal)) => ExitStatus::from_raw(signal & 0x7f),
                // Neither: say "ended oddly" rather than invent a status.
                (None, None) => ExitStatus::from_raw(0x7f),
            };
            runs.deliver(
                run_id,
                RunEvent::Exited {
                    status,
                    cpu_seconds,
                    max_rss_mb,
                },
            );
        }
        FromZygote::Error {
            run_id: Some(run_id),
            message,
        } => runs.deliver(run_id, RunEvent::Refused(message)),
        FromZygote::Error {
            run_id: None,
            message,
        } => warn!(message, "the zygote reported an error"),
    }
}

/// The zygote's own `PATH` (its runs get theirs from [`run_environment`]). An embedded
/// CPython finds its installation as `python3` run by that name would: from the first
/// `python3` on `PATH` (its `sys.prefix`, a virtual environment's `pyvenv.cfg`, the
/// `site-packages` whose `.pth` files run at start). So `--python`'s own directory comes
/// first when it is a `python3`: the zygote is then set up as that interpreter is (a
/// virtual environment's prefix and `.pth` files, not the base installation's), not as
/// whichever `python3` comes first on the agent's `PATH`.
fn zygote_path(python: &str, path: &OsStr) -> OsString {
    let python = Path::new(python);
    match python.parent() {
        Some(dir) if python.is_absolute() && python.file_name() == Some(OsStr::new("python3")) => {
            let mut first = dir.as_os_str().to_os_string();
            first.push(":");
            first.push(path);
            first
        }
        _ => path.to_os_string(),
    }
}

/// The environment a run gets: the cold executor's, variable for variable.
fn run_environment(job: &Job, path: &OsStr, home: &Path) -> BTreeMap<String, String> {
    [
        ("PATH", path.to_string_lossy().into_owned()),
        ("LANG", "C.UTF-8".to_string()),
        ("PYTHONIOENCODING", "utf-8".to_string()),
        ("PYTHONUNBUFFERED", "1".to_string()),
        ("HOME", home.display().to_string()),
        ("TMPDIR", home.display().to_string()),
        ("LULL_TASK_ID", job.task_id.to_string()),
        ("LULL_RUN_ID", job.run_id.to_string()),
    ]
    .into_iter()
    .chain(job.point.environment())
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

/// A working directory on the host, for runs without a private `/tmp`; handed to the
/// sandbox's uid when runs drop to one.
fn make_workdir(settings: &ZygoteSettings) -> io::Result<Option<TempDir>> {
    if settings.protections.namespaces {
        return Ok(None);
    }
    let dir = tempfile::Builder::new().prefix("lull-run-").tempdir()?;
    if settings.protections.drop_user {
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(settings.sandbox.uid)),
            Some(nix::unistd::Gid::from_raw(settings.sandbox.gid)),
        )?;
    }
    Ok(Some(dir))
}

/// A pipe for one output stream: our read end (watched later: [`UnwatchedOutput`]), and the
/// write end for the run.
fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe2(OFlag::O_CLOEXEC)?)
}

/// A run's stdout and stderr read ends, not yet watched (see [`WATCH_OUTPUT_AFTER`]).
struct UnwatchedOutput {
    out: OwnedFd,
    err: OwnedFd,
}

impl UnwatchedOutput {
    /// Into the agent's event loop, as the readers of the run's stdout and stderr. A pipe
    /// the event loop cannot take (it never happens short of running out of memory) is read
    /// as if the run had closed it.
    fn watch(self) -> (Option<pipe::Receiver>, Option<pipe::Receiver>) {
        let watch = |fd: OwnedFd| match pipe::Receiver::from_owned_fd(fd) {
            Ok(pipe) => Some(pipe),
            Err(err) => {
                error!(%err, "could not watch a run's output pipe; its output is lost");
                None
            }
        };
        (watch(self.out), watch(self.err))
    }
}

/// Kills the run through the zygote if it is still running when the run's future ends
/// (dropped half-way included), and takes it off the zygote's table.
struct RunGuard<'a> {
    zygote: &'a Zygote,
    run_id: RunId,
    running: bool,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if self.running {
            self.zygote.send(
                &ToZygote::Kill {
                    run_id: self.run_id,
                },
                Vec::new(),
            );
        }
        self.zygote.runs.remove(self.run_id);
    }
}

/// How the supervision of a run ended, beyond what cold knows.
enum ZygoteEnding {
    Ended(Ending),
    /// The zygote refused the run; it never started.
    Refused(String),
    /// The zygote died with the run.
    Lost,
}

/// One run on `zygote`, from its pipes to its [`Execution`].
async fn run_on(
    zygote: &Zygote,
    settings: &ZygoteSettings,
    path: &OsStr,
    job: Job,
    cancel: CancellationToken,
) -> Execution {
    let started_at = unix_now();
    let workdir = match make_workdir(settings) {
        Ok(workdir) => workdir,
        Err(err) => {
            let error = format!("could not create a working directory: {err}");
            return Execution::not_started(started_at, error);
        }
    };
    let policy = RunPolicy::for_job(
        job.run_id,
        &settings.protections,
        &settings.sandbox,
        job.resources.memory,
        job.timeout,
        workdir.as_ref().map(|dir| dir.path().to_path_buf()),
    );
    let execution = supervise_run(zygote, settings, path, &job, &policy, cancel, started_at).await;
    if let Some(workdir) = workdir {
        remove_workdir(workdir).await;
    }
    if policy.protections.cgroups && !policy.protections.namespaces {
        // The run's watcher removes it; this covers a watcher that was killed. Runs with
        // namespaces borrow a cgroup from the zygote's pool instead (named after the zygote,
        // swept by the next one if it dies): nothing is named after this run to remove.
        super::remove_run_cgroup_in_background(policy.cgroup.clone());
    }
    execution
}

async fn supervise_run(
    zygote: &Zygote,
    settings: &ZygoteSettings,
    path: &OsStr,
    job: &Job,
    policy: &RunPolicy,
    cancel: CancellationToken,
    started_at: f64,
) -> Execution {
    let pipes = output_pipe().and_then(|out| Ok((out, output_pipe()?)));
    let ((out_pipe, out_write), (err_pipe, err_write)) = match pipes {
        Ok(pipes) => pipes,
        Err(err) => {
            let error = format!("could not create the run's output pipes: {err}");
            return Execution::not_started(started_at, error);
        }
    };
    let Some(mut events) = zygote.runs.register(job.run_id) else {
        return lost(started_at, String::new(), String::new());
    };
    let mut guard = RunGuard {
        zygote,
        run_id: job.run_id,
        running: true,
    };
    let message = ToZygote::Run {
        policy: Box::new(policy.clone()),
        code: job.code.clone(),
        env: run_environment(job, path, &policy.home()),
        exec: settings.fresh_interpreter,
    };
    if !zygote.send(&message, vec![out_write, err_write]) {
        return lost(started_at, String::new(), String::new());
    }

    let mut unwatched = Some(UnwatchedOutput {
        out: out_pipe,
        err: err_pipe,
    });
    let watch_later = tokio::time::sleep(WATCH_OUTPUT_AFTER);
    tokio::pin!(watch_later);
    let mut out: Option<pipe::Receiver> = None;
    let mut err: Option<pipe::Receiver> = None;
    let mut stdout = Capture::new(settings.max_output_bytes);
    let mut stderr = Capture::new(settings.max_output_bytes);
    let mut out_buf = vec![0u8; READ_CHUNK_BYTES];
    let mut err_buf = vec![0u8; READ_CHUNK_BYTES];
    let mut timer = job.control.clock.timer(job.timeout.min(MAX_TIMEOUT));
    let mut pid: Option<i32> = None;
    let mut killed_because: Option<Ending> = None;
    let mut kill_deadline: Option<Instant> = None;
    let mut exited: Option<(ExitStatus, Option<f64>, Option<f64>)> = None;
    let mut drain_deadline: Option<Instant> = None;
    let kill = |guard: &RunGuard<'_>| {
        guard
            .zygote
            .send(&ToZygote::Kill { run_id: job.run_id }, Vec::new());
    };

    let ending = loop {
        if let Some((status, ..)) = &exited
            && unwatched.is_none()
            && out.is_none()
            && err.is_none()
        {
            break ZygoteEnding::Ended(Ending::Exited(*status));
        }
        tokio::select! {
            () = &mut watch_later, if unwatched.is_some() => {
                if let Some(pipes) = unwatched.take() {
                    (out, err) = pipes.watch();
                }
            },
            read = read_chunk(&mut out, &mut out_buf), if out.is_some() => match read {
                Ok(n) if n > 0 => {
                    stdout.push(&out_buf[..n]);
                    if stdout.is_flood() && killed_because.is_none() && exited.is_none() {
                        kill(&guard);
                        killed_because = Some(Ending::Flooded("stdout"));
                        kill_deadline = Some(Instant::now() + KILL_WAIT);
                    }
                }
                _ => out = None,
            },
            read = read_chunk(&mut err, &mut err_buf), if err.is_some() => match read {
                Ok(n) if n > 0 => {
                    stderr.push(&err_buf[..n]);
                    if stderr.is_flood() && killed_because.is_none() && exited.is_none() {
                        kill(&guard);
                        killed_because = Some(Ending::Flooded("stderr"));
                        kill_deadline = Some(Instant::now() + KILL_WAIT);
                    }
                }
                _ => err = None,
            },
            event = events.recv(), if exited.is_none() => match event {
                Some(RunEvent::Started(started)) => {
                    pid = Some(started);
                    if let Ok(started) = u32::try_from(started) {
                        job.control.process.set(started);
                    }
                }
                Some(RunEvent::Exited { status, cpu_seconds, max_rss_mb }) => {
                    job.control.process.clear();
                    guard.running = false;
                    if let Some(pipes) = unwatched.take() {
                        (out, err) = pipes.watch();
                    }
                    exited = Some((status, cpu_seconds, max_rss_mb));
                    drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_GRACE);
                }
                Some(RunEvent::Refused(message)) => {
                    guard.running = false;
                    break ZygoteEnding::Refused(message);
                }
                None => {
                    guard.running = false;
                    // The zygote's death took the run's watcher (parent-death signal) and with
                    // it PID 1 and its namespace. No kill by pid here: the watcher has been
                    // reaped by now and its pid may belong to another process.
                    let _ = pid;
                    break ZygoteEnding::Lost;
                }
            },
            () = timer.expired(), if exited.is_none() && killed_because.is_none() => {
                kill(&guard);
                killed_because = Some(Ending::TimedOut);
                kill_deadline = Some(Instant::now() + KILL_WAIT);
            }
            () = cancel.cancelled(), if exited.is_none() && killed_because.is_none() => {
                kill(&guard);
                killed_because = Some(Ending::Cancelled);
                kill_deadline = Some(Instant::now() + KILL_WAIT);
            }
            () = tokio::time::sleep_until(kill_deadline.unwrap_or_else(Instant::now)),
                if kill_deadline.is_some() && exited.is_none() => {
                error!(run_id = job.run_id, pid, "the zygote did not report the killed run's exit");
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                break ZygoteEnding::Ended(Ending::WaitFailed(io::Error::other(
                    "the zygote did not report its exit",
                )));
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)),
                if drain_deadline.is_some() => {
                warn!("a process that left the run's group still holds its output open; not waiting for it");
                let (status, ..) = exited.as_ref().map_or((ExitStatus::from_raw(0x7f), None, None), |e| *e);
                break ZygoteEnding::Ended(Ending::Exited(status));
            }
        }
    };
    drop(guard);
    job.control.process.clear();
    let completed_at = unix_now();
    let (cpu_seconds, max_rss_mb) = exited.map_or((None, None), |(_, cpu, rss)| (cpu, rss));

    let ending = match (ending, killed_because) {
        // A run the agent killed ended for that reason, whatever the zygote did after.
        (ZygoteEnding::Ended(_) | ZygoteEnding::Lost, Some(reason)) => reason,
        (ZygoteEnding::Ended(ending), None) => ending,
        (ZygoteEnding::Lost, None) => {
            return lost(started_at, stdout.into_text(), stderr.into_text());
        }
        (ZygoteEnding::Refused(message), _) => {
            let error = format!("the zygote could not start the run: {message}");
            return Execution::not_started(started_at, error);
        }
    };
    finished(
        ending,
        stdout,
        stderr,
        job.timeout,
        (started_at, completed_at),
        (cpu_seconds, max_rss_mb),
    )
}

/// A run the zygote took down with it: lost to the system, not failed.
fn lost(started_at: f64, stdout: String, stderr: String) -> Execution {
    Execution {
        outcome: RunOutcome::Lost,
        exit_code: None,
        stdout,
        stderr,
        error: Some(ZYGOTE_DIED.to_string()),
        started_at,
        completed_at: unix_now(),
        cpu_seconds: None,
        max_rss_mb: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zygote_finds_python3_where_python_is_first() {
        let path = OsStr::new("/usr/bin:/bin");
        assert_eq!(
            zygote_path("/srv/venv/bin/python3", path),
            OsString::from("/srv/venv/bin:/usr/bin:/bin")
        );
        // Not a `python3` by that name, or not a path: the agent's PATH as it is.
        for python in ["/opt/py/bin/python3.11", "python3", "bin/python3"] {
            assert_eq!(zygote_path(python, path), OsString::from("/usr/bin:/bin"));
        }
    }

    #[test]
    fn restarts_back_off_after_the_first() {
        assert_eq!(restart_delay(1), Duration::ZERO);
        assert_eq!(restart_delay(2), Duration::from_millis(250));
        assert_eq!(restart_delay(3), Duration::from_millis(500));
        assert_eq!(restart_delay(40), RESTART_BACKOFF_MAX);
    }

    #[test]
    fn exits_map_to_the_status_cold_would_see() {
        let runs = RunTable::open();
        let mut events = runs.register(7).expect("registered");
        route(&runs, r#"{"op":"exited","run_id":7,"exit_code":3}"#);
        route(&runs, r#"{"op":"exited","run_id":7,"signal":9}"#);

        let Some(RunEvent::Exited { status, .. }) = events.try_recv().ok() else {
            panic!("no exit");
        };
        assert_eq!(status.code(), Some(3));
        let Some(RunEvent::Exited { status, .. }) = events.try_recv().ok() else {
            panic!("no exit");
        };
        assert_eq!((status.code(), status.signal()), (None, Some(9)));
    }

    #[test]
    fn a_closed_table_takes_no_runs_and_ends_the_waiting_ones() {
        let runs = RunTable::open();
        let mut events = runs.register(1).expect("registered");
        assert!(runs.register(1).is_none(), "the same run twice");
        runs.close();

        assert!(runs.register(2).is_none());
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
