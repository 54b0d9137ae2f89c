//! What the agent and `lull-zygote` say to each other: one JSON object per line over the Unix
//! socket that is the zygote's stdin.
//!
//! ```text
//! zygote → agent   {"op":"ready","python_version":"3.11.7"}          once, when it can fork
//! agent → zygote   {"op":"run","policy":{...},"code":"...","env":{...}}  + 2 fds (SCM_RIGHTS)
//! zygote → agent   {"op":"started","run_id":7,"pid":4242}
//! agent → zygote   {"op":"kill","run_id":7}
//! zygote → agent   {"op":"exited","run_id":7,"exit_code":0}  or  {..,"signal":9}
//! zygote → agent   {"op":"error","run_id":7,"message":"..."}  the run did not start
//! ```
//!
//! A `run` message carries exactly [`RUN_FDS`] file descriptors, attached to its first byte:
//! the write ends of the run's stdout and stderr pipes, in that order. The zygote keeps them
//! only until it has forked the run's process.
//!
//! Architecture Invariant: these types are the whole protocol; both sides serialise only them.

use crate::sandbox::RunPolicy;
use lull_shared::RunId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many file descriptors travel with a `run` message: stdout, then stderr.
pub const RUN_FDS: usize = 2;

/// Agent → zygote.
///
/// Read through [`WireToZygote`], a plain struct: serde reads an internally tagged enum by
/// first buffering the whole message in its own tree (every string copied into it, the map
/// rebuilt), and what the zygote allocates lands on pages every later fork shares (with the
/// copy it made for its spare, ~9 of a zygote run's ~258 page faults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", try_from = "WireToZygote")]
pub enum ToZygote {
    /// Fork a process for this run. Its identity is `policy.run_id`.
    Run {
        /// Boxed: far larger than the other messages.
        policy: Box<RunPolicy>,
        code: String,
        /// The run's whole environment (the zygote's own is not passed on).
        env: BTreeMap<String, String>,
        /// The run's process, once sandboxed, execs a fresh `python3 -I -u -c code` (the
        /// zygote's `--python`) with exactly `env`, instead of running the code in the fork:
        /// the cold executor's runs, with the zygote as their launcher.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        exec: bool,
    },
    /// SIGKILL the run's process (and so, through the sandbox, everything it started).
    Kill { run_id: RunId },
}

/// [`ToZygote`] as it is read: every field of every kind of message, the `op` saying which.
/// Fields of the other kinds are ignored, as unknown fields are.
#[derive(Deserialize)]
struct WireToZygote {
    op: Op,
    policy: Option<Box<RunPolicy>>,
    code: Option<String>,
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    exec: bool,
    run_id: Option<RunId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Run,
    Kill,
}

impl TryFrom<WireToZygote> for ToZygote {
    type Error = String;

    fn try_from(wire: WireToZygote) -> Result<Self, String> {
        let missing = |field: &str| format!("missing field `{field}`");
        Ok(match wire.op {
            Op::Run => ToZygote::Run {
                policy: wire.policy.ok_or_else(|| missing("policy"))?,
                code: wire.code.ok_or_else(|| missing("code"))?,
                env: wire.env.ok_or_else(|| missing("env"))?,
                exec: wire.exec,
            },
            Op::Kill => ToZygote::Kill {
                run_id: wire.run_id.ok_or_else(|| missing("run_id"))?,
            },
        })
    }
}

/// Zygote → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromZygote {
    /// Initialised and waiting for runs.
    Ready {
        /// The embedded interpreter's version, e.g. `3.11.7`.
        python_version: String,
    },
    /// The run's process exists.
    Started { run_id: RunId, pid: i32 },
    /// The run's process has ended (and was reaped). Exactly one of `exit_code` and `signal`.
    Exited {
        run_id: RunId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// User plus system CPU time of the run's process and the descendants it waited for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_seconds: Option<f64>,
        /// Peak resident set size of the largest of those processes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rss_mb: Option<f64>,
    },
    /// Something went wrong; with a `run_id`, that run never started (or was not found).
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<RunId>,
        message: String,
    },
}

impl ToZygote {
    /// The message as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

impl FromZygote {
    /// The message as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

fn to_line<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string.
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exits_name_either_a_code_or_a_signal() {
        let code = FromZygote::Exited {
            run_id: 7,
            exit_code: Some(3),
            signal: None,
            cpu_seconds: None,
            max_rss_mb: None,
        };
        let signal = FromZygote::Exited {
            run_id: 7,
            exit_code: None,
            signal: Some(9),
            cpu_seconds: None,
            max_rss_mb: None,
        };

        assert_eq!(
            serde_json::to_value(&code).expect("json"),
            json!({"op": "exited", "run_id": 7, "exit_code": 3})
        );
        assert_eq!(
            serde_json::to_value(&signal).expect("json"),
            json!({"op": "exited", "run_id": 7, "signal": 9})
        );
    }

    #[test]
    fn a_run_message_parses_back_and_one_missing_a_field_is_refused_by_name() {
        let policy = RunPolicy::for_job(
            7,
            &lull_shared::Protections::none("a test"),
            &crate::sandbox::SandboxSettings::default(),
            64.0,
            std::time::Duration::from_secs(5),
            None,
        );
        let run = ToZygote::Run {
            policy: Box::new(policy),
            code: "print(\"a\\nb\")\n".into(),
            env: BTreeMap::from([("LULL_RUN_ID".into(), "7".into())]),
            exec: true,
        };

        let parsed: ToZygote = serde_json::from_slice(&run.to_line()).expect("parses");
        assert_eq!(parsed, run);

        let mut without_code = serde_json::to_value(&run).expect("json");
        without_code.as_object_mut().expect("object").remove("code");
        let err = serde_json::from_value::<ToZygote>(without_code).expect_err("no code");
        assert!(err.to_string().contains("missing field `code`"), "{err}");
        let err = serde_json::from_str::<ToZygote>(r#"{"op":"kill"}"#).expect_err("no run id");
        assert!(err.to_string().contains("missing field `run_id`"), "{err}");
        let err = serde_json::from_str::<ToZygote>(r#"{"op":"fly","run_id":1}"#).expect_err("op");
        assert!(err.to_string().contains("unknown variant `fly`"), "{err}");
    }

    #[test]
    fn lines_end_with_one_newline_and_parse_back() {
        let kill = ToZygote::Kill { run_id: 12 };
        let line = kill.to_line();

        assert_eq!(line, b"{\"op\":\"kill\",\"run_id\":12}\n");
        let parsed: ToZygote = serde_json::from_slice(&line).expect("parses");
        assert_eq!(parsed, kill);
        let ready: FromZygote =
            serde_json::from_str(r#"{"op":"ready","python_version":"3.11.7"}"#).expect("parses");
        assert_eq!(
            ready,
            FromZygote::Ready {
                python_version: "3.11.7".into()
            }
        );
    }
}
