//! Node commands from the coordinator (seed 004): they arrive in heartbeat answers, are
//! carried out once each, and their outcomes ride on the next heartbeats until one is
//! acknowledged.
//!
//! - `drain` / `undrain`: the coordinator enforces them (it places nothing here and sends
//!   cancels at the deadline); the agent acknowledges them and logs them.
//! - `restart`: the agent stops pulling and shuts down as on SIGTERM (runs finish within
//!   the shutdown grace, the rest are handed back), then starts again with the same node
//!   id. Its outcome is reported by the restarted agent, from a marker file in the state
//!   directory written just before the restart.
//! - `decommission` (shrink): the agent stops pulling and shuts down as on SIGTERM (the
//!   coordinator drained the node first, so nothing should be running), reports the
//!   command succeeded in its goodbye heartbeat, and leaves: an adopted standby agent goes
//!   back to standby, an agent started on its own exits.
//!
//! Architecture Invariant: no HTTP here; the heartbeat carries both directions.

use lull_shared::{AgentCommand, CommandId, CommandKind, CommandResult};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The file a restarting agent leaves for its successor: the restart command's id.
const RESTART_MARKER: &str = "restart-command";

#[derive(Default)]
struct State {
    /// Commands already acted on (the coordinator repeats them until it has an outcome).
    handled: BTreeSet<CommandId>,
    /// Outcomes not yet carried by an acknowledged heartbeat.
    outcomes: Vec<CommandResult>,
    /// The restart command being carried out, if any.
    restart: Option<CommandId>,
    /// The decommission command being carried out, if any.
    decommission: Option<CommandId>,
}

/// Why [`crate::run_once`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was asked for (SIGTERM, or the embedder's token).
    Shutdown,
    /// A `restart` command: start again (same configuration, same node id).
    Restart,
    /// A `decommission` command: leave the pool (back to standby, or exit).
    Decommission,
}

pub(crate) struct Commands {
    state: Mutex<State>,
    marker: PathBuf,
    /// Cancelled by a `restart` or `decommission` command: the pull loop stops and
    /// shutdown begins.
    stop_pulling: CancellationToken,
}

impl Commands {
    /// Reads (and removes) the marker a restarting predecessor left, so that the first
    /// heartbeat reports its restart as succeeded.
    pub(crate) fn open(state_dir: &Path, stop_pulling: CancellationToken) -> Commands {
        let marker = state_dir.join(RESTART_MARKER);
        let mut state = State::default();
        if let Ok(text) = std::fs::read_to_string(&marker) {
            match text.trim().parse::<CommandId>() {
                Ok(id) => {
                    info!(command_id = id, "restarted at the coordinator's request");
                    state.handled.insert(id);
                    state.outcomes.push(CommandResult {
                        id,
                        ok: true,
                        error: None,
                    });
                }
                Err(_) => warn!(path = %marker.display(), "ignoring an unreadable restart marker"),
            }
            if let Err(err) = std::fs::remove_file(&marker) {
                warn!(%err, path = %marker.display(), "could not remove the restart marker");
            }
        }
        Commands {
            state: Mutex::new(state),
            marker,
            stop_pulling,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Outcomes to carry on the next heartbeat.
    pub(crate) fn outcomes(&self) -> Vec<CommandResult> {
        self.state().outcomes.clone()
    }

    /// The coordinator acknowledged a heartbeat that carried `sent`.
    pub(crate) fn delivered(&self, sent: &[CommandResult]) {
        self.state()
            .outcomes
            .retain(|o| !sent.iter().any(|s| s.id == o.id));
    }

    /// Acts on the commands in a heartbeat answer that were not acted on yet.
    pub(crate) fn handle(&self, commands: &[AgentCommand]) {
        let mut state = self.state();
        for command in commands {
            if !state.handled.insert(command.id) {
                continue;
            }
            match command.command {
                CommandKind::Drain | CommandKind::Undrain => {
                    info!(command_id = command.id, command = %command.command, args = %command.args,
                        "node command: the coordinator holds back or resumes work");
                    state.outcomes.push(CommandResult {
                        id: command.id,
                        ok: true,
                        error: None,
                    });
                }
                CommandKind::Decommission => {
                    if state.restart.is_some() || state.decommission.is_some() {
                        // A repeat of a decommission under way is as good as done.
                        let result = CommandResult {
                            id: command.id,
                            ok: state.decommission.is_some(),
                            error: state.restart.map(|_| "a restart is under way".to_string()),
                        };
                        state.outcomes.push(result);
                        continue;
                    }
                    info!(
                        command_id = command.id,
                        "decommission requested: finishing runs, then leaving the pool"
                    );
                    state.decommission = Some(command.id);
                    self.stop_pulling.cancel();
                }
                CommandKind::Restart => {
                    if state.restart.is_some() || state.decommission.is_some() {
                        let why = if state.decommission.is_some() {
                            "the agent is leaving the pool (decommission)"
                        } else {
                            "a restart is already under way"
                        };
                        state.outcomes.push(CommandResult {
                            id: command.id,
                            ok: false,
                            error: Some(why.into()),
                        });
                        continue;
                    }
                    info!(
                        command_id = command.id,
                        "restart requested: finishing runs, then restarting"
                    );
                    state.restart = Some(command.id);
                    self.stop_pulling.cancel();
                }
            }
        }
    }

    /// Called once runs are over, before the goodbye heartbeat: a decommission is then
    /// done, and its outcome rides on that heartbeat.
    pub(crate) fn finish_decommission(&self) {
        let mut state = self.state();
        if let Some(id) = state.decommission {
            state.outcomes.push(CommandResult {
                id,
                ok: true,
                error: None,
            });
        }
    }

    /// Why the agent stopped when it was not shut down: a decommission, or a restart (then
    /// it leaves the marker for the restarted agent).
    pub(crate) fn finish(&self) -> Stopped {
        if self.state().decommission.is_some() {
            return Stopped::Decommission;
        }
        let Some(id) = self.state().restart else {
            return Stopped::Shutdown;
        };
        if let Err(err) = std::fs::write(&self.marker, id.to_string()) {
            // The restart still happens; its command will show `expired` instead.
            warn!(%err, path = %self.marker.display(), "could not write the restart marker");
        }
        Stopped::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: CommandId, kind: CommandKind) -> AgentCommand {
        AgentCommand {
            id,
            command: kind,
            args: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    #[test]
    fn a_decommission_stops_pulling_and_reports_success_on_the_goodbye() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stop = CancellationToken::new();
        let commands = Commands::open(dir.path(), stop.clone());
        commands.handle(&[command(5, CommandKind::Decommission)]);
        assert!(stop.is_cancelled());
        assert!(
            commands.outcomes().is_empty(),
            "not done until the runs are over"
        );
        // Repeated by the coordinator until it has an outcome: acted on once.
        commands.handle(&[command(5, CommandKind::Decommission)]);
        // A restart meanwhile is refused; a second decommission is as good as done.
        commands.handle(&[
            command(6, CommandKind::Restart),
            command(7, CommandKind::Decommission),
        ]);
        commands.finish_decommission();
        let outcomes = commands.outcomes();
        let ok = |id| outcomes.iter().find(|o| o.id == id).map(|o| o.ok);
        assert_eq!((ok(5), ok(6), ok(7)), (Some(true), Some(false), Some(true)));
        assert_eq!(commands.finish(), Stopped::Decommission);
        assert!(!dir.path().join(RESTART_MARKER).exists());
    }
}
