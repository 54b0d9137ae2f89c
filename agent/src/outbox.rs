//! The outbox: every result waits here until the coordinator acknowledged or refused it.
//! A result is posted from memory at once (on a busy node after at most a short linger, see
//! [`Refill::hold`]); it is also written to
//! `state_dir/outbox/{run_id}.json` (and from then on survives an agent restart) as soon as
//! its delivery is in doubt: a post failed, a post took longer than [`SAVE_AFTER`], or the
//! agent is stopping. While the coordinator is unreachable, results are written the moment
//! they are made. A result its first post settles, the usual case, is never written: the
//! file write, rename and delete cost the agent about a fifth of its CPU per task. The ids
//! of the waiting results are reported in every heartbeat (`finished`) so that the
//! coordinator does not count those runs as lost. A copy of each saved result stays in
//! memory (up to [`MAX_KEPT_BYTES`] in all) for the post, so that delivering it does not
//! read back the file just written.
//!
//! An agent killed between a run's end and its result's acknowledgement (a few
//! milliseconds; at most [`SAVE_AFTER`] while the coordinator answers) loses that result:
//! the coordinator counts the run as lost and runs the task again. That is a rerun, never a
//! lost task or a double completion, as for an agent killed during the run itself.
//!
//! Architecture Invariant: a result leaves the outbox only on an answer that settles it
//! (2xx, or a 4xx that can never turn into a success); never because posting failed.

use crate::AgentError;
use crate::client::{BatchDelivery, CallError, CoordinatorClient, Delivery};
use crate::node_id::write_replacing;
use crate::retry::{Backoff, FailureLog};
use lull_shared::PullResponse;
use lull_shared::{RunId, RunReport};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Most results one post carries.
const MAX_BATCH_REPORTS: usize = 256;
/// About the most bytes of results one post carries (the coordinator's default body limit
/// is 8 MiB; a result larger than this goes alone).
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;
const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Most bytes of saved results the outbox also keeps in memory, so that posting a result
/// does not read back the file it just wrote; past this, results are read from their files
/// when posted (a backlog while the coordinator is away stays on disk).
const MAX_KEPT_BYTES: usize = 8 * 1024 * 1024;

/// How long a post may keep the results it carries only in memory before they are saved to
/// their files: past this, the coordinator is slow enough that a result may wait long.
const SAVE_AFTER: Duration = Duration::from_millis(200);

/// A result held in memory, with about how many bytes it adds to a post.
type Kept = (Arc<RunReport>, usize);

/// Where a waiting result lives.
#[derive(Debug)]
enum Pending {
    /// Only in memory so far: saved (becoming `OnDisk`) once its delivery is in doubt (see
    /// the module's documentation); never written when its first post settles it.
    Unsaved(Arc<RunReport>),
    /// In its file; with a copy in memory (and that copy's size) while the outbox keeps
    /// fewer than [`MAX_KEPT_BYTES`] of them.
    OnDisk(Option<Kept>),
    /// Writing it failed (disk full, read-only): it is kept in memory and still delivered,
    /// it just would not survive an agent restart.
    InMemory(Arc<RunReport>),
}

/// New work asked for with the results: the capacity a result frees is refilled by the
/// answer to its post (`POST /internal/results?node_id=&max=`), leased in the results'
/// commit, instead of by a second round trip through the long-poll.
pub(crate) trait Refill: Send + Sync {
    /// This node and at most how many runs to ask for with the next post; `None` while the
    /// agent takes no work (paused for its owner, stopping).
    fn wanted(&self) -> Option<(String, usize)>;
    /// Runs to start and runs to cancel that came with a post's answer.
    fn pulled(&self, answer: PullResponse);
    /// Whether the `waiting` results may wait a little for more before they are posted (at
    /// most the outbox's linger): yes while the node has more runs queued for a slot than
    /// running (a post now would start nothing sooner, and one later still comes back before
    /// a slot runs dry) and fewer results wait than runs execute. Under load results then go
    /// a few to a post, and the coordinator makes one commit for them.
    fn hold(&self, _waiting: usize) -> bool {
        false
    }
}

#[derive(Debug)]
pub(crate) struct Outbox {
    dir: PathBuf,
    pending: watch::Sender<BTreeMap<RunId, Pending>>,
    /// Bytes of the copies kept in memory of saved results (at most [`MAX_KEPT_BYTES`]).
    kept_bytes: AtomicUsize,
    /// The last post did not settle its results (the coordinator is unreachable or
    /// failing): new results are saved as they are stored, until a post settles again.
    save_at_once: AtomicBool,
}

impl Outbox {
    /// Opens (creating it if needed) the outbox in `dir` and picks up what a previous run of
    /// the agent left there.
    pub(crate) async fn open(dir: PathBuf) -> Result<Outbox, AgentError> {
        let scan_dir = dir.clone();
        let scanned = tokio::task::spawn_blocking(move || scan(&scan_dir))
            .await
            .map_err(io::Error::other)
            .and_then(|scanned| scanned)
            .map_err(|source| AgentError::Outbox {
                path: dir.clone(),
                source,
            })?;
        let pending = scanned
            .into_iter()
            .map(|run_id| (run_id, Pending::OnDisk(None)))
            .collect();
        Ok(Outbox {
            dir,
            pending: watch::Sender::new(pending),
            kept_bytes: AtomicUsize::new(0),
            save_at_once: AtomicBool::new(false),
        })
    }

    /// The runs whose result waits for an acknowledgement.
    pub(crate) fn ids(&self) -> Vec<RunId> {
        self.pending.borrow().keys().copied().collect()
    }

    pub(crate) fn contains(&self, run_id: RunId) -> bool {
        self.pending.borrow().contains_key(&run_id)
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Queues `report` for delivery: in memory, or saved at once while the coordinator is
    /// unreachable (see the module's documentation).
    pub(crate) async fn store(&self, report: RunReport) {
        let run_id = report.run_id;
        let report = Arc::new(report);
        let entry = if self.save_at_once.load(Ordering::Relaxed) {
            let mut saved = self.write(vec![Arc::clone(&report)]).await;
            self.entry_for(
                report,
                saved
                    .pop()
                    .unwrap_or_else(|| Err(io::Error::other("not written"))),
            )
        } else {
            Pending::Unsaved(report)
        };
        self.pending.send_modify(|pending| {
            if let Some(Pending::OnDisk(Some((_, size)))) = pending.insert(run_id, entry) {
                self.kept_bytes.fetch_sub(size, Ordering::Relaxed);
            }
        });
    }

    /// Writes every result still only in memory to its file. Not fsync'd: the file survives
    /// the agent being killed (it is in the kernel's page cache), and what a power loss takes
    /// away costs a rerun, never a double completion — the coordinator never saw the
    /// result, so it counts the run as lost and retries the task.
    ///
    /// Only the delivery task and the agent's shutdown (after that task ended) call this,
    /// and only they remove results: no result can be settled while it is being written.
    pub(crate) async fn save_unsaved(&self) {
        let unsaved: Vec<Arc<RunReport>> = self
            .pending
            .borrow()
            .values()
            .filter_map(|entry| match entry {
                Pending::Unsaved(report) => Some(Arc::clone(report)),
                _ => None,
            })
            .collect();
        if unsaved.is_empty() {
            return;
        }
        let written = self.write(unsaved.clone()).await;
        let entries: Vec<(RunId, Pending)> = unsaved
            .into_iter()
            .zip(written)
            .map(|(report, written)| (report.run_id, self.entry_for(report, written)))
            .collect();
        self.pending.send_modify(|pending| {
            for (run_id, entry) in entries {
                if let Some(waiting) = pending.get_mut(&run_id) {
                    *waiting = entry;
                }
            }
        });
    }

    /// Writes `reports` to their files (temp file, rename), in one blocking task: the size
    /// of each file, or why it could not be written.
    async fn write(&self, reports: Vec<Arc<RunReport>>) -> Vec<io::Result<usize>> {
        let dir = self.dir.clone();
        let n = reports.len();
        tokio::task::spawn_blocking(move || {
            reports
                .iter()
                .map(|report| {
                    let json = serde_json::to_string(&**report).map_err(io::Error::other)?;
                    write_replacing(&dir, &file_name(report.run_id), &json, false)
                        .map(|()| json.len())
                })
                .collect()
        })
        .await
        .unwrap_or_else(|err| {
            let message = err.to_string();
            (0..n)
                .map(|_| Err(io::Error::other(message.clone())))
                .collect()
        })
    }

    /// What waits for a result once `written` to its file (or not): on disk, with a copy in
    /// memory while there is room for it, or only in memory if it could not be written.
    fn entry_for(&self, report: Arc<RunReport>, written: io::Result<usize>) -> Pending {
        match written {
            Ok(size) => {
                let room =
                    self.kept_bytes
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kept| {
                            (kept + size <= MAX_KEPT_BYTES).then_some(kept + size)
                        });
                Pending::OnDisk(room.is_ok().then_some((report, size)))
            }
            Err(err) => {
                error!(run_id = report.run_id, %err, dir = %self.dir.display(), "could not save the result to the outbox; keeping it in memory");
                Pending::InMemory(report)
            }
        }
    }

    /// Resolves once nothing waits in the outbox.
    pub(crate) async fn wait_empty(&self) {
        let mut pending = self.pending.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = pending.wait_for(BTreeMap::is_empty).await;
    }

    /// Posts waiting results, oldest run first, until `stop`: deletes each one once settled,
    /// retries with backoff while the coordinator is unreachable or failing.
    ///
    /// Results that are waiting together go together: up to [`MAX_BATCH_REPORTS`] (and about
    /// [`MAX_BATCH_BYTES`]) in one `POST /internal/results`, which the coordinator records in
    /// one commit and answers report by report. While one post is in flight, new results
    /// queue up for the next, so batches grow with load and a lone result goes at once.
    ///
    /// Each post asks for new runs as [`Refill`] says, and hands it what comes back. While
    /// [`Refill::hold`] says so, results wait for more, at most `linger` after the first of
    /// them was seen (zero: never).
    pub(crate) async fn deliver_until_stopped(
        &self,
        client: &CoordinatorClient,
        refill: &dyn Refill,
        linger: Duration,
        stop: CancellationToken,
    ) {
        let mut changes = self.pending.subscribe();
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let mut failures = FailureLog::new("posting results");
        // Until when the results waiting now may wait for more.
        let mut held_until: Option<tokio::time::Instant> = None;
        loop {
            let waiting: Vec<(RunId, Option<Kept>)> = changes
                .borrow_and_update()
                .iter()
                .take(MAX_BATCH_REPORTS)
                .map(|(run_id, entry)| match entry {
                    Pending::OnDisk(None) => (*run_id, None),
                    Pending::OnDisk(Some((report, size))) => {
                        (*run_id, Some((Arc::clone(report), *size)))
                    }
                    Pending::Unsaved(report) | Pending::InMemory(report) => (
                        *run_id,
                        Some((Arc::clone(report), approximate_size(report))),
                    ),
                })
                .collect();
            if waiting.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                continue;
            }
            if !linger.is_zero() && refill.hold(waiting.len()) {
                let until = *held_until.get_or_insert_with(|| tokio::time::Instant::now() + linger);
                if tokio::time::Instant::now() < until {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        changed = changes.changed() => if changed.is_err() { return },
                        () = tokio::time::sleep_until(until) => {}
                    }
                    continue;
                }
            }
            held_until = None;

            let mut batch = Vec::with_capacity(waiting.len());
            let mut sizes = Vec::with_capacity(waiting.len());
            for (run_id, in_memory) in waiting {
                let (report, size) = match in_memory {
                    Some(kept) => kept,
                    None => match self.read(run_id).await {
                        Ok((report, size)) => (Arc::new(report), size),
                        Err(err) => {
                            self.quarantine(run_id, &err).await;
                            continue;
                        }
                    },
                };
                sizes.push(size);
                if batch_len(&sizes, MAX_BATCH_BYTES) < sizes.len() {
                    // Over the budget: it leads the next post instead. Reading stops here,
                    // so large results never sit in memory more than one post's worth.
                    break;
                }
                batch.push(report);
            }
            if batch.is_empty() {
                continue;
            }

            let delivered = deliver(client, &batch, refill.wanted());
            tokio::pin!(delivered);
            let mut save_by = Some(tokio::time::Instant::now() + SAVE_AFTER);
            let (deliveries, pulled) = loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    answer = &mut delivered => break answer,
                    () = sleep_until(save_by) => {
                        // A slow answer: what it carries may wait long yet.
                        save_by = None;
                        self.save_unsaved().await;
                    }
                }
            };
            // Leased to us already: start them before the bookkeeping below.
            if !pulled.tasks.is_empty() || !pulled.cancel.is_empty() {
                refill.pulled(pulled);
            }
            let mut retry = false;
            for (report, delivery) in batch.iter().zip(deliveries) {
                let (task_id, run_id) = (report.task_id, report.run_id);
                match delivery {
                    Delivery::Acknowledged => {
                        info!(task_id, run_id, outcome = ?report.outcome, "result acknowledged");
                        self.remove(run_id).await;
                    }
                    Delivery::Refused { status, detail } => {
                        warn!(task_id, run_id, %status, detail, "result refused: the run is no longer ours; dropping it");
                        self.remove(run_id).await;
                    }
                    Delivery::Rejected { status, detail } => {
                        error!(task_id, run_id, %status, detail, "result rejected as invalid; dropping it");
                        self.remove(run_id).await;
                    }
                    Delivery::Retry(err) => {
                        if !retry {
                            failures.failed(&err);
                        }
                        retry = true;
                    }
                }
            }
            if retry {
                // The coordinator is unreachable or failing: keep what waits on disk, and
                // save new results as they come until a post settles again.
                self.save_at_once.store(true, Ordering::Relaxed);
                self.save_unsaved().await;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            } else {
                self.save_at_once.store(false, Ordering::Relaxed);
                failures.succeeded();
                backoff.reset();
            }
        }
    }

    /// A saved result and the size of its file (about what it adds to a post).
    async fn read(&self, run_id: RunId) -> io::Result<(RunReport, usize)> {
        let bytes = tokio::fs::read(self.path(run_id)).await?;
        let report = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
        Ok((report, bytes.len()))
    }

    /// A result file that cannot be read is set aside (renamed `.corrupt`) for an operator
    /// and forgotten: retrying it would block every result behind it forever.
    async fn quarantine(&self, run_id: RunId, err: &io::Error) {
        let path = self.path(run_id);
        let aside = path.with_extension("json.corrupt");
        error!(run_id, %err, path = %path.display(), "unreadable result in the outbox; setting it aside");
        if let Err(err) = tokio::fs::rename(&path, &aside).await
            && err.kind() != io::ErrorKind::NotFound
        {
            error!(run_id, %err, "could not set the unreadable result aside");
        }
        self.forget(run_id);
    }

    async fn remove(&self, run_id: RunId) {
        let unsaved = matches!(
            self.pending.borrow().get(&run_id),
            Some(Pending::Unsaved(_))
        );
        if !unsaved {
            match tokio::fs::remove_file(self.path(run_id)).await {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    error!(run_id, %err, "could not delete a settled result from the outbox")
                }
            }
        }
        self.forget(run_id);
    }

    fn forget(&self, run_id: RunId) {
        self.pending.send_modify(|pending| {
            if let Some(Pending::OnDisk(Some((_, size)))) = pending.remove(&run_id) {
                self.kept_bytes.fetch_sub(size, Ordering::Relaxed);
            }
        });
    }

    fn path(&self, run_id: RunId) -> PathBuf {
        self.dir.join(file_name(run_id))
    }
}

/// Posts results together (`POST /internal/results`, asking for `refill`), or one alone
/// (`POST /internal/result`) when no new runs are wanted; a coordinator that does not take
/// the batch gets them one at a time (and hands out nothing with them). One [`Delivery`]
/// per report, in order, and the runs handed out with the answer.
async fn deliver(
    client: &CoordinatorClient,
    batch: &[Arc<RunReport>],
    refill: Option<(String, usize)>,
) -> (Vec<Delivery>, PullResponse) {
    if let ([report], None) = (batch, &refill) {
        return (
            vec![client.post_result(report).await],
            PullResponse::default(),
        );
    }
    let refill = refill
        .as_ref()
        .map(|(node_id, max)| (node_id.as_str(), *max));
    match client.post_results(batch, refill).await {
        BatchDelivery::Settled(deliveries, pulled) => return (deliveries, pulled),
        BatchDelivery::Retry(err) => {
            let message = err.to_string();
            let mut deliveries = vec![Delivery::Retry(err)];
            deliveries.extend(
                batch[1..]
                    .iter()
                    .map(|_| Delivery::Retry(CallError::Transport(message.clone()))),
            );
            return (deliveries, PullResponse::default());
        }
        BatchDelivery::OneByOne { status, detail } => {
            debug!(%status, detail, results = batch.len(), "batch not taken; posting the results one by one");
        }
    }
    let mut deliveries = Vec::with_capacity(batch.len());
    for report in batch {
        deliveries.push(client.post_result(report).await);
    }
    (deliveries, PullResponse::default())
}

/// How many of the leading results (of these serialised sizes) one post carries: as many as
/// fit in `max_bytes`, and always the first, however large (it goes alone then).
fn batch_len(sizes: &[usize], max_bytes: usize) -> usize {
    let mut total = 0;
    sizes
        .iter()
        .take_while(|size| {
            total += **size;
            total <= max_bytes
        })
        .count()
        .max(sizes.len().min(1))
}

/// Until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// About what a result kept in memory adds to a post.
fn approximate_size(report: &RunReport) -> usize {
    report.stdout.len() + report.stderr.len() + report.error.as_ref().map_or(0, String::len) + 256
}

fn file_name(run_id: RunId) -> String {
    format!("{run_id}.json")
}

/// Creates `dir` if needed and lists the run ids of the results in it; removes the temporary
/// files a crash mid-write may have left.
fn scan(dir: &Path) -> io::Result<Vec<RunId>> {
    std::fs::create_dir_all(dir)?;
    let mut run_ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        } else if let Some(run_id) = name
            .strip_suffix(".json")
            .and_then(|stem| stem.parse::<RunId>().ok())
        {
            run_ids.push(run_id);
        }
    }
    Ok(run_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_fits_and_always_the_first() {
        assert_eq!(batch_len(&[], 100), 0);
        assert_eq!(batch_len(&[10, 20, 30], 100), 3);
        assert_eq!(
            batch_len(&[40, 40, 40], 100),
            2,
            "the third would pass the limit"
        );
        assert_eq!(
            batch_len(&[40, 60, 1], 100),
            2,
            "exactly the limit fits, a byte more not"
        );
        assert_eq!(
            batch_len(&[500, 1], 100),
            1,
            "an oversized first result goes alone"
        );
        assert_eq!(
            batch_len(&[1, 500, 1], 100),
            1,
            "stops at the first that does not fit"
        );
    }

    fn result(run_id: RunId, stdout: String) -> RunReport {
        RunReport {
            node_id: "n".into(),
            task_id: run_id,
            run_id,
            outcome: lull_shared::RunOutcome::Completed,
            exit_code: Some(0),
            stdout,
            stderr: String::new(),
            error: None,
            started_at: None,
            completed_at: None,
            cpu_seconds: None,
            max_rss_mb: None,
        }
    }

    fn kept(outbox: &Outbox, run_id: RunId) -> bool {
        matches!(
            outbox.pending.borrow().get(&run_id),
            Some(Pending::OnDisk(Some(_)))
        )
    }

    /// Stores `report` and saves it at once, as a post that failed would.
    async fn store_saved(outbox: &Outbox, report: RunReport) {
        outbox.store(report).await;
        outbox.save_unsaved().await;
    }

    /// A saved result is also kept in memory (posting it need not read its file back),
    /// up to [`MAX_KEPT_BYTES`] in all; past that, results wait only in their files, and a
    /// settled result gives its room back.
    #[tokio::test]
    async fn saved_results_are_kept_in_memory_up_to_a_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = Outbox::open(dir.path().join("outbox")).await.expect("open");
        let big = "x".repeat(MAX_KEPT_BYTES / 2);
        for run_id in 1..=3 {
            store_saved(&outbox, result(run_id, big.clone())).await;
            assert!(outbox.path(run_id).exists(), "every result is saved");
        }
        assert!(kept(&outbox, 1));
        assert!(
            !kept(&outbox, 2),
            "two halves and the JSON around them pass the bound"
        );
        assert!(!kept(&outbox, 3));
        store_saved(&outbox, result(4, "small".into())).await;
        assert!(kept(&outbox, 4), "what fits beside the first is kept");
        outbox.remove(1).await;
        assert!(!outbox.path(1).exists());
        store_saved(&outbox, result(5, big.clone())).await;
        assert!(kept(&outbox, 5), "room given back by a settled result");
        let after_restart = Outbox::open(dir.path().join("outbox"))
            .await
            .expect("reopen");
        assert_eq!(after_restart.ids(), vec![2, 3, 4, 5]);
        assert!(
            (2..=5).all(|run_id| !kept(&after_restart, run_id)),
            "a new life reads them from disk"
        );
    }

    /// The usual case: a result waits in memory, its post settles it, and no file was ever
    /// written for it. Saving writes what still waits, and a new life finds it.
    #[tokio::test]
    async fn a_result_waits_in_memory_until_its_delivery_is_in_doubt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = Outbox::open(dir.path().join("outbox")).await.expect("open");
        outbox.store(result(1, "one".into())).await;
        outbox.store(result(2, "two".into())).await;
        assert_eq!(outbox.ids(), vec![1, 2], "both wait for delivery");
        assert!(
            !outbox.path(1).exists() && !outbox.path(2).exists(),
            "nothing written yet"
        );
        outbox.remove(1).await;
        outbox.save_unsaved().await;
        assert!(
            !outbox.path(1).exists(),
            "a settled result is never written"
        );
        assert!(outbox.path(2).exists(), "what still waits is saved");
        assert!(kept(&outbox, 2), "and kept in memory for its post");
        let after_restart = Outbox::open(dir.path().join("outbox"))
            .await
            .expect("reopen");
        assert_eq!(after_restart.ids(), vec![2]);
    }

    struct NoRefill;

    impl Refill for NoRefill {
        fn wanted(&self) -> Option<(String, usize)> {
            None
        }
        fn pulled(&self, _: PullResponse) {}
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// An outbox in `dir` delivering to `url` until stopped.
    struct Delivering {
        outbox: Arc<Outbox>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Delivering {
        async fn start(dir: &Path, url: &str) -> Delivering {
            let outbox = Arc::new(Outbox::open(dir.join("outbox")).await.expect("open"));
            let client = CoordinatorClient::new(url, None, None, None).expect("client");
            let stop = CancellationToken::new();
            let task = tokio::spawn({
                let (outbox, stop) = (Arc::clone(&outbox), stop.clone());
                async move {
                    outbox
                        .deliver_until_stopped(&client, &NoRefill, Duration::ZERO, stop)
                        .await
                }
            });
            Delivering { outbox, stop, task }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.expect("delivery task");
        }
    }

    /// A coordinator that takes the post and never answers: the result is saved while the
    /// post hangs, and survives an agent restart.
    #[tokio::test]
    async fn a_result_whose_post_hangs_is_saved() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listener");
        let url = format!("http://{}", silent.local_addr().expect("address"));
        let held = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                connections.push(connection);
            }
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let delivering = Delivering::start(dir.path(), &url).await;
        let outbox = Arc::clone(&delivering.outbox);
        outbox.store(result(7, "seven".into())).await;
        eventually("the waiting result to be saved", || outbox.path(7).exists()).await;
        assert!(
            !outbox.save_at_once.load(Ordering::Relaxed),
            "saved while its post was waiting, not after it failed"
        );
        delivering.stop().await;
        held.abort();
        let after_restart = Outbox::open(dir.path().join("outbox"))
            .await
            .expect("reopen");
        assert_eq!(after_restart.ids(), vec![7]);
    }

    /// A coordinator that cannot be reached: the result is saved once its post failed, and
    /// results made meanwhile are saved as they are stored.
    #[tokio::test]
    async fn results_are_saved_while_the_coordinator_is_unreachable() {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let url = format!("http://{}", gone.local_addr().expect("address"));
        drop(gone);
        let dir = tempfile::tempdir().expect("temp dir");
        let delivering = Delivering::start(dir.path(), &url).await;
        let outbox = Arc::clone(&delivering.outbox);
        outbox.store(result(1, "one".into())).await;
        eventually("the result whose post failed to be saved", || {
            outbox.path(1).exists()
        })
        .await;
        outbox.store(result(2, "two".into())).await;
        assert!(
            outbox.path(2).exists(),
            "stored while the coordinator is unreachable: saved at once"
        );
        delivering.stop().await;
    }

    #[test]
    fn a_result_in_memory_is_sized_by_its_output() {
        let report = RunReport {
            node_id: "n".into(),
            task_id: 1,
            run_id: 2,
            outcome: lull_shared::RunOutcome::Failed,
            exit_code: Some(1),
            stdout: "x".repeat(1000),
            stderr: "y".repeat(500),
            error: Some("boom".into()),
            started_at: None,
            completed_at: None,
            cpu_seconds: None,
            max_rss_mb: None,
        };
        let json = serde_json::to_string(&report).expect("json");
        let estimate = approximate_size(&report);
        assert!(estimate >= 1504, "counts every output byte: {estimate}");
        assert!(
            estimate >= json.len(),
            "covers the serialised size ({} bytes) of plain output: {estimate}",
            json.len()
        );
    }
}
