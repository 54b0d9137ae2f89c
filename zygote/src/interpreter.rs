//! The embedded CPython: set up once in the zygote, and driven by a forked child around the
//! user's code. The Python half lives in `run.py`.

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
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
    /// `os.fork`, held like the other functions below rather than looked up on `os` each time.
    fork: Py<PyAny>,
    /// `os.putenv` and the dict behind `os.environ` (`os.environ._data`, its keys and values
    /// bytes): a run's own variables go into both directly (see [`Interpreter::add_environment`]).
    putenv: Py<PyAny>,
    environ_data: Py<PyDict>,
    sys: Py<PyModule>,
    /// `_signal.signal` and `_signal.default_int_handler`: a run's SIGINT handler (the
    /// `signal` module's wrapper of the same function converts to and from enums in Python).
    set_signal: Py<PyAny>,
    int_handler: Py<PyAny>,
    /// The globals of the `__main__` every run starts with (`run.py`'s `_install_run_state`).
    main_globals: Py<PyDict>,
    /// `compile`, `exec` and the arguments a run's code is compiled with.
    compile: Py<PyAny>,
    exec: Py<PyAny>,
    filename: Py<PyString>,
    mode: Py<PyString>,
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

/// Whether an environment variable is the run's own (set in its process after the fork),
/// not shared through the zygote's environment ([`Interpreter::share_environment`]).
pub(crate) fn is_run_own(name: &str) -> bool {
    name.starts_with(RUN_OWN_PREFIX)
}

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

        let os = py.import("os").map_err(failed("import os"))?;
        let putenv = os.getattr("putenv").map_err(failed("os.putenv"))?;
        let environ_data = os
            .getattr("environ")
            .and_then(|environ| environ.getattr("_data"))
            .and_then(|data| Ok(data.cast_into::<PyDict>()?))
            .map_err(failed("os.environ"))?;
        let signal = py.import("_signal").map_err(failed("import _signal"))?;
        let main_globals = sys
            .getattr("modules")
            .and_then(|modules| modules.get_item("__main__"))
            .and_then(|main| main.getattr("__dict__"))
            .and_then(|globals| Ok(globals.cast_into::<PyDict>()?))
            .map_err(failed("__main__"))?;
        let builtins = py.import("builtins").map_err(failed("import builtins"))?;
        let interpreter = Interpreter {
            helper: helper.unbind(),
            fork: os.getattr("fork").map_err(failed("os.fork"))?.unbind(),
            putenv: putenv.unbind(),
            environ_data: environ_data.unbind(),
            sys: sys.unbind(),
            set_signal: signal
                .getattr("signal")
                .map_err(failed("_signal"))?
                .unbind(),
            int_handler: signal
                .getattr("default_int_handler")
                .map_err(failed("_signal"))?
                .unbind(),
            main_globals: main_globals.unbind(),
            compile: builtins
                .getattr("compile")
                .map_err(failed("compile"))?
                .unbind(),
            exec: builtins.getattr("exec").map_err(failed("exec"))?.unbind(),
            filename: PyString::new(py, "<string>").unbind(),
            mode: PyString::new(py, "exec").unbind(),
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
        self.fork.bind(py).call0()?.extract()
    }

    /// In the zygote, before a fork: makes the zygote's own environment the part of `env`
    /// every run shares (all but the `LULL_*` variables of the run), when it is not already.
    /// Returns what the run still has to add ([`Interpreter::add_environment`]).
    pub(crate) fn share_environment(
        &mut self,
        py: Python<'_>,
        env: &BTreeMap<String, String>,
    ) -> PyResult<BTreeMap<String, String>> {
        let shared = || env.iter().filter(|(name, _)| !is_run_own(name));
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
            .filter(|(name, _)| is_run_own(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Ok(own)
    }

    /// In a run's process: its own variables on top of the shared ones, set as
    /// `os.environ[name] = value` would (the C environment for the processes it starts, and
    /// `os.environ`'s dict), but without running `os.environ`'s Python methods: this is the
    /// first Python work after the fork, and each Python function it runs writes to (so copies)
    /// pages of the interpreter's that nothing later in the run touches (`os.environ.update`
    /// cost ~26 page faults per run). Both get the variables' UTF-8 bytes, which is what the
    /// agent means by them, whatever the interpreter's filesystem encoding.
    pub(crate) fn add_environment(
        &self,
        py: Python<'_>,
        own: &BTreeMap<String, String>,
    ) -> PyResult<()> {
        let putenv = self.putenv.bind(py);
        let data = self.environ_data.bind(py);
        for (name, value) in own {
            let name = PyBytes::new(py, name.as_bytes());
            let value = PyBytes::new(py, value.as_bytes());
            putenv.call1((&name, &value))?;
            data.set_item(name, value)?;
        }
        Ok(())
    }

    /// In the confined run's process, right before the code: what of a fresh `python3 -I -u
    /// -c code`'s state the zygote could not give it already (its standard streams, `sys.argv`
    /// and `__main__` it has from the zygote): Python's SIGINT handler (the zygote ignores
    /// SIGINT) and `sys.orig_argv`. Returns the globals of the run's `__main__`. From Rust,
    /// without a Python frame: each Python function a run calls writes to, so copies, the
    /// pages of its code and the objects it names.
    pub(crate) fn enter<'py>(
        &self,
        py: Python<'py>,
        code: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let sigint = nix::sys::signal::Signal::SIGINT as i32;
        self.set_signal
            .bind(py)
            .call1((sigint, self.int_handler.bind(py)))?;
        let argv = PyList::new(
            py,
            [
                PyString::new(py, &self.python),
                PyString::new(py, "-I"),
                PyString::new(py, "-u"),
                PyString::new(py, "-c"),
                code.clone(),
            ],
        )?;
        self.sys.bind(py).setattr("orig_argv", argv)?;
        Ok(self.main_globals.bind(py).clone())
    }

    /// Runs `code` in `globals` as `python3 -I -u -c code` would, including what the interpreter does at
    /// exit, and returns the process's exit status. Never returns an error: every failure is
    /// the code's, and is printed the way CPython prints it.
    pub(crate) fn run_main(
        &self,
        py: Python<'_>,
        code: &Bound<'_, PyString>,
        globals: &Bound<'_, PyDict>,
    ) -> i32 {
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
    fn execute(
        &self,
        py: Python<'_>,
        code: &Bound<'_, PyString>,
        globals: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let compiled =
            self.compile
                .bind(py)
                .call1((code, self.filename.bind(py), self.mode.bind(py)))?;
        self.exec.bind(py).call1((compiled, globals))?;
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
    /// `finish` imports, and the state `python3 -I -u -c` starts with (`sys.argv`, standard
    /// streams that are the `sys.__std*__` ones, a fresh `__main__`), installed in the zygote
    /// so that a run only inherits it. Driven in a plain `python3 -S` (no `site`: nothing a
    /// host's `.pth` files import gets to do it first), the way the zygote and a run drive it:
    /// the helper run from a string, `prepare`, then a run's `compile`, what
    /// `Interpreter::enter` does, and `finish`.
    #[test]
    fn a_prepared_interpreter_leaves_a_run_nothing_to_build() {
        let driver = "import _signal, gc, os, sys, types\n\
                      helper = types.ModuleType('_lull_zygote')\n\
                      exec(os.environ['RUN_PY'], helper.__dict__)\n\
                      assert 'ast' not in sys.modules and '_ast' not in sys.modules\n\
                      fresh = sorted(vars(sys.modules['__main__']))\n\
                      failed = helper.prepare(sys.executable, [])\n\
                      state = (sys.argv, sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__,\n\
                               sys.stdout.seekable(), sorted(vars(sys.modules['__main__'])) == fresh)\n\
                      before = set(sys.modules)\n\
                      compile('print(sum(range(1000)))', '<string>', 'exec')\n\
                      _signal.signal(_signal.SIGINT, _signal.default_int_handler)\n\
                      sys.orig_argv = [sys.executable, '-I', '-u', '-c', 'pass']\n\
                      status = helper.finish(0, False)\n\
                      made = sorted({o.__module__ for o in gc.get_objects() if isinstance(o, type)})\n\
                      imported = sorted(set(sys.modules) - before)\n\
                      os.write(1, repr((failed, state, status, made, imported)).encode())\n";
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
        // (failed preloads, the state a run inherits, exit status, modules of the types the run
        // made, modules it imported)
        assert_eq!(
            stdout.trim(),
            "([], (['-c'], True, True, False, True), 0, [], [])"
        );
    }
}
