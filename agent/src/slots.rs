//! The node's capacity, as the agent enforces it: runs start in the order they were leased,
//! each when its CPU and memory fit beside the runs already going (or when nothing else is
//! running). The coordinator may lease a node a few runs more than it can start at once
//! (`--prefetch`); those wait here, so that a slot does not sit idle for the round trip
//! that refills it.

use lull_shared::{NodeResources, Resources, RunId};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// Tolerance for floating-point capacity sums (as the coordinator's).
const EPSILON: f64 = 1e-9;

#[derive(Debug, Default)]
struct State {
    cpu_used: f64,
    memory_used: f64,
    running: usize,
    /// Runs waiting to start, in lease order.
    waiting: VecDeque<RunId>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Slots {
    capacity: NodeResources,
    state: Mutex<State>,
    changed: Notify,
}

/// A started run's share of the capacity, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    resources: Resources,
}

impl Slots {
    pub(crate) fn new(capacity: NodeResources) -> Arc<Slots> {
        Arc::new(Slots {
            capacity,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under every panic point (plain field updates).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `run_id` may start (every run leased before it has started, and it fits),
    /// and takes its share. Dropping the future before then gives up its place in line.
    pub(crate) async fn acquire(self: &Arc<Self>, run_id: RunId, resources: Resources) -> Slot {
        let mut place = Place {
            slots: self,
            run_id,
            queued: false,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so that a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut state = self.state();
                if !place.queued {
                    state.waiting.push_back(run_id);
                    place.queued = true;
                }
                let first = state.waiting.front() == Some(&run_id);
                let fits = state.running == 0
                    || (state.cpu_used + resources.cpu <= self.capacity.cpu_cores + EPSILON
                        && state.memory_used + resources.memory
                            <= self.capacity.memory_mb + EPSILON);
                if first && fits {
                    state.waiting.pop_front();
                    state.cpu_used += resources.cpu;
                    state.memory_used += resources.memory;
                    state.running += 1;
                    place.queued = false;
                    drop(state);
                    // The next in line may fit too.
                    self.changed.notify_waiters();
                    return Slot {
                        slots: Arc::clone(self),
                        resources,
                    };
                }
            }
            notified.await;
        }
    }

    /// The runs waiting to start, in lease order.
    pub(crate) fn waiting_runs(&self) -> Vec<RunId> {
        self.state().waiting.iter().copied().collect()
    }

    /// How many runs hold a share now, and how many wait for one.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        let state = self.state();
        (state.running, state.waiting.len())
    }
}

/// A run's place in line while it waits; leaving the line (cancelled while waiting) lets
/// the runs behind it move up.
struct Place<'a> {
    slots: &'a Slots,
    run_id: RunId,
    queued: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.slots.state().waiting.retain(|id| *id != self.run_id);
            self.slots.changed.notify_waiters();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut state = self.slots.state();
            state.running = state.running.saturating_sub(1);
            if state.running == 0 {
                // No drift from float sums.
                state.cpu_used = 0.0;
                state.memory_used = 0.0;
            } else {
                state.cpu_used = (state.cpu_used - self.resources.cpu).max(0.0);
                state.memory_used = (state.memory_used - self.resources.memory).max(0.0);
            }
        }
        self.slots.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    fn one_cpu() -> Resources {
        Resources {
            cpu: 1.0,
            memory: 100.0,
        }
    }

    fn node(cpus: f64) -> Arc<Slots> {
        Slots::new(NodeResources {
            cpu_cores: cpus,
            memory_mb: 1000.0,
        })
    }

    const A_WHILE: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn runs_start_in_lease_order_as_capacity_frees() {
        let slots = node(2.0);
        let a = slots.acquire(1, one_cpu()).await;
        let _b = slots.acquire(2, one_cpu()).await;
        let third = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire(3, one_cpu()).await }
        });
        let fourth = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire(4, one_cpu()).await }
        });
        // Both wait: the node is full.
        tokio::task::yield_now().await;
        assert!(
            timeout(A_WHILE, async {
                while slots.waiting_runs().len() < 2 {
                    tokio::task::yield_now().await
                }
            })
            .await
            .is_ok()
        );
        assert!(!third.is_finished() && !fourth.is_finished());

        assert_eq!(slots.occupancy(), (2, 2), "two run, two wait");

        drop(a);
        let _c = third.await.expect("run 3 starts when run 1 ends");
        assert_eq!(slots.waiting_runs().len(), 1, "run 4 still waits");
        assert!(!fourth.is_finished());
        assert_eq!(slots.occupancy(), (2, 1), "run 3 took run 1's share");
    }

    #[tokio::test]
    async fn a_run_bigger_than_the_node_starts_when_it_is_alone() {
        let slots = node(1.0);
        let big = Resources {
            cpu: 4.0,
            memory: 100.0,
        };
        let _only = timeout(A_WHILE, slots.acquire(1, big))
            .await
            .expect("starts at once on an idle node");
    }

    #[tokio::test]
    async fn giving_up_a_place_lets_the_next_run_start() {
        let slots = node(1.0);
        let running = slots.acquire(1, one_cpu()).await;
        let gave_up = timeout(A_WHILE, slots.acquire(2, one_cpu())).await;
        assert!(gave_up.is_err(), "run 2 had to wait");
        assert_eq!(
            slots.waiting_runs().len(),
            0,
            "and left the line when dropped"
        );
        drop(running);
        let _next = timeout(A_WHILE, slots.acquire(3, one_cpu()))
            .await
            .expect("run 3 is first in line now");
    }
}
