//! The single writer: every change goes through one thread that applies whatever has queued
//! up as one transaction (a group commit), then acknowledges each sender.
//!
//! The writer is an OS thread that owns its [`Committer`] (its own database connection), not
//! an async task: a commit is one blocking call there, so a change costs one hand-off to the
//! writer and one acknowledgement back, whatever the number of statements. (Through sqlx,
//! every statement, the `BEGIN` and the `COMMIT` were each a round trip to its SQLite
//! thread.) While a commit is in flight, what queues up rides in the next one.
//!
//! Senders enqueue while holding the scheduler's lock (the send never blocks), so the durable
//! order is the scheduler's order; they await the acknowledgement after releasing the lock.
//!
//! After each successful commit, and before anyone is acknowledged, the [`CommitObserver`]
//! (the live feed) is shown the committed changes: what it publishes is durable, in commit
//! order.

use super::{Committer, StoreError};
use crate::model::Change;
use crate::waiters::FinishWaiters;
use std::sync::Arc;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Most changes applied in one transaction; more waits for the next commit.
const MAX_BATCH_CHANGES: usize = 16_384;

struct Batch {
    changes: Vec<Change>,
    acks: Vec<oneshot::Sender<Result<(), String>>>,
}

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Batch>,
}

/// Resolves once the changes it was issued for are durable.
pub struct Ack(Option<oneshot::Receiver<Result<(), String>>>);

impl Ack {
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
        });
        Ack(Some(rx))
    }

    /// Queues changes for `awaiting` parties at once (the changes are one whole: a
    /// submission and the leases it allowed): each gets an [`Ack`] for the same commit.
    pub fn send_to(&self, changes: Vec<Change>, awaiting: usize) -> Vec<Ack> {
        if changes.is_empty() {
            return (0..awaiting).map(|_| Ack(None)).collect();
        }
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..awaiting).map(|_| oneshot::channel()).unzip();
        let batch = Batch {
            changes,
            acks: senders,
        };
        // If the writer is gone, the receivers report it when awaited.
        let _ = self.tx.send(batch);
        receivers.into_iter().map(|rx| Ack(Some(rx))).collect()
    }
}

/// Told about every batch of changes once it is durable, in commit order, before any
/// sender is acknowledged. It runs on the writer's task: it must not block or wait.
pub trait CommitObserver: Send + Sync + 'static {
    fn committed(&self, changes: &[Change]);
}

pub struct Writer;

/// Resolves once the writer's thread has ended (every handle dropped, the queue drained).
pub type WriterStopped = oneshot::Receiver<()>;

impl Writer {
    /// Starts the writer's thread, which commits through `committer`. It ends once every
    /// handle is dropped and the queue is drained. `finished` is shown every commit, to wake
    /// those waiting for a task it finished (never before: what they answer must be
    /// durable). `observer` sees every committed batch.
    pub fn spawn(
        committer: Box<dyn Committer>,
        finished: Arc<FinishWaiters>,
        observer: Arc<dyn CommitObserver>,
    ) -> Result<(WriterHandle, WriterStopped), StoreError> {
        let (tx, rx) = mpsc::channel();
        let (stopped_tx, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("lull-writer".into())
            .spawn(move || {
                // Dropped when the thread ends, however it ends: resolves `stopped`.
                let _stopped = stopped_tx;
                run(committer, rx, &finished, observer.as_ref());
            })
            .map_err(StoreError::WriterThread)?;
        Ok((WriterHandle { tx }, stopped))
    }
}

fn run(
    mut committer: Box<dyn Committer>,
    rx: mpsc::Receiver<Batch>,
    finished: &FinishWaiters,
    observer: &dyn CommitObserver,
) {
    let mut changes = Vec::new();
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        changes.extend(first.changes);
        acks.extend(first.acks);
        while changes.len() < MAX_BATCH_CHANGES {
            match rx.try_recv() {
                Ok(next) => {
                    changes.extend(next.changes);
                    acks.extend(next.acks);
                }
                Err(_) => break,
            }
        }
        let outcome = committer.apply(&changes).map_err(|e| {
            tracing::error!(error = %e, changes = changes.len(), "commit failed");
            e.to_string()
        });
        if outcome.is_ok() {
            observer.committed(&changes);
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
