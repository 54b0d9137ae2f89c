//! The pending queue, grouped by shape so that placement looks at a handful of classes
//! rather than every waiting task.
//!
//! Tasks with the same resources and constraints form a class; within a class, and across
//! the classes that fit a node, the oldest task (lowest id) goes first. A requeued task keeps
//! its place because order is by id, not by arrival in the queue. A task with several
//! points waits here while any of its points has no run: one entry per task, taken once per
//! point.

use crate::model::TaskSpec;
use lull_shared::{Constraints, Resources, TaskId};
use std::collections::{BTreeSet, HashMap};

/// Identifies a class: the exact bits of the resources plus the constraints' canonical JSON.
type ClassKey = (u64, u64, String);

#[derive(Debug)]
struct Class {
    resources: Resources,
    constraints: Constraints,
    tasks: BTreeSet<TaskId>,
}

#[derive(Debug, Default)]
pub struct PendingQueue {
    classes: HashMap<ClassKey, Class>,
    /// Which class each queued task is in, for removal.
    member_of: HashMap<TaskId, ClassKey>,
}

fn class_key(spec: &TaskSpec) -> ClassKey {
    // BTreeMap-backed meta serialises in a stable order, so equal constraints give equal keys.
    let constraints = if spec.constraints.is_empty() {
        String::new()
    } else {
        format!(
            "{:?}|{:?}|{}",
            spec.constraints.zone,
            spec.constraints.node_type,
            serde_json::Value::Object(
                spec.constraints
                    .meta
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            )
        )
    };
    (
        spec.resources.cpu.to_bits(),
        spec.resources.memory.to_bits(),
        constraints,
    )
}

impl PendingQueue {
    pub fn len(&self) -> usize {
        self.member_of.len()
    }

    /// Adds a task (idempotent).
    pub fn push(&mut self, task_id: TaskId, spec: &TaskSpec) {
        if self.member_of.contains_key(&task_id) {
            return;
        }
        let key = class_key(spec);
        self.classes
            .entry(key.clone())
            .or_insert_with(|| Class {
                resources: spec.resources,
                constraints: spec.constraints.clone(),
                tasks: BTreeSet::new(),
            })
            .tasks
            .insert(task_id);
        self.member_of.insert(task_id, key);
    }

    pub fn remove(&mut self, task_id: TaskId) {
        let Some(key) = self.member_of.remove(&task_id) else {
            return;
        };
        if let Some(class) = self.classes.get_mut(&key) {
            class.tasks.remove(&task_id);
            if class.tasks.is_empty() {
                self.classes.remove(&key);
            }
        }
    }

    /// How many queued tasks are older than `task_id`.
    pub fn ahead_of(&self, task_id: TaskId) -> usize {
        self.classes
            .values()
            .map(|c| c.tasks.range(..task_id).count())
            .sum()
    }

    /// Removes and returns the oldest task that `eligible` accepts among the classes `fits`
    /// accepts. (`eligible` turns down a multi-point task on a node that already runs one
    /// of its points; it accepts nearly every task, so a class is rarely walked far.)
    pub fn pop_first(
        &mut self,
        fits: impl Fn(&Resources, &Constraints) -> bool,
        eligible: impl Fn(TaskId) -> bool,
    ) -> Option<TaskId> {
        let task_id = self
            .classes
            .values()
            .filter(|c| fits(&c.resources, &c.constraints))
            .filter_map(|c| c.tasks.iter().copied().find(|id| eligible(*id)))
            .min()?;
        self.remove(task_id);
        Some(task_id)
    }
}
