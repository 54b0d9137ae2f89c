//! Owner first: the machine belongs to its owner, and Lull only borrows the idle part.
//!
//! Every [`SAMPLE_PERIOD`] the agent measures the owner's load — the host's CPU and memory
//! use minus what Lull itself uses ([`meter`]) — and feeds it to [`OwnerWatch`], a pure state
//! machine that answers with a [`Decision`]: pause (stop pulling, suspend every run with
//! [`suspend`]), resume, or evict (kill the runs of a node paused too long and hand them back,
//! `Released`, so the coordinator requeues them without counting a loss).
//!
//! Architecture Invariant: [`OwnerWatch`] does no IO and reads no clock: samples and times
//! are its arguments, so every rule is unit-tested without processes or sleeps. The IO is
//! in [`meter`] and [`suspend`]; [`watch_owner_until_stopped`] is the loop that measures,
//! asks the watch and acts.
//!
//! Architecture Invariant: a paused node's runs do not lose wall-clock time: their timeout
//! runs on a [`crate::executor::PauseClock`] that stands still while the node is paused.

pub(crate) mod meter;
pub(crate) mod suspend;

use crate::agent::{Shared, StopReason};
use crate::heartbeat::send_heartbeat;
use lull_shared::RunId;
use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// After an eviction, how long the killed runs get to die before whatever is left is
/// resumed (a frozen process may need thawing to act on its kill).
const EVICT_WAIT: Duration = Duration::from_secs(5);

/// How often the owner's load is measured (and the policy consulted).
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// The owner-first thresholds (`--owner-*` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerPolicy {
    /// `false`: the node never pauses for its owner (owner load is still measured and reported).
    pub enabled: bool,
    /// The owner is busy when their CPU use exceeds this share of the whole host, in percent.
    pub cpu_percent: f64,
    /// ... or when their memory use exceeds this share of the host's memory, in percent.
    pub memory_percent: f64,
    /// How long the owner must stay busy before the node pauses.
    pub busy_for: Duration,
    /// How long the owner must stay below both thresholds before the node resumes.
    pub quiet_for: Duration,
    /// How long a pause may last before the node's runs are evicted (killed and requeued).
    pub evict_after: Duration,
}

impl OwnerPolicy {
    pub const DEFAULT_CPU_PERCENT: f64 = 50.0;
    pub const DEFAULT_MEMORY_PERCENT: f64 = 90.0;
    pub const DEFAULT_BUSY_FOR: Duration = Duration::from_secs(10);
    pub const DEFAULT_QUIET_FOR: Duration = Duration::from_secs(30);
    pub const DEFAULT_EVICT_AFTER: Duration = Duration::from_secs(600);

    /// The policy turned off: never pause.
    pub fn off() -> Self {
        OwnerPolicy {
            enabled: false,
            ..OwnerPolicy::default()
        }
    }
}

impl Default for OwnerPolicy {
    fn default() -> Self {
        OwnerPolicy {
            enabled: true,
            cpu_percent: Self::DEFAULT_CPU_PERCENT,
            memory_percent: Self::DEFAULT_MEMORY_PERCENT,
            busy_for: Self::DEFAULT_BUSY_FOR,
            quiet_for: Self::DEFAULT_QUIET_FOR,
            evict_after: Self::DEFAULT_EVICT_AFTER,
        }
    }
}

/// The owner's share of the host, in percent of all cores and of all memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OwnerLoad {
    pub cpu_percent: f64,
    pub memory_percent: f64,
}

/// What the node must do after a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Stop taking work and suspend the running runs; `reason` is shown to operators.
    Pause { reason: String },
    /// The owner is quiet again: resume the runs and take work.
    Resume,
    /// Paused past `evict_after`: kill the runs and hand them back. The node stays paused.
    Evict { reason: String },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Lending the machine; `busy_since` is when the owner's current busy spell began.
    Lending { busy_since: Option<Duration> },
    Paused {
        since: Duration,
        /// When the owner's current quiet spell began.
        quiet_since: Option<Duration>,
        evicted: bool,
    },
}

/// The owner-first policy as a state machine over (sample, time) pairs. Times are any
/// monotonic reading (the agent uses time since it started).
#[derive(Debug, Clone)]
pub struct OwnerWatch {
    policy: OwnerPolicy,
    state: State,
}

impl OwnerWatch {
    pub fn new(policy: OwnerPolicy) -> Self {
        OwnerWatch {
            policy,
            state: State::Lending { busy_since: None },
        }
    }

    pub fn is_paused(&self) -> bool {
        matches!(self.state, State::Paused { .. })
    }

    /// Why the owner counts as busy in `load`, or `None` when they are quiet.
    fn busy_because(&self, load: OwnerLoad) -> Option<String> {
        let p = &self.policy;
        if load.cpu_percent > p.cpu_percent {
            Some(format!(
                "owner CPU {:.0}% > {:.0}%",
                load.cpu_percent, p.cpu_percent
            ))
        } else if load.memory_percent > p.memory_percent {
            Some(format!(
                "owner memory {:.0}% > {:.0}%",
                load.memory_percent, p.memory_percent
            ))
        } else {
            None
        }
    }

    /// Takes one sample measured at `now`; says what to do, if anything.
    pub fn observe(&mut self, load: OwnerLoad, now: Duration) -> Option<Decision> {
        if !self.policy.enabled {
            return None;
        }
        let busy = self.busy_because(load);
        match &mut self.state {
            State::Lending { busy_since } => {
                let Some(why) = busy else {
                    *busy_since = None;
                    return None;
                };
                let since = *busy_since.get_or_insert(now);
                let held = now.saturating_sub(since);
                if held < self.policy.busy_for {
                    return None;
                }
                self.state = State::Paused {
                    since: now,
                    quiet_since: None,
                    evicted: false,
                };
                Some(Decision::Pause {
                    reason: format!("{why} for {}", whole_seconds(held)),
                })
            }
            State::Paused {
                since,
                quiet_since,
                evicted,
            } => {
                let since = *since;
                if busy.is_some() {
                    *quiet_since = None;
                } else {
                    let quiet = now.saturating_sub(*quiet_since.get_or_insert(now));
                    if quiet >= self.policy.quiet_for {
                        self.state = State::Lending { busy_since: None };
                        return Some(Decision::Resume);
                    }
                }
                let paused = now.saturating_sub(since);
                if !*evicted && paused >= self.policy.evict_after {
                    *evicted = true;
                    return Some(Decision::Evict {
                        reason: format!(
                            "evicted: the owner needed the machine (paused for {})",
                            whole_seconds(paused)
                        ),
                    });
                }
                None
            }
        }
    }
}

/// Measures the owner every [`SAMPLE_PERIOD`] until `stop` and acts on the policy's
/// decisions. Owner load is measured (and reported in heartbeats) even when the policy is off.
pub(crate) async fn watch_owner_until_stopped(shared: Arc<Shared>, stop: CancellationToken) {
    let origin = Instant::now();
    let mut meter = meter::OwnerMeter::new(std::process::id());
    let mut watch = OwnerWatch::new(shared.config.owner.clone());
    let mut ticker = tokio::time::interval_at(origin + SAMPLE_PERIOD, SAMPLE_PERIOD);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Runs stopped during this pause (a run that got its process after the pause began is
    // stopped on the next tick).
    let mut suspended: BTreeSet<RunId> = BTreeSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // A scan of every process in /proc (a few milliseconds on a busy host): off the
        // agent's one runtime thread, which starts runs and posts their results.
        let measured = tokio::task::spawn_blocking(move || {
            let load = meter.measure();
            (meter, load)
        })
        .await;
        let load = match measured {
            Ok((back, load)) => {
                meter = back;
                load
            }
            Err(err) => {
                warn!(error = %err, "measuring the owner's load failed; measuring anew");
                meter = meter::OwnerMeter::new(std::process::id());
                continue;
            }
        };
        *shared
            .owner_load
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(load);
        debug!(
            owner_cpu_percent = load.cpu_percent,
            owner_memory_percent = load.memory_percent,
            "owner load measured"
        );
        let decision = watch.observe(load, origin.elapsed());
        let node_id = shared.node_id.as_str();
        match decision {
            Some(Decision::Pause { reason }) => {
                warn!(node_id, reason, "the owner is busy: node paused");
                *shared
                    .paused_because
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(reason);
                shared.pause_switch.pause();
                suspend_new_runs(&shared, &mut suspended);
                announce(&shared).await;
            }
            Some(Decision::Resume) => {
                resume_runs(&shared, &mut suspended);
                *shared
                    .paused_because
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                shared.pause_switch.resume();
                info!(node_id, "the owner is quiet: node resumed");
                announce(&shared).await;
            }
            Some(Decision::Evict { reason }) => {
                warn!(
                    node_id,
                    reason,
                    runs = shared.runs.len(),
                    "evicting the node's runs"
                );
                shared.runs.stop_all(StopReason::Evicted(reason));
                if tokio::time::timeout(EVICT_WAIT, shared.runs.wait_empty())
                    .await
                    .is_err()
                {
                    warn!(
                        node_id,
                        runs = shared.runs.len(),
                        "evicted runs still here; resuming them so that they can die"
                    );
                    resume_runs(&shared, &mut suspended);
                }
            }
            None => {}
        }
        if watch.is_paused() {
            suspend_new_runs(&shared, &mut suspended);
        }
    }
}

/// Stops every run not stopped yet in this pause.
fn suspend_new_runs(shared: &Shared, suspended: &mut BTreeSet<RunId>) {
    for (run_id, task_id, pid) in shared.runs.processes() {
        if suspended.contains(&run_id) {
            continue;
        }
        match suspend::suspend(pid) {
            Ok(how) => {
                info!(
                    node_id = shared.node_id,
                    task_id, run_id, pid, how, "run suspended"
                );
                suspended.insert(run_id);
            }
            Err(err) => {
                warn!(node_id = shared.node_id, task_id, run_id, pid, %err, "could not suspend run")
            }
        }
    }
}

/// Lets every run stopped in this pause go on.
fn resume_runs(shared: &Shared, suspended: &mut BTreeSet<RunId>) {
    for (run_id, task_id, pid) in shared.runs.processes() {
        if !suspended.remove(&run_id) {
            continue;
        }
        match suspend::resume(pid) {
            Ok(how) => info!(
                node_id = shared.node_id,
                task_id, run_id, pid, how, "run resumed"
            ),
            Err(err) => {
                warn!(node_id = shared.node_id, task_id, run_id, pid, %err, "could not resume run")
            }
        }
    }
    // Runs that ended meanwhile need nothing.
    suspended.clear();
}

/// Tells the coordinator at once (best effort: the next heartbeat says it anyway).
async fn announce(shared: &Shared) {
    let status = shared.current_state();
    match tokio::time::timeout(SAMPLE_PERIOD, send_heartbeat(shared, status)).await {
        Ok(Ok(_)) => debug!(?status, "heartbeat sent"),
        Ok(Err(err)) => debug!(?status, %err, "could not tell the coordinator yet"),
        Err(_) => debug!(?status, "the coordinator did not answer in time"),
    }
}

/// `10 s`, `0.5 s`: as the reason strings print durations.
fn whole_seconds(duration: Duration) -> String {
    format!("{} s", crate::executor::format_seconds(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OwnerPolicy {
        OwnerPolicy {
            enabled: true,
            cpu_percent: 50.0,
            memory_percent: 90.0,
            busy_for: Duration::from_secs(10),
            quiet_for: Duration::from_secs(5),
            evict_after: Duration::from_secs(60),
        }
    }

    fn cpu(percent: f64) -> OwnerLoad {
        OwnerLoad {
            cpu_percent: percent,
            memory_percent: 10.0,
        }
    }

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Feeds one sample a second from `from` to `to` (inclusive); the decisions made.
    fn feed(watch: &mut OwnerWatch, load: OwnerLoad, from: u64, to: u64) -> Vec<(u64, Decision)> {
        (from..=to)
            .filter_map(|t| watch.observe(load, at(t)).map(|d| (t, d)))
            .collect()
    }

    #[test]
    fn a_busy_owner_pauses_the_node_once_it_has_held_long_enough() {
        let mut watch = OwnerWatch::new(policy());
        assert_eq!(feed(&mut watch, cpu(87.0), 0, 9), vec![]);
        assert_eq!(
            watch.observe(cpu(87.0), at(10)),
            Some(Decision::Pause {
                reason: "owner CPU 87% > 50% for 10 s".into()
            })
        );
        assert!(watch.is_paused());
        assert_eq!(feed(&mut watch, cpu(87.0), 11, 20), vec![]);
    }

    #[test]
    fn a_short_spike_does_not_pause() {
        let mut watch = OwnerWatch::new(policy());
        assert_eq!(feed(&mut watch, cpu(95.0), 0, 9), vec![]);
        assert_eq!(watch.observe(cpu(20.0), at(10)), None);
        // The next spell starts from scratch.
        assert_eq!(feed(&mut watch, cpu(95.0), 11, 20), vec![]);
        assert!(!watch.is_paused());
    }

    #[test]
    fn exactly_at_the_threshold_is_not_busy() {
        let mut watch = OwnerWatch::new(policy());
        assert_eq!(feed(&mut watch, cpu(50.0), 0, 100), vec![]);
    }

    #[test]
    fn memory_alone_can_pause() {
        let mut watch = OwnerWatch::new(policy());
        let heavy = OwnerLoad {
            cpu_percent: 0.0,
            memory_percent: 95.0,
        };
        assert_eq!(
            feed(&mut watch, heavy, 0, 10),
            vec![(
                10,
                Decision::Pause {
                    reason: "owner memory 95% > 90% for 10 s".into()
                }
            )]
        );
    }

    #[test]
    fn the_node_resumes_after_the_owner_has_been_quiet_long_enough() {
        let mut watch = OwnerWatch::new(policy());
        feed(&mut watch, cpu(90.0), 0, 10);
        assert!(watch.is_paused());
        // Quiet for 4 s, busy again: the quiet spell starts over.
        assert_eq!(feed(&mut watch, cpu(5.0), 11, 14), vec![]);
        assert_eq!(watch.observe(cpu(90.0), at(15)), None);
        assert_eq!(feed(&mut watch, cpu(5.0), 16, 20), vec![]);
        assert_eq!(watch.observe(cpu(5.0), at(21)), Some(Decision::Resume));
        assert!(!watch.is_paused());
        // And it takes a full busy spell to pause again.
        assert_eq!(feed(&mut watch, cpu(90.0), 22, 31), vec![]);
        assert!(matches!(
            watch.observe(cpu(90.0), at(32)),
            Some(Decision::Pause { .. })
        ));
    }

    #[test]
    fn a_pause_past_the_limit_evicts_once_and_stays_paused() {
        let mut watch = OwnerWatch::new(policy());
        feed(&mut watch, cpu(90.0), 0, 10);
        assert_eq!(
            feed(&mut watch, cpu(90.0), 11, 200),
            vec![(
                70,
                Decision::Evict {
                    reason: "evicted: the owner needed the machine (paused for 60 s)".into()
                }
            )]
        );
        assert!(watch.is_paused());
        assert_eq!(
            feed(&mut watch, cpu(1.0), 201, 206),
            vec![(206, Decision::Resume)]
        );
    }

    #[test]
    fn an_owner_quiet_before_the_limit_is_never_evicted() {
        let mut watch = OwnerWatch::new(policy());
        feed(&mut watch, cpu(90.0), 0, 10);
        let decisions = feed(&mut watch, cpu(1.0), 11, 200);
        assert_eq!(decisions, vec![(16, Decision::Resume)]);
    }

    #[test]
    fn a_policy_turned_off_never_decides() {
        let mut watch = OwnerWatch::new(OwnerPolicy::off());
        assert_eq!(feed(&mut watch, cpu(100.0), 0, 10_000), vec![]);
    }

    #[test]
    fn uneven_sample_times_count_real_time_held() {
        let mut watch = OwnerWatch::new(policy());
        assert_eq!(watch.observe(cpu(80.0), at(0)), None);
        assert_eq!(watch.observe(cpu(80.0), at(7)), None);
        assert_eq!(
            watch.observe(cpu(80.0), at(13)),
            Some(Decision::Pause {
                reason: "owner CPU 80% > 50% for 13 s".into()
            })
        );
    }
}
