//! The embedded CPython: set up once in the zygote, and driven by a forked child around the
//! user's code. The Python half lives in `run.py`.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::process::{Command, Stdio};

const RUN_PY: &str = include_str!("run.py");
const PATH_FALLBACK: &str = "/usr/local/bin:/usr/bin:/bin";

/// What `--python` says about itself; the zygote must match it.
#[derive(Debug, Deserialize)]
pub(crate) struct TargetPython {
    /// `major.minor.micro`.
    pub(crate) version: String,
    /// Its `sys.path` under `-I`: what a cold run can import.
    pub(crate) path: Vec<String>,
}

/// Asks `python` (the interpreter cold runs use) for its version and `sys.path`, with the
/// environment a run has.
pub(crate) fn ask_target_python(python: &str) -> Result<TargetPython, String> {
    let script = "import json, platform, sys\n\
                  print(json.dumps({'version': platform.python_version(), 'path': sys.path}))";
    let output = Command::new(python)
        .args(["-I", "-c", script])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| PATH_FALLBACK.into()),
        )
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| format!("could not start {python}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{python} could not describe itself ({})",
            output.status
        ));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|err| format!("{python} described itself oddly: {err}"))
}

/// The zygote's interpreter, initialised and ready to fork.
pub(crate) struct Interpreter {
    /// `run.py`, loaded as a module that is not in `sys.modules`.
    helper: Py<PyModule>,
    os: Py<PyModule>,
    builtins: Py<PyModule>,
    /// The target python's path, for `sys.orig_argv`.
    python: String,
    pub(crate) version: String,
    /// The environment the zygote's own `os.environ` holds for its runs: what every run's
    /// environment has but its own `LULL_*` variables.
    shared_env: Option<BTreeMap<String, String>>,
    /// Counts the changes of the shared environment: a process forked ahead of its run (the
    /// spare) has the environment of the generation it was forked in.
    pub(crate) env_generation: u64,
}

/// Variables that differ from run to run (task and run ids, points): set in each run's
/// process, the others once in the zygote.
const RUN_OWN_PREFIX: &str = "LULL_";

impl Interpreter {
    /// Points the interpreter at `target` (executable, version check, `sys.path`) and imports
    /// `preload`. Returns the interpreter and the preloads that failed (they are not fatal:
    /// the run that imports one fails the way it would cold).
    pub(crate) fn prepare(
        py: Python<'_>,
        python: &str,
        target: &TargetPython,
        preload: &[String],
    ) -> Result<(Interpreter, Vec<String>), String> {
        let failed = |what: &'static str| move |err: PyErr| format!("{what}: {err}");
        let sys = py.import("sys").map_err(failed("import sys"))?;
        let info = sys
            .getattr("version_info")
            .map_err(failed("python version"))?;
        let part = |i: usize| -> Result<u32, String> {
            info.get_item(i)
                .and_then(|n| n.extract())
                .map_err(failed("python version"))
        };
        let (major, minor, micro) = (part(0)?, part(1)?, part(2)?);
        let version = format!("{major}.{minor}.{micro}");
        if major_minor(&version) != major_minor(&target.version) {
            return Err(format!(
                "this zygote embeds Python {version}, but {python} is Python {}",
                target.version
            ));
        }
        sys.setattr(
            "path",
            PyList::new(py, &target.path).map_err(failed("sys.path"))?,
        )
        .map_err(failed("sys.path"))?;

        let source = CString::new(RUN_PY).map_err(|err| format!("run.py: {err}"))?;
        let helper = PyModule::from_code(py, &source, c"<lull-zygote>", c"_lull_zygote")
            .map_err(failed("loading the run helper"))?;
        // Not importable by runs: it is the zygote's, not theirs.
        sys.getattr("modules")
            .and_then(|modules| modules.del_item("_lull_zygote"))
            .map_err(failed("hiding the run helper"))?;
        let failed_preloads: Vec<String> = helper
            .call_method1("prepare", (python, preload.to_vec()))
            .and_then(|failed| failed.extract())
            .map_err(failed("preparing the interpreter"))?;

        let interpreter = Interpreter {
            helper: helper.unbind(),
            os: py.import("os").map_err(failed("import os"))?.unbind(),
            builtins: py
                .import("builtins")
                .map_err(failed("import builtins"))?
                .unbind(),
            python: python.to_string(),
            version,
            shared_env: None,
            env_generation: 0,
        };
        Ok((interpreter, failed_preloads))
    }

    /// `os.fork()`: 0 in the child, the child's pid in the parent. CPython's own fork runs its
    /// before/after-fork hooks (import lock, thread state, `random` reseeding, ...).
    pub(crate) fn fork(&self, py: Python<'_>) -> PyResult<i32> {
        self.os.bind(py).call_method0("fork")?.extract()
    }

    /// In the zygote, before a fork: makes the zygote's own environment the part of `env`
    /// every run shares (all but the `LULL_*` variables of the run), when it is not already.
    /// Returns what the run still has to add ([`Interpreter::add_environment`]).
    pub(crate) fn share_environment(
        &mut self,
        py: Python<'_>,
        env: &BTreeMap<String, String>,
    ) -> PyResult<BTreeMap<String, String>> {
        let is_own = |name: &String| name.starts_with(RUN_OWN_PREFIX);
        let shared = || env.iter().filter(|(name, _)| !is_own(name));
        // Compared in place: this runs before every fork, and what the zygote allocates here
        // is written to pages each run's fork protects again.
        if !self
            .shared_env
            .as_ref()
            .is_some_and(|held| held.iter().eq(shared()))
        {
            let shared: BTreeMap<String, String> = shared()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            self.helper
                .bind(py)
                .call_method1("set_base_environment", (&shared,))?;
            self.shared_env = Some(shared);
            self.env_generation += 1;
        }
        let own = env
            .iter()
            .filter(|(name, _)| is_own(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Ok(own)
    }

    /// In a run's process: its own variables on top of the shared ones.
    pub(crate) fn add_environment(
        &self,
        py: Python<'_>,
        own: &BTreeMap<String, String>,
    ) -> PyResult<()> {
        if !own.is_empty() {
            self.helper
                .bind(py)
                .call_method1("add_environment", (own,))?;
        }
        Ok(())
    }

    /// In the confined run's process, right before the code: the interpreter state of a fresh
    /// `python3 -I -u -c code` (signals, standard streams, `sys.argv`). Returns the globals of
    /// a new `__main__`.
    pub(crate) fn enter<'py>(&self, py: Python<'py>, code: &str) -> PyResult<Bound<'py, PyDict>> {
        let argv = [self.python.as_str(), "-I", "-u", "-c", code];
        let globals = self
            .helper
            .bind(py)
            .call_method1("enter", (argv.to_vec(),))?;
        Ok(globals.cast_into::<PyDict>()?)
    }

    /// Runs `code` in `globals` as `python3 -I -u -c code` would, including what the interpreter does at
    /// exit, and returns the process's exit status. Never returns an error: every failure is
    /// the code's, and is printed the way CPython prints it.
    pub(crate) fn run_main(&self, py: Python<'_>, code: &str, globals: &Bound<'_, PyDict>) -> i32 {
        let helper = self.helper.bind(py);
        let (status, interrupted) = match self.execute(py, code, globals) {
            Ok(()) => (0, false),
            Err(err) if err.is_instance_of::<PySystemExit>(py) => {
                let status = helper
                    .call_method1("system_exit_status", (err.value(py),))
                    .and_then(|status| status.extract())
                    .unwrap_or(1);
                (status, false)
            }
            Err(err) => {
                let interrupted = err.is_instance_of::<PyKeyboardInterrupt>(py);
                // PyErr_PrintEx(1), as `python -c` does: sys.excepthook, sys.last_*.
                err.print_and_set_sys_last_vars(py);
                (1, interrupted)
            }
        };
        match helper
            .call_method1("finish", (status, interrupted))
            .and_then(|status| status.extract())
        {
            Ok(status) => status,
            Err(err) => {
                err.print(py);
                120
            }
        }
    }

    /// Compiles and executes `code` in `globals`, called from Rust so that the traceback of an
    /// uncaught exception starts at the code's own `<module>` frame.
    fn execute(&self, py: Python<'_>, code: &str, globals: &Bound<'_, PyDict>) -> PyResult<()> {
        let builtins = self.builtins.bind(py);
        let compiled = builtins.call_method1("compile", (code, "<string>", "exec"))?;
        builtins.call_method1("exec", (compiled, globals))?;
        Ok(())
    }
}

fn major_minor(version: &str) -> Option<(&str, &str)> {
    let mut parts = version.split('.');
    Some((parts.next()?, parts.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert_eq!(major_minor("3.11.7"), major_minor("3.11.2"));
        assert_ne!(major_minor("3.11.7"), major_minor("3.12.0"));
        assert_eq!(major_minor("3"), None);
    }

    /// `run.py`'s `prepare` leaves the zygote holding what a run would otherwise make for
    /// itself, in every run: the AST classes `compile()` builds on first use, the modules
    /// `finish` imports, and it keeps the zygote's own standard streams alive so that a run's
    /// `enter` does not free them. Driven in a plain `python3 -S` (no `site`: nothing a host's
    /// `.pth` files import gets to do it first), the way the zygote and a run drive it: the
    /// helper run from a string, `prepare`, then a run's `compile`, `enter` and `finish`.
    #[test]
    fn a_prepared_interpreter_leaves_a_run_nothing_to_build() {
        let driver = "import gc, os, sys, types, weakref\n\
                      helper = types.ModuleType('_lull_zygote')\n\
                      exec(os.environ['RUN_PY'], helper.__dict__)\n\
                      assert 'ast' not in sys.modules and '_ast' not in sys.modules\n\
                      own = [weakref.ref(s) for s in (sys.stdin, sys.stdout, sys.stderr)]\n\
                      failed = helper.prepare(sys.executable, [])\n\
                      before = set(sys.modules)\n\
                      compile('print(sum(range(1000)))', '<string>', 'exec')\n\
                      helper.enter([sys.executable, '-I', '-u', '-c', 'pass'])\n\
                      status = helper.finish(0, False)\n\
                      made = sorted({o.__module__ for o in gc.get_objects() if isinstance(o, type)})\n\
                      freed = [i for i, ref in enumerate(own) if ref() is None]\n\
                      imported = sorted(set(sys.modules) - before)\n\
                      os.write(1, repr((failed, status, made, imported, freed)).encode())\n";
        let output = Command::new("python3")
            .args(["-I", "-S", "-c", driver])
            .env("RUN_PY", RUN_PY)
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // (failed preloads, exit status, modules of the types the run made, modules it
        // imported, which of the zygote's streams it freed)
        assert_eq!(stdout.trim(), "([], 0, [], [], [])");
    }
}
