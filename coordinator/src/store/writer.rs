//! The single writer: every change goes through one task that applies whatever has queued
//! up as one transaction (a group commit), then acknowledges each sender.
//!
//! Senders enqueue while holding the scheduler's lock (the send never blocks), so the durable
//! order is the scheduler's order; they await the acknowledgement after releasing the lock.
//!
//! After each successful commit, and before anyone is acknowledged, the [`CommitObserver`]
//! (the live feed) is shown the committed changes: what it publishes is durable, in commit
//! order.

use super::{Store, StoreError};
use crate::model::Change;
use crate::waiters::FinishWaiters;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most changes applied in one transaction; more waits for the next commit.
const MAX_BATCH_CHANGES: usize = 16_384;

struct Batch {
    changes: Vec<Change>,
    acks: Vec<oneshot::Sender<Result<(), String>>>,
}

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Batch>,
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

impl Writer {
    /// Starts the writer task. It ends once every handle is dropped and the queue is drained.
    /// `finished` is shown every commit, to wake those waiting for a task it finished (never
    /// before: what they answer must be durable). `observer` sees every committed batch.
    pub fn spawn(
        store: Arc<dyn Store>,
        finished: Arc<FinishWaiters>,
        observer: Arc<dyn CommitObserver>,
    ) -> (WriterHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(store, rx, finished, observer));
        (WriterHandle { tx }, task)
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    finished: Arc<FinishWaiters>,
    observer: Arc<dyn CommitObserver>,
) {
    let mut changes = Vec::new();
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
        changes.extend(first.changes);
        acks.extend(first.acks);
        // Let the tasks this change just woke run first: what they queue now rides in the
        // same commit. (A submission leases to waiting pulls itself, in its own batch.)
        tokio::task::yield_now().await;
        while changes.len() < MAX_BATCH_CHANGES {
            match rx.try_recv() {
                Ok(next) => {
                    changes.extend(next.changes);
                    acks.extend(next.acks);
                }
                Err(_) => break,
            }
        }
        let outcome = store.apply(&changes).await.map_err(|e| {
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
