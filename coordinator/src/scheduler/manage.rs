//! Node management (seed 004): drain and undrain, operator metadata, and the commands that
//! reach agents in their heartbeat answers.
//!
//! A drain is the coordinator's business: it stops placing work on the node at once and,
//! at the deadline, ends what still runs there (`released`, requeued without counting
//! against `max_attempts`) and tells the agent to kill it. Every drain, undrain and restart
//! is also a [`CommandRecord`] delivered to the agent, whose outcome the agent reports.
//!
//! Architecture Invariant: as the rest of the scheduler, no IO and no clock; `now` is given.

use super::{NodeEntry, Scheduler, SchedulerError};
use crate::model::{Change, CommandRecord, Drain};
use lull_shared::{
    AgentCommand, CommandId, CommandKind, CommandResult, CommandStatus, NodeStatus, RunId,
    RunStatus,
};
use serde_json::{Map, Value};

/// Why a run is stopped when its node's drain deadline passes.
const DRAIN_DEADLINE_ERROR: &str = "stopped by the node's drain deadline; requeued";
/// Why a run that was still waiting for a slot is handed back when its node is drained.
const DRAIN_WAITING_ERROR: &str = "its node is draining and it had not started; requeued";

impl Scheduler {
    /// The node, or `NodeNotFound` (the seed's `"Node X not found"`).
    pub(super) fn managed_node(&self, node_id: &str) -> Result<&NodeEntry, SchedulerError> {
        let node = self
            .nodes
            .get(node_id)
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()))?;
        if node.record.status == NodeStatus::Removed {
            return Err(SchedulerError::NodeRemoved(node_id.to_string()));
        }
        Ok(node)
    }

    /// Drains a node: no new runs from now on; runs still waiting there for a slot are
    /// handed back at once; the running ones may finish until `now + timeout` (no deadline
    /// when `timeout` is `None`; `0` stops them now). The node is `draining` while runs
    /// remain, then `drained`. Draining a draining node sets the new deadline.
    pub fn drain(
        &mut self,
        node_id: &str,
        timeout: Option<f64>,
        now: f64,
    ) -> Result<(CommandRecord, Vec<Change>), SchedulerError> {
        self.managed_node(node_id)?;
        let mut changes = Vec::new();
        let deadline = timeout.map(|t| now + t);
        let waiting = match self.nodes.get_mut(node_id) {
            Some(node) => {
                let requested_at = node.record.drain.map_or(now, |d| d.requested_at);
                node.record.drain = Some(Drain {
                    requested_at,
                    deadline,
                });
                node.refresh_busy();
                changes.push(Change::NodeSaved(node.record.clone()));
                self.nodes
                    .get(node_id)
                    .map(|n| self.waiting_run_ids(n))
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        for run_id in waiting {
            self.stop_run_on_node(node_id, run_id, DRAIN_WAITING_ERROR, now, &mut changes);
        }
        if deadline.is_some_and(|d| d <= now) {
            self.stop_all_runs_on_node(node_id, DRAIN_DEADLINE_ERROR, now, &mut changes);
        }
        let mut args = Map::new();
        if let Some(t) = timeout {
            args.insert("timeout".into(), Value::from(t));
        }
        let command = self.new_command(node_id, CommandKind::Drain, args, now, &mut changes);
        Ok((command, changes))
    }

    /// Returns a drained (or draining) node to service: `idle` or `busy` by its runs. A
    /// node that is not drained is left as it is (the command is still recorded).
    pub fn undrain(
        &mut self,
        node_id: &str,
        now: f64,
    ) -> Result<(CommandRecord, Vec<Change>), SchedulerError> {
        self.managed_node(node_id)?;
        let mut changes = Vec::new();
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.record.drain.take().is_some()
        {
            node.refresh_busy();
            changes.push(Change::NodeSaved(node.record.clone()));
        }
        let command =
            self.new_command(node_id, CommandKind::Undrain, Map::new(), now, &mut changes);
        Ok((command, changes))
    }

    /// Asks the node's agent to restart (it finishes its runs first, bounded by its
    /// shutdown grace). Nothing changes here until the agent acts: it says `draining`, leaves
    /// and rejoins with the same id.
    pub fn restart(
        &mut self,
        node_id: &str,
        now: f64,
    ) -> Result<(CommandRecord, Vec<Change>), SchedulerError> {
        self.managed_node(node_id)?;
        let mut changes = Vec::new();
        let command =
            self.new_command(node_id, CommandKind::Restart, Map::new(), now, &mut changes);
        Ok((command, changes))
    }

    /// The node's operator metadata.
    pub fn meta(&self, node_id: &str) -> Result<Map<String, Value>, SchedulerError> {
        self.nodes
            .get(node_id)
            .map(|n| n.record.meta.clone())
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()))
    }

    /// Replaces the node's metadata; `constraints.meta` match against it from the next
    /// placement on. Heartbeats never change it.
    pub fn set_meta(
        &mut self,
        node_id: &str,
        meta: Map<String, Value>,
    ) -> Result<Vec<Change>, SchedulerError> {
        let node = self
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()))?;
        if node.record.meta == meta {
            return Ok(Vec::new());
        }
        node.record.meta = meta;
        Ok(vec![Change::NodeSaved(node.record.clone())])
    }

    pub(super) fn new_command(
        &mut self,
        node_id: &str,
        kind: CommandKind,
        args: Map<String, Value>,
        now: f64,
        changes: &mut Vec<Change>,
    ) -> CommandRecord {
        let command_id = self.next_command_id;
        self.next_command_id += 1;
        let command = CommandRecord {
            command_id,
            node_id: node_id.to_string(),
            kind,
            args,
            status: CommandStatus::Pending,
            created_at: now,
            delivered_at: None,
            completed_at: None,
            error: None,
        };
        changes.push(Change::CommandSaved(command.clone()));
        self.commands.insert(command_id, command.clone());
        command
    }

    /// The commands a heartbeat answer carries: every one of the node's commands without
    /// an outcome, oldest first; `pending` ones become `delivered`.
    pub(super) fn deliver_commands(
        &mut self,
        node_id: &str,
        now: f64,
        changes: &mut Vec<Change>,
    ) -> Vec<AgentCommand> {
        let mut out = Vec::new();
        for command in self.commands.values_mut() {
            if command.node_id != node_id {
                continue;
            }
            if command.status == CommandStatus::Pending {
                command.status = CommandStatus::Delivered;
                command.delivered_at = Some(now);
                changes.push(Change::CommandSaved(command.clone()));
            }
            out.push(AgentCommand {
                id: command.command_id,
                command: command.kind,
                args: Value::Object(command.args.clone()),
            });
        }
        out
    }

    /// Records the outcomes a node reports. Outcomes for commands that are not that node's,
    /// or already finished (a repeat, or after expiry), are ignored.
    pub(super) fn command_results(
        &mut self,
        node_id: &str,
        results: &[CommandResult],
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        for result in results {
            if self
                .commands
                .get(&result.id)
                .is_none_or(|c| c.node_id != node_id)
            {
                continue;
            }
            let Some(mut command) = self.commands.remove(&result.id) else {
                continue;
            };
            command.delivered_at.get_or_insert(now);
            command.completed_at = Some(now);
            if result.ok {
                command.status = CommandStatus::Succeeded;
            } else {
                command.status = CommandStatus::Failed;
                command.error = Some(
                    result
                        .error
                        .clone()
                        .unwrap_or_else(|| "the agent gave no reason".into()),
                );
            }
            changes.push(Change::CommandSaved(command));
        }
    }

    /// Commands with no outcome `command_ttl` seconds after they were issued expire.
    pub(super) fn expire_commands(&mut self, now: f64, changes: &mut Vec<Change>) {
        let ttl = self.config.command_ttl;
        let expired: Vec<CommandId> = self
            .commands
            .values()
            .filter(|c| now - c.created_at > ttl)
            .map(|c| c.command_id)
            .collect();
        for id in expired {
            if let Some(mut command) = self.commands.remove(&id) {
                command.error = Some(match command.status {
                    CommandStatus::Pending => {
                        format!(
                            "never delivered: node {} did not heartbeat within {ttl} s",
                            command.node_id
                        )
                    }
                    _ => format!(
                        "delivered, but node {} reported no outcome within {ttl} s",
                        command.node_id
                    ),
                });
                command.status = CommandStatus::Expired;
                command.completed_at = Some(now);
                changes.push(Change::CommandSaved(command));
            }
        }
    }

    /// Stops what still runs on nodes whose drain deadline has passed.
    pub(super) fn enforce_drain_deadlines(&mut self, now: f64, changes: &mut Vec<Change>) {
        let due: Vec<String> = self
            .nodes
            .values()
            .filter(|n| !n.runs.is_empty())
            .filter(|n| {
                n.record
                    .drain
                    .and_then(|d| d.deadline)
                    .is_some_and(|d| d <= now)
            })
            .map(|n| n.record.node_id.clone())
            .collect();
        for node_id in due {
            tracing::info!(node_id, "drain deadline passed; stopping the node's runs");
            self.stop_all_runs_on_node(&node_id, DRAIN_DEADLINE_ERROR, now, changes);
        }
    }

    pub(super) fn stop_all_runs_on_node(
        &mut self,
        node_id: &str,
        why: &str,
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        let runs: Vec<RunId> = self
            .nodes
            .get(node_id)
            .map(|n| n.runs.iter().copied().collect())
            .unwrap_or_default();
        for run_id in runs {
            self.stop_run_on_node(node_id, run_id, why, now, changes);
        }
    }

    /// Ends a run the node holds as `released` (not the code's fault, not a lost node: it
    /// does not count against `max_attempts`), requeues its task, and has the node kill it.
    /// A result the node still sends for it is refused as stale.
    fn stop_run_on_node(
        &mut self,
        node_id: &str,
        run_id: RunId,
        why: &str,
        now: f64,
        changes: &mut Vec<Change>,
    ) {
        let Some(task_id) = self.runs.get(&run_id).map(|r| r.record.task_id) else {
            return;
        };
        self.end_run(
            run_id,
            RunStatus::Released,
            Some(why.to_string()),
            now,
            changes,
        );
        self.settle(task_id, now, changes);
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.to_cancel.insert(run_id);
        }
    }
}
