//! Who waits for which task to finish (`GET /api/v1/tasks/{id}?wait=`), and their wake-up:
//! the writer shows [`FinishWaiters`] every committed batch, and only the waiters of a task
//! that batch finished are woken, each handed the task's final state as committed.
//!
//! A waiter therefore costs at most one store read (the task as it is when it starts
//! waiting; none for the submitter's own wait on a task still active) and no other, however
//! many other tasks finish meanwhile; the writer pays a map lookup per task it finishes,
//! nothing when nobody waits.
//!
//! Architecture Invariant: a waiter is woken only after the commit that finished its task,
//! so what it answers is durable. Knows neither axum nor SQL.

use crate::model::{Change, RunRecord, TaskState};
use lull_shared::{RunId, TaskId};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// How a task finished, as the commit that finished it holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub state: TaskState,
    /// Every run of the task as of that commit (by run id), when the commit holds them all:
    /// as many runs as the task's `attempts` (each start makes one run, and `attempts` only
    /// grows). `None` otherwise, or when no waiter asked for them.
    pub runs: Option<Vec<RunRecord>>,
}

/// One task's waiters: woken together, with the state that finished it.
#[derive(Default)]
struct Slot {
    notify: Notify,
    finished: Mutex<Option<Finished>>,
    /// A waiter will answer with the task's runs: keep those the finishing commit holds.
    wants_runs: AtomicBool,
}

#[derive(Default)]
pub struct FinishWaiters {
    /// Task → its slot and how many watches hold it (the slot goes with the last one).
    slots: Mutex<HashMap<TaskId, (Arc<Slot>, usize)>>,
}

impl FinishWaiters {
    fn slots(&self) -> MutexGuard<'_, HashMap<TaskId, (Arc<Slot>, usize)>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// As [`FinishWaiters::watch`], for a waiter that answers with the task's runs: the
    /// commit that finishes the task hands them over too when it holds them all, which
    /// spares the waiter reading them (see [`Finished::runs`]).
    pub fn watch_with_runs(self: &Arc<Self>, task_id: TaskId) -> FinishWatch {
        let watch = self.watch(task_id);
        watch.slot.wants_runs.store(true, Ordering::Relaxed);
        watch
    }

    /// Starts watching `task_id`. Take the watch *before* reading the task: a commit
    /// between the read and the wait then still wakes it.
    pub fn watch(self: &Arc<Self>, task_id: TaskId) -> FinishWatch {
        let slot = match self.slots().entry(task_id) {
            Entry::Occupied(mut held) => {
                held.get_mut().1 += 1;
                Arc::clone(&held.get().0)
            }
            Entry::Vacant(free) => Arc::clone(&free.insert((Arc::default(), 1)).0),
        };
        FinishWatch {
            waiters: Arc::clone(self),
            task_id,
            slot,
        }
    }

    /// Called by the writer after `changes` are committed: wakes the waiters of every task
    /// they finished.
    pub fn committed(&self, changes: &[Change]) {
        let finished = changes.iter().filter_map(|change| match change {
            Change::TaskUpdated(state) if state.status.is_terminal() => Some(state),
            _ => None,
        });
        let mut woken = Vec::new();
        {
            let slots = self.slots();
            if slots.is_empty() {
                return;
            }
            for state in finished {
                if let Some((slot, _)) = slots.get(&state.task_id) {
                    woken.push((Arc::clone(slot), state));
                }
            }
        }
        for (slot, state) in woken {
            let runs = if slot.wants_runs.load(Ordering::Relaxed) {
                all_runs_in(changes, state)
            } else {
                None
            };
            *slot.finished.lock().unwrap_or_else(PoisonError::into_inner) = Some(Finished {
                state: state.clone(),
                runs,
            });
            slot.notify.notify_waiters();
        }
    }

    /// Tasks watched now (for tests).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.slots().len()
    }
}

/// `state`'s task's runs in `changes`, the last record of each, by run id, if they are all of
/// its runs (as many as its `attempts`).
fn all_runs_in(changes: &[Change], state: &TaskState) -> Option<Vec<RunRecord>> {
    let mut runs: BTreeMap<RunId, &RunRecord> = BTreeMap::new();
    for change in changes {
        if let Change::RunSaved(run) = change
            && run.task_id == state.task_id
        {
            runs.insert(run.run_id, run);
        }
    }
    (runs.len() == state.attempts as usize).then(|| runs.into_values().cloned().collect())
}

/// A registration for one task's finish; dropping it lets go.
pub struct FinishWatch {
    waiters: Arc<FinishWaiters>,
    task_id: TaskId,
    slot: Arc<Slot>,
}

impl FinishWatch {
    /// Resolves with the task's final state once a commit finished it. Only a commit after
    /// the watch was taken counts; call it after reading the task and finding it unfinished.
    pub async fn finished(&self) -> TaskState {
        self.finished_with_runs().await.state
    }

    /// As [`FinishWatch::finished`], with the task's runs when the finishing commit held them
    /// all and the watch asked for them ([`FinishWaiters::watch_with_runs`]).
    pub async fn finished_with_runs(&self) -> Finished {
        loop {
            let notified = self.slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(finished) = self.take() {
                return finished;
            }
            notified.await;
        }
    }

    fn take(&self) -> Option<Finished> {
        self.slot
            .finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        let mut slots = self.waiters.slots();
        if let Entry::Occupied(mut held) = slots.entry(self.task_id) {
            held.get_mut().1 -= 1;
            if held.get().1 == 0 {
                held.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lull_shared::TaskStatus;
    use std::time::Duration;

    fn state(task_id: TaskId, status: TaskStatus) -> TaskState {
        TaskState {
            task_id,
            status,
            result: Some("done".into()),
            error: None,
            attempts: 1,
            losses: 0,
            points: 1,
            node_id: Some("n".into()),
            started_at: Some(1.0),
            completed_at: Some(2.0),
        }
    }

    #[tokio::test]
    async fn only_the_waiters_of_a_finished_task_are_woken_with_its_state() {
        let waiters = Arc::new(FinishWaiters::default());
        let one = waiters.watch(1);
        let also_one = waiters.watch(1);
        let two = waiters.watch(2);

        // Another task finishing, or task 1 only changing, wakes nobody waiting on 1.
        waiters.committed(&[
            Change::TaskUpdated(state(3, TaskStatus::Completed)),
            Change::TaskUpdated(state(1, TaskStatus::Running)),
        ]);
        assert_eq!(one.take(), None, "woken by a commit that did not finish it");

        let finished = state(1, TaskStatus::Completed);
        waiters.committed(&[Change::TaskUpdated(finished.clone())]);
        assert_eq!(one.finished().await, finished);
        assert_eq!(also_one.finished().await, finished, "every waiter of it");
        assert_eq!(two.take(), None, "task 2 has not finished");
    }

    #[tokio::test]
    async fn a_finish_committed_before_the_wait_is_not_missed() {
        let waiters = Arc::new(FinishWaiters::default());
        let watch = waiters.watch(7);
        // The commit lands between the waiter's read and its wait.
        waiters.committed(&[Change::TaskUpdated(state(7, TaskStatus::Failed))]);
        let state = tokio::time::timeout(Duration::from_secs(5), watch.finished())
            .await
            .expect("woken");
        assert_eq!(state.status, TaskStatus::Failed);
    }

    #[tokio::test]
    async fn a_finishing_commit_hands_over_the_runs_only_when_it_holds_them_all() {
        use lull_shared::RunStatus;
        let waiters = Arc::new(FinishWaiters::default());
        let (one, two, plain) = (
            waiters.watch_with_runs(1),
            waiters.watch_with_runs(2),
            waiters.watch(3),
        );
        let done = RunRecord {
            stdout: "ok\n".into(),
            completed_at: Some(2.0),
            ..RunRecord::sample(10, 1, RunStatus::Completed)
        };
        let mut retried = state(2, TaskStatus::Completed);
        retried.attempts = 2;
        waiters.committed(&[
            // Task 1's one run, saved twice in this commit (started, then done): the last
            // record counts. Another task's run is not task 1's.
            Change::RunSaved(RunRecord::sample(10, 1, RunStatus::Running)),
            Change::RunSaved(RunRecord::sample(11, 5, RunStatus::Running)),
            Change::RunSaved(done.clone()),
            Change::TaskUpdated(state(1, TaskStatus::Completed)),
            // Task 2 ran twice; only its second run is in this commit.
            Change::RunSaved(RunRecord::sample(13, 2, RunStatus::Completed)),
            Change::TaskUpdated(retried),
            Change::RunSaved(RunRecord::sample(14, 3, RunStatus::Completed)),
            Change::TaskUpdated(state(3, TaskStatus::Completed)),
        ]);
        assert_eq!(one.finished_with_runs().await.runs, Some(vec![done]));
        assert_eq!(
            two.finished_with_runs().await.runs,
            None,
            "its first run is not here"
        );
        assert_eq!(plain.finished_with_runs().await.runs, None, "not asked for");
    }

    #[test]
    fn the_last_watch_dropped_lets_go_of_its_task() {
        let waiters = Arc::new(FinishWaiters::default());
        let a = waiters.watch(1);
        let b = waiters.watch(1);
        assert_eq!(waiters.watched(), 1);
        drop(a);
        assert_eq!(waiters.watched(), 1, "b still waits");
        drop(b);
        assert_eq!(waiters.watched(), 0);
    }
}
