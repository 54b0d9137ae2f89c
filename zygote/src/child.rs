//! One run's process, from the moment `os.fork()` returned 0 in it: wire its pipes, confine it
//! with `lull_agent::sandbox::ForkedRun::confine` (it was born PID 1 of the run's own PID
//! namespace, where the host allows one), run the code as `python3 -I -u -c` would, exit.
//!
//! Architecture Invariant: this path never returns to the zygote's loop. Every way out, a
//! panic included, ends in `os._exit`.

use crate::interpreter::Interpreter;
use lull_agent::sandbox::{ForkedRun, RunPolicy};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::unistd::{Pid, getppid};
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::fd::RawFd;
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
    /// (`Interpreter::share_environment`).
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) stdout: ReceivedFd,
    pub(crate) stderr: ReceivedFd,
}

/// Runs `request` in this freshly forked child of the zygote (`zygote` is its pid, `launch`
/// what the zygote prepared for it) and exits with the code's exit status.
pub(crate) fn run(
    py: Python<'_>,
    interpreter: &Interpreter,
    request: &RunRequest,
    zygote: Pid,
    launch: &ForkedRun,
) -> ! {
    let status = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match prepare(py, interpreter, request, zygote, launch) {
            Ok(globals) => interpreter.run_main(py, &request.code, &globals),
            Err(err) => {
                // fd 2 is the run's stderr once redirected (the zygote's log before that).
                let _ = writeln!(std::io::stderr(), "lull: sandbox setup failed: {err}");
                SETUP_FAILED
            }
        }
    }))
    .unwrap_or(SETUP_FAILED);
    interpreter.exit(py, status)
}

/// Whether `pid` (in the host's PID namespace) exists and has not exited.
fn process_is_alive(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The setup steps, in order; each error names its step.
fn prepare<'py>(
    py: Python<'py>,
    interpreter: &Interpreter,
    request: &RunRequest,
    zygote: Pid,
    launch: &ForkedRun,
) -> Result<Bound<'py, pyo3::types::PyDict>, String> {
    // The zygote blocks SIGCHLD (it reads it from a signalfd); the run must not inherit that.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|err| format!("signal mask: {err}"))?;
    // At once, before the sandbox does it too: a zygote that dies takes its runs with it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|err| format!("parent-death signal: {err}"))?;
    // Did the zygote die before the death signal was set? PID 1 of a new namespace sees no
    // parent (getppid() is 0), so it looks the zygote up in the host's /proc, still mounted
    // here (the run's own /proc comes with its mount namespace, later).
    let zygote_alive = if request.policy.protections.namespaces {
        process_is_alive(zygote)
    } else {
        getppid() == zygote
    };
    if !zygote_alive {
        return Err("the zygote exited before the run started".to_string());
    }
    interpreter
        .redirect_stdio(py, request.stdout.raw(), request.stderr.raw())
        .map_err(|err| format!("standard streams: {err}"))?;
    interpreter
        .add_environment(py, &request.env)
        .map_err(|err| format!("environment: {err}"))?;
    // Restores the death signal and dumpable after the uid drop (this process never execs).
    launch
        .confine(&request.policy)
        .map_err(|err| err.to_string())?;
    interpreter
        .enter(py, &request.code)
        .map_err(|err| format!("interpreter state: {err}"))
}
