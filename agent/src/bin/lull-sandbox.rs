//! `lull-sandbox`: sets up the sandbox for one cold run, then execs the program.
//!
//! ```text
//! lull-sandbox --policy JSON -- PROGRAM [ARGS...]   run PROGRAM confined by the policy
//! lull-sandbox --check JSON PYTHON                    apply the policy, verify it (and that
//!                                                     PYTHON starts) from inside, exit 0
//! lull-sandbox --spare JSON                          started ahead of a run: join a cgroup
//!                                                     named after this process, limited as
//!                                                     the template policy says, then
//!                                                     read the run (a `LaunchRequest` line)
//!                                                     on stdin and go on as --policy
//! ```
//!
//! Started by the agent only; a separate small process because setup must happen in a
//! single-threaded process (the agent is not), and because it forks the run's PID 1.

#![forbid(unsafe_code)]

use lull_agent::sandbox::{self, LaunchRequest, RunPolicy};
use std::io::BufRead as _;
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
        [flag, json] if flag == "--spare" => match parse(json) {
            Ok(template) => spare(&template),
            Err(code) => code,
        },
        _ => {
            eprintln!(
                "usage: lull-sandbox --policy JSON -- PROGRAM [ARGS...] | lull-sandbox --check JSON PYTHON | lull-sandbox --spare JSON"
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

/// Started ahead of its run: gets into a cgroup now, then waits for the run on stdin. Stdin
/// is `/dev/null` again before anything of the run starts (a run's stdin is closed).
fn spare(template: &RunPolicy) -> ExitCode {
    let mut template = template.clone();
    template.cgroup = sandbox::spare_cgroup_name(std::process::id());
    let prepared = match sandbox::prepare_launch(&template) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("lull: sandbox setup failed: {e}");
            return ExitCode::from(SETUP_FAILED);
        }
    };
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    let request: LaunchRequest = match read.map(|_| serde_json::from_str(&line)) {
        Ok(Ok(request)) => request,
        // The agent let it go without a run (it is stopping): nothing to say.
        Ok(Err(_)) if line.is_empty() => return ExitCode::from(SETUP_FAILED),
        Ok(Err(e)) => {
            eprintln!("lull: bad run for a waiting launcher: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("lull: could not read the run: {e}");
            return ExitCode::from(SETUP_FAILED);
        }
    };
    let null = match std::fs::File::open("/dev/null") {
        Ok(null) => null,
        Err(e) => {
            eprintln!("lull: sandbox setup failed: /dev/null: {e}");
            return ExitCode::from(SETUP_FAILED);
        }
    };
    if let Err(e) = nix::unistd::dup2_stdin(&null) {
        eprintln!("lull: sandbox setup failed: /dev/null on stdin: {e}");
        return ExitCode::from(SETUP_FAILED);
    }
    let err = prepared.launch(&request);
    eprintln!("lull: sandbox setup failed: {err}");
    ExitCode::from(SETUP_FAILED)
}
