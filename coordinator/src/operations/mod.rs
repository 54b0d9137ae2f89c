//! Operations (seed 002's DAGs): scale-out and shrink as durable records that move through
//! a fixed list of stages, and the drivers that carry them out.
//!
//! - [`OperationRecord`] and its transitions (this file) are pure: a stage starts, succeeds
//!   or fails, an operation is retried or interrupted by a restart. Every transition is
//!   checked and saved through the writer as a [`crate::model::Change::OperationSaved`],
//!   so the live feed publishes `operation_updated` after it is durable.
//! - [`plan`] holds the other decisions, also pure: which answers from a standby agent mean
//!   what, and which shrink numbers are valid.
//! - `driver` (async, IO) runs each stage: it talks to standby agents over HTTP (`standby`)
//!   and to the scheduler through the engine, and records each outcome here.
//!
//! Architecture Invariant: this file and `plan` do no IO and read no clock; time is given.

pub mod driver;
pub mod plan;
mod standby;

pub use driver::{Operations, OperationsConfig};

use serde_json::{Map, Value};

pub type OperationId = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    ScaleOut,
    Shrink,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::ScaleOut => "scale_out",
            OperationKind::Shrink => "shrink",
        }
    }

    pub fn parse(s: &str) -> Option<OperationKind> {
        [OperationKind::ScaleOut, OperationKind::Shrink]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    /// The DAG's `name`.
    pub fn title(self) -> &'static str {
        match self {
            OperationKind::ScaleOut => "Cluster scale out",
            OperationKind::Shrink => "Cluster shrink",
        }
    }

    /// The stages, in order (each DAG node's `name`).
    pub fn stages(self) -> &'static [&'static str] {
        match self {
            OperationKind::ScaleOut => &SCALE_OUT_STAGES,
            OperationKind::Shrink => &SHRINK_STAGES,
        }
    }
}

pub const SCALE_OUT_STAGES: [&str; 6] = [
    "check_agent_reachable",
    "authenticate",
    "push_config",
    "start_executor",
    "wait_first_heartbeat",
    "mark_node_ready",
];

pub const SHRINK_STAGES: [&str; 4] = ["select_nodes", "drain", "decommission", "mark_removed"];

/// The state of an operation and of each of its stages (seed 002's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationState {
    Ready,
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Ready => "READY",
            OperationState::Running => "RUNNING",
            OperationState::Succeeded => "SUCCEEDED",
            OperationState::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<OperationState> {
        [
            OperationState::Ready,
            OperationState::Running,
            OperationState::Succeeded,
            OperationState::Failed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, OperationState::Succeeded | OperationState::Failed)
    }
}

/// One stage (a DAG node).
#[derive(Debug, Clone, PartialEq)]
pub struct StageRecord {
    pub name: String,
    pub state: OperationState,
    /// What it did, or why it failed.
    pub message: Option<String>,
    pub start_time: Option<f64>,
    pub end_time: Option<f64>,
}

/// An operation as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    pub operation_id: OperationId,
    pub kind: OperationKind,
    pub state: OperationState,
    /// How it was last set going: `RUN`, or `RETRY` for a resumed failed shrink.
    pub operator: String,
    /// The current stage, 1-based (the failed one, once failed; the last, once succeeded).
    pub stage: usize,
    pub stages: Vec<StageRecord>,
    pub created_at: f64,
    pub start_time: Option<f64>,
    pub end_time: Option<f64>,
    /// The request and what the stages learnt (node ids, key id, group, error).
    pub additional_data: Map<String, Value>,
}

/// A transition that does not apply to the operation as it is: a bug in a driver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("operation {operation_id} is {state}: it cannot {what}")]
pub struct TransitionError {
    pub operation_id: OperationId,
    pub state: &'static str,
    pub what: &'static str,
}

impl OperationRecord {
    /// A new operation, `READY`, every stage `READY`.
    pub fn new(
        operation_id: OperationId,
        kind: OperationKind,
        additional_data: Map<String, Value>,
        now: f64,
    ) -> OperationRecord {
        OperationRecord {
            operation_id,
            kind,
            state: OperationState::Ready,
            operator: "RUN".into(),
            stage: 1,
            stages: kind
                .stages()
                .iter()
                .map(|name| StageRecord {
                    name: (*name).to_string(),
                    state: OperationState::Ready,
                    message: None,
                    start_time: None,
                    end_time: None,
                })
                .collect(),
            created_at: now,
            start_time: None,
            end_time: None,
            additional_data,
        }
    }

    pub fn max_stage(&self) -> usize {
        self.stages.len()
    }

    /// The name of the current stage.
    pub fn stage_name(&self) -> &str {
        self.stages
            .get(self.stage.saturating_sub(1))
            .map_or("", |s| s.name.as_str())
    }

    fn refuse(&self, what: &'static str) -> TransitionError {
        TransitionError {
            operation_id: self.operation_id,
            state: self.state.as_str(),
            what,
        }
    }

    fn current(&mut self) -> Option<&mut StageRecord> {
        let index = self.stage.checked_sub(1)?;
        self.stages.get_mut(index)
    }

    /// `READY` → `RUNNING`: its first stage starts.
    pub fn start(&mut self, now: f64) -> Result<(), TransitionError> {
        if self.state != OperationState::Ready {
            return Err(self.refuse("start"));
        }
        self.state = OperationState::Running;
        self.start_time = Some(now);
        self.stage = 1;
        if let Some(stage) = self.current() {
            stage.state = OperationState::Running;
            stage.start_time = Some(now);
        }
        Ok(())
    }

    /// The current stage succeeded: the next one starts, or after the last the operation
    /// has `SUCCEEDED`.
    pub fn stage_succeeded(
        &mut self,
        message: impl Into<String>,
        now: f64,
    ) -> Result<(), TransitionError> {
        if self.state != OperationState::Running {
            return Err(self.refuse("finish a stage"));
        }
        let message = message.into();
        if let Some(stage) = self.current() {
            stage.state = OperationState::Succeeded;
            stage.message = (!message.is_empty()).then_some(message);
            stage.end_time = Some(now);
        }
        if self.stage >= self.max_stage() {
            self.state = OperationState::Succeeded;
            self.end_time = Some(now);
            return Ok(());
        }
        self.stage += 1;
        if let Some(stage) = self.current() {
            stage.state = OperationState::Running;
            stage.message = None;
            stage.start_time = Some(now);
            stage.end_time = None;
        }
        Ok(())
    }

    /// The current stage failed: so has the operation. `additional_data.error` says which
    /// stage and why.
    pub fn stage_failed(
        &mut self,
        reason: impl Into<String>,
        now: f64,
    ) -> Result<(), TransitionError> {
        if self.state != OperationState::Running {
            return Err(self.refuse("fail a stage"));
        }
        let reason = reason.into();
        let name = self.stage_name().to_string();
        if let Some(stage) = self.current() {
            stage.state = OperationState::Failed;
            stage.message = Some(reason.clone());
            stage.end_time = Some(now);
        }
        self.state = OperationState::Failed;
        self.end_time = Some(now);
        self.additional_data.insert(
            "error".into(),
            Value::String(format!("stage {name} failed: {reason}")),
        );
        Ok(())
    }

    /// Adds to the failed stage's message what the rollback did.
    pub fn note_rollback(&mut self, what: &str) {
        if self.state != OperationState::Failed {
            return;
        }
        if let Some(stage) = self.current() {
            let message = stage.message.take().unwrap_or_default();
            stage.message = Some(format!("{message}; rolled back: {what}"));
        }
        self.additional_data
            .insert("rollback".into(), Value::String(what.to_string()));
    }

    /// A `FAILED` operation runs again from the stage that failed (`operator` `RETRY`).
    pub fn retry(&mut self, now: f64) -> Result<(), TransitionError> {
        if self.state != OperationState::Failed {
            return Err(self.refuse("be retried"));
        }
        self.state = OperationState::Running;
        self.operator = "RETRY".into();
        self.end_time = None;
        self.additional_data.remove("error");
        if let Some(stage) = self.current() {
            stage.state = OperationState::Running;
            stage.message = None;
            stage.start_time = Some(now);
            stage.end_time = None;
        }
        Ok(())
    }

    /// The coordinator restarted while this operation was unfinished: what happens to it.
    pub fn after_restart(&self) -> AfterRestart {
        match (self.state, self.kind) {
            (OperationState::Succeeded | OperationState::Failed, _) => AfterRestart::Nothing,
            // A shrink's stages can all be carried out again: the drain is stored with the
            // node, commands with the scheduler, and every wait looks at the nodes anew.
            (_, OperationKind::Shrink) => AfterRestart::Resume,
            // A scale-out's session with the agent died with the process: it fails and is
            // rolled back (the agent is asked back to standby).
            (_, OperationKind::ScaleOut) => AfterRestart::FailAndRollBack,
        }
    }

    /// The node ids recorded in `additional_data.node_ids`.
    pub fn node_ids(&self) -> Vec<String> {
        string_list(self.additional_data.get("node_ids"))
    }
}

/// What a restarted coordinator does with an unfinished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRestart {
    Nothing,
    Resume,
    FailAndRollBack,
}

pub(crate) fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OperationKind) -> OperationRecord {
        OperationRecord::new(7, kind, Map::new(), 100.0)
    }

    #[test]
    fn a_new_operation_is_ready_with_every_stage_ready() {
        let o = op(OperationKind::ScaleOut);
        assert_eq!(o.state, OperationState::Ready);
        assert_eq!((o.stage, o.max_stage()), (1, 6));
        assert!(o.stages.iter().all(|s| s.state == OperationState::Ready));
        assert_eq!(o.stage_name(), "check_agent_reachable");
        assert_eq!(op(OperationKind::Shrink).max_stage(), 4);
    }

    #[test]
    fn stages_run_in_order_to_success() {
        let mut o = op(OperationKind::Shrink);
        o.start(101.0).expect("starts");
        assert_eq!(o.state, OperationState::Running);
        assert_eq!(o.stages[0].state, OperationState::Running);
        for (i, t) in [102.0, 103.0, 104.0].into_iter().enumerate() {
            o.stage_succeeded(format!("stage {i} done"), t)
                .expect("stage ends");
            assert_eq!(o.stage, i + 2);
            assert_eq!(o.stages[i].state, OperationState::Succeeded);
            assert_eq!(o.stages[i + 1].state, OperationState::Running);
            assert_eq!(o.stages[i + 1].start_time, Some(t));
        }
        o.stage_succeeded("", 105.0).expect("last stage ends");
        assert_eq!(o.state, OperationState::Succeeded);
        assert_eq!(o.stage, 4);
        assert_eq!(o.end_time, Some(105.0));
        assert_eq!(o.stages[3].message, None);
        // Finished: nothing more may happen to it.
        assert!(o.stage_succeeded("again", 106.0).is_err());
        assert!(o.stage_failed("late", 106.0).is_err());
        assert!(o.retry(106.0).is_err());
    }

    #[test]
    fn a_failure_names_the_stage_and_a_retry_resumes_there() {
        let mut o = op(OperationKind::Shrink);
        assert!(o.stage_succeeded("not started", 100.0).is_err());
        o.start(101.0).expect("starts");
        o.stage_succeeded("picked n1", 102.0).expect("select");
        o.stage_failed("node n1 still runs task 4", 103.0)
            .expect("drain fails");
        assert_eq!(o.state, OperationState::Failed);
        assert_eq!(o.stage, 2);
        assert_eq!(o.stages[1].state, OperationState::Failed);
        assert_eq!(
            o.additional_data["error"],
            "stage drain failed: node n1 still runs task 4"
        );
        assert_eq!(o.stages[2].state, OperationState::Ready);
        o.retry(110.0).expect("retry");
        assert_eq!(o.state, OperationState::Running);
        assert_eq!(o.operator, "RETRY");
        assert_eq!(o.stage, 2);
        assert_eq!(o.stages[1].state, OperationState::Running);
        assert_eq!(o.stages[0].state, OperationState::Succeeded);
        assert!(!o.additional_data.contains_key("error"));
        assert_eq!(o.end_time, None);
    }

    #[test]
    fn rollback_notes_go_on_the_failed_stage() {
        let mut o = op(OperationKind::ScaleOut);
        o.note_rollback("ignored while not failed");
        assert!(!o.additional_data.contains_key("rollback"));
        o.start(1.0).expect("starts");
        o.stage_failed("agent unreachable", 2.0).expect("fails");
        o.note_rollback("nothing to undo");
        assert_eq!(
            o.stages[0].message.as_deref(),
            Some("agent unreachable; rolled back: nothing to undo")
        );
    }

    #[test]
    fn after_a_restart_shrinks_resume_and_scale_outs_fail() {
        let mut s = op(OperationKind::Shrink);
        s.start(1.0).expect("starts");
        assert_eq!(s.after_restart(), AfterRestart::Resume);
        let mut o = op(OperationKind::ScaleOut);
        assert_eq!(o.after_restart(), AfterRestart::FailAndRollBack);
        o.start(1.0).expect("starts");
        assert_eq!(o.after_restart(), AfterRestart::FailAndRollBack);
        o.stage_failed("x", 2.0).expect("fails");
        assert_eq!(o.after_restart(), AfterRestart::Nothing);
    }
}
