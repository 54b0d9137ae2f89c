//! What the zygote's loop ([`crate::server`]) forks, and what each child becomes: a warm
//! interpreter's runs ([`Warm`]: CPython initialised once, each run's code executed in its
//! fork), or a launcher's ([`Launcher`], `--launcher`: no interpreter at all, every run execs
//! a fresh `python3 -I -u -c`: the cold executor's). Each refuses the other's runs
//! ([`refusal`]).
//!
//! A launcher forks a small process instead of a copy of an initialised CPython: the fork
//! copies fewer page tables, the child writes to (and so copies) few pages before its exec,
//! and the exec tears down a small address space. That is most of what launching a cold run
//! cost beyond the interpreter itself (BENCHMARKS.md).

use crate::child::{self, RunRequest, Zygote};
use crate::interpreter::Interpreter;
use lull_agent::sandbox::{ForkedRun, RunPolicy};
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

/// What the server needs of the process it runs in.
pub(crate) trait Runtime {
    /// Whether runs can execute their code in the fork (`exec: false`); a launcher only
    /// execs fresh interpreters.
    fn runs_code(&self) -> bool;
    /// Counts the changes of the environment runs share (see
    /// [`Interpreter::share_environment`]): a spare forked in an earlier generation cannot
    /// take the next run. Constant for a launcher, whose runs bring their whole environment.
    fn env_generation(&self) -> u64;
    /// Before forking a run that does not exec: what of `env` the run still has to add.
    fn share_environment(
        &mut self,
        env: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String>;
    /// Forks: 0 in the child, the child's pid in the parent.
    fn fork(&self) -> Result<i32, String>;
    /// In a child forked for `request`: runs it, never returns.
    fn run(
        &self,
        request: &RunRequest,
        zygote: &Zygote,
        launch: &ForkedRun,
        report: Option<OwnedFd>,
    ) -> !;
    /// In a child forked ahead of its run (a spare): waits for it on `socket` and runs it,
    /// never returns.
    fn spare(
        &self,
        socket: OwnedFd,
        zygote: &Zygote,
        launch: &ForkedRun,
        made_for: &RunPolicy,
    ) -> !;
}

/// The zygote's own CPython, initialised and prepared ([`Interpreter::prepare`]).
pub(crate) struct Warm<'py> {
    pub(crate) py: Python<'py>,
    pub(crate) interpreter: Interpreter,
}

impl Runtime for Warm<'_> {
    fn runs_code(&self) -> bool {
        true
    }

    fn env_generation(&self) -> u64 {
        self.interpreter.env_generation
    }

    fn share_environment(
        &mut self,
        env: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String> {
        self.interpreter
            .share_environment(self.py, env)
            .map_err(|err| err.to_string())
    }

    fn fork(&self) -> Result<i32, String> {
        self.interpreter
            .fork(self.py)
            .map_err(|err| err.to_string())
    }

    fn run(
        &self,
        request: &RunRequest,
        zygote: &Zygote,
        launch: &ForkedRun,
        report: Option<OwnedFd>,
    ) -> ! {
        child::run(self.py, &self.interpreter, request, zygote, launch, report)
    }

    fn spare(
        &self,
        socket: OwnedFd,
        zygote: &Zygote,
        launch: &ForkedRun,
        made_for: &RunPolicy,
    ) -> ! {
        child::spare(self.py, &self.interpreter, socket, zygote, launch, made_for)
    }
}

/// No interpreter: every run execs `python` fresh, once sandboxed.
pub(crate) struct Launcher {
    pub(crate) python: String,
}

impl Runtime for Launcher {
    fn runs_code(&self) -> bool {
        false
    }

    fn env_generation(&self) -> u64 {
        0
    }

    fn share_environment(
        &mut self,
        _env: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String> {
        Err(LAUNCHER_RUNS_NO_CODE.to_string())
    }

    fn fork(&self) -> Result<i32, String> {
        match lull_agent::sandbox::fork_single_threaded() {
            Ok(None) => Ok(0),
            Ok(Some(pid)) => Ok(pid.as_raw()),
            Err(err) => Err(err.to_string()),
        }
    }

    fn run(
        &self,
        request: &RunRequest,
        zygote: &Zygote,
        launch: &ForkedRun,
        _report: Option<OwnedFd>,
    ) -> ! {
        child::launch(&self.python, request, zygote, launch)
    }

    fn spare(
        &self,
        socket: OwnedFd,
        zygote: &Zygote,
        launch: &ForkedRun,
        made_for: &RunPolicy,
    ) -> ! {
        child::launcher_spare(&self.python, socket, zygote, launch, made_for)
    }
}

/// Why a launcher refuses a run that does not exec.
pub(crate) const LAUNCHER_RUNS_NO_CODE: &str = "this zygote is a launcher (--launcher): it runs no code in its own process, only fresh interpreters";

/// Why a warm zygote refuses a run that would exec a fresh interpreter.
pub(crate) const WARM_EXECS_NOTHING: &str = "this zygote runs code in its own interpreter; a run that execs a fresh one goes to a launcher (--launcher)";

/// Why a zygote whose runtime runs code in its fork (`runs_code`) or not cannot start a run
/// that execs (`exec`) or not; `None` when it can.
pub(crate) fn refusal(runs_code: bool, exec: bool) -> Option<&'static str> {
    match (runs_code, exec) {
        (true, true) => Some(WARM_EXECS_NOTHING),
        (false, false) => Some(LAUNCHER_RUNS_NO_CODE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_refuses_the_runs_of_the_other() {
        assert_eq!(refusal(true, false), None, "a warm zygote runs code");
        assert_eq!(refusal(false, true), None, "a launcher execs");
        assert_eq!(refusal(true, true), Some(WARM_EXECS_NOTHING));
        assert_eq!(refusal(false, false), Some(LAUNCHER_RUNS_NO_CODE));
    }
}
