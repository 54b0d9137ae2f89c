//! The zygote's loop: one thread, blocked in `poll` on the agent's socket, on a signalfd for
//! SIGCHLD and on each run's report socket ([`crate::report`]); forks a child per `run`,
//! kills on `kill`, reports every run's end (from its report, or at its reap) and reaps.

use crate::child::{ReceivedFd, RunRequest, Zygote};
use crate::interpreter::{self, Interpreter};
use crate::report::{EndReport, REPORT_BYTES};
use crate::runtime::{Launcher, Runtime, Warm};
use crate::{Args, log};
use lull_agent::executor::zygote_protocol::{FromZygote, RUN_FDS, ToZygote};
use lull_agent::sandbox::{ForkedRun, RunPolicy, RunPools};
use lull_shared::RunId;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, RecvMsg, SockFlag, SockType,
    UnixAddr, recvmsg, send, sendmsg, socketpair, sockopt,
};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use pyo3::prelude::*;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

const READ_BYTES: usize = 64 * 1024;
/// Room for more descriptors than a message may carry, so that a wrong sender cannot make
/// the kernel truncate (and leak) what it sent.
const MAX_FDS_PER_READ: usize = 16;

/// Starts the zygote and serves until the agent closes the socket.
pub(crate) fn serve(args: &Args) -> Result<(), String> {
    let target = interpreter::ask_target_python(&args.python)?;
    let socket = take_socket_from_stdin()?;
    let child_exits = child_exit_signals()?;
    let zygote = Zygote::this_process()
        .map_err(|err| format!("could not open its own /proc/<pid>/statm: {err}"))?;
    // A session of its own, without a controlling terminal: runs forked into their own PID
    // namespace stay in it, and must not reach the terminal the agent was started from.
    match nix::unistd::setsid() {
        Ok(_) | Err(Errno::EPERM) => {}
        Err(err) => return Err(format!("could not start a session: {err}")),
    }

    // What every run's sandbox setup would otherwise redo on the fork path.
    lull_agent::sandbox::prepare()
        .map_err(|err| format!("could not prepare the sandbox: {err}"))?;
    if args.launcher {
        // No interpreter here: its version is the one `--python` reported.
        let runtime = Launcher {
            python: args.python.clone(),
        };
        return Server::new(socket, child_exits, zygote, runtime)
            .serve_until_closed(&target.version);
    }
    Python::initialize();
    Python::attach(|py| {
        let (interpreter, failed_preloads) =
            Interpreter::prepare(py, &args.python, &target, &args.preload)?;
        for failure in &failed_preloads {
            log!("could not preload {failure}");
        }
        let version = interpreter.version.clone();
        let runtime = Warm { py, interpreter };
        Server::new(socket, child_exits, zygote, runtime).serve_until_closed(&version)
    })
}

/// The agent's socket arrives as stdin; keep it on a close-on-exec fd and put `/dev/null` on
/// 0, so that nothing reading stdin (Python's `sys.stdin`) can consume the protocol.
fn take_socket_from_stdin() -> Result<OwnedFd, String> {
    let socket = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|err| format!("could not take the socket from stdin: {err}"))?;
    nix::sys::socket::getsockopt(&socket, sockopt::SockType)
        .map_err(|_| "stdin must be the agent's Unix socket".to_string())?;
    let null = File::open("/dev/null").map_err(|err| format!("/dev/null: {err}"))?;
    nix::unistd::dup2_stdin(&null).map_err(|err| format!("/dev/null on stdin: {err}"))?;
    Ok(socket)
}

/// Blocks SIGCHLD and returns a signalfd that becomes readable when a child exits.
fn child_exit_signals() -> Result<SignalFd, String> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()
        .map_err(|err| format!("could not block SIGCHLD: {err}"))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|err| format!("could not open a signalfd: {err}"))
}

/// Forking a multi-threaded process copies only the forking thread: locks held by the others
/// stay locked forever in the child. Refuse rather than risk it. Checked before every fork.
fn threads_are_single() -> Result<(), String> {
    match lull_agent::sandbox::thread_count() {
        Some(1) => Ok(()),
        Some(n) => Err(format!(
            "the zygote has {n} threads (a preloaded module started some?); refusing to fork"
        )),
        None => Err("could not count the zygote's threads in /proc/self".to_string()),
    }
}

struct Server<R: Runtime> {
    socket: OwnedFd,
    child_exits: SignalFd,
    runtime: R,
    inbox: Inbox,
    /// The runs' processes (the zygote's direct children), by run id.
    runs: BTreeMap<RunId, RunProcess>,
    /// Cgroups and network namespaces runs reuse, one run at a time each.
    pools: RunPools,
    /// This process, as its children see it.
    zygote: Zygote,
    /// Where the socket is read into.
    read_buf: Vec<u8>,
    /// The next run's process, forked ahead of it (see [`Spare`]).
    spare: Option<Spare>,
    /// A spare failed (said once): every run is forked when it comes.
    spare_off: bool,
    /// The last run's policy, for the next spare.
    last_policy: Option<RunPolicy>,
}

/// A child forked before its run comes, made like a run's process for the last run's policy
/// ([`ForkedRun::prepare`]: its cgroup, network namespace and mount template lent, born PID 1
/// of a PID namespace of its own), that joins its cgroup while it waits
/// ([`child::spare`]). The step it does ahead is the one that makes an idle host slow: on
/// cgroup v1, the first cgroup attach after a quiet spell waits for an RCU grace period
/// (10-30 ms on a VM), while a run's whole start takes about a millisecond. The next run that
/// fits what it was made for ([`ForkedRun::fits`]; the same shared environment) is handed to
/// it over `socket`; any other is forked as before, and the spare discarded.
struct Spare {
    pid: Pid,
    made_for: RunPolicy,
    launch: ForkedRun,
    socket: OwnedFd,
    env_generation: u64,
}

/// A run's process, as the zygote (its watcher) keeps it until it is reaped.
struct RunProcess {
    pid: Pid,
    policy: RunPolicy,
    launch: ForkedRun,
    /// The run's stderr, for what only the watcher can tell (a limit the run hit); closed
    /// once the run's end is reported, so the agent's EOF comes after that line.
    stderr: Option<ReceivedFd>,
    /// Where the run says how it ended ([`crate::report`]), until it has said it (or closed
    /// it without a word).
    report: Option<OwnedFd>,
    /// Its end has been reported to the agent (from its report): the reap only gives back
    /// what it was lent.
    reported: bool,
}

/// Why a run could not be started: its own problem (reported for that run), or one that
/// leaves the zygote unable to start any other (it exits, and the agent starts another).
enum StartError {
    Run(String),
    Fatal(String),
}

impl<R: Runtime> Server<R> {
    fn new(socket: OwnedFd, child_exits: SignalFd, zygote: Zygote, runtime: R) -> Self {
        Server {
            socket,
            child_exits,
            runtime,
            inbox: Inbox::default(),
            runs: BTreeMap::new(),
            pools: RunPools::default(),
            zygote,
            read_buf: vec![0u8; READ_BYTES],
            spare: None,
            spare_off: false,
            last_policy: None,
        }
    }

    /// Says `ready` (with the Python version runs get), serves until the agent closes the
    /// socket (`Ok`) or the socket fails (`Err`), then kills what is left.
    fn serve_until_closed(mut self, python_version: &str) -> Result<(), String> {
        threads_are_single()?;
        self.send(&FromZygote::Ready {
            python_version: python_version.to_string(),
        })?;
        let served = self.serve();
        self.kill_all_and_reap();
        served
    }

    /// Until the agent closes the socket (`Ok`) or the socket fails (`Err`).
    fn serve(&mut self) -> Result<(), String> {
        loop {
            let (socket_ready, children_ready, reports_ready) = {
                let wanted = PollFlags::POLLIN;
                let mut fds = vec![
                    PollFd::new(self.socket.as_fd(), wanted),
                    PollFd::new(self.child_exits.as_fd(), wanted),
                ];
                let mut reporting = Vec::new();
                for (&run_id, run) in &self.runs {
                    if let Some(report) = &run.report {
                        fds.push(PollFd::new(report.as_fd(), wanted));
                        reporting.push(run_id);
                    }
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(err) => return Err(format!("poll: {err}")),
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let reports_ready: Vec<RunId> = reporting
                    .into_iter()
                    .zip(&fds[2..])
                    .filter_map(|(run_id, fd)| ready(fd).then_some(run_id))
                    .collect();
                (ready(&fds[0]), ready(&fds[1]), reports_ready)
            };
            // First: a run that has said how it ended is reported before anything else.
            for run_id in reports_ready {
                self.take_report(run_id)?;
            }
            if children_ready {
                // Signals coalesce: drain them all, then reap whatever has exited.
                while let Ok(Some(_)) = self.child_exits.read_signal() {}
                self.reap_exited()?;
            }
            if socket_ready {
                if !self.receive()? {
                    return Ok(());
                }
                while let Some((line, fds)) = self.inbox.next_line() {
                    self.handle(&line, fds)?;
                }
            }
            // Right after a run started, or once nothing else is left to do: while this run
            // executes, the next one's process gets ready.
            self.make_spare()?;
        }
    }

    /// Reads what the socket has. False when the agent has closed it.
    fn receive(&mut self) -> Result<bool, String> {
        // One buffer for the zygote's life: a fresh 64 KiB per read was zeroed, written and
        // freed on every run, and each fork made all those pages fault again.
        let buf = &mut self.read_buf;
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS_PER_READ]);
        let mut iov = [IoSliceMut::new(buf)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let received: RecvMsg<'_, '_, UnixAddr> =
            match recvmsg(self.socket.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(received) => received,
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(true),
                Err(Errno::ECONNRESET) => return Ok(false),
                Err(err) => return Err(format!("reading the socket: {err}")),
            };
        let bytes = received.bytes;
        let mut fds = Vec::new();
        match received.cmsgs() {
            Ok(cmsgs) => {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(rights) = cmsg {
                        fds.extend(rights.into_iter().map(ReceivedFd::new));
                    }
                }
            }
            Err(err) => log!("file descriptors were lost in transit: {err}"),
        }
        if bytes == 0 && fds.is_empty() {
            return Ok(false);
        }
        self.inbox.push(&self.read_buf[..bytes], fds);
        Ok(true)
    }

    fn handle(&mut self, line: &[u8], fds: Vec<ReceivedFd>) -> Result<(), String> {
        let message: ToZygote = match serde_json::from_slice(line) {
            Ok(message) => message,
            Err(err) => {
                log!("unreadable message from the agent: {err}");
                return self.send(&FromZygote::Error {
                    run_id: None,
                    message: format!("unreadable message: {err}"),
                });
            }
        };
        match message {
            ToZygote::Run {
                policy,
                code,
                env,
                exec,
            } => {
                let run_id = policy.run_id;
                match self.start(line, *policy, code, env, exec, fds) {
                    Ok(pid) => self.send(&FromZygote::Started {
                        run_id,
                        pid: pid.as_raw(),
                    }),
                    Err(StartError::Run(message)) => self.send(&FromZygote::Error {
                        run_id: Some(run_id),
                        message,
                    }),
                    Err(StartError::Fatal(message)) => Err(message),
                }
            }
            ToZygote::Kill { run_id } => {
                // A kill for a run that has already exited crosses its `exited` report.
                if let Some(run) = self.runs.get(&run_id) {
                    kill_run(run.pid);
                }
                Ok(())
            }
        }
    }

    /// Forks the run's process (or hands the run to the spare). Returns its pid; the child
    /// never returns from here. With `exec` (a launcher's runs), the child execs a fresh
    /// interpreter with exactly `env` once sandboxed, and reports nothing before its exit (its
    /// reap tells). `line` is the run's message as it came, which a spare gets as it is.
    fn start(
        &mut self,
        line: &[u8],
        policy: RunPolicy,
        code: String,
        env: BTreeMap<String, String>,
        exec: bool,
        fds: Vec<ReceivedFd>,
    ) -> Result<Pid, StartError> {
        let run_id = policy.run_id;
        if self.runs.contains_key(&run_id) {
            return Err(StartError::Run(format!("run {run_id} is already running")));
        }
        let [stdout, stderr]: [ReceivedFd; RUN_FDS] = fds.try_into().map_err(|fds: Vec<_>| {
            StartError::Run(format!(
                "a run needs {RUN_FDS} file descriptors (stdout, stderr); {} came",
                fds.len()
            ))
        })?;
        if let Some(why) = crate::runtime::refusal(self.runtime.runs_code(), exec) {
            return Err(StartError::Run(why.to_string()));
        }
        let env = if exec {
            env
        } else {
            self.runtime
                .share_environment(&env)
                .map_err(|err| StartError::Run(format!("environment: {err}")))?
        };
        if let Some((pid, launch, report)) = self.start_on_spare(line, &policy, [&stdout, &stderr])
        {
            let report = (!exec).then_some(report);
            return Ok(self.track(pid, policy, launch, stderr, report));
        }
        threads_are_single().map_err(StartError::Fatal)?;
        // A run that execs reports nothing: it gets no report socket.
        let (report, theirs) = if exec {
            (None, None)
        } else {
            let (ours, theirs) = report_pair()
                .map_err(|err| StartError::Run(format!("no socket for the run's report: {err}")))?;
            (Some(ours), Some(theirs))
        };
        let mut launch = ForkedRun::prepare(&policy, &mut self.pools)
            .map_err(|err| StartError::Run(format!("sandbox setup failed: {err}")))?;
        let request = RunRequest {
            policy,
            code,
            env,
            exec,
            stdout,
            stderr,
        };
        // `theirs` closes here once the fork is done; the child keeps its copy.
        let forked = self
            .fork_with(&mut launch, |launch| {
                self.runtime.run(&request, &self.zygote, launch, theirs)
            })
            .map_err(StartError::Fatal)?;
        let pid = match forked {
            Ok(pid) => pid,
            Err(err) => {
                let _ = launch.finish(&request.policy, WaitStatus::StillAlive, &mut self.pools);
                return Err(StartError::Run(format!("could not fork: {err}")));
            }
        };
        let RunRequest { policy, stderr, .. } = request;
        Ok(self.track(pid, policy, launch, stderr, report))
    }

    /// Keeps a started run until it is reaped; its policy is the next spare's guess. The run's
    /// process has its own copies of the pipes; the zygote keeps stderr until the run's end
    /// is reported.
    fn track(
        &mut self,
        pid: Pid,
        policy: RunPolicy,
        launch: ForkedRun,
        stderr: ReceivedFd,
        report: Option<OwnedFd>,
    ) -> Pid {
        self.last_policy = Some(policy.clone());
        self.runs.insert(
            policy.run_id,
            RunProcess {
                pid,
                policy,
                launch,
                stderr: Some(stderr),
                report,
                reported: false,
            },
        );
        pid
    }

    /// The run's report socket is readable: a whole [`EndReport`] ends the run now (killed at
    /// once, reported to the agent; the reap gives back what it was lent), its end without a
    /// word leaves the run to its reap, and anything else gets the run killed (the reap
    /// reports that).
    fn take_report(&mut self, run_id: RunId) -> Result<(), String> {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return Ok(());
        };
        let Some(socket) = run.report.take() else {
            return Ok(());
        };
        // One more byte than a report: a longer message is not one.
        let mut buf = [0u8; REPORT_BYTES + 1];
        let report =
            match nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    run.report = Some(socket);
                    return Ok(());
                }
                // Closed without a report (a signal, `os._exit`): the reap tells how it ended.
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => EndReport::decode(&buf[..n]),
            };
        // On its way out, or not a report: either way nothing of the run may go on.
        kill_run(run.pid);
        let Some(report) = report else {
            log!("run {run_id} wrote something other than its report; killed");
            return Ok(());
        };
        let status = WaitStatus::Exited(run.pid, i32::from(report.status));
        let (status, note) = run.launch.verdict(&run.policy, status);
        run.reported = true;
        let stderr = run.stderr.take();
        if let (Some(note), Some(stderr)) = (note, &stderr) {
            self.tell_why(run_id, stderr, &note);
        }
        drop(stderr);
        let (exit_code, signal) = exit_code_and_signal(run_id, status);
        self.send(&FromZygote::Exited {
            run_id,
            exit_code,
            signal,
            cpu_seconds: Some(report.cpu_seconds()),
            max_rss_mb: Some(report.max_rss_mb()),
        })
    }

    /// Writes `note` as the run's last stderr line, which the agent reports as its error.
    fn tell_why(&self, run_id: RunId, stderr: &ReceivedFd, note: &str) {
        let line = format!("lull: {note}\n");
        // Non-blocking: a pipe nobody drains cannot stall the zygote.
        if let Err(err) = lull_agent::sandbox::write_nonblocking(stderr.raw(), line.as_bytes()) {
            log!("could not tell run {run_id} why it ended: {err}");
        }
    }

    /// Hands the run to the spare if it can take it: its pid, what was lent for it, and the
    /// socket it reports its end on (the one it got its run on). Otherwise (none, it does not
    /// fit, it is gone) the spare is discarded and the caller forks the run itself.
    ///
    /// The spare gets the run's `line` as the agent sent it, not a copy made here: the zygote
    /// allocates nothing for it, so writes no pages its forks share (the spare keeps only the
    /// run's own variables of its environment: the rest is the environment it was forked
    /// with, of the same generation).
    fn start_on_spare(
        &mut self,
        line: &[u8],
        policy: &RunPolicy,
        fds: [&ReceivedFd; RUN_FDS],
    ) -> Option<(Pid, ForkedRun, OwnedFd)> {
        let mut spare = self.spare.take()?;
        // A spare forked before the shared environment changed holds the old one (a launcher's
        // runs take theirs from the message: its generation never changes).
        if spare.env_generation != self.runtime.env_generation()
            || !spare.launch.fits(&spare.made_for, policy)
        {
            self.discard(spare);
            return None;
        }
        match hand_over(&spare.socket, line, fds.map(ReceivedFd::raw)) {
            Ok(()) => Some((spare.pid, spare.launch, spare.socket)),
            Err(err) => {
                log!("could not hand a run to the spare ({err}); forking it instead");
                self.discard(spare);
                None
            }
        }
    }

    /// Whether a spare should be made: none waits, a run came
    /// already (its policy is the guess for the next), and spares work here. Runs without
    /// namespaces get a cgroup of their own, named after them: nothing to do ahead for them.
    fn wants_spare(&self) -> bool {
        self.spare.is_none()
            && !self.spare_off
            && self
                .last_policy
                .as_ref()
                .is_some_and(|policy| policy.protections.namespaces)
    }

    /// Forks the next run's process ahead of it, for the last run's policy (see
    /// [`Server::wants_spare`]).
    fn make_spare(&mut self) -> Result<(), String> {
        if !self.wants_spare() {
            return Ok(());
        }
        let Some(policy) = self.last_policy.clone() else {
            return Ok(());
        };
        threads_are_single()?;
        let (ours, theirs) = match report_pair() {
            Ok(pair) => pair,
            Err(err) => {
                self.stop_spares(&format!("no socket pair: {err}"));
                return Ok(());
            }
        };
        let mut launch = match ForkedRun::prepare(&policy, &mut self.pools) {
            Ok(launch) => launch,
            Err(err) => {
                self.stop_spares(&format!("sandbox setup failed: {err}"));
                return Ok(());
            }
        };
        // The spare closes `ours` with every other descriptor it inherited; `theirs` closes
        // here once the fork is done.
        let forked = self.fork_with(&mut launch, |launch| {
            self.runtime.spare(theirs, &self.zygote, launch, &policy)
        })?;
        match forked {
            Ok(pid) => {
                self.spare = Some(Spare {
                    pid,
                    made_for: policy,
                    launch,
                    socket: ours,
                    env_generation: self.runtime.env_generation(),
                });
            }
            Err(err) => {
                let _ = launch.finish(&policy, WaitStatus::StillAlive, &mut self.pools);
                self.stop_spares(&format!("could not fork: {err}"));
            }
        }
        Ok(())
    }

    /// Forks a child that runs `in_child` (which never returns) with `launch`, prepared for
    /// it by [`ForkedRun::prepare`], then puts the zygote back in its own PID namespace for
    /// its later children. `Err` when it cannot be put back (fatal: every later child would
    /// land in this one's namespace); `Ok(Err)` when the fork itself failed.
    fn fork_with(
        &self,
        launch: &mut ForkedRun,
        in_child: impl FnOnce(&ForkedRun) -> std::convert::Infallible,
    ) -> Result<Result<Pid, String>, String> {
        let forked = self.runtime.fork();
        if let Ok(0) = forked {
            // Never returns: the child ends in `os._exit`.
            in_child(launch);
        }
        if let Err(err) = launch.restore() {
            if let Ok(pid) = forked {
                kill_run(Pid::from_raw(pid));
            }
            return Err(format!(
                "could not return to the zygote's PID namespace: {err}"
            ));
        }
        Ok(forked.map(Pid::from_raw))
    }

    fn stop_spares(&mut self, why: &str) {
        log!("no spare process ({why}); each run is forked when it comes");
        self.spare_off = true;
    }

    /// Kills and reaps a spare that will not get a run, and gives back what it held.
    fn discard(&mut self, spare: Spare) {
        kill_run(spare.pid);
        let status = lull_agent::sandbox::reap_child(spare.pid)
            .map_or(WaitStatus::StillAlive, |_| {
                WaitStatus::Signaled(spare.pid, Signal::SIGKILL, false)
            });
        let _ = spare
            .launch
            .finish(&spare.made_for, status, &mut self.pools);
    }

    /// Reaps every child that has exited and reports the runs among them.
    fn reap_exited(&mut self) -> Result<(), String> {
        loop {
            // WNOWAIT: look without reaping, so that the pid (and so the run's process group
            // id) cannot be reused while we kill what is left of the group.
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            let status = match waitid(Id::All, flags) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(status) => status,
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(format!("waitid: {err}")),
            };
            let Some(pid) = status.pid() else {
                return Ok(());
            };
            // Whatever the run left in its group (without a PID namespace) dies with it.
            let _ = killpg(pid, Signal::SIGKILL);
            let usage = lull_agent::sandbox::reap_child(pid);
            if self.spare.as_ref().is_some_and(|spare| spare.pid == pid)
                && let Some(spare) = self.spare.take()
            {
                let _ = spare
                    .launch
                    .finish(&spare.made_for, status, &mut self.pools);
                self.stop_spares(&format!("the spare ended before its run: {status:?}"));
                continue;
            }
            let Some(run_id) = self
                .runs
                .iter()
                .find_map(|(&run_id, run)| (run.pid == pid).then_some(run_id))
            else {
                continue;
            };
            let Some(run) = self.runs.remove(&run_id) else {
                continue;
            };
            let (status, note) = run.launch.finish(&run.policy, status, &mut self.pools);
            if run.reported {
                // Its end went to the agent from its report already.
                continue;
            }
            if let (Some(note), Some(stderr)) = (note, &run.stderr) {
                self.tell_why(run_id, stderr, &note);
            }
            drop(run.stderr);
            let (exit_code, signal) = exit_code_and_signal(run_id, status);
            let (cpu_seconds, max_rss_mb) = match usage {
                Ok(usage) => (Some(usage.cpu_seconds), Some(usage.max_rss_mb)),
                Err(err) => {
                    log!("could not read run {run_id}'s resource usage: {err}");
                    (None, None)
                }
            };
            self.send(&FromZygote::Exited {
                run_id,
                exit_code,
                signal,
                cpu_seconds,
                max_rss_mb,
            })?;
        }
    }

    /// The agent is gone: nothing may outlive it.
    fn kill_all_and_reap(&mut self) {
        if let Some(spare) = self.spare.take() {
            self.discard(spare);
        }
        for (_, run) in std::mem::take(&mut self.runs) {
            kill_run(run.pid);
            let _ = lull_agent::sandbox::reap_child(run.pid);
            let _ = run
                .launch
                .finish(&run.policy, WaitStatus::StillAlive, &mut self.pools);
        }
    }

    fn send(&self, message: &FromZygote) -> Result<(), String> {
        let line = message.to_line();
        let mut sent = 0;
        while sent < line.len() {
            match send(
                self.socket.as_raw_fd(),
                &line[sent..],
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(err) => return Err(format!("writing to the agent: {err}")),
            }
        }
        Ok(())
    }
}

/// A run's exit code or the signal that ended it, as the agent is told.
fn exit_code_and_signal(run_id: RunId, status: WaitStatus) -> (Option<i32>, Option<i32>) {
    match status {
        WaitStatus::Exited(_, code) => (Some(code), None),
        WaitStatus::Signaled(_, signal, _) => (None, Some(signal as i32)),
        other => {
            log!("run {run_id} ended oddly: {other:?}");
            (None, None)
        }
    }
}

/// The two ends of a run's report socket ([`crate::report`]): the zygote's, and the run's
/// (which the sandbox keeps on `REPORT_FD`). A spare's socket, which brought it its run, is
/// one already.
fn report_pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Sends a spare its run: `line` with the run's stdout and stderr attached to its first bytes.
fn hand_over(socket: &OwnedFd, line: &[u8], fds: [RawFd; RUN_FDS]) -> Result<(), Errno> {
    let rights = [ControlMessage::ScmRights(&fds)];
    let mut sent = loop {
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &[IoSlice::new(line)],
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => {}
            Err(err) => return Err(err),
        }
    };
    while sent < line.len() {
        match send(socket.as_raw_fd(), &line[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// SIGKILL to the run's process and its process group (the sandbox made it a session leader);
/// with a PID namespace, the kernel takes everything else in it.
fn kill_run(pid: Pid) {
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = kill(pid, Signal::SIGKILL);
}

/// Bytes read from the socket, cut into lines, with the file descriptors that arrived with
/// each line's first byte.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    start: u64,
    /// Descriptors by the stream offset of the byte they arrived with.
    fds: VecDeque<(u64, ReceivedFd)>,
}

impl Inbox {
    /// Adds one read. A read ends right after the segment that carried descriptors (the
    /// kernel does not read past one), and the agent sends every message as one `sendmsg`
    /// starting at a line boundary: so the descriptors belong to the last line that starts
    /// inside this read — fd-less lines may come before it in the same read.
    fn push(&mut self, bytes: &[u8], fds: Vec<ReceivedFd>) {
        let last_line_start = bytes[..bytes.len().saturating_sub(1)]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let at = self.start + (self.buf.len() + last_line_start) as u64;
        self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (its newline included: a run's line goes on to a spare as it
    /// came) and the descriptors that came with it.
    fn next_line(&mut self) -> Option<(Vec<u8>, Vec<ReceivedFd>)> {
        let newline = self.buf.iter().position(|&b| b == b'\n')?;
        let line_start = self.start;
        let line_end = self.start + newline as u64 + 1;
        let line: Vec<u8> = self.buf.drain(..=newline).collect();
        self.start = line_end;
        let mut fds = Vec::new();
        while let Some((at, _)) = self.fds.front() {
            if *at >= line_end {
                break;
            }
            let (at, fd) = self.fds.pop_front()?;
            if at >= line_start {
                fds.push(fd);
            }
            // Else it came with an earlier line that did not take it: dropping closes it.
        }
        Some((line, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> ReceivedFd {
        use std::os::fd::IntoRawFd;
        ReceivedFd::new(File::open("/dev/null").expect("/dev/null").into_raw_fd())
    }

    #[test]
    fn a_launcher_refuses_a_run_that_does_not_exec_and_says_why() {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair");
        let child_exits = child_exit_signals().expect("a signalfd");
        let launcher = Launcher {
            python: "python3".to_string(),
        };
        let zygote = Zygote::this_process().expect("its own statm");
        let mut server = Server::new(theirs, child_exits, zygote, launcher);
        let policy = RunPolicy::for_job(
            7,
            &lull_shared::Protections::none("a test"),
            &lull_agent::sandbox::SandboxSettings::default(),
            64.0,
            std::time::Duration::from_secs(5),
            None,
        );
        let line = ToZygote::Run {
            policy: Box::new(policy),
            code: "print(1)".to_string(),
            env: BTreeMap::new(),
            exec: false,
        }
        .to_line();

        server.handle(&line, vec![fd(), fd()]).expect("handled");

        let mut said = vec![0u8; 4096];
        let n = nix::unistd::read(&ours, &mut said).expect("the answer");
        let said: FromZygote = serde_json::from_slice(&said[..n]).expect("one message");
        assert_eq!(
            said,
            FromZygote::Error {
                run_id: Some(7),
                message: crate::runtime::LAUNCHER_RUNS_NO_CODE.to_string(),
            }
        );
        assert!(server.runs.is_empty(), "nothing was forked");
    }

    #[test]
    fn lines_take_the_descriptors_that_came_with_them() {
        let mut inbox = Inbox::default();
        // An fd-less line and the first part of a line with descriptors, in one read.
        inbox.push(b"{\"a\":1}\n{\"b\"", vec![fd(), fd()]);
        inbox.push(b":2}\n", vec![]);
        inbox.push(b"{\"c\":3}\n", vec![fd()]);

        let (line, fds) = inbox.next_line().expect("first line");
        assert_eq!(line, b"{\"a\":1}\n");
        assert!(fds.is_empty());
        let (line, fds) = inbox.next_line().expect("second line");
        assert_eq!(line, b"{\"b\":2}\n");
        assert_eq!(fds.len(), 2);
        let (line, fds) = inbox.next_line().expect("third line");
        assert_eq!(line, b"{\"c\":3}\n");
        assert_eq!(fds.len(), 1);
        assert!(inbox.next_line().is_none());
    }

    #[test]
    fn a_kill_read_together_with_the_next_run_leaves_the_run_its_descriptors() {
        // What the kernel does when a fd-less `kill` is followed by a `run` with 2 fds.
        let mut inbox = Inbox::default();
        inbox.push(
            b"{\"op\":\"kill\",\"run_id\":1}\n{\"op\":\"run\"}\n",
            vec![fd(), fd()],
        );
        let (line, fds) = inbox.next_line().expect("kill");
        assert_eq!(line, b"{\"op\":\"kill\",\"run_id\":1}\n");
        assert!(fds.is_empty(), "the kill takes none");
        let (line, fds) = inbox.next_line().expect("run");
        assert_eq!(line, b"{\"op\":\"run\"}\n");
        assert_eq!(fds.len(), 2, "the run keeps its own");
    }

    #[test]
    fn a_partial_line_waits_for_the_rest() {
        let mut inbox = Inbox::default();
        inbox.push(b"{\"op\":", vec![fd()]);
        assert!(inbox.next_line().is_none());
        inbox.push(b"\"kill\"}\n", vec![]);
        let (line, fds) = inbox.next_line().expect("the line");
        assert_eq!(line, b"{\"op\":\"kill\"}\n");
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn this_test_process_is_not_single_threaded() {
        // The test harness runs tests on threads; the check must see them.
        let spawned = std::thread::spawn(threads_are_single);
        assert!(spawned.join().expect("thread").is_err());
    }
}
