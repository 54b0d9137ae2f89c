//! The agent against a fake coordinator: registration, pulling, running, reporting through
//! the outbox, cancels and graceful shutdown, all through the public API.

mod fake;

use fake::FakeCoordinator;
use lull_agent::{AgentConfig, AgentError};
use lull_shared::{AgentState, Assignment, Resources, RunId, RunOutcome, RunReport, TaskId};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Hang guard for every wait below; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(30);

struct RunningAgent {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    fn start(config: AgentConfig) -> RunningAgent {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(lull_agent::run(config, shutdown.clone()));
        RunningAgent { shutdown, handle }
    }

    /// Asks the agent to shut down and waits for `run` to return `Ok`.
    async fn stop(self) {
        self.shutdown.cancel();
        let returned = tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("the agent shut down in time")
            .expect("the agent task did not panic");
        returned.expect("the agent shut down cleanly");
    }
}

fn config(fake: &FakeCoordinator, state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::new(fake.url.clone(), state_dir.to_path_buf());
    config.heartbeat_interval = Duration::from_millis(100);
    config.pull_wait = Duration::from_secs(1);
    config.cpus = Some(2.0);
    config.memory_mb = Some(2048.0);
    // Other tests' load on this host is no owner to yield to.
    config.owner = lull_agent::OwnerPolicy::off();
    config
}

fn assignment(task_id: TaskId, run_id: RunId, code: &str, timeout: f64) -> Assignment {
    Assignment {
        task_id,
        run_id,
        attempt: 1,
        code: code.to_string(),
        timeout,
        resources: Resources::default(),
        point: 0,
        points: 1,
    }
}

fn outbox_file(state_dir: &Path, run_id: RunId) -> PathBuf {
    state_dir.join("outbox").join(format!("{run_id}.json"))
}

/// A result left in the outbox by an earlier life of the agent.
fn seed_outbox(state_dir: &Path, node_id: &str, run_id: RunId) -> PathBuf {
    seed_outbox_with(state_dir, node_id, run_id, "42\n")
}

/// [`seed_outbox`] with this standard output.
fn seed_outbox_with(state_dir: &Path, node_id: &str, run_id: RunId, stdout: &str) -> PathBuf {
    let report = RunReport {
        node_id: node_id.to_string(),
        task_id: run_id * 10,
        run_id,
        outcome: RunOutcome::Completed,
        exit_code: Some(0),
        stdout: stdout.to_string(),
        stderr: String::new(),
        error: None,
        started_at: Some(1.0),
        completed_at: Some(2.0),
        cpu_seconds: None,
        max_rss_mb: None,
    };
    let path = outbox_file(state_dir, run_id);
    std::fs::create_dir_all(path.parent().expect("outbox dir")).expect("create outbox");
    std::fs::write(&path, serde_json::to_vec(&report).expect("json")).expect("write result");
    path
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report_for(fake: &FakeCoordinator, run_id: RunId) -> Option<RunReport> {
    fake.results().into_iter().find(|r| r.run_id == run_id)
}

#[tokio::test]
async fn registers_runs_an_assignment_and_reports_it() {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let agent = RunningAgent::start(config(&fake, state.path()));

    wait_until("the agent registered", || !fake.heartbeats().is_empty()).await;
    fake.assign(assignment(1, 10, "print('Hello World')", 30.0));
    wait_until("the result arrived", || report_for(&fake, 10).is_some()).await;
    wait_until("the outbox is empty", || {
        !outbox_file(state.path(), 10).exists()
    })
    .await;
    agent.stop().await;

    let heartbeats = fake.heartbeats();
    let first = &heartbeats[0];
    let node_id = std::fs::read_to_string(state.path().join("node_id")).expect("node id saved");
    assert_eq!(first.node_id, node_id.trim());
    assert_eq!(first.status, AgentState::Idle);
    assert_eq!(first.resources.cpu_cores, 2.0);
    assert_eq!(first.resources.memory_mb, 2048.0);
    assert_eq!(first.node_type.as_deref(), Some("cpu"));
    assert_eq!(first.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));

    let report = report_for(&fake, 10).expect("report");
    assert_eq!(report.node_id, first.node_id);
    assert_eq!(report.task_id, 1);
    assert_eq!(report.outcome, RunOutcome::Completed);
    assert_eq!(report.exit_code, Some(0));
    assert_eq!(report.stdout, "Hello World\n");
    assert_eq!(
        lull_shared::result_from_stdout(&report.stdout),
        "Hello World"
    );
    assert_eq!(report.error, None);
    assert!(report.started_at.is_some() && report.completed_at.is_some());
    assert_eq!(
        fake.results().len(),
        1,
        "acknowledged results are not sent twice"
    );

    assert!(heartbeats.iter().any(|h| h.status == AgentState::Draining));
    let last = heartbeats.last().expect("a last heartbeat");
    assert_eq!(last.status, AgentState::Offline);
    assert!(last.running.is_empty() && last.finished.is_empty());
}

#[tokio::test]
async fn a_result_is_retried_until_acknowledged() {
    let fake = FakeCoordinator::start().await;
    fake.answer_results_with(Some(503));
    let state = tempfile::tempdir().expect("state dir");
    let waiting = seed_outbox(state.path(), "node-1", 77);
    let mut config = config(&fake, state.path());
    config.node_id = Some("node-1".to_string());
    let agent = RunningAgent::start(config);

    wait_until("the coordinator refused the result with 503", || {
        !fake.results().is_empty()
    })
    .await;
    wait_until("a heartbeat reports the unacknowledged result", || {
        fake.heartbeats().iter().any(|h| h.finished == [77])
    })
    .await;
    assert!(waiting.exists(), "kept while the coordinator fails");
    fake.answer_results_with(None);
    wait_until("the acknowledged result left the outbox", || {
        !waiting.exists()
    })
    .await;
    agent.stop().await;

    let results = fake.results();
    assert!(results.len() >= 2, "retried after the 503: {results:?}");
    assert!(results.iter().all(|r| r.run_id == 77 && r.stdout == "42\n"));
    let last = fake.heartbeats().pop().expect("heartbeats");
    assert!(last.finished.is_empty());
}

#[tokio::test]
async fn a_refused_result_is_dropped_without_retry() {
    let fake = FakeCoordinator::start().await;
    fake.answer_results_with(Some(409));
    let state = tempfile::tempdir().expect("state dir");
    let waiting = seed_outbox(state.path(), "node-1", 88);
    let mut config = config(&fake, state.path());
    config.node_id = Some("node-1".to_string());
    let agent = RunningAgent::start(config);

    wait_until("the refused result left the outbox", || !waiting.exists()).await;
    agent.stop().await;

    assert_eq!(
        fake.results().len(),
        1,
        "a refused result is never sent again"
    );
    let last = fake.heartbeats().pop().expect("heartbeats");
    assert!(last.finished.is_empty());
}

#[tokio::test]
async fn a_cancel_from_the_coordinator_kills_the_run() {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let agent = RunningAgent::start(config(&fake, state.path()));

    fake.assign(assignment(2, 20, "import time; time.sleep(60)", 120.0));
    wait_until("a heartbeat lists the run as running", || {
        fake.heartbeats().iter().any(|h| h.running == [20])
    })
    .await;
    assert!(
        fake.heartbeats()
            .iter()
            .any(|h| h.status == AgentState::Busy)
    );
    fake.cancel(20);
    wait_until("the cancelled run was reported", || {
        report_for(&fake, 20).is_some()
    })
    .await;
    agent.stop().await;

    let report = report_for(&fake, 20).expect("report");
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert_eq!(report.exit_code, None);
}

#[tokio::test]
async fn shutdown_releases_runs_that_outlive_the_grace_period() {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let mut config = config(&fake, state.path());
    config.shutdown_grace = Duration::from_millis(200);
    let agent = RunningAgent::start(config);

    fake.assign(assignment(3, 30, "import time; time.sleep(60)", 120.0));
    wait_until("a heartbeat lists the run as running", || {
        fake.heartbeats().iter().any(|h| h.running == [30])
    })
    .await;
    agent.stop().await;

    let report = report_for(&fake, 30).expect("the released run was reported");
    assert_eq!(report.outcome, RunOutcome::Released);
    assert_eq!(report.error.as_deref(), Some("agent shutting down"));
    let heartbeats = fake.heartbeats();
    assert!(heartbeats.iter().any(|h| h.status == AgentState::Draining));
    let last = heartbeats.last().expect("heartbeats");
    assert_eq!(last.status, AgentState::Offline);
    assert!(last.running.is_empty());
    assert!(!outbox_file(state.path(), 30).exists());
}

#[tokio::test]
async fn a_coordinator_that_forgot_the_node_is_sent_a_heartbeat_first() {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let mut config = config(&fake, state.path());
    // No ticker heartbeat during the test: only the 404 path can register the node again.
    config.heartbeat_interval = Duration::from_secs(3600);
    let agent = RunningAgent::start(config);

    wait_until("the agent pulls", || !fake.pulls().is_empty()).await;
    assert_eq!(fake.heartbeats().len(), 1);
    fake.forget_nodes();
    wait_until("a pull was answered 404", || {
        fake.pulls().contains(&axum::http::StatusCode::NOT_FOUND)
    })
    .await;
    wait_until("the agent registered again", || {
        fake.heartbeats().len() == 2
    })
    .await;
    fake.assign(assignment(4, 40, "print(6 * 7)", 30.0));
    wait_until("the result arrived", || report_for(&fake, 40).is_some()).await;
    agent.stop().await;

    let report = report_for(&fake, 40).expect("report");
    assert_eq!(report.outcome, RunOutcome::Completed);
    assert_eq!(report.stdout, "42\n");
}

/// Starts an agent as `node-1` on an outbox holding results for `runs` (an earlier life's).
fn agent_with_waiting_results(
    fake: &FakeCoordinator,
    state_dir: &Path,
    runs: &[RunId],
) -> (RunningAgent, Vec<PathBuf>) {
    let files = runs
        .iter()
        .map(|run_id| seed_outbox(state_dir, "node-1", *run_id))
        .collect();
    let mut config = config(fake, state_dir);
    config.node_id = Some("node-1".to_string());
    (RunningAgent::start(config), files)
}

#[tokio::test]
async fn results_waiting_together_go_in_one_post_and_are_settled_one_by_one() {
    let fake = FakeCoordinator::start().await;
    fake.refuse_in_batches(102);
    let state = tempfile::tempdir().expect("state dir");
    let (agent, files) = agent_with_waiting_results(&fake, state.path(), &[101, 102, 103]);

    wait_until("every result left the outbox", || {
        files.iter().all(|f| !f.exists())
    })
    .await;
    agent.stop().await;

    assert_eq!(
        fake.batches(),
        [vec![101, 102, 103]],
        "one post for the three"
    );
    assert!(fake.single_posts().is_empty(), "none went alone");
    let results = fake.results();
    assert_eq!(
        results.len(),
        3,
        "the refused one is not sent again: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| r.task_id == r.run_id * 10 && r.stdout == "42\n")
    );
    let last = fake.heartbeats().pop().expect("heartbeats");
    assert!(last.finished.is_empty());
}

#[tokio::test]
async fn a_failed_batch_keeps_every_result_until_it_is_acknowledged() {
    let fake = FakeCoordinator::start().await;
    fake.answer_batches_with(Some(503));
    let state = tempfile::tempdir().expect("state dir");
    let (agent, files) = agent_with_waiting_results(&fake, state.path(), &[201, 202]);

    wait_until("a batch was answered 503", || !fake.batches().is_empty()).await;
    wait_until("a heartbeat reports both unacknowledged results", || {
        fake.heartbeats().iter().any(|h| h.finished == [201, 202])
    })
    .await;
    assert!(
        files.iter().all(|f| f.exists()),
        "kept while the coordinator fails"
    );
    fake.answer_batches_with(None);
    wait_until("both results left the outbox", || {
        files.iter().all(|f| !f.exists())
    })
    .await;
    agent.stop().await;

    let batches = fake.batches();
    assert!(batches.len() >= 2, "retried after the 503: {batches:?}");
    assert!(
        batches.iter().all(|b| b == &[201, 202]),
        "whole, each time: {batches:?}"
    );
    assert!(fake.single_posts().is_empty());
}

#[tokio::test]
async fn a_coordinator_without_the_batch_endpoint_gets_the_results_one_by_one() {
    let fake = FakeCoordinator::start().await;
    fake.answer_batches_with(Some(404));
    let state = tempfile::tempdir().expect("state dir");
    let (agent, files) = agent_with_waiting_results(&fake, state.path(), &[301, 302, 303]);

    wait_until("every result left the outbox", || {
        files.iter().all(|f| !f.exists())
    })
    .await;
    agent.stop().await;

    assert_eq!(
        fake.batches(),
        [vec![301, 302, 303]],
        "tried once as a batch"
    );
    assert_eq!(
        fake.single_posts(),
        [301, 302, 303],
        "then one by one, in order"
    );
}

#[tokio::test]
async fn large_results_are_posted_in_bounded_batches() {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    // Two results of 1.5 MiB each cannot share a post (about 2 MiB at most); the small one
    // joins the second.
    let big = "x".repeat(1536 * 1024);
    let files = [
        seed_outbox_with(state.path(), "node-1", 401, &big),
        seed_outbox_with(state.path(), "node-1", 402, &big),
        seed_outbox_with(state.path(), "node-1", 403, "small\n"),
    ];
    let mut config = config(&fake, state.path());
    config.node_id = Some("node-1".to_string());
    let agent = RunningAgent::start(config);

    wait_until("every result left the outbox", || {
        files.iter().all(|f| !f.exists())
    })
    .await;
    agent.stop().await;

    // Every post is a batch (one that also asks for new runs), the first of one result.
    assert!(fake.single_posts().is_empty(), "{:?}", fake.batches());
    assert_eq!(
        fake.batches(),
        [vec![401], vec![402, 403]],
        "the first went alone"
    );
    let results = fake.results();
    assert_eq!(results.len(), 3);
    assert!(
        results
            .iter()
            .filter(|r| r.run_id != 403)
            .all(|r| r.stdout == big)
    );
}

/// A busy node's six runs, leased at once to an agent with two slots and `linger`: a quick
/// one, one that sleeps 2 s, `third` (queued behind them) and three quick ones; once every
/// result arrived, the posts' batches of run ids, and the fake coordinator.
async fn six_runs_two_slots(
    run_ids: [RunId; 6],
    third: &str,
    linger: Duration,
) -> (Vec<Vec<RunId>>, FakeCoordinator) {
    let fake = FakeCoordinator::start().await;
    let codes = [
        "print(1)",
        "import time; time.sleep(2); print(2)",
        third,
        "print(4)",
        "print(5)",
        "print(6)",
    ];
    for (task_id, (run_id, code)) in (1..).zip(run_ids.into_iter().zip(codes)) {
        fake.assign(assignment(task_id, run_id, code, 60.0));
    }
    let state = tempfile::tempdir().expect("state dir");
    let mut config = config(&fake, state.path());
    config.results_linger = linger;
    let agent = RunningAgent::start(config);

    wait_until("every result arrived", || fake.results().len() == 6).await;
    agent.stop().await;
    (fake.batches(), fake)
}

/// Two runs at once and four more queued behind them, as a busy node has them: the first
/// run's result waits (more runs are queued than running, so posting it now would start
/// nothing sooner, and a later post still comes back before a slot runs dry) until a second
/// result waits, as many as runs execute; both go in one post.
#[tokio::test]
async fn a_busy_nodes_results_wait_to_share_a_post() {
    // Long enough that only a second result ends the wait.
    let (batches, _fake) = six_runs_two_slots([11, 12, 13, 14, 15, 16], "print(3)", PATIENCE).await;
    assert_eq!(
        batches.first(),
        Some(&vec![11, 13]),
        "the first run's result waited for the next: {batches:?}"
    );
}

/// With the linger at zero nothing is held: the first run's result goes alone at once, long
/// before the third run (queued behind it, half a second long) could join it.
#[tokio::test]
async fn a_zero_linger_posts_each_result_at_once() {
    let (batches, _fake) = six_runs_two_slots(
        [31, 32, 33, 34, 35, 36],
        "import time; time.sleep(0.5); print(3)",
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        batches.first(),
        Some(&vec![31]),
        "the first run's result went alone: {batches:?}"
    );
}

/// A held result waits at most the linger: with the node's queue never running low (long
/// runs in both slots and three more queued), the first run's result is still posted, alone.
#[tokio::test]
async fn a_held_result_is_posted_once_the_linger_is_over() {
    let fake = FakeCoordinator::start().await;
    fake.assign(assignment(1, 21, "print(1)", 600.0));
    for (task_id, run_id) in [(2, 22), (3, 23), (4, 24), (5, 25), (6, 26)] {
        fake.assign(assignment(
            task_id,
            run_id,
            "import time; time.sleep(300)",
            600.0,
        ));
    }
    let state = tempfile::tempdir().expect("state dir");
    let mut config = config(&fake, state.path());
    config.results_linger = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_millis(200);
    let agent = RunningAgent::start(config);

    wait_until("the quick run's result arrived", || {
        report_for(&fake, 21).is_some()
    })
    .await;
    let batches = fake.batches();
    agent.stop().await;

    assert_eq!(
        batches,
        [vec![21]],
        "posted alone, while the others still ran"
    );
}
