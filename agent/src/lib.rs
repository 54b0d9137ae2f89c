//! Lull's agent: the worker daemon that lends a host's idle cycles to a coordinator.
//!
//! The agent registers with a coordinator by heartbeating, keeps one long-poll for work
//! outstanding, runs every assignment it receives in a fresh Python process, and posts each
//! result back through an on-disk outbox so that nothing is lost when the coordinator restarts.
//! It is a binary (`lull-agent`) and a library: the coordinator embeds it for single-machine use
//! through [`run`].
//!
//! # Code map
//!
//! | module | owns |
//! |---|---|
//! | `config` | [`AgentConfig`], the one configuration value, built by `main.rs` or the embedder |
//! | `error` | [`AgentError`], why the agent could not start |
//! | `node_id` | [`resolve_node_id`]: the node id that survives restarts (`state_dir/node_id`); [`private_dir`], the state directory (and the coordinator's data directory) for its owner alone |
//! | `agent` | the supervisor: the pull loop, the table of runs, cancels, graceful shutdown |
//! | `heartbeat` | the heartbeat ticker and the host's load as `sysinfo` measures it |
//! | `commands` | node commands from heartbeat answers (drain, undrain, restart) and their outcomes |
//! | `owner` | owner first: the owner's load (host minus Lull), [`OwnerPolicy`] and the pure `OwnerWatch` (pause, resume, evict), suspending runs |
//! | `outbox` | results written to `state_dir/outbox/{run_id}.json` and posted until acknowledged |
//! | `client` | the HTTP calls to the coordinator and what each answer means (ack, refuse, retry) |
//! | `retry` | backoff and the rate-limited logging of repeated failures |
//! | `standby` | standby mode: [`serve_standby`] waits to be adopted by a coordinator (scale-out), then runs the agent until it is told to leave |
//! | [`executor`] | the [`Executor`] trait, [`ColdExecutor`] (`python3 -I -c CODE` per run) and [`ZygoteExecutor`] (a fork of a warm `lull-zygote` per run) |
//!
//! # Lifecycle
//!
//! heartbeat (registers the node) → long-poll `GET /internal/task` → spawn each assignment →
//! write its result to the outbox → `POST /internal/result` until acknowledged or refused.
//! While the owner needs the machine: stop pulling, suspend the runs, heartbeat `paused`;
//! resume when they are quiet, or evict (hand back) the runs after `owner.evict_after`.
//! On shutdown: stop pulling, heartbeat `draining`, wait for the runs up to the grace period,
//! release what is left, flush the outbox briefly, heartbeat `offline`.
//!
//! Architecture Invariant: the coordinator decides what fits on this node. The agent does no
//! capacity accounting of its own; it runs every assignment it is handed.
//!
//! Architecture Invariant: the library never reads the process environment or installs signal
//! handlers; `main.rs` does both and passes an [`AgentConfig`] and a shutdown token down.
//! (The one exception is the executors, which hand the agent's own `PATH` to their runs.)

mod agent;
mod client;
mod commands;
mod config;
mod error;
pub mod executor;
mod heartbeat;
mod node_id;
mod outbox;
mod owner;
mod retry;
pub mod sandbox;
mod slots;
mod standby;

pub use agent::{run, run_once, run_with_executor};
pub use commands::Stopped;
pub use config::AgentConfig;
pub use error::AgentError;
pub use executor::{
    ColdExecutor, Execution, Executor, ExecutorKind, Job, RunPoint, ZygoteExecutor, ZygoteSettings,
};
pub use node_id::{private_dir, resolve_node_id};
pub use owner::OwnerPolicy;
pub use standby::{StandbyError, serve_standby};
