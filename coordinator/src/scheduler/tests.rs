//! Scheduler unit tests, written as stories through a small harness.

use super::*;
use crate::model::{NewTask, TaskLimits};
use lull_shared::{CommandKind, CommandResult, CommandStatus, Load, NodeResources, SubmitRequest};

/// A scheduler plus a clock, and shorthand for the calls tests make.
struct Harness {
    sched: Scheduler,
    now: f64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            sched: Scheduler::new(SchedulerConfig {
                node_ttl: 10.0,
                reconcile_grace: 5.0,
                legacy_lease_grace: 30.0,
                prefetch: 0,
                command_ttl: 60.0,
            }),
            now: 1000.0,
        }
    }

    fn advance(&mut self, secs: f64) {
        self.now += secs;
    }

    fn node(&mut self, id: &str, cpus: f64, memory_mb: f64) -> HeartbeatOutcome {
        self.heartbeat(id, cpus, memory_mb, &[])
    }

    fn heartbeat(
        &mut self,
        id: &str,
        cpus: f64,
        memory_mb: f64,
        running: &[RunId],
    ) -> HeartbeatOutcome {
        let hb = HeartbeatRequest {
            node_id: id.into(),
            status: AgentState::Idle,
            resources: NodeResources {
                cpu_cores: cpus,
                memory_mb,
            },
            current_load: Load::default(),
            hostname: Some(format!("{id}.local")),
            node_type: Some("cpu".into()),
            zone: Some("zone1".into()),
            version: None,
            running: running.to_vec(),
            finished: vec![],
            sandbox: None,
            executor: None,
            command_results: vec![],
            owner_load: None,
            paused_reason: None,
        };
        self.sched.heartbeat(&hb, self.now)
    }

    fn submit_with(&mut self, req: SubmitRequest) -> TaskId {
        let task = NewTask::from_request(req, &TaskLimits::default()).expect("valid task");
        self.sched.submit(task, self.now).0
    }

    fn submit(&mut self, code: &str) -> TaskId {
        self.submit_with(SubmitRequest {
            code: Some(code.into()),
            ..SubmitRequest::default()
        })
    }

    fn pull(&mut self, node: &str, max: usize) -> Vec<Assignment> {
        self.sched
            .pull(node, max, self.now)
            .expect("known node")
            .assignments
    }

    fn report(
        &mut self,
        node: &str,
        a: &Assignment,
        outcome: RunOutcome,
        stdout: &str,
    ) -> Result<Vec<Change>, SchedulerError> {
        self.sched
            .report(&run_report(node, a, outcome, stdout), self.now)
    }
}

fn final_state(changes: &[Change], task_id: TaskId) -> Option<TaskState> {
    changes.iter().rev().find_map(|c| match c {
        Change::TaskUpdated(s) if s.task_id == task_id => Some(s.clone()),
        _ => None,
    })
}

#[test]
fn a_task_runs_on_a_node_and_completes_with_its_stdout() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let t = h.submit("print('Hello World')");
    let got = h.pull("n1", 10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task_id, t);
    assert_eq!(got[0].attempt, 1);
    let changes = h
        .report("n1", &got[0], RunOutcome::Completed, "Hello World\n")
        .expect("accepted");
    let state = final_state(&changes, t).expect("task updated");
    assert_eq!(state.status, TaskStatus::Completed);
    assert_eq!(state.result.as_deref(), Some("Hello World"));
    assert_eq!(h.sched.active_count(), 0, "finished tasks leave memory");
}

#[test]
fn placement_respects_free_cpu_and_memory() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 1024.0);
    for _ in 0..5 {
        h.submit("pass");
    }
    // Two 1-cpu/512-MB tasks fill the node, whatever `max` asks.
    let first = h.pull("n1", 10);
    assert_eq!(first.len(), 2);
    assert!(h.pull("n1", 10).is_empty(), "node is full");
    h.report("n1", &first[0], RunOutcome::Completed, "")
        .expect("accepted");
    assert_eq!(h.pull("n1", 10).len(), 1, "one slot freed");

    let big = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        resources: Some(Resources {
            cpu: 1.0,
            memory: 2048.0,
        }),
        ..SubmitRequest::default()
    });
    h.node("n2", 8.0, 1024.0);
    let on_n2 = h.pull("n2", 10);
    assert!(
        on_n2.iter().all(|a| a.task_id != big),
        "2048 MB never fits a 1024 MB node"
    );
}

#[test]
fn constraints_match_zone_type_and_meta() {
    let mut h = Harness::new();
    h.node("n1", 4.0, 4096.0); // zone1, cpu, no meta
    let gpu = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        constraints: Some(Constraints {
            node_type: Some("gpu".into()),
            ..Constraints::default()
        }),
        ..SubmitRequest::default()
    });
    let zone1 = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        constraints: Some(Constraints {
            zone: Some("zone1".into()),
            ..Constraints::default()
        }),
        ..SubmitRequest::default()
    });
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("rack".to_string(), serde_json::json!("a"));
    let with_meta = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        constraints: Some(Constraints {
            meta,
            ..Constraints::default()
        }),
        ..SubmitRequest::default()
    });
    let got: Vec<TaskId> = h.pull("n1", 10).iter().map(|a| a.task_id).collect();
    assert_eq!(got, vec![zone1]);
    assert!(!got.contains(&gpu) && !got.contains(&with_meta));
}

#[test]
fn oldest_task_goes_first_across_classes() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 4096.0);
    let a = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        resources: Some(Resources {
            cpu: 0.5,
            memory: 100.0,
        }),
        ..SubmitRequest::default()
    });
    let _b = h.submit("pass");
    assert_eq!(h.pull("n1", 1)[0].task_id, a);
}

#[test]
fn a_silent_node_goes_offline_and_its_run_moves_elsewhere() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit("pass");
    let first = h.pull("n1", 1);
    h.node("n2", 1.0, 1024.0);
    h.advance(11.0);
    h.heartbeat("n2", 1.0, 1024.0, &[]);
    let changes = h.sched.tick(h.now);
    assert!(changes.iter().any(|c| matches!(c, Change::NodeSaved(n) if n.node_id == "n1" && n.status == NodeStatus::Offline)));
    let again = h.pull("n2", 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].task_id, t);
    assert_eq!(again[0].attempt, 2);
    // The first node comes back and reports its old run: refused, and told to kill it.
    let err = h
        .report("n1", &first[0], RunOutcome::Completed, "late")
        .expect_err("stale");
    assert!(matches!(err, SchedulerError::StaleLease { .. }));
    let back = h.heartbeat("n1", 1.0, 1024.0, &[first[0].run_id]);
    assert_eq!(back.cancel, vec![first[0].run_id]);
    // The new run completes exactly once.
    let done = h
        .report("n2", &again[0], RunOutcome::Completed, "ok\n")
        .expect("current run");
    assert_eq!(
        final_state(&done, t).map(|s| s.status),
        Some(TaskStatus::Completed)
    );
    assert!(
        h.report("n2", &again[0], RunOutcome::Completed, "ok\n")
            .is_err(),
        "no second completion"
    );
}

#[test]
fn a_task_fails_after_max_attempts_losses() {
    let mut h = Harness::new();
    let t = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        max_attempts: Some(2),
        ..SubmitRequest::default()
    });
    let mut last = Vec::new();
    for round in 0..2 {
        let node = format!("n{round}");
        h.node(&node, 1.0, 1024.0);
        assert_eq!(h.pull(&node, 1).len(), 1);
        h.advance(11.0);
        last = h.sched.tick(h.now);
    }
    let state = final_state(&last, t).expect("task updated");
    assert_eq!(state.status, TaskStatus::Failed);
    assert!(
        state.error.as_deref().unwrap_or("").contains("lost 2 of 2"),
        "{state:?}"
    );
    assert_eq!(h.sched.pending_count(), 0);
}

#[test]
fn heartbeat_reconciliation_requeues_runs_the_node_does_not_report() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit("pass");
    let got = h.pull("n1", 1);
    // Within the grace, a heartbeat without the run is not trusted: it may predate the pull.
    h.advance(1.0);
    assert!(
        h.heartbeat("n1", 1.0, 1024.0, &[])
            .changes
            .iter()
            .all(|c| !matches!(c, Change::RunSaved(_)))
    );
    // Past the grace, the run is lost and the task requeued.
    h.advance(10.0);
    let out = h.heartbeat("n1", 1.0, 1024.0, &[]);
    assert_eq!(
        final_state(&out.changes, t).map(|s| s.status),
        Some(TaskStatus::Pending)
    );
    let retry = h.pull("n1", 1);
    assert_eq!(retry[0].task_id, t);
    assert_ne!(retry[0].run_id, got[0].run_id);
}

#[test]
fn a_run_reported_as_finished_but_unacknowledged_is_not_lost() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    h.submit("pass");
    let got = h.pull("n1", 1);
    h.advance(20.0);
    let hb = HeartbeatRequest {
        resources: NodeResources {
            cpu_cores: 1.0,
            memory_mb: 1024.0,
        },
        finished: vec![got[0].run_id],
        ..heartbeat_request("n1")
    };
    let out = h.sched.heartbeat(&hb, h.now);
    assert!(
        out.changes
            .iter()
            .all(|c| !matches!(c, Change::RunSaved(_)))
    );
    assert!(h.report("n1", &got[0], RunOutcome::Completed, "x").is_ok());
}

#[test]
fn a_report_from_another_node_is_refused() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    h.node("n2", 1.0, 1024.0);
    h.submit("pass");
    let got = h.pull("n1", 1);
    let err = h
        .report("n2", &got[0], RunOutcome::Completed, "x")
        .expect_err("wrong node");
    assert!(matches!(err, SchedulerError::StaleLease { .. }));
}

#[test]
fn a_released_run_is_requeued_without_counting_a_loss() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        max_attempts: Some(1),
        ..SubmitRequest::default()
    });
    let got = h.pull("n1", 1);
    let changes = h
        .report("n1", &got[0], RunOutcome::Released, "")
        .expect("accepted");
    let state = final_state(&changes, t).expect("updated");
    assert_eq!(state.status, TaskStatus::Pending);
    assert_eq!(state.losses, 0);
    assert_eq!(h.pull("n1", 1)[0].task_id, t);
}

#[test]
fn user_code_failure_is_final() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit("1/0");
    let got = h.pull("n1", 1);
    let changes = h
        .report("n1", &got[0], RunOutcome::Failed, "")
        .expect("accepted");
    assert_eq!(
        final_state(&changes, t).map(|s| s.status),
        Some(TaskStatus::Failed)
    );
    assert_eq!(h.sched.pending_count(), 0, "not retried");
}

#[test]
fn cancel_kills_a_running_task_on_its_node() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit("import time; time.sleep(100)");
    let got = h.pull("n1", 1);
    let changes = h.sched.cancel(t, h.now).expect("active");
    assert_eq!(
        final_state(&changes, t).map(|s| s.status),
        Some(TaskStatus::Cancelled)
    );
    let pull = h.sched.pull("n1", 1, h.now).expect("node");
    assert_eq!(pull.cancel, vec![got[0].run_id]);
    let again = h.sched.pull("n1", 1, h.now).expect("node");
    assert!(
        again.cancel.is_empty(),
        "a pull repeats no cancel it already delivered"
    );
    assert_eq!(
        h.heartbeat("n1", 1.0, 1024.0, &[got[0].run_id]).cancel,
        vec![got[0].run_id]
    );
    // Once the node stops reporting it, the cancel is done.
    assert!(h.heartbeat("n1", 1.0, 1024.0, &[]).cancel.is_empty());
    assert!(
        h.report("n1", &got[0], RunOutcome::Cancelled, "").is_err(),
        "the lease is gone"
    );
    assert!(matches!(
        h.sched.cancel(t, h.now),
        Err(SchedulerError::TaskNotFound(_))
    ));
}

#[test]
fn legacy_workers_lease_tasks_that_expire_and_requeue() {
    let mut h = Harness::new();
    let t = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        timeout: Some(10.0),
        ..SubmitRequest::default()
    });
    let (lease, _) = h.sched.legacy_assign(h.now);
    let lease = lease.expect("a task");
    assert_eq!(lease.task_id, t);
    assert!(
        h.sched.legacy_assign(h.now).0.is_none(),
        "leased, not pending"
    );
    h.advance(41.0); // timeout 10 + grace 30
    let changes = h.sched.tick(h.now);
    assert_eq!(
        final_state(&changes, t).map(|s| s.status),
        Some(TaskStatus::Pending)
    );
    // The first worker's late result is refused; the second worker's lands once.
    let (again, _) = h.sched.legacy_assign(h.now);
    let again = again.expect("requeued");
    let late = h
        .sched
        .legacy_result(t, Some(lease.run_id), "late".into(), None, h.now);
    assert!(matches!(late, Err(SchedulerError::StaleLease { .. })));
    let ok = h
        .sched
        .legacy_result(t, Some(again.run_id), "42".into(), None, h.now)
        .expect("current");
    assert_eq!(
        final_state(&ok, t).and_then(|s| s.result),
        Some("42".into())
    );
    assert!(
        h.sched
            .legacy_result(t, None, "again".into(), None, h.now)
            .is_err()
    );
}

#[test]
fn legacy_results_are_refused_for_tasks_leased_to_agents() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit("pass");
    h.pull("n1", 1);
    assert_eq!(
        h.sched.legacy_result(t, None, "x".into(), None, h.now),
        Err(SchedulerError::NoLegacyLease(t))
    );
}

#[test]
fn restore_rebuilds_queue_reservations_and_ids() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let running = h.submit("a");
    let pending = h.submit("b");
    let got = h.pull("n1", 1);
    assert_eq!(got[0].task_id, running);
    // Collect what the store would hold.
    let snapshot = Snapshot {
        active_tasks: h.sched.tasks.values().map(|t| t.record.clone()).collect(),
        active_runs: h.sched.runs.values().map(|r| r.record.clone()).collect(),
        nodes: h.sched.nodes.values().map(|n| n.record.clone()).collect(),
        max_task_id: pending,
        max_run_id: got[0].run_id,
        total_tasks: 2,
        ..Snapshot::default()
    };
    let mut after = Scheduler::restore(
        SchedulerConfig {
            prefetch: 0,
            ..SchedulerConfig::default()
        },
        snapshot,
        5000.0,
    );
    assert_eq!(after.pending_count(), 1);
    // n1 is still full with the restored run; its result is still accepted.
    assert!(
        after
            .pull("n1", 5, 5000.0)
            .expect("node")
            .assignments
            .is_empty()
    );
    let next = after
        .submit(
            NewTask::from_request(
                SubmitRequest {
                    code: Some("c".into()),
                    ..Default::default()
                },
                &TaskLimits::default(),
            )
            .expect("valid"),
            5000.0,
        )
        .0;
    assert!(next > pending, "ids keep increasing across restarts");
    let report = run_report("n1", &got[0], RunOutcome::Completed, "a\n");
    assert!(after.report(&report, 5000.0).is_ok());
    assert_eq!(
        after.pull("n1", 5, 5000.0).expect("node").assignments[0].task_id,
        pending
    );
}

#[test]
fn node_counts_follow_runs() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    h.node("n2", 1.0, 1024.0);
    h.submit("a");
    h.pull("n1", 1);
    let c = h.sched.node_counts();
    assert_eq!((c.total, c.idle, c.busy, c.offline), (2, 1, 1, 0));
}

#[test]
fn a_run_the_agent_lost_is_retried_and_counts_against_max_attempts() {
    let mut h = Harness::new();
    h.node("n1", 1.0, 1024.0);
    let t = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        max_attempts: Some(2),
        ..SubmitRequest::default()
    });
    let first = h.pull("n1", 1);
    let changes = h
        .report("n1", &first[0], RunOutcome::Lost, "")
        .expect("accepted");
    let state = final_state(&changes, t).expect("updated");
    assert_eq!((state.status, state.losses), (TaskStatus::Pending, 1));
    let second = h.pull("n1", 1);
    let changes = h
        .report("n1", &second[0], RunOutcome::Lost, "")
        .expect("accepted");
    let state = final_state(&changes, t).expect("updated");
    assert_eq!(state.status, TaskStatus::Failed);
    assert!(
        state.error.as_deref().unwrap_or("").contains("lost 2 of 2"),
        "{state:?}"
    );
}

fn prefetching(prefetch: usize) -> Harness {
    let mut h = Harness::new();
    h.sched.config.prefetch = prefetch;
    h
}

#[test]
fn a_full_node_gets_up_to_prefetch_runs_to_hold_until_a_slot_frees() {
    let mut h = prefetching(2);
    h.node("n1", 2.0, 4096.0);
    let tasks: Vec<TaskId> = (0..6).map(|i| h.submit(&format!("print({i})"))).collect();

    let got = h.pull("n1", 64);
    let ids: Vec<TaskId> = got.iter().map(|a| a.task_id).collect();
    assert_eq!(ids, tasks[..4], "two that fit, two waiting, oldest first");
    assert!(h.pull("n1", 64).is_empty(), "no more while two wait");

    // One run ends: the first waiting one takes its slot, so one more may wait.
    h.report("n1", &got[0], RunOutcome::Completed, "0\n")
        .expect("report");
    let more = h.pull("n1", 64);
    assert_eq!(
        more.iter().map(|a| a.task_id).collect::<Vec<_>>(),
        vec![tasks[4]]
    );
}

#[test]
fn nothing_is_prefetched_while_another_node_has_room() {
    let mut h = prefetching(2);
    h.node("n1", 1.0, 4096.0);
    h.node("n2", 1.0, 4096.0);
    let tasks: Vec<TaskId> = (0..3).map(|i| h.submit(&format!("print({i})"))).collect();

    let first = h.pull("n1", 64);
    assert_eq!(
        first.iter().map(|a| a.task_id).collect::<Vec<_>>(),
        vec![tasks[0]],
        "n2 has room: n1 keeps nothing waiting"
    );
    assert_eq!(h.pull("n2", 1).len(), 1);
    // Now both are full: the last task may wait on whichever node asks.
    assert_eq!(
        h.pull("n1", 64)
            .iter()
            .map(|a| a.task_id)
            .collect::<Vec<_>>(),
        vec![tasks[2]]
    );
}

#[test]
fn a_task_larger_than_the_node_is_never_prefetched_there() {
    let mut h = prefetching(2);
    h.node("n1", 2.0, 1024.0);
    h.submit("print(1)");
    h.submit_with(SubmitRequest {
        code: Some("print('big')".into()),
        resources: Some(Resources {
            cpu: 4.0,
            memory: 100.0,
        }),
        ..SubmitRequest::default()
    });
    assert_eq!(
        h.pull("n1", 64).len(),
        1,
        "only the one that can ever run here"
    );
}

// ---------------------------------------------------------------------------------------------
// Node management (seed 004)
// ---------------------------------------------------------------------------------------------

fn status_of(h: &Harness, node: &str) -> NodeStatus {
    h.sched.nodes[node].record.status
}

fn run_status(changes: &[Change], run_id: RunId) -> Option<RunStatus> {
    changes.iter().rev().find_map(|c| match c {
        Change::RunSaved(r) if r.run_id == run_id => Some(r.status),
        _ => None,
    })
}

#[test]
fn a_drained_node_takes_no_new_runs_and_its_running_run_may_finish() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let first = h.submit("print(1)");
    let got = h.pull("n1", 1);
    let (command, _) = h.sched.drain("n1", Some(60.0), h.now).expect("known node");
    assert_eq!(command.kind, CommandKind::Drain);
    assert_eq!(command.status, CommandStatus::Pending);
    assert_eq!(status_of(&h, "n1"), NodeStatus::Draining);

    h.submit("print(2)");
    assert!(
        h.pull("n1", 10).is_empty(),
        "a draining node gets nothing new"
    );
    // Heartbeats from the agent do not undo the drain.
    h.heartbeat("n1", 2.0, 4096.0, &[got[0].run_id]);
    assert_eq!(status_of(&h, "n1"), NodeStatus::Draining);

    let changes = h
        .report("n1", &got[0], RunOutcome::Completed, "1\n")
        .expect("the running run may finish");
    assert_eq!(
        final_state(&changes, first).map(|s| s.status),
        Some(TaskStatus::Completed)
    );
    assert_eq!(
        status_of(&h, "n1"),
        NodeStatus::Drained,
        "drained when its last run ends"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::NodeSaved(n) if n.status == NodeStatus::Drained))
    );

    let (_, changes) = h.sched.undrain("n1", h.now).expect("known node");
    assert_eq!(status_of(&h, "n1"), NodeStatus::Idle);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::NodeSaved(n) if n.drain.is_none()))
    );
    assert_eq!(h.pull("n1", 10).len(), 1, "back in service");
    assert_eq!(status_of(&h, "n1"), NodeStatus::Busy);
}

#[test]
fn at_the_drain_deadline_what_remains_is_stopped_and_requeued_without_counting_a_loss() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let t = h.submit_with(SubmitRequest {
        code: Some("import time; time.sleep(600)".into()),
        max_attempts: Some(1),
        ..SubmitRequest::default()
    });
    let got = h.pull("n1", 1);
    h.sched.drain("n1", Some(30.0), h.now).expect("known node");
    h.advance(10.0);
    h.heartbeat("n1", 2.0, 4096.0, &[got[0].run_id]);
    assert!(
        h.sched.tick(h.now).is_empty(),
        "nothing happens before the deadline"
    );

    h.advance(21.0);
    h.heartbeat("n1", 2.0, 4096.0, &[got[0].run_id]);
    let changes = h.sched.tick(h.now);
    assert_eq!(
        run_status(&changes, got[0].run_id),
        Some(RunStatus::Released)
    );
    let state = final_state(&changes, t).expect("task requeued");
    assert_eq!(state.status, TaskStatus::Pending);
    assert_eq!(
        state.losses, 0,
        "a drain is not the code's fault nor a lost node"
    );
    assert_eq!(status_of(&h, "n1"), NodeStatus::Drained);
    let answer = h.heartbeat("n1", 2.0, 4096.0, &[got[0].run_id]);
    assert_eq!(
        answer.cancel,
        vec![got[0].run_id],
        "the agent is told to kill it"
    );

    // It completes elsewhere, once; the stopped run's late result is refused.
    h.node("n2", 2.0, 4096.0);
    let again = h.pull("n2", 1);
    assert_eq!(again[0].task_id, t);
    assert!(matches!(
        h.report("n1", &got[0], RunOutcome::Completed, ""),
        Err(SchedulerError::StaleLease { .. })
    ));
    let changes = h
        .report("n2", &again[0], RunOutcome::Completed, "")
        .expect("current run");
    assert_eq!(
        final_state(&changes, t).map(|s| s.status),
        Some(TaskStatus::Completed)
    );
}

#[test]
fn a_drain_with_timeout_zero_stops_runs_at_once_and_an_idle_node_is_drained_at_once() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    h.node("n2", 2.0, 4096.0);
    h.submit("pass");
    let got = h.pull("n1", 1);
    let (_, changes) = h.sched.drain("n1", Some(0.0), h.now).expect("known node");
    assert_eq!(
        run_status(&changes, got[0].run_id),
        Some(RunStatus::Released)
    );
    assert_eq!(status_of(&h, "n1"), NodeStatus::Drained);
    h.sched.drain("n2", None, h.now).expect("known node");
    assert_eq!(status_of(&h, "n2"), NodeStatus::Drained);
}

#[test]
fn drain_state_survives_a_restart_and_an_offline_spell() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    h.sched.drain("n1", None, h.now).expect("known node");
    let snapshot = Snapshot {
        nodes: h.sched.nodes.values().map(|n| n.record.clone()).collect(),
        ..Snapshot::default()
    };
    let mut h2 = Harness::new();
    h2.sched = Scheduler::restore(SchedulerConfig::default(), snapshot, h.now);
    h2.now = h.now;
    assert_eq!(status_of(&h2, "n1"), NodeStatus::Drained);
    h2.node("n1", 2.0, 4096.0);
    assert_eq!(
        status_of(&h2, "n1"),
        NodeStatus::Drained,
        "a heartbeat does not undrain"
    );
    h2.advance(60.0);
    h2.sched.tick(h2.now);
    assert_eq!(status_of(&h2, "n1"), NodeStatus::Offline);
    h2.node("n1", 2.0, 4096.0);
    assert_eq!(
        status_of(&h2, "n1"),
        NodeStatus::Drained,
        "back from offline, still drained"
    );
}

#[test]
fn unknown_nodes_are_not_found_for_every_node_operation() {
    let mut h = Harness::new();
    let missing = |e: SchedulerError| matches!(e, SchedulerError::NodeNotFound(n) if n == "ghost");
    assert!(
        h.sched
            .drain("ghost", None, h.now)
            .err()
            .is_some_and(missing)
    );
    assert!(h.sched.undrain("ghost", h.now).err().is_some_and(missing));
    assert!(h.sched.restart("ghost", h.now).err().is_some_and(missing));
    assert!(h.sched.meta("ghost").err().is_some_and(missing));
    assert!(
        h.sched
            .set_meta("ghost", serde_json::Map::new())
            .err()
            .is_some_and(missing)
    );
}

#[test]
fn commands_are_delivered_in_heartbeats_until_the_agent_reports_and_expire_otherwise() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let (restart, _) = h.sched.restart("n1", h.now).expect("known node");
    let answer = h.node("n1", 2.0, 4096.0);
    assert_eq!(answer.commands.len(), 1);
    assert_eq!(answer.commands[0].id, restart.command_id);
    assert!(answer.changes.iter().any(|c| matches!(c,
        Change::CommandSaved(cmd) if cmd.status == CommandStatus::Delivered)));
    // Repeated until there is an outcome.
    assert_eq!(h.node("n1", 2.0, 4096.0).commands.len(), 1);

    let hb = HeartbeatRequest {
        command_results: vec![CommandResult {
            id: restart.command_id,
            ok: true,
            error: None,
        }],
        ..heartbeat_request("n1")
    };
    let out = h.sched.heartbeat(&hb, h.now);
    assert!(out.commands.is_empty());
    assert!(out.changes.iter().any(|c| matches!(c,
        Change::CommandSaved(cmd) if cmd.status == CommandStatus::Succeeded && cmd.completed_at.is_some())));

    // A command for a node that never answers expires after the TTL.
    let (lonely, _) = h.sched.undrain("n1", h.now).expect("known node");
    h.advance(61.0);
    let changes = h.sched.tick(h.now);
    let expired = changes.iter().find_map(|c| match c {
        Change::CommandSaved(cmd) if cmd.command_id == lonely.command_id => Some(cmd.clone()),
        _ => None,
    });
    let expired = expired.expect("expired");
    assert_eq!(expired.status, CommandStatus::Expired);
    assert!(expired.error.is_some_and(|e| e.contains("never delivered")));
}

/// `node`'s report that run `a` ended with `outcome` (exit code 0), having printed `stdout`.
pub(crate) fn run_report(
    node: &str,
    a: &Assignment,
    outcome: RunOutcome,
    stdout: &str,
) -> RunReport {
    RunReport {
        node_id: node.into(),
        task_id: a.task_id,
        run_id: a.run_id,
        outcome,
        exit_code: Some(0),
        stdout: stdout.into(),
        stderr: String::new(),
        error: None,
        started_at: None,
        completed_at: None,
        cpu_seconds: None,
        max_rss_mb: None,
    }
}

/// An idle node's heartbeat: 2 cores, 4 GB, nothing running.
pub(crate) fn heartbeat_request(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        node_id: id.into(),
        status: AgentState::Idle,
        resources: NodeResources {
            cpu_cores: 2.0,
            memory_mb: 4096.0,
        },
        current_load: Load::default(),
        hostname: None,
        node_type: None,
        zone: None,
        version: None,
        running: vec![],
        finished: vec![],
        sandbox: None,
        executor: None,
        command_results: vec![],
        owner_load: None,
        paused_reason: None,
    }
}

#[test]
fn operator_meta_steers_placement_from_the_next_pull_and_heartbeats_keep_it() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let mut want = std::collections::BTreeMap::new();
    want.insert("gpu".to_string(), serde_json::json!("a100"));
    let t = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        constraints: Some(Constraints {
            meta: want,
            ..Constraints::default()
        }),
        ..SubmitRequest::default()
    });
    assert!(h.pull("n1", 1).is_empty(), "no meta yet");
    let mut meta = serde_json::Map::new();
    meta.insert("gpu".into(), serde_json::json!("a100"));
    let changes = h.sched.set_meta("n1", meta.clone()).expect("known node");
    assert!(matches!(&changes[..], [Change::NodeSaved(n)] if n.meta == meta));
    h.node("n1", 2.0, 4096.0);
    assert_eq!(
        h.sched.meta("n1").expect("known"),
        meta,
        "a heartbeat leaves meta alone"
    );
    assert_eq!(h.pull("n1", 1)[0].task_id, t);
}

#[test]
fn explain_names_what_keeps_a_task_pending() {
    let mut h = Harness::new();
    let t = h.submit("pass");
    let e = h.sched.explain(t).expect("active");
    assert_eq!(e.reason, "no node has joined the pool");

    h.node("small", 0.5, 4096.0);
    let e = h.sched.explain(t).expect("active");
    assert_eq!(e.nodes[0].verdict, Verdict::TooSmall);
    assert_eq!(e.nodes[0].short, vec!["cpu"]);
    assert!(e.reason.contains("big enough"), "{}", e.reason);

    h.node("n1", 1.0, 4096.0);
    let blocker = h.submit("pass");
    // `t` is older, so it is placed first; then the node is full for `blocker`.
    assert_eq!(h.pull("n1", 1)[0].task_id, t);
    let e = h.sched.explain(blocker).expect("active");
    let n1 = e.nodes.iter().find(|n| n.node_id == "n1").expect("n1");
    assert_eq!(n1.verdict, Verdict::Full);
    assert_eq!(n1.short, vec!["cpu"]);
    assert!(e.reason.contains("full"), "{}", e.reason);

    h.sched.drain("n1", None, h.now).expect("known");
    let e = h.sched.explain(blocker).expect("active");
    assert!(e.reason.contains("n1 draining"), "{}", e.reason);

    let running = h.sched.explain(t).expect("active");
    assert_eq!(running.status, TaskStatus::Running);
    assert!(
        running.reason.contains("running on node n1"),
        "{}",
        running.reason
    );

    let mut want = std::collections::BTreeMap::new();
    want.insert("rack".to_string(), serde_json::json!(7));
    let picky = h.submit_with(SubmitRequest {
        code: Some("pass".into()),
        constraints: Some(Constraints {
            meta: want,
            ..Constraints::default()
        }),
        ..SubmitRequest::default()
    });
    let e = h.sched.explain(picky).expect("active");
    assert!(e.nodes.iter().all(|n| n.verdict == Verdict::Mismatch));
    assert!(
        e.reason.contains("no node matches its constraints"),
        "{}",
        e.reason
    );
    assert!(
        e.nodes[0].detail.contains("meta.rack is not set"),
        "{}",
        e.nodes[0].detail
    );
}

#[test]
fn a_node_paused_for_its_owner_gets_no_work_until_it_resumes() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let paused = |status: AgentState, reason: Option<&str>| HeartbeatRequest {
        status,
        owner_load: Some(Load {
            cpu_percent: 87.0,
            memory_percent: 20.0,
        }),
        paused_reason: reason.map(str::to_string),
        ..heartbeat_request("n1")
    };
    let reason = "owner CPU 87% > 50% for 10 s";
    h.sched
        .heartbeat(&paused(AgentState::Paused, Some(reason)), h.now);
    h.submit("pass");
    let node = &h.sched.nodes()[0];
    assert_eq!(node.record.status, NodeStatus::Paused);
    assert_eq!(node.paused_reason.as_deref(), Some(reason));
    assert_eq!(node.owner_load.map(|l| l.cpu_percent), Some(87.0));
    assert!(
        h.pull("n1", 10).is_empty(),
        "nothing is placed on a paused node"
    );

    h.sched.heartbeat(&paused(AgentState::Idle, None), h.now);
    assert_eq!(h.sched.nodes()[0].record.status, NodeStatus::Idle);
    assert_eq!(h.sched.nodes()[0].paused_reason, None);
    assert_eq!(h.pull("n1", 10).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Membership: scale-out groups, holds, admission, removal (seeds 002 and 003)
// ---------------------------------------------------------------------------------------------

fn group_of(h: &Harness, id: &str) -> NodeGroup {
    h.sched
        .nodes()
        .into_iter()
        .find(|n| n.record.node_id == id)
        .map(|n| n.record.group)
        .expect("known node")
}

#[test]
fn nodes_that_join_on_their_own_form_a_group_each_in_joining_order() {
    let mut h = Harness::new();
    h.node("b", 2.0, 4096.0);
    h.node("a", 2.0, 4096.0);
    h.node("b", 2.0, 4096.0);
    let (a, b) = (group_of(&h, "a"), group_of(&h, "b"));
    assert!(b.id < a.id, "b joined first");
    assert_eq!((a.operation_id, b.operation_id), (None, None));
    let groups = h.sched.groups();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].node_ids, vec!["b".to_string()]);
}

#[test]
fn a_held_node_is_not_registered_until_admitted_with_its_operation_as_one_group() {
    let mut h = Harness::new();
    h.node("old", 2.0, 4096.0);
    h.sched.hold("n1", 7).expect("holds");
    h.sched.hold("n2", 7).expect("holds");
    assert!(h.sched.hold("n1", 8).is_err(), "held by another operation");
    let t = h.submit("print(1)");
    // Heartbeats are noted, not registered; pulls get nothing.
    let out = h.node("n1", 2.0, 4096.0);
    assert!(out.changes.is_empty());
    assert!(h.sched.nodes().iter().all(|n| n.record.node_id != "n1"));
    assert!(h.pull("n1", 1).is_empty());
    assert_eq!(h.sched.held_heartbeat_at("n1"), Some(h.now));
    assert_eq!(h.sched.held_heartbeat_at("n2"), None);
    // All or nothing: n2 has not heartbeated yet.
    assert_eq!(
        h.sched.admit(&["n1".into(), "n2".into()], 7, h.now).err(),
        Some(SchedulerError::NoHeartbeatYet("n2".into()))
    );
    assert!(h.sched.nodes().iter().all(|n| n.record.node_id != "n1"));
    h.node("n2", 2.0, 4096.0);
    assert!(
        h.sched.admit(&["n1".into()], 8, h.now).is_err(),
        "not its hold"
    );
    let (group, changes) = h
        .sched
        .admit(&["n1".into(), "n2".into()], 7, h.now)
        .expect("admitted");
    assert_eq!(group.operation_id, Some(7));
    assert!(group.id > group_of(&h, "old").id);
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::NodeSaved(n) if n.group == group && n.status == NodeStatus::Idle))
            .count(),
        2
    );
    assert_eq!(group_of(&h, "n1"), group_of(&h, "n2"));
    // Members now: work flows, and a new hold is refused.
    assert_eq!(h.pull("n1", 1)[0].task_id, t);
    assert!(matches!(
        h.sched.hold("n2", 9),
        Err(SchedulerError::AlreadyMember(_))
    ));
    assert_eq!(h.sched.groups().len(), 2);
}

#[test]
fn an_unheld_node_that_was_never_admitted_leaves_no_record() {
    let mut h = Harness::new();
    h.sched.hold("n1", 3).expect("holds");
    h.node("n1", 2.0, 4096.0);
    h.sched.unhold("n1", 4);
    assert!(
        h.sched.held_heartbeat_at("n1").is_some(),
        "only its operation lets go"
    );
    h.sched.unhold("n1", 3);
    assert!(h.sched.held_heartbeat_at("n1").is_none());
    assert!(h.sched.nodes().is_empty(), "nothing half-joined");
}

#[test]
fn a_removed_node_stays_removed_when_its_agent_says_goodbye_and_rejoins_as_a_new_group() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    h.node("n2", 2.0, 4096.0);
    let first = group_of(&h, "n1");
    let (command, _) = h.sched.decommission("n1", h.now).expect("known node");
    assert_eq!(command.kind, CommandKind::Decommission);
    // Its outcome rides on the goodbye heartbeat.
    let mut bye = heartbeat_request("n1");
    bye.status = AgentState::Offline;
    bye.command_results = vec![CommandResult {
        id: command.command_id,
        ok: true,
        error: None,
    }];
    h.sched.heartbeat(&bye, h.now);
    assert_eq!(status_of(&h, "n1"), NodeStatus::Offline);
    let changes = h.sched.remove_node("n1", h.now).expect("known");
    assert!(matches!(&changes[..], [Change::NodeSaved(n)] if n.status == NodeStatus::Removed));
    assert!(h.sched.remove_node("n1", h.now).expect("known").is_empty());
    assert_eq!(h.sched.node_counts().removed, 1);
    assert_eq!(h.sched.groups().len(), 1, "a removed node is in no group");
    // A stray goodbye changes nothing; ticks leave it alone.
    h.sched.heartbeat(&bye, h.now);
    h.advance(60.0);
    h.sched.tick(h.now);
    assert_eq!(status_of(&h, "n1"), NodeStatus::Removed);
    assert!(
        h.sched.drain("n1", None, h.now).is_err(),
        "removed nodes take no commands"
    );
    // Started again on its own: a member again, in a group of its own, the newest.
    h.node("n1", 2.0, 4096.0);
    assert_eq!(status_of(&h, "n1"), NodeStatus::Idle);
    assert!(group_of(&h, "n1").id > first.id.max(group_of(&h, "n2").id));
}

#[test]
fn removing_a_node_that_still_holds_runs_hands_them_back_without_a_loss() {
    let mut h = Harness::new();
    h.node("n1", 2.0, 4096.0);
    let t = h.submit("print(1)");
    let a = h.pull("n1", 1);
    let changes = h.sched.remove_node("n1", h.now).expect("known");
    let state = final_state(&changes, t).expect("requeued");
    assert_eq!(state.status, TaskStatus::Pending);
    assert_eq!(state.losses, 0);
    h.node("n2", 2.0, 4096.0);
    assert_eq!(h.pull("n2", 1)[0].task_id, t);
    assert!(
        h.report("n1", &a[0], RunOutcome::Completed, "1\n").is_err(),
        "stale"
    );
}

// ---------------------------------------------------------------------------------------------
// Points (seed 000): one task on several distinct nodes at once
// ---------------------------------------------------------------------------------------------

impl Harness {
    fn submit_points(&mut self, code: &str, points: u32) -> TaskId {
        self.submit_with(SubmitRequest {
            code: Some(code.into()),
            points: Some(points),
            ..SubmitRequest::default()
        })
    }

    fn change_points(&mut self, task_id: TaskId, points: u32) -> Vec<Change> {
        self.sched
            .change_points(task_id, points, self.now)
            .expect("active task")
    }
}

fn revised_state(changes: &[Change], task_id: TaskId) -> Option<TaskState> {
    changes.iter().rev().find_map(|c| match c {
        Change::TaskUpdated(s) | Change::TaskRevised(s) if s.task_id == task_id => Some(s.clone()),
        _ => None,
    })
}

fn saved_run(changes: &[Change], run_id: RunId) -> Option<RunRecord> {
    changes.iter().rev().find_map(|c| match c {
        Change::RunSaved(r) if r.run_id == run_id => Some(r.clone()),
        _ => None,
    })
}

/// Three roomy nodes and a task with `points` points, one placed on each of the first
/// `points` nodes in order.
fn three_nodes_running(points: u32) -> (Harness, TaskId, Vec<Assignment>) {
    let mut h = Harness::new();
    for n in ["n1", "n2", "n3"] {
        h.node(n, 4.0, 8192.0);
    }
    let t = h.submit_points("print(1)", points);
    let mut placed = Vec::new();
    for n in ["n1", "n2", "n3"].into_iter().take(points as usize) {
        let got = h.pull(n, 10);
        assert_eq!(got.len(), 1, "{n} takes exactly one point of the task");
        placed.push(got[0].clone());
    }
    (h, t, placed)
}

#[test]
fn the_points_of_a_task_run_on_distinct_nodes() {
    let mut h = Harness::new();
    h.node("n1", 4.0, 8192.0);
    h.node("n2", 4.0, 8192.0);
    let t = h.submit_points("print(1)", 2);
    // n1 has room for both, but takes one point only.
    let first = h.pull("n1", 10);
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].task_id, first[0].point, first[0].points),
        (t, 0, 2)
    );
    assert!(h.pull("n1", 10).is_empty(), "never two points on one node");
    let second = h.pull("n2", 10);
    assert_eq!((second[0].point, second[0].points), (1, 2));
    assert_eq!(h.sched.pending_count(), 0, "every point placed");
    let state = &h.sched.tasks[&t].record.state;
    assert_eq!(state.status, TaskStatus::Running);
    assert_eq!(state.attempts, 2);
    // A one-point task behind it is still placed on n1.
    let other = h.submit("pass");
    assert_eq!(h.pull("n1", 10)[0].task_id, other);
}

#[test]
fn a_hand_run_worker_never_leases_a_multi_point_task() {
    let mut h = Harness::new();
    let multi = h.submit_points("print(1)", 2);
    let single = h.submit("pass");
    let (lease, _) = h.sched.legacy_assign(h.now);
    assert_eq!(lease.map(|l| l.task_id), Some(single));
    assert!(h.sched.legacy_assign(h.now).0.is_none());
    assert!(h.sched.explain(multi).is_some());
}

#[test]
fn raising_points_places_the_new_points_on_nodes_without_one() {
    let (mut h, t, placed) = three_nodes_running(2);
    let changes = h.change_points(t, 3);
    let state = revised_state(&changes, t).expect("points recorded");
    assert_eq!((state.points, state.status), (3, TaskStatus::Running));
    assert!(
        matches!(changes.last(), Some(Change::TaskRevised(_))),
        "no status change: revised, not updated"
    );
    assert!(h.pull("n1", 10).is_empty());
    assert!(h.pull("n2", 10).is_empty());
    let third = h.pull("n3", 10);
    assert_eq!(
        (third[0].task_id, third[0].point, third[0].points),
        (t, 2, 3)
    );
    assert_ne!(third[0].run_id, placed[0].run_id);
    // The same count again changes nothing.
    assert!(h.change_points(t, 3).is_empty());
}

#[test]
fn lowering_points_stops_the_newest_runs_as_stopped_and_refuses_their_results() {
    let (mut h, t, placed) = three_nodes_running(3);
    let changes = h.change_points(t, 1);
    for a in &placed[1..] {
        let run = saved_run(&changes, a.run_id).expect("stopped run saved");
        assert_eq!(run.status, RunStatus::Stopped);
        assert!(
            run.error
                .as_deref()
                .is_some_and(|e| e.contains("scaled down from 3 to 1")),
            "{:?}",
            run.error
        );
    }
    assert!(
        saved_run(&changes, placed[0].run_id).is_none(),
        "point 0 runs on"
    );
    let state = revised_state(&changes, t).expect("task saved");
    assert_eq!(
        (state.points, state.status, state.losses),
        (1, TaskStatus::Running, 0)
    );
    // Their nodes are told to kill them, and a late result is refused.
    let hb = h.heartbeat("n2", 4.0, 8192.0, &[placed[1].run_id]);
    assert_eq!(hb.cancel, vec![placed[1].run_id]);
    let late = h.report("n3", &placed[2], RunOutcome::Completed, "late\n");
    assert!(
        matches!(late, Err(SchedulerError::StaleLease { .. })),
        "{late:?}"
    );
    // Not retried: nothing is queued, no node gets it again.
    assert_eq!(h.sched.pending_count(), 0);
    assert!(h.pull("n2", 10).is_empty());
    // The remaining point completes the task, once.
    let done = h
        .report("n1", &placed[0], RunOutcome::Completed, "zero\n")
        .expect("current run");
    let state = final_state(&done, t).expect("finished");
    assert_eq!(
        (state.status, state.result.as_deref()),
        (TaskStatus::Completed, Some("zero"))
    );
    assert!(
        h.report("n1", &placed[0], RunOutcome::Completed, "zero\n")
            .is_err()
    );
}

#[test]
fn a_point_lost_with_its_node_is_retried_on_another_node() {
    let (mut h, t, placed) = three_nodes_running(2);
    // n2 falls silent; n1 and n3 keep heartbeating.
    h.advance(11.0);
    h.heartbeat("n1", 4.0, 8192.0, &[placed[0].run_id]);
    h.heartbeat("n3", 4.0, 8192.0, &[]);
    let changes = h.sched.tick(h.now);
    assert_eq!(
        run_status(&changes, placed[1].run_id),
        Some(RunStatus::Lost)
    );
    let state = revised_state(&changes, t).expect("task saved");
    assert_eq!((state.status, state.losses), (TaskStatus::Running, 1));
    assert!(h.pull("n1", 10).is_empty(), "n1 runs point 0 already");
    let retry = h.pull("n3", 10);
    assert_eq!(
        (retry[0].task_id, retry[0].point, retry[0].attempt),
        (t, 1, 3)
    );
    // The lost run's late result is refused; the retry's is taken.
    assert!(
        h.report("n2", &placed[1], RunOutcome::Completed, "x\n")
            .is_err()
    );
    h.report("n3", &retry[0], RunOutcome::Completed, "one\n")
        .expect("current");
    let done = h
        .report("n1", &placed[0], RunOutcome::Completed, "zero\n")
        .expect("current");
    assert_eq!(
        final_state(&done, t).map(|s| (s.status, s.result)),
        Some((TaskStatus::Completed, Some("zero".to_string())))
    );
}

#[test]
fn a_multi_point_task_completes_when_every_point_has_with_point_zeros_result() {
    let (mut h, t, placed) = three_nodes_running(2);
    // Point 0 finishes first: the task runs on while point 1 does.
    let first = h
        .report("n1", &placed[0], RunOutcome::Completed, "zero\n")
        .expect("current");
    assert!(final_state(&first, t).is_none(), "no status change yet");
    assert_eq!(
        revised_state(&first, t).map(|s| s.status),
        Some(TaskStatus::Running)
    );
    assert!(h.pull("n1", 10).is_empty(), "a done point is not run again");
    let last = h
        .report("n2", &placed[1], RunOutcome::Completed, "one\n")
        .expect("current");
    let state = final_state(&last, t).expect("completed");
    assert_eq!(state.status, TaskStatus::Completed);
    assert_eq!(state.result.as_deref(), Some("zero"), "point 0's output");
    assert_eq!(h.sched.active_count(), 0);
}

#[test]
fn lowering_to_points_that_are_all_done_completes_the_task() {
    let (mut h, t, placed) = three_nodes_running(2);
    h.report("n1", &placed[0], RunOutcome::Completed, "zero\n")
        .expect("current");
    let changes = h.change_points(t, 1);
    assert_eq!(
        run_status(&changes, placed[1].run_id),
        Some(RunStatus::Stopped)
    );
    let state = final_state(&changes, t).expect("completed");
    assert_eq!((state.status, state.points), (TaskStatus::Completed, 1));
    assert_eq!(state.result.as_deref(), Some("zero"));
}

#[test]
fn a_failed_point_fails_the_task_and_cancels_the_other_points() {
    let (mut h, t, placed) = three_nodes_running(2);
    let failed = h
        .report("n2", &placed[1], RunOutcome::Failed, "")
        .expect("current");
    let state = final_state(&failed, t).expect("failed");
    assert_eq!(state.status, TaskStatus::Failed);
    assert!(
        state
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("point 1 failed")),
        "{:?}",
        state.error
    );
    assert_eq!(
        run_status(&failed, placed[0].run_id),
        Some(RunStatus::Cancelled)
    );
    let hb = h.heartbeat("n1", 4.0, 8192.0, &[placed[0].run_id]);
    assert_eq!(hb.cancel, vec![placed[0].run_id]);
    assert!(
        h.report("n1", &placed[0], RunOutcome::Completed, "0\n")
            .is_err()
    );
}

#[test]
fn points_survive_a_restart_with_what_is_done_and_what_runs() {
    let (mut h, t, placed) = three_nodes_running(3);
    h.report("n1", &placed[0], RunOutcome::Completed, "zero\n")
        .expect("current");
    let task = h.sched.tasks[&t].record.clone();
    let runs: Vec<RunRecord> = placed[1..]
        .iter()
        .map(|a| h.sched.active_run(a.run_id).expect("active").clone())
        .collect();
    let nodes: Vec<NodeRecord> = h.sched.nodes().into_iter().map(|n| n.record).collect();
    let snapshot = Snapshot {
        active_tasks: vec![task],
        active_runs: runs,
        completed_points: vec![(t, 0, "zero\n".into())],
        nodes,
        max_task_id: t,
        max_run_id: placed[2].run_id,
        total_tasks: 1,
        ..Snapshot::default()
    };
    let mut after = Scheduler::restore(h.sched.config.clone(), snapshot, h.now);
    assert_eq!(
        after.pending_count(),
        0,
        "nothing to place: 1 done, 2 running"
    );
    let report = |a: &Assignment, node: &str, stdout: &str| {
        run_report(node, a, RunOutcome::Completed, stdout)
    };
    after
        .report(&report(&placed[1], "n2", "one\n"), h.now)
        .expect("restored run");
    let done = after
        .report(&report(&placed[2], "n3", "two\n"), h.now)
        .expect("restored run");
    let state = final_state(&done, t).expect("completed");
    assert_eq!(state.result.as_deref(), Some("zero"));
}

#[test]
fn explain_says_which_points_run_and_why_the_others_wait() {
    let (mut h, t, _) = three_nodes_running(2);
    h.change_points(t, 4);
    // n3 takes point 2; point 3 has no node left that does not run one.
    assert_eq!(h.pull("n3", 10)[0].point, 2);
    let e = h.sched.explain(t).expect("active");
    assert_eq!(e.points, 4);
    assert_eq!(
        e.runs.iter().map(|r| r.point).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(e.waiting_points, vec![3]);
    assert!(e.nodes.iter().all(|n| n.verdict == Verdict::RunsAPoint));
    assert!(
        e.reason.starts_with("3 of its 4 points run"),
        "{}",
        e.reason
    );
    assert!(
        e.reason.contains("point 3 waits for a node"),
        "{}",
        e.reason
    );
    assert!(
        e.reason.contains("already runs one of its points"),
        "{}",
        e.reason
    );
}

#[test]
fn a_heartbeat_saves_the_node_only_when_something_it_carries_changed() {
    let mut h = Harness::new();
    let base = HeartbeatRequest {
        node_id: "n1".into(),
        status: AgentState::Idle,
        resources: NodeResources {
            cpu_cores: 2.0,
            memory_mb: 2048.0,
        },
        current_load: Load::default(),
        hostname: Some("n1.local".into()),
        node_type: Some("cpu".into()),
        zone: Some("zone1".into()),
        version: Some("1.0".into()),
        running: vec![],
        finished: vec![],
        sandbox: Some(lull_shared::Protections::none("not probed")),
        executor: Some("zygote".into()),
        command_results: vec![],
        owner_load: None,
        paused_reason: None,
    };
    let saved = |out: &HeartbeatOutcome| {
        out.changes
            .iter()
            .filter(|c| matches!(c, Change::NodeSaved(_)))
            .count()
    };
    assert_eq!(saved(&h.sched.heartbeat(&base, h.now)), 1, "first seen");
    h.advance(2.0);
    assert_eq!(
        saved(&h.sched.heartbeat(&base, h.now)),
        0,
        "nothing changed"
    );
    // Leaving a field out keeps what the node said before: not a change either.
    let quiet = HeartbeatRequest {
        hostname: None,
        version: None,
        sandbox: None,
        executor: None,
        ..base.clone()
    };
    assert_eq!(
        saved(&h.sched.heartbeat(&quiet, h.now)),
        0,
        "fields left out"
    );
    let variants = [
        HeartbeatRequest {
            hostname: Some("renamed.local".into()),
            ..base.clone()
        },
        HeartbeatRequest {
            node_type: Some("gpu".into()),
            ..base.clone()
        },
        HeartbeatRequest {
            zone: Some("zone2".into()),
            ..base.clone()
        },
        HeartbeatRequest {
            version: Some("1.1".into()),
            ..base.clone()
        },
        HeartbeatRequest {
            sandbox: Some(lull_shared::Protections::none("probed again")),
            ..base.clone()
        },
        HeartbeatRequest {
            executor: Some("cold".into()),
            ..base.clone()
        },
        HeartbeatRequest {
            resources: NodeResources {
                cpu_cores: 4.0,
                memory_mb: 2048.0,
            },
            ..base.clone()
        },
        HeartbeatRequest {
            status: AgentState::Paused,
            ..base.clone()
        },
    ];
    for (i, changed) in variants.iter().enumerate() {
        h.advance(2.0);
        let out = h.sched.heartbeat(changed, h.now);
        assert_eq!(saved(&out), 1, "variant {i} is saved");
        h.advance(2.0);
        assert_eq!(
            saved(&h.sched.heartbeat(changed, h.now)),
            0,
            "variant {i} again"
        );
        // And back, which is a change again.
        h.advance(2.0);
        assert_eq!(
            saved(&h.sched.heartbeat(&base, h.now)),
            1,
            "variant {i} undone"
        );
    }
}
