//! `lull-sandbox`: sets up the sandbox for one cold run, then execs the program.
//!
//! ```text
//! lull-sandbox --policy JSON -- PROGRAM [ARGS...]   run PROGRAM confined by the policy
//! lull-sandbox --check JSON PYTHON                    apply the policy, verify it (and that
//!                                                     PYTHON starts) from inside, exit 0
//! ```
//!
//! Started by the agent only; a separate small process because setup must happen in a
//! single-threaded process (the agent is not), and because it forks the run's PID 1.

#![forbid(unsafe_code)]

use lull_agent::sandbox::{self, RunPolicy};
use std::process::ExitCode;

/// The exit status for "the sandbox could not be set up" (as `env` and `nohup` use 125).
const SETUP_FAILED: u8 = 125;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, json, python] if flag == "--check" => match parse(json) {
            Ok(policy) => check(&policy, python),
            Err(code) => code,
        },
        [flag, json, dashdash, program, rest @ ..] if flag == "--policy" && dashdash == "--" => {
            match parse(json) {
                Ok(policy) => {
                    let err = sandbox::launch(&policy, program, rest);
                    eprintln!("lull: sandbox setup failed: {err}");
                    ExitCode::from(SETUP_FAILED)
                }
                Err(code) => code,
            }
        }
        _ => {
            eprintln!(
                "usage: lull-sandbox --policy JSON -- PROGRAM [ARGS...] | lull-sandbox --check JSON PYTHON"
            );
            ExitCode::from(2)
        }
    }
}

fn parse(json: &str) -> Result<RunPolicy, ExitCode> {
    serde_json::from_str(json).map_err(|e| {
        eprintln!("lull: bad sandbox policy: {e}");
        ExitCode::from(2)
    })
}

fn check(policy: &RunPolicy, python: &str) -> ExitCode {
    let applied = sandbox::confine_run(policy);
    if let Err(e) = applied {
        eprintln!("{e}");
        return ExitCode::from(SETUP_FAILED);
    }
    match sandbox::self_check(policy, python) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
