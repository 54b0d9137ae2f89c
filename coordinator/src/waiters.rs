//! Who waits for which task to finish (`GET /api/v1/tasks/{id}?wait=`), and their wake-up:
//! the writer shows [`FinishWaiters`] every committed batch, and only the waiters of a task
//! that batch finished are woken, each handed the task's final state as committed.
//!
//! A waiter therefore costs one store read (the task as it is when it starts waiting) and no
//! other, however many other tasks finish meanwhile; the writer pays a map lookup per task
//! it finishes, nothing when nobody waits.
//!
//! Architecture Invariant: a waiter is woken only after the commit that finished its task,
//! so what it answers is durable. Knows neither axum nor SQL.

use crate::model::{Change, TaskState};
use lull_shared::TaskId;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// One task's waiters: woken together, with the state that finished it.
#[derive(Default)]
struct Slot {
    notify: Notify,
    finished: Mutex<Option<TaskState>>,
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
            *slot.finished.lock().unwrap_or_else(PoisonError::into_inner) = Some(state.clone());
            slot.notify.notify_waiters();
        }
    }

    /// Tasks watched now (for tests).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.slots().len()
    }
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
        loop {
            let notified = self.slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(state) = self.take() {
                return state;
            }
            notified.await;
        }
    }

    fn take(&self) -> Option<TaskState> {
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
