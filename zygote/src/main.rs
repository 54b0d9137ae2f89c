//! `lull-zygote`: a warm CPython that forks one sandboxed process per run for the Lull agent.
//!
//! ```text
//! lull-zygote --python /usr/bin/python3.11 [--preload mod1,mod2]
//! lull-zygote --python /usr/bin/python3 --launcher
//! ```
//!
//! The agent starts it with one end of a Unix socket as stdin and speaks the protocol of
//! `lull_agent::executor::zygote_protocol` over it. The zygote:
//!
//! 1. asks `--python` for its version and `sys.path` (a run must import exactly what
//!    `python3 -I` would), and refuses to start if its own embedded CPython is another version;
//! 2. initialises CPython once, points `sys.executable` at `--python` (so `multiprocessing` and
//!    `subprocess.run([sys.executable, ...])` never start a zygote) and imports `--preload`;
//! 3. serves ([`server`]): waits on the socket, on child exits and on runs' reports, forks a
//!    child per `run` ([`child`]; when idle, the next one ahead of its run: a spare), which
//!    runs the code, or for a cold run execs a fresh interpreter; kills on `kill`, reports
//!    every run's end (its own report, [`report`], or its exit) and reaps. It exits when the
//!    socket closes, killing the runs it still has.
//!
//! With `--launcher` (the agent's cold executor) it skips 2: no interpreter is initialised
//! (nor must its version match `--python`'s), and every run execs a fresh interpreter
//! ([`runtime::Launcher`]): a small process forks faster than a copy of a warm CPython.
//!
//! Architecture Invariant: the zygote never runs user code, and stays single-threaded: it checks
//! before every fork. It has no `unsafe`: it forks with Python's own `os.fork()` (which runs
//! CPython's before/after-fork hooks), or as a launcher with `lull_agent::sandbox`'s
//! `fork_single_threaded`, and the sandbox lives in `lull_agent::sandbox`.
#![forbid(unsafe_code)]

mod child;
mod interpreter;
mod report;
mod runtime;
mod server;

use std::process::ExitCode;

/// Arguments, as the agent passes them.
#[derive(Debug)]
struct Args {
    python: String,
    preload: Vec<String>,
    /// Only exec fresh interpreters: no CPython in this process.
    launcher: bool,
}

const USAGE: &str = "usage: lull-zygote --python PATH [--preload MODULE[,MODULE...] | --launcher]";

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut python = None;
        let mut preload = Vec::new();
        let mut launcher = false;
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--python" => python = Some(value()?),
                "--launcher" => launcher = true,
                "--preload" => preload.extend(
                    value()?
                        .split(',')
                        .map(str::trim)
                        .filter(|name| !name.is_empty())
                        .map(String::from),
                ),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if launcher && !preload.is_empty() {
            return Err("--preload needs an interpreter; a --launcher has none".to_string());
        }
        Ok(Args {
            python: python.ok_or("--python is required")?,
            preload,
            launcher,
        })
    }
}

/// One line to stderr, which the agent passes through to its own log.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("lull-zygote[{}]: {}", std::process::id(), format_args!($($arg)*))
    };
}
pub(crate) use log;

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(err) => {
            log!("{err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match server::serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log!("{err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn flags_parse_with_preloads_split_on_commas() {
        let args =
            parse(&["--python", "/usr/bin/python3", "--preload", "json, re,,csv"]).expect("valid");

        assert_eq!(args.python, "/usr/bin/python3");
        assert_eq!(args.preload, ["json", "re", "csv"]);
        assert!(!args.launcher);
    }

    #[test]
    fn a_launcher_takes_no_preloads() {
        let args = parse(&["--launcher", "--python", "/usr/bin/python3"]).expect("valid");
        assert!(args.launcher);
        assert!(parse(&["--python", "p", "--launcher", "--preload", "json"]).is_err());
    }

    #[test]
    fn python_is_required_and_unknown_flags_are_refused() {
        assert_eq!(
            parse(&[]).expect_err("no python").as_str(),
            "--python is required"
        );
        assert!(parse(&["--python", "p", "--fast"]).is_err());
        assert!(parse(&["--python"]).is_err());
        assert!(
            parse(&["--python", "p", "--protections", "{}"]).is_err(),
            "runs bring their own"
        );
    }
}
