//! What the agent keeps of a run while an executor runs it: which process is the run
//! ([`RunProcess`], so that the owner-first policy can suspend it), and a wall clock that
//! stands still while the node is paused ([`PauseClock`], [`RunTimer`]).
//!
//! Architecture Invariant: executors only *report* a run's process and *read* the pause
//! clock; suspending, resuming and deciding when are the agent's (`crate::owner`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The agent's hold on one run: given to the executor inside its [`super::Job`].
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    pub process: RunProcess,
    pub clock: PauseClock,
}

/// The host pid of the process that *is* the run (the cold executor's watcher, the zygote
/// run's PID 1): its cgroup, or else its process tree, holds everything the run started.
/// Set by the executor once the process exists, cleared once it is reaped (so that a
/// recycled pid is never signalled).
#[derive(Debug, Clone, Default)]
pub struct RunProcess(Arc<Mutex<Option<u32>>>);

impl RunProcess {
    pub fn set(&self, pid: u32) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(pid);
    }

    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn pid(&self) -> Option<u32> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Node-wide: whether the node is paused now, and for how long it has been paused in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PauseState {
    pub paused_since: Option<Instant>,
    /// Every finished pause, summed.
    pub paused_total: Duration,
}

impl PauseState {
    /// Time paused in all up to `now`, the current pause included.
    fn paused_until(&self, now: Instant) -> Duration {
        self.paused_total
            + self
                .paused_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// The reading side of the node's pause state. The default never pauses (its sender is
/// gone), for executors used without an agent.
#[derive(Debug, Clone)]
pub struct PauseClock(watch::Receiver<PauseState>);

impl Default for PauseClock {
    fn default() -> Self {
        PauseClock(watch::channel(PauseState::default()).1)
    }
}

impl PauseClock {
    /// A clock and the switch that pauses and resumes it.
    pub fn new() -> (PauseSwitch, PauseClock) {
        let (sender, receiver) = watch::channel(PauseState::default());
        (PauseSwitch(sender), PauseClock(receiver))
    }

    pub fn is_paused(&self) -> bool {
        self.0.borrow().paused_since.is_some()
    }

    /// Waits until the node is not paused (at once when it is not).
    pub async fn wait_unpaused(&mut self) {
        // An error means the switch is gone: nothing will pause again.
        let _ = self.0.wait_for(|state| state.paused_since.is_none()).await;
    }

    /// A timer of `limit` that starts now and does not run while the node is paused.
    pub fn timer(&self, limit: Duration) -> RunTimer {
        let now = Instant::now();
        RunTimer {
            clock: self.0.clone(),
            started: now,
            paused_before: self.0.borrow().paused_until(now),
            limit,
        }
    }
}

/// The agent's side of a [`PauseClock`].
#[derive(Debug)]
pub struct PauseSwitch(watch::Sender<PauseState>);

impl PauseSwitch {
    pub fn pause(&self) {
        self.0.send_if_modified(|state| {
            if state.paused_since.is_some() {
                return false;
            }
            state.paused_since = Some(Instant::now());
            true
        });
    }

    pub fn resume(&self) {
        self.0
            .send_if_modified(|state| match state.paused_since.take() {
                Some(since) => {
                    state.paused_total += since.elapsed();
                    true
                }
                None => false,
            });
    }
}

/// A run's wall-clock limit, not counting the time the node was paused during the run.
#[derive(Debug, Clone)]
pub struct RunTimer {
    clock: watch::Receiver<PauseState>,
    started: Instant,
    paused_before: Duration,
    limit: Duration,
}

impl RunTimer {
    /// Completes once `limit` of unpaused time has passed since the timer started. Holds no
    /// state across calls, so it can be a `select!` branch that is rebuilt every iteration.
    pub async fn expired(&mut self) {
        loop {
            let state = *self.clock.borrow_and_update();
            if state.paused_since.is_none() {
                let paused = state
                    .paused_until(Instant::now())
                    .saturating_sub(self.paused_before);
                let deadline = self.started + self.limit + paused;
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return,
                    changed = self.clock.changed() => if changed.is_err() {
                        // Nothing will pause any more: the deadline stands.
                        tokio::time::sleep_until(deadline).await;
                        return;
                    },
                }
            } else if self.clock.changed().await.is_err() {
                // Paused by a switch that is gone: never resumes, never expires.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_timer_expires_after_its_limit_without_pauses() {
        let clock = PauseClock::default();
        let mut timer = clock.timer(Duration::from_secs(5));
        let start = Instant::now();
        timer.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn time_paused_does_not_count_against_the_limit() {
        let (switch, clock) = PauseClock::new();
        let mut timer = clock.timer(Duration::from_secs(5));
        let start = Instant::now();
        let pausing = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            switch.pause();
            tokio::time::sleep(Duration::from_secs(10)).await;
            switch.resume();
        };
        let ((), ()) = tokio::join!(timer.expired(), pausing);
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_before_the_run_started_do_not_extend_it() {
        let (switch, clock) = PauseClock::new();
        switch.pause();
        tokio::time::sleep(Duration::from_secs(30)).await;
        switch.resume();
        let mut timer = clock.timer(Duration::from_secs(5));
        let start = Instant::now();
        timer.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
