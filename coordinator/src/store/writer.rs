//! The single writer: every change goes through one thread that applies whatever has queued
//! up as one transaction (a group commit), then acknowledges each sender.
//!
//! The writer is an OS thread that owns its [`Committer`] (its own database connection), not
//! an async task: a commit is one blocking call there, so a change costs one hand-off to the
//! writer and one acknowledgement back, whatever the number of statements. (Through sqlx,
//! every statement, the `BEGIN` and the `COMMIT` were each a round trip to its SQLite
//! thread.) While a commit is in flight, what queues up rides in the next one.
//!
//! A change may be *deferred* ([`WriterHandle::send_deferred_to`]): it waits, up to the
//! writer's window, for a change that is not, and rides in that one's commit (a task submitted
//! by a client that waits for its end is committed with its result: one commit, not two).
//! Whoever must tell a client about a deferred change first has it committed now
//! ([`WriterHandle::hasten`]).
//!
//! Senders enqueue while holding the scheduler's lock (the send never blocks), so the durable
//! order is the scheduler's order; they await the acknowledgement after releasing the lock.
//!
//! After each successful commit, and before anyone is acknowledged, the [`CommitObserver`]
//! (the live feed) is shown the committed changes: what it publishes is durable, in commit
//! order; and the highest durable run id ([`WriterHandle::durable_runs`]) is raised to the
//! highest the commit saved.

use super::{Committer, StoreError};
use crate::model::Change;
use crate::waiters::FinishWaiters;
use lull_shared::RunId;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most changes applied in one transaction; more waits for the next commit.
const MAX_BATCH_CHANGES: usize = 16_384;

struct Batch {
    changes: Vec<Change>,
    acks: Vec<oneshot::Sender<Result<(), String>>>,
    /// May wait up to the writer's window for a batch that may not.
    deferred: bool,
}

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Batch>,
    runs: Arc<DurableRuns>,
}

/// Resolves once the changes it was issued for are durable.
pub struct Ack(Option<oneshot::Receiver<Result<(), String>>>);

impl Ack {
    /// An acknowledgement of nothing: durable already.
    pub fn durable_already() -> Ack {
        Ack(None)
    }

    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(msg)) => Err(StoreError::Commit(msg)),
                Err(_) => Err(StoreError::WriterGone),
            },
        }
    }
}

impl WriterHandle {
    /// The highest run id whose record is durable.
    pub fn durable_runs(&self) -> RunId {
        self.runs.highest()
    }

    /// Queues changes; the returned [`Ack`] resolves when they are committed.
    /// An empty list is durable already.
    pub fn send(&self, changes: Vec<Change>) -> Ack {
        if changes.is_empty() {
            return Ack(None);
        }
        let (tx, rx) = oneshot::channel();
        // If the writer is gone, the receiver reports it when awaited.
        let _ = self.tx.send(Batch {
            changes,
            acks: vec![tx],
            deferred: false,
        });
        Ack(Some(rx))
    }

    /// Queues changes for `awaiting` parties at once (the changes are one whole: a
    /// submission and the leases it allowed): each gets an [`Ack`] for the same commit.
    pub fn send_to(&self, changes: Vec<Change>, awaiting: usize) -> Vec<Ack> {
        self.queue(changes, awaiting, false)
    }

    /// As [`WriterHandle::send_to`], but the changes need not be committed now: they wait
    /// for the next change that must be (and ride in its commit), or for the writer's window
    /// to pass, whichever comes first. Nobody may be told of them before their [`Ack`]
    /// resolves; [`WriterHandle::hasten`] has them committed at once.
    pub fn send_deferred_to(&self, changes: Vec<Change>, awaiting: usize) -> Vec<Ack> {
        self.queue(changes, awaiting, true)
    }

    fn queue(&self, changes: Vec<Change>, awaiting: usize, deferred: bool) -> Vec<Ack> {
        if changes.is_empty() {
            return (0..awaiting).map(|_| Ack(None)).collect();
        }
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..awaiting).map(|_| oneshot::channel()).unzip();
        let batch = Batch {
            changes,
            acks: senders,
            deferred,
        };
        // If the writer is gone, the receivers report it when awaited.
        let _ = self.tx.send(batch);
        receivers.into_iter().map(|rx| Ack(Some(rx))).collect()
    }

    /// Resolves once `ack`'s changes are durable, having the writer commit at once whatever
    /// waits (deferred changes among it) if they are not yet.
    pub async fn hasten(&self, mut ack: Ack) -> Result<(), StoreError> {
        let Some(rx) = ack.0.as_mut() else {
            return Ok(());
        };
        match rx.try_recv() {
            Ok(outcome) => return outcome.map_err(StoreError::Commit),
            Err(oneshot::error::TryRecvError::Closed) => return Err(StoreError::WriterGone),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // Nothing to commit of its own: it ends the wait of what queued before it.
        let _ = self.tx.send(Batch {
            changes: Vec::new(),
            acks: Vec::new(),
            deferred: false,
        });
        ack.durable().await
    }
}

/// Told about every batch of changes once it is durable, in commit order, before any
/// sender is acknowledged. It runs on the writer's task: it must not block or wait.
pub trait CommitObserver: Send + Sync + 'static {
    fn committed(&self, changes: &[Change]);
}

pub struct Writer;

/// The highest run id whose record is durable: what the store held at start, then raised by
/// the writer after every commit that saved a run, before anyone is acknowledged. Runs are
/// never deleted, so it never goes down, across restarts too.
#[derive(Debug)]
struct DurableRuns(AtomicI64);

impl DurableRuns {
    /// `highest`: the highest run id the store holds.
    fn new(highest: RunId) -> DurableRuns {
        DurableRuns(AtomicI64::new(highest))
    }

    fn highest(&self) -> RunId {
        self.0.load(Ordering::Acquire)
    }

    /// Called with every committed batch.
    fn committed(&self, changes: &[Change]) {
        let saved = changes.iter().filter_map(|change| match change {
            Change::RunSaved(run) => Some(run.run_id),
            _ => None,
        });
        if let Some(highest) = saved.max() {
            self.0.fetch_max(highest, Ordering::AcqRel);
        }
    }
}

/// Resolves once the writer's thread has ended (every handle dropped, the queue drained).
pub type WriterStopped = oneshot::Receiver<()>;

impl Writer {
    /// Starts the writer's thread, which commits through `committer`. It ends once every
    /// handle is dropped and the queue is drained. `finished` is shown every commit, to wake
    /// those waiting for a task it finished (never before: what they answer must be
    /// durable). `observer` sees every committed batch. `highest_run`: the highest run id
    /// the store holds, raised by every commit that saves a higher one
    /// ([`WriterHandle::durable_runs`]). `window`: the longest a deferred change waits for
    /// its commit.
    pub fn spawn(
        committer: Box<dyn Committer>,
        finished: Arc<FinishWaiters>,
        observer: Arc<dyn CommitObserver>,
        highest_run: RunId,
        window: Duration,
    ) -> Result<(WriterHandle, WriterStopped), StoreError> {
        let runs = Arc::new(DurableRuns::new(highest_run));
        let handle_runs = runs.clone();
        let (tx, rx) = mpsc::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("lull-writer".into())
            .spawn(move || {
                // Dropped when the thread ends, however it ends: resolves `stopped`.
                let _stopped = stopped_tx;
                run(committer, rx, &finished, observer.as_ref(), &runs, window);
            })
            .map_err(StoreError::WriterThread)?;
        Ok((
            WriterHandle {
                tx,
                runs: handle_runs,
            },
            stopped,
        ))
    }
}

fn run(
    mut committer: Box<dyn Committer>,
    rx: mpsc::Receiver<Batch>,
    finished: &FinishWaiters,
    observer: &dyn CommitObserver,
    runs: &DurableRuns,
    window: Duration,
) {
    let mut changes = Vec::new();
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let arrived = Instant::now();
        let mut deferred = first.deferred;
        changes.extend(first.changes);
        acks.extend(first.acks);
        loop {
            while changes.len() < MAX_BATCH_CHANGES {
                match rx.try_recv() {
                    Ok(next) => {
                        deferred &= next.deferred;
                        changes.extend(next.changes);
                        acks.extend(next.acks);
                    }
                    Err(_) => break,
                }
            }
            if !deferred || changes.len() >= MAX_BATCH_CHANGES {
                break;
            }
            // Everything queued may wait: until something may not, or the window has passed
            // (or every handle is gone).
            let left = window.saturating_sub(arrived.elapsed());
            match rx.recv_timeout(left) {
                Ok(next) => {
                    deferred &= next.deferred;
                    changes.extend(next.changes);
                    acks.extend(next.acks);
                }
                Err(_) => break,
            }
        }
        if changes.is_empty() {
            // A nudge with nothing queued before it.
            continue;
        }
        let outcome = committer.apply(&changes).map_err(|e| {
            tracing::error!(error = %e, changes = changes.len(), "commit failed");
            e.to_string()
        });
        if outcome.is_ok() {
            observer.committed(&changes);
            runs.committed(&changes);
        }
        for ack in acks.drain(..) {
            let _ = ack.send(outcome.clone());
        }
        if outcome.is_ok() {
            finished.committed(&changes);
        }
        changes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CommandRecord;
    use lull_shared::{CommandKind, CommandStatus};
    use std::sync::Mutex;
    use std::time::Duration;

    /// What the writer did, in order: `commit N` (the command ids committed) or `seen N` (the
    /// observer shown them).
    type Log = Arc<Mutex<Vec<String>>>;

    fn ids(changes: &[Change]) -> String {
        let ids: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::CommandSaved(c) => c.command_id.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        ids.join(",")
    }

    /// Commits by logging; fails the commits whose first id is listed in `fail`.
    struct Logging {
        log: Log,
        fail: Vec<i64>,
    }

    impl Committer for Logging {
        fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            let first = match changes.first() {
                Some(Change::CommandSaved(c)) => c.command_id,
                _ => 0,
            };
            if self.fail.contains(&first) {
                return Err(StoreError::Commit(format!("disk full at {first}")));
            }
            lock(&self.log).push(format!("commit {}", ids(changes)));
            Ok(())
        }
    }

    /// Logs what it is shown; the first time, it first waits for `gate` (if any) to open.
    struct Seen {
        log: Log,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl CommitObserver for Seen {
        fn committed(&self, changes: &[Change]) {
            let gate = self
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(gate) = gate {
                let _ = gate.recv_timeout(Duration::from_secs(10));
            }
            lock(&self.log).push(format!("seen {}", ids(changes)));
        }
    }

    fn lock(log: &Log) -> std::sync::MutexGuard<'_, Vec<String>> {
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn command(command_id: i64) -> Change {
        Change::CommandSaved(CommandRecord {
            command_id,
            node_id: "n1".into(),
            kind: CommandKind::Drain,
            args: serde_json::Map::new(),
            status: CommandStatus::Pending,
            created_at: 1.0,
            delivered_at: None,
            completed_at: None,
            error: None,
        })
    }

    fn run(run_id: RunId) -> Change {
        Change::RunSaved(crate::model::RunRecord::sample(
            run_id,
            1,
            lull_shared::RunStatus::Assigned,
        ))
    }

    /// Longer than any test: a deferred change waits for another, never for the time.
    const NEVER: Duration = Duration::from_secs(3600);

    fn start(
        fail: Vec<i64>,
        gate: Option<mpsc::Receiver<()>>,
    ) -> (WriterHandle, WriterStopped, Log) {
        start_with(fail, gate, 0, NEVER)
    }

    fn start_with(
        fail: Vec<i64>,
        gate: Option<mpsc::Receiver<()>>,
        highest_run: RunId,
        window: Duration,
    ) -> (WriterHandle, WriterStopped, Log) {
        let log = Log::default();
        let (writer, stopped) = Writer::spawn(
            Box::new(Logging {
                log: log.clone(),
                fail,
            }),
            Arc::new(FinishWaiters::default()),
            Arc::new(Seen {
                log: log.clone(),
                gate: Mutex::new(gate),
            }),
            highest_run,
            window,
        )
        .expect("writer starts");
        (writer, stopped, log)
    }

    #[tokio::test]
    async fn the_highest_durable_run_rises_with_commits_that_saved_runs_and_only_with_them() {
        let (writer, _stopped, _log) = start_with(vec![1], None, 3, NEVER);
        assert_eq!(writer.durable_runs(), 3, "what the store held at start");
        let failed = writer.send(vec![command(1), run(7)]).durable().await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(writer.durable_runs(), 3, "a failed commit saved nothing");
        writer
            .send(vec![command(2), run(5), run(9)])
            .durable()
            .await
            .expect("durable");
        assert_eq!(writer.durable_runs(), 9, "raised before the sender heard");
        writer
            .send(vec![run(4), command(3)])
            .durable()
            .await
            .expect("durable");
        assert_eq!(
            writer.durable_runs(),
            9,
            "an older run saved again lowers nothing"
        );
    }

    #[tokio::test]
    async fn changes_are_committed_in_order_and_shown_before_their_sender_hears() {
        let (open, gate) = mpsc::channel();
        let (writer, _stopped, log) = start(Vec::new(), Some(gate));
        let first = writer.send(vec![command(1), command(2)]);
        let mut first = tokio::spawn(first.durable());
        // The observer is held at the first commit: its sender must not have heard yet (what
        // the feed publishes is never behind what a client was told).
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut first)
                .await
                .is_err(),
            "acknowledged before the observer was shown the commit: {:?}",
            lock(&log)
        );
        let second = writer.send(vec![command(3)]);
        open.send(()).expect("observer waiting");
        first.await.expect("joined").expect("first durable");
        second.durable().await.expect("second durable");
        let log = lock(&log).clone();
        // The second send waited for the next commit; never reordered.
        let committed: Vec<&String> = log.iter().filter(|l| l.starts_with("commit")).collect();
        assert_eq!(committed, ["commit 1,2", "commit 3"], "{log:?}");
        for (i, line) in log.iter().enumerate() {
            if let Some(batch) = line.strip_prefix("commit ") {
                assert_eq!(log.get(i + 1), Some(&format!("seen {batch}")), "{log:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_to_its_senders_and_the_writer_goes_on() {
        let (writer, _stopped, log) = start(vec![1], None);
        let failed = writer.send_to(vec![command(1)], 2);
        for ack in failed {
            match ack.durable().await {
                Err(StoreError::Commit(msg)) => assert!(msg.contains("disk full at 1"), "{msg}"),
                other => panic!("expected the commit's failure, got {other:?}"),
            }
        }
        writer
            .send(vec![command(2)])
            .durable()
            .await
            .expect("next commit");
        assert_eq!(
            *lock(&log),
            ["commit 2", "seen 2"],
            "nothing shown of a failed commit"
        );
    }

    /// The deferred change's acknowledgement, once it has stayed unresolved for a while.
    async fn still_waiting(ack: Ack) -> tokio::task::JoinHandle<Result<(), StoreError>> {
        let mut waiting = tokio::spawn(ack.durable());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut waiting)
                .await
                .is_err(),
            "a deferred change was committed alone, before its window passed"
        );
        waiting
    }

    #[tokio::test]
    async fn a_deferred_change_rides_in_the_commit_of_the_next_change_that_may_not_wait() {
        let (writer, _stopped, log) = start(Vec::new(), None);
        let deferred = writer.send_deferred_to(vec![command(1)], 1).remove(0);
        let deferred = still_waiting(deferred).await;
        writer
            .send(vec![command(2)])
            .durable()
            .await
            .expect("durable");
        deferred.await.expect("joined").expect("durable with it");
        assert_eq!(*lock(&log), ["commit 1,2", "seen 1,2"]);
    }

    #[tokio::test]
    async fn a_deferred_change_alone_is_committed_once_its_window_has_passed() {
        let (writer, _stopped, log) = start_with(Vec::new(), None, 0, Duration::from_millis(50));
        let deferred = writer.send_deferred_to(vec![command(1)], 2);
        for ack in deferred {
            tokio::time::timeout(Duration::from_secs(10), ack.durable())
                .await
                .expect("committed after its window")
                .expect("durable");
        }
        assert_eq!(*lock(&log), ["commit 1", "seen 1"]);
    }

    #[tokio::test]
    async fn hastening_a_deferred_change_commits_it_and_what_waited_with_it_at_once() {
        let (writer, _stopped, log) = start(Vec::new(), None);
        let mut first = writer.send_deferred_to(vec![command(1)], 2);
        let second = writer.send_deferred_to(vec![command(2)], 1).remove(0);
        tokio::time::timeout(Duration::from_secs(10), writer.hasten(first.remove(0)))
            .await
            .expect("committed at once")
            .expect("durable");
        // One commit for all that waited; the other party hears of it too, and hastening an
        // acknowledgement already resolved (or of nothing) answers at once.
        first.remove(0).durable().await.expect("durable");
        writer.hasten(second).await.expect("durable");
        writer
            .hasten(Ack::durable_already())
            .await
            .expect("nothing to wait for");
        writer
            .send(vec![command(3)])
            .durable()
            .await
            .expect("durable");
        assert_eq!(
            *lock(&log),
            ["commit 1,2", "seen 1,2", "commit 3", "seen 3"]
        );
    }

    #[tokio::test]
    async fn the_thread_ends_once_every_handle_is_dropped() {
        let (writer, stopped, _log) = start(Vec::new(), None);
        let other = writer.clone();
        drop(writer);
        other
            .send(vec![command(1)])
            .durable()
            .await
            .expect("still running");
        drop(other);
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the writer's thread ended")
            .ok();
    }
}
