//! One run's process, from the moment `os.fork()` returned 0 in it: wire its pipes, confine it
//! with `lull_agent::sandbox::ForkedRun::confine` (it was born PID 1 of the run's own PID
//! namespace, where the host allows one), run the code as `python3 -I -u -c` would, report
//! how it ended ([`crate::report`]), exit. A launcher's child ([`launch`]: a cold run,
//! `exec`) execs a fresh `python3 -I -u -c` instead, once confined.
//! A spare ([`spare`], [`launcher_spare`]) is the same process forked before its run: it joins
//! its cgroup, waits for the run on a socket, then goes on as [`run`] or [`launch`] does.
//!
//! Architecture Invariant: this path never returns to the zygote's loop. Every way out, a
//! panic included, ends in `_exit`.

use crate::interpreter::Interpreter;
use crate::report::EndReport;
use lull_agent::executor::zygote_protocol::{RUN_FDS, ToZygote};
use lull_agent::sandbox::{ForkedRun, RunPolicy};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, RecvMsg, UnixAddr, recvmsg};
use nix::unistd::{Pid, getppid};
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::io::{IoSliceMut, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;

/// The exit status of a run whose sandbox could not be set up (as `lull-sandbox` uses).
pub(crate) const SETUP_FAILED: i32 = 125;

/// A file descriptor received over the socket; closed when dropped.
///
/// Received descriptors arrive as plain numbers (`SCM_RIGHTS`); turning one into an `OwnedFd`
/// needs `unsafe`, so the zygote keeps the number and is careful to close it exactly once.
#[derive(Debug)]
pub(crate) struct ReceivedFd(RawFd);

impl ReceivedFd {
    pub(crate) fn new(fd: RawFd) -> Self {
        ReceivedFd(fd)
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0
    }
}

impl Drop for ReceivedFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

/// Everything a run's process needs, received in one `run` message.
#[derive(Debug)]
pub(crate) struct RunRequest {
    pub(crate) policy: RunPolicy,
    pub(crate) code: String,
    /// The run's own environment variables: the zygote's environment holds the rest
    /// (`Interpreter::share_environment`); with `exec`, the whole environment.
    pub(crate) env: BTreeMap<String, String>,
    /// Exec a fresh `python3 -I -u -c code` once sandboxed (a cold run) instead of running
    /// the code in this process.
    pub(crate) exec: bool,
    pub(crate) stdout: ReceivedFd,
    pub(crate) stderr: ReceivedFd,
}

/// Runs `request` in this freshly forked child of the zygote (`zygote` is its pid, `launch`
/// what the zygote prepared for it, `report` where it says how it ended: see
/// [`crate::report`]) and exits with the code's exit status.
pub(crate) fn run(
    py: Python<'_>,
    interpreter: &Interpreter,
    request: &RunRequest,
    zygote: &Zygote,
    launch: &ForkedRun,
    report: Option<OwnedFd>,
) -> ! {
    let status = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let prepared = outlive_no_zygote(request.policy.protections.namespaces, zygote)
            .and_then(|()| prepare(py, interpreter, request, launch, Setup::Whole, report));
        execute(py, interpreter, prepared)
    }))
    .unwrap_or(SETUP_FAILED);
    lull_agent::sandbox::exit_now(status)
}

/// A child the zygote forked before it had a run for it (its spare, always PID 1 of a PID
/// namespace of its own, made for a run of `made_for`'s policy): it gets into its cgroup now,
/// the one step of a run's start that can wait on the kernel for long, makes its namespaces
/// and mounts and installs its seccomp filter, then waits on `socket` for its run (the `run` message and the
/// run's stdout and stderr, from the zygote; the zygote hands it only a run that
/// [`ForkedRun::fits`] it) and runs it as [`run`] would, reporting how it ended on the same
/// socket. If the zygote closes the socket instead, it exits.
pub(crate) fn spare(
    py: Python<'_>,
    interpreter: &Interpreter,
    socket: OwnedFd,
    zygote: &Zygote,
    launch: &ForkedRun,
    made_for: &RunPolicy,
) -> ! {
    let status = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut request = match wait_for_run(&socket, zygote, launch, made_for) {
            Ok((request, Ok(()))) => request,
            Ok((request, Err(err))) => return failed_ahead(&request, &err),
            Err(err) => return not_run(&err),
        };
        if !request.exec {
            // The message as the agent sent it: the rest of its environment is this process's
            // own already (the zygote hands a spare only runs of its environment's generation).
            request
                .env
                .retain(|name, _| crate::interpreter::is_run_own(name));
        }
        // The zygote hands it only runs of its own kind (the server checks the same rule).
        match crate::runtime::refusal(true, request.exec) {
            Some(why) => setup_failed(why),
            None => {
                let prepared = prepare(
                    py,
                    interpreter,
                    &request,
                    launch,
                    Setup::Ahead,
                    Some(socket),
                );
                execute(py, interpreter, prepared)
            }
        }
    }))
    .unwrap_or(SETUP_FAILED);
    lull_agent::sandbox::exit_now(status)
}

/// In a launcher's child forked for `request` ([`crate::runtime::Launcher`]: no interpreter
/// in this process): confines it as [`run`] does, then execs a fresh `python -I -u -c` for
/// the run. Exits only if that fails.
pub(crate) fn launch(python: &str, request: &RunRequest, zygote: &Zygote, launch: &ForkedRun) -> ! {
    let status = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let err = match outlive_no_zygote(request.policy.protections.namespaces, zygote) {
            Ok(()) => exec_fresh(python, request, launch, Setup::Whole),
            Err(err) => err,
        };
        setup_failed(&err)
    }))
    .unwrap_or(SETUP_FAILED);
    lull_agent::sandbox::exit_now(status)
}

/// A launcher's spare: as [`spare`], for a run that [`launch`] would exec.
pub(crate) fn launcher_spare(
    python: &str,
    socket: OwnedFd,
    zygote: &Zygote,
    launch: &ForkedRun,
    made_for: &RunPolicy,
) -> ! {
    let status = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let request = match wait_for_run(&socket, zygote, launch, made_for) {
            Ok((request, Ok(()))) => request,
            Ok((request, Err(err))) => return failed_ahead(&request, &err),
            Err(err) => return not_run(&err),
        };
        match crate::runtime::refusal(false, request.exec) {
            Some(why) => setup_failed(why),
            // The socket that brought the run closes with the rest at its exec: a fresh
            // interpreter reports its end by exiting.
            None => setup_failed(&exec_fresh(python, &request, launch, Setup::Ahead)),
        }
    }))
    .unwrap_or(SETUP_FAILED);
    lull_agent::sandbox::exit_now(status)
}

/// A spare's first steps: it checks that its zygote lives, closes what it inherited, gets into
/// its cgroup (the step that can wait on the kernel), makes its namespaces and installs its
/// seccomp filter, then waits on `socket` for its run.
fn wait_for_run(
    socket: &OwnedFd,
    zygote: &Zygote,
    launch: &ForkedRun,
    made_for: &RunPolicy,
) -> Result<(RunRequest, Result<(), String>), String> {
    // First: the check reads the zygote's `statm` through a descriptor the zygote opened,
    // which closing what the spare inherited closes.
    outlive_no_zygote(true, zygote)?;
    launch
        .close_other_fds(socket.as_raw_fd())
        .map_err(|err| err.to_string())?;
    launch.enter_cgroup().map_err(|err| err.to_string())?;
    // Off the run's path: what the kernel does for its namespaces and mounts (a copy of the
    // mount template, four mounts, two new namespaces) and its seccomp filter while the spare
    // still waits. A failure is the run's to hear of, on its stderr, once it comes.
    let ahead = launch.enter_ahead(made_for).map_err(|err| err.to_string());
    Ok((receive_run(socket)?, ahead))
}

/// A spare whose namespaces or filter could not be made ahead: its run fails, saying why on its own
/// stderr, as a run that failed to make them at its start does.
fn failed_ahead(request: &RunRequest, err: &str) -> i32 {
    match lull_agent::sandbox::redirect_stdio(request.stdout.raw(), request.stderr.raw()) {
        Ok(()) => setup_failed(err),
        Err(redirect) => setup_failed(&format!("{err} (and then {redirect})")),
    }
}

/// A spare that got no run ends here.
fn not_run(err: &str) -> i32 {
    // The zygote closed the socket without a run: it is going away, nothing to say.
    if err != NO_RUN {
        // Still the zygote's stderr: its log.
        let _ = writeln!(std::io::stderr(), "lull-zygote spare: {err}");
    }
    SETUP_FAILED
}

/// Says on the run's stderr (fd 2 once redirected; the zygote's log before that) why its
/// sandbox could not be set up.
fn setup_failed(err: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "lull: sandbox setup failed: {err}");
    SETUP_FAILED
}

/// In a launcher's child: the run's pipes on 1 and 2, the sandbox, then `python -I -u -c
/// code` with exactly the run's environment. Returns only on failure, saying why.
fn exec_fresh(python: &str, request: &RunRequest, launch: &ForkedRun, setup: Setup) -> String {
    if let Err(err) =
        lull_agent::sandbox::redirect_stdio(request.stdout.raw(), request.stderr.raw())
    {
        return err.to_string();
    }
    let confined = match setup {
        Setup::Whole => launch.confine(&request.policy, None),
        Setup::Ahead => launch.confine_after_ahead(&request.policy, None),
    };
    if let Err(err) = confined {
        return err.to_string();
    }
    let args = ["-I", "-u", "-c", request.code.as_str()];
    let err = lull_agent::sandbox::exec_program(python, &args, &request.env);
    format!("exec {python}: {err}")
}

fn execute(
    py: Python<'_>,
    interpreter: &Interpreter,
    prepared: Result<Prepared<'_>, String>,
) -> i32 {
    match prepared {
        Ok(Prepared {
            code,
            globals,
            report,
        }) => {
            let status = interpreter.run_main(py, &code, &globals);
            if let Some(report) = report {
                report_end(report, status);
            }
            status
        }
        Err(err) => setup_failed(&err),
    }
}

/// Why a spare ends when its socket closed before a run came.
const NO_RUN: &str = "the zygote gave no run";

/// A spare's run, as the zygote hands it over: the `run` message's line, with the run's
/// stdout and stderr attached to its first bytes.
fn receive_run(socket: &OwnedFd) -> Result<RunRequest, String> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !line.ends_with(b"\n") {
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let received: RecvMsg<'_, '_, UnixAddr> = match recvmsg(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(received) => received,
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(format!("waiting for a run: {err}")),
        };
        let bytes = received.bytes;
        if let Ok(cmsgs) = received.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(rights) = cmsg {
                    fds.extend(rights.into_iter().map(ReceivedFd::new));
                }
            }
        }
        if bytes == 0 {
            return Err(NO_RUN.to_string());
        }
        line.extend_from_slice(&buf[..bytes]);
    }
    let Ok(ToZygote::Run {
        policy,
        code,
        env,
        exec,
    }) = serde_json::from_slice(&line)
    else {
        return Err("the zygote handed over something other than a run".to_string());
    };
    let [stdout, stderr]: [ReceivedFd; RUN_FDS] = fds
        .try_into()
        .map_err(|fds: Vec<_>| format!("a run needs {RUN_FDS} descriptors; {} came", fds.len()))?;
    Ok(RunRequest {
        policy: *policy,
        code,
        env,
        exec,
        stdout,
        stderr,
    })
}

/// The zygote as the children it forks see it: its pid, and its own `/proc/<pid>/statm`,
/// opened once by the zygote and inherited by every child (which closes it with everything
/// else it inherited, before its code runs). A child that is PID 1 of a namespace of its own
/// cannot ask for its parent (`getppid()` is 0 there): it reads the zygote's memory sizes
/// through this file, one `pread` (opening `/proc/<pid>/stat` by path, as it did, was a path
/// walk and the kernel's longest per-process report: ~3 % of a zygote run's samples in a
/// profile, within noise end to end). An exited zygote has no memory left (its sizes are
/// zeros, zombie or not); a reaped one has no file (`ESRCH`).
pub(crate) struct Zygote {
    pid: Pid,
    statm: std::fs::File,
}

impl Zygote {
    /// The calling process, as the zygote of the children it will fork.
    pub(crate) fn this_process() -> std::io::Result<Zygote> {
        Zygote::of(nix::unistd::getpid())
    }

    fn of(pid: Pid) -> std::io::Result<Zygote> {
        let statm = std::fs::File::open(format!("/proc/{pid}/statm"))?;
        Ok(Zygote { pid, statm })
    }

    /// Whether the zygote is alive: read through its `statm` in a PID namespace of the
    /// child's own (`namespaces`), else from the parent pid.
    fn is_alive(&self, namespaces: bool) -> bool {
        if !namespaces {
            return getppid() == self.pid;
        }
        let mut sizes = [0u8; 64];
        nix::sys::uio::pread(&self.statm, &mut sizes, 0).is_ok_and(|read| {
            // "size resident shared text lib data dt", in pages: 0 once the memory is gone.
            sizes[..read]
                .split(|&byte| byte == b' ')
                .next()
                .is_some_and(|size| size.iter().any(|&digit| digit != b'0'))
        })
    }
}

/// The first steps of every child: the signal mask the zygote blocked, and the death signal,
/// checking that the zygote did not die before it was set.
fn outlive_no_zygote(namespaces: bool, zygote: &Zygote) -> Result<(), String> {
    // The zygote blocks SIGCHLD (it reads it from a signalfd); the run must not inherit that.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|err| format!("signal mask: {err}"))?;
    // At once, before the sandbox does it too: a zygote that dies takes its runs with it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|err| format!("parent-death signal: {err}"))?;
    // Did the zygote die before the death signal was set?
    let zygote_alive = zygote.is_alive(namespaces);
    if zygote_alive {
        Ok(())
    } else {
        Err("the zygote exited before the run started".to_string())
    }
}

/// Whether the child still has to join its cgroup and make its namespaces, or did both while
/// it waited as a spare.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Whole,
    Ahead,
}

/// A confined run's process, ready for its code.
struct Prepared<'py> {
    /// Its code, as the `str` both `sys.orig_argv` and `compile` get.
    code: Bound<'py, pyo3::types::PyString>,
    /// Its `__main__`'s globals.
    globals: Bound<'py, pyo3::types::PyDict>,
    /// Where it says how it ended; `None` when the sandbox kept none.
    report: Option<ReportSocket>,
}

/// The run's end of its report socket, on `REPORT_FD`, and which socket that is (device and
/// inode): the code may close it and open something else on the same number, which must not
/// get the report.
struct ReportSocket {
    fd: OwnedFd,
    identity: (u64, u64),
}

impl ReportSocket {
    fn new(fd: OwnedFd) -> Result<ReportSocket, String> {
        let identity = identity(&fd).map_err(|err| format!("report socket: {err}"))?;
        Ok(ReportSocket { fd, identity })
    }
}

fn identity(fd: &OwnedFd) -> nix::Result<(u64, u64)> {
    nix::sys::stat::fstat(fd).map(|stat| (stat.st_dev, stat.st_ino))
}

/// The run's code is done and `status` is what its process exits with: its output ends now
/// (the agent's reader sees both streams end without waiting for the exit), and the zygote
/// hears how it ended (see [`crate::report`]), if the report socket is still where it was.
/// Nothing here can fail the run: without the report, the zygote learns the same at the reap.
fn report_end(report: ReportSocket, status: i32) {
    let _ = nix::unistd::close(1);
    let _ = nix::unistd::close(2);
    if identity(&report.fd).is_ok_and(|now| now == report.identity) {
        let _ = nix::unistd::write(&report.fd, &EndReport::of_this_process(status).encode());
    }
    // Never closed by a drop: the code may have closed it already, and the process exits now.
    std::mem::forget(report.fd);
}

/// The setup steps after [`outlive_no_zygote`], in order; each error names its step.
fn prepare<'py>(
    py: Python<'py>,
    interpreter: &Interpreter,
    request: &RunRequest,
    launch: &ForkedRun,
    setup: Setup,
    report: Option<OwnedFd>,
) -> Result<Prepared<'py>, String> {
    // From Rust: Python's `os.dup2` was the run's first Python call, and touched (so copied)
    // a few pages of the interpreter's that nothing later in the run touches (~5 faults).
    lull_agent::sandbox::redirect_stdio(request.stdout.raw(), request.stderr.raw())
        .map_err(|err| err.to_string())?;
    interpreter
        .add_environment(py, &request.env)
        .map_err(|err| format!("environment: {err}"))?;
    // Restores the death signal and dumpable after the uid drop.
    let confined = match setup {
        Setup::Whole => launch.confine(&request.policy, report),
        Setup::Ahead => launch.confine_after_ahead(&request.policy, report),
    };
    let report = confined
        .map_err(|err| err.to_string())?
        .map(ReportSocket::new)
        .transpose()?;
    let code = pyo3::types::PyString::new(py, &request.code);
    let globals = interpreter
        .enter(py, &code)
        .map_err(|err| format!("interpreter state: {err}"))?;
    Ok(Prepared {
        code,
        globals,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn state(pid: Pid) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string(),
        )
    }

    /// A child's check that its zygote is alive, through the `statm` the zygote opened: true
    /// while the process runs, false once it has exited (a zombie, not yet reaped), and false
    /// once it is reaped.
    #[test]
    fn a_zygote_is_alive_until_it_exits_zombie_or_reaped() {
        let mut process = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep starts");
        let pid = Pid::from_raw(process.id() as i32);
        let zygote = Zygote::of(pid).expect("its statm opens");
        assert!(zygote.is_alive(true), "a running process");

        process.kill().expect("killed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(pid).as_deref() != Some("Z") {
            assert!(Instant::now() < deadline, "no zombie: {:?}", state(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!zygote.is_alive(true), "a zombie");

        process.wait().expect("reaped");
        assert!(!zygote.is_alive(true), "a reaped process");
    }
}
