//! Who belongs to the pool: scale-out groups, nodes held while a scale-out adopts them,
//! and removal by shrink.
//!
//! A node being adopted is *held*: its heartbeats are kept aside (the operation waits for
//! the first one) and its pulls get nothing, but no node record exists or changes for it
//! until the operation admits it, with the operation's group, in one step. A rolled-back
//! scale-out only lets go of the hold: nothing is left half-joined.
//!
//! Architecture Invariant: as the rest of the scheduler, no IO and no clock.

use super::{HeartbeatOutcome, Scheduler, SchedulerError};
use crate::model::{Change, CommandRecord, NodeGroup};
use crate::operations::plan::GroupMembers;
use lull_shared::{AgentState, CommandKind, HeartbeatRequest, NodeStatus};
use serde_json::Map;
use std::collections::BTreeMap;

/// Why a removed node's runs (there should be none: it was drained) are handed back.
const REMOVED_ERROR: &str = "its node was removed by a shrink; requeued";

/// A node a scale-out is adopting.
#[derive(Debug)]
pub(super) struct Held {
    operation_id: i64,
    /// The latest heartbeat and when it came.
    heartbeat: Option<(HeartbeatRequest, f64)>,
}

impl Scheduler {
    /// Holds `node_id` for `operation_id`'s scale-out. Refused when it is a live member
    /// (an `offline` or `removed` node may come back this way) or held by another one.
    pub fn hold(&mut self, node_id: &str, operation_id: i64) -> Result<(), SchedulerError> {
        if let Some(held) = self.held.get(node_id)
            && held.operation_id != operation_id
        {
            return Err(SchedulerError::AlreadyMember(format!(
                "node {node_id} is being adopted by operation {}",
                held.operation_id
            )));
        }
        if let Some(node) = self.nodes.get(node_id)
            && !matches!(
                node.record.status,
                NodeStatus::Offline | NodeStatus::Removed
            )
        {
            return Err(SchedulerError::AlreadyMember(format!(
                "node {node_id} is {} in group {}",
                node.record.status, node.record.group.id
            )));
        }
        self.held.entry(node_id.to_string()).or_insert(Held {
            operation_id,
            heartbeat: None,
        });
        Ok(())
    }

    /// Lets go of a hold (a scale-out rolled back). Its heartbeats from now on register
    /// it like any agent's, so the rollback first sends the agent back to standby.
    pub fn unhold(&mut self, node_id: &str, operation_id: i64) {
        if self
            .held
            .get(node_id)
            .is_some_and(|h| h.operation_id == operation_id)
        {
            self.held.remove(node_id);
        }
    }

    /// When a held node last heartbeated (`None`: not yet, or not held).
    pub fn held_heartbeat_at(&self, node_id: &str) -> Option<f64> {
        self.held
            .get(node_id)
            .and_then(|h| h.heartbeat.as_ref().map(|(_, at)| *at))
    }

    /// Notes a held node's heartbeat; `None` if the node is not held. The answer cancels
    /// whatever it says it runs: nothing there is ours.
    pub(super) fn held_heartbeat(
        &mut self,
        hb: &HeartbeatRequest,
        now: f64,
    ) -> Option<HeartbeatOutcome> {
        let held = self.held.get_mut(&hb.node_id)?;
        if hb.status != AgentState::Offline {
            held.heartbeat = Some((hb.clone(), now));
        }
        Some(HeartbeatOutcome {
            cancel: hb.running.clone(),
            ..HeartbeatOutcome::default()
        })
    }

    /// Admits the held nodes of one scale-out as one new group, each from its latest
    /// heartbeat. All or nothing: every node must be held by the operation and have
    /// heartbeated.
    pub fn admit(
        &mut self,
        node_ids: &[String],
        operation_id: i64,
        now: f64,
    ) -> Result<(NodeGroup, Vec<Change>), SchedulerError> {
        for node_id in node_ids {
            match self.held.get(node_id) {
                Some(h) if h.operation_id == operation_id => {
                    if h.heartbeat.is_none() {
                        return Err(SchedulerError::NoHeartbeatYet(node_id.clone()));
                    }
                }
                _ => return Err(SchedulerError::NotHeld(node_id.clone(), operation_id)),
            }
        }
        let group = NodeGroup {
            id: self.next_group_id,
            operation_id: Some(operation_id),
        };
        self.next_group_id += 1;
        let mut changes = Vec::new();
        for node_id in node_ids {
            let Some((hb, _)) = self.held.remove(node_id).and_then(|h| h.heartbeat) else {
                continue;
            };
            let out = self.register(&hb, now, Some(group));
            changes.extend(out.changes);
        }
        Ok((group, changes))
    }

    /// The pool's groups and their members (every node that is not removed), by group id.
    pub fn groups(&self) -> Vec<GroupMembers> {
        let mut groups: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for node in self.nodes.values() {
            if node.record.status == NodeStatus::Removed {
                continue;
            }
            groups
                .entry(node.record.group.id)
                .or_default()
                .push(node.record.node_id.clone());
        }
        groups
            .into_iter()
            .map(|(group_id, mut node_ids)| {
                node_ids.sort();
                GroupMembers { group_id, node_ids }
            })
            .collect()
    }

    /// Asks a node's agent to leave the pool for good (shrink); the coordinator has
    /// drained it first.
    pub fn decommission(
        &mut self,
        node_id: &str,
        now: f64,
    ) -> Result<(CommandRecord, Vec<Change>), SchedulerError> {
        self.managed_node(node_id)?;
        let mut changes = Vec::new();
        let command = self.new_command(
            node_id,
            CommandKind::Decommission,
            Map::new(),
            now,
            &mut changes,
        );
        Ok((command, changes))
    }

    /// Marks a node `removed`: no longer capacity, not offline. Anything it still held is
    /// handed back (requeued, no loss counted) and its open commands stay as they are.
    /// Removing a removed node changes nothing.
    pub fn remove_node(&mut self, node_id: &str, now: f64) -> Result<Vec<Change>, SchedulerError> {
        let status = self
            .nodes
            .get(node_id)
            .map(|n| n.record.status)
            .ok_or_else(|| SchedulerError::NodeNotFound(node_id.to_string()))?;
        if status == NodeStatus::Removed {
            return Ok(Vec::new());
        }
        let mut changes = Vec::new();
        self.stop_all_runs_on_node(node_id, REMOVED_ERROR, now, &mut changes);
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.record.status = NodeStatus::Removed;
            node.agent_state = AgentState::Offline;
            changes.push(Change::NodeSaved(node.record.clone()));
        }
        Ok(changes)
    }
}
