//! The live feed behind `WS /ws/updates`: each committed change a client would want to see
//! becomes an event with a sequence number, kept in a bounded ring (for `?since=` replays)
//! and broadcast to every subscriber through a bounded channel. A commit's events travel
//! together, as one [`Group`] (of at most [`GROUP_EVENTS`]): a subscriber takes a commit's
//! events from the broadcast at once, and a `?batch=true` connection that wants them all
//! sends the group's array (encoded once for every such connection) instead of building its
//! own from the events.
//!
//! Architecture Invariant: an event is published only after the change it reports is
//! durable. The store's writer calls [`Feed::committed`] after each commit and before it
//! acknowledges anyone, from its single task, so `seq` order is commit order, and a client
//! answered by the HTTP API already finds its event in the feed.
//!
//! Architecture Invariant: publishing never waits for a subscriber. Each subscriber reads a
//! bounded broadcast; one that falls more than `buffer` groups behind loses the oldest and is
//! told how many events that was (`lagged`). A stuck client costs memory bounded by the
//! buffer (`buffer` × [`GROUP_EVENTS`] events at most), never time on the commit path or for
//! other clients.
//!
//! Architecture Invariant: nobody listening costs (close to) nothing. An event keeps what it
//! says as typed data; its JSON is encoded once, by the first subscriber (live or replaying)
//! that sends it, and shared by all the others. The commit path only numbers, stores and
//! broadcasts.
//!
//! Knows neither axum nor SQL: the HTTP layer turns a [`Subscription`] into WebSocket frames.

use crate::engine::unix_now;
use crate::model::{Change, NodeRecord, RunRecord, TaskState};
use crate::store::CommitObserver;
use bytes::Bytes;
use lull_shared::{
    FeedEventKind, FeedMessage, LaggedData, NodeEventData, NodeStatus, RunEventData, RunStatus,
    TaskEventData, TaskId, TaskStatus,
};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use tokio::sync::broadcast;

/// Longest `error` a task event carries; the whole text is in the task itself.
const MAX_EVENT_ERROR_CHARS: usize = 1000;

/// Most events broadcast as one group: a larger commit's events go in several. With the
/// default buffer of 4,096 groups, a stuck subscriber holds at most 65,536 events (about
/// 30 MB) and may fall at least 4,096 events behind before it loses any.
pub const GROUP_EVENTS: usize = 16;

#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// Events kept for `?since=` replays.
    pub history: usize,
    /// Groups (a commit's events, at most [`GROUP_EVENTS`] each) one subscriber may fall
    /// behind before it loses the oldest (and gets `lagged`).
    pub buffer: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            history: 16_384,
            buffer: 4096,
        }
    }
}

/// One published event, serialised (at most) once for every subscriber.
#[derive(Debug)]
pub struct Event {
    pub seq: u64,
    pub kind: FeedEventKind,
    pub task_id: Option<TaskId>,
    pub node_id: Option<String>,
    ts: f64,
    data: EventData,
    /// The message as sent, encoded when first asked for.
    json: OnceLock<Bytes>,
}

/// An event's `data`, as the feed derived it from a change.
#[derive(Debug)]
enum EventData {
    Task(TaskEventData),
    Run(RunEventData),
    Node(NodeEventData),
    Other(Value),
}

impl Event {
    /// The message as sent: `{"event", "data", "seq", "ts"}`. The first call encodes it (a
    /// concurrent one waits for that); every later one shares the same bytes.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let data = match &self.data {
                EventData::Task(d) => to_value(d),
                EventData::Run(d) => to_value(d),
                EventData::Node(d) => to_value(d),
                EventData::Other(v) => v.clone(),
            };
            encode(&FeedMessage {
                event: self.kind,
                data,
                seq: self.seq,
                ts: self.ts,
            })
        })
    }
}

/// Events published together (one commit's, or part of a large one's), in `seq` order, with
/// no gap between them: what the broadcast carries.
#[derive(Debug)]
pub struct Group {
    events: Vec<Arc<Event>>,
    /// The events as one JSON array (`?batch=true`), encoded when first asked for.
    array: OnceLock<Bytes>,
}

impl Group {
    fn new(events: Vec<Arc<Event>>) -> Group {
        Group {
            events,
            array: OnceLock::new(),
        }
    }

    /// Never empty: the feed broadcasts no empty group.
    pub fn events(&self) -> &[Arc<Event>] {
        &self.events
    }

    /// The seq of the first event (0 for an empty group, which the feed never sends).
    pub fn first_seq(&self) -> u64 {
        self.events.first().map_or(0, |e| e.seq)
    }

    /// `[event,event,...]`: each event's own message, comma-separated. Built once, by the
    /// first connection that sends the group whole; every other one shares the bytes.
    pub fn array(&self) -> &Bytes {
        self.array.get_or_init(|| {
            let len = self
                .events
                .iter()
                .map(|e| e.json().len() + 1)
                .sum::<usize>()
                + 1;
            let mut array = Vec::with_capacity(len);
            array.push(b'[');
            for (i, event) in self.events.iter().enumerate() {
                if i > 0 {
                    array.push(b',');
                }
                array.extend_from_slice(event.json());
            }
            array.push(b']');
            Bytes::from(array)
        })
    }
}

/// Which events a subscriber wants; every given part must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: every kind.
    pub events: Option<Vec<FeedEventKind>>,
    pub task_id: Option<TaskId>,
    /// Events about this node: its own, and those of tasks running on it.
    pub node_id: Option<String>,
}

impl Filter {
    /// Whether this filter lets every event through.
    pub fn takes_all(&self) -> bool {
        self.events.is_none() && self.task_id.is_none() && self.node_id.is_none()
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.events
            .as_ref()
            .is_none_or(|kinds| kinds.contains(&event.kind))
            && self.task_id.is_none_or(|id| event.task_id == Some(id))
            && self
                .node_id
                .as_deref()
                .is_none_or(|id| event.node_id.as_deref() == Some(id))
    }
}

/// Events a subscriber asked for (with `since`) that it will never receive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gap {
    /// `missed` events after seq `after` have left the ring.
    Missed { after: u64, missed: u64 },
    /// `since` is beyond the newest event: it came from an earlier coordinator process
    /// (seq starts again at 1 on every start).
    Ahead { since: u64, newest: u64 },
}

/// What a new subscriber sends, in order: the gap notice, the backlog, then `live`.
pub struct Subscription {
    pub gap: Option<Gap>,
    /// Events after `since` still in the ring, oldest first.
    pub backlog: Vec<Arc<Event>>,
    /// Everything published after the backlog, with nothing skipped or repeated.
    pub live: broadcast::Receiver<Arc<Group>>,
    /// The newest seq when the subscription began (the last one before `live`).
    pub newest: u64,
}

pub struct Feed {
    state: Mutex<FeedState>,
    sender: broadcast::Sender<Arc<Group>>,
    history: usize,
    buffer: usize,
}

struct FeedState {
    last_seq: u64,
    ring: VecDeque<Arc<Event>>,
    /// The last status published for each node, to tell joins, leaves and updates apart.
    node_status: HashMap<String, NodeStatus>,
    /// The events of the commit being published not broadcast yet (fewer than
    /// [`GROUP_EVENTS`]); empty whenever the lock is free.
    gathering: Vec<Arc<Event>>,
}

impl Feed {
    /// A feed starting at seq 1 that knows `nodes` (as restored from the store) and their
    /// statuses, so that a known node's next heartbeat is not announced as a join.
    pub fn new(config: &FeedConfig, nodes: impl IntoIterator<Item = (String, NodeStatus)>) -> Feed {
        let history = config.history.max(1);
        // The broadcast rounds its capacity up to a power of two; say what it really is.
        let buffer = config.buffer.max(1).next_power_of_two();
        let (sender, _) = broadcast::channel(buffer);
        Feed {
            state: Mutex::new(FeedState {
                last_seq: 0,
                ring: VecDeque::with_capacity(history.min(4096)),
                node_status: nodes.into_iter().collect(),
                gathering: Vec::new(),
            }),
            sender,
            history,
            buffer,
        }
    }

    /// Publishing holds the lock only to number, store and broadcast (none of which waits);
    /// a panic there leaves a consistent ring, so a poisoned lock is taken over.
    fn state(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes, replaying what is still held after `since`. Taken under the same lock
    /// publishing holds, so the backlog and `live` neither overlap nor leave a hole.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let state = self.state();
        let live = self.sender.subscribe();
        let newest = state.last_seq;
        let (gap, backlog) = match since {
            None => (None, Vec::new()),
            Some(since) if since > newest => (Some(Gap::Ahead { since, newest }), Vec::new()),
            Some(since) => {
                let oldest = state.ring.front().map_or(newest + 1, |e| e.seq);
                let gap = (since + 1 < oldest).then(|| Gap::Missed {
                    after: since,
                    missed: oldest - since - 1,
                });
                let first = state.ring.partition_point(|e| e.seq <= since);
                (gap, state.ring.range(first..).cloned().collect())
            }
        };
        Subscription {
            gap,
            backlog,
            live,
            newest,
        }
    }

    /// The newest seq published so far (0 before the first event).
    pub fn newest_seq(&self) -> u64 {
        self.state().last_seq
    }

    /// Connected subscribers.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    /// How far the slowest subscriber is behind, in groups. It reaching [`Feed::buffer`]
    /// means that subscriber is losing events (it will be told with `lagged`).
    pub fn slowest_backlog(&self) -> usize {
        self.sender.len()
    }

    /// Groups one subscriber may fall behind before it loses the oldest.
    pub fn buffer(&self) -> usize {
        self.buffer
    }

    /// Publishes one event. Only for a change that is already durable. (Operations do not
    /// need it: their steps are committed changes, published by [`CommitObserver`].)
    pub fn publish(
        &self,
        kind: FeedEventKind,
        task_id: Option<TaskId>,
        node_id: Option<String>,
        data: Value,
    ) {
        let ts = unix_now();
        let mut state = self.state();
        self.push(
            &mut state,
            ts,
            kind,
            task_id,
            node_id,
            EventData::Other(data),
        );
        self.send(&mut state);
    }

    /// Numbers and stores one event and adds it to the group being gathered, which is sent
    /// when it is full.
    fn push(
        &self,
        state: &mut FeedState,
        ts: f64,
        kind: FeedEventKind,
        task_id: Option<TaskId>,
        node_id: Option<String>,
        data: EventData,
    ) {
        state.last_seq += 1;
        let event = Arc::new(Event {
            seq: state.last_seq,
            kind,
            task_id,
            node_id,
            ts,
            data,
            json: OnceLock::new(),
        });
        if state.ring.len() >= self.history {
            state.ring.pop_front();
        }
        state.ring.push_back(event.clone());
        state.gathering.push(event);
        if state.gathering.len() >= GROUP_EVENTS {
            self.send(state);
        }
    }

    /// Broadcasts the events gathered (if any) as one group; the next group starts empty.
    fn send(&self, state: &mut FeedState) {
        if state.gathering.is_empty() {
            return;
        }
        let events = std::mem::take(&mut state.gathering);
        // An error only means nobody is listening right now.
        let _ = self.sender.send(Arc::new(Group::new(events)));
    }
}

impl CommitObserver for Feed {
    fn committed(&self, changes: &[Change]) {
        let ts = unix_now();
        let mut state = self.state();
        for change in changes {
            match change {
                Change::TaskCreated(task) => {
                    let data = task_data(&task.state);
                    self.push(
                        &mut state,
                        ts,
                        FeedEventKind::TaskCreated,
                        Some(task.task_id),
                        None,
                        data,
                    );
                }
                Change::TaskUpdated(task) => {
                    let kind = match task.status {
                        TaskStatus::Pending => FeedEventKind::TaskRequeued,
                        TaskStatus::Assigned | TaskStatus::Running => FeedEventKind::TaskStarted,
                        TaskStatus::Completed => FeedEventKind::TaskCompleted,
                        TaskStatus::Failed => FeedEventKind::TaskFailed,
                        TaskStatus::Cancelled => FeedEventKind::TaskCancelled,
                    };
                    let data = task_data(task);
                    self.push(
                        &mut state,
                        ts,
                        kind,
                        Some(task.task_id),
                        task.node_id.clone(),
                        data,
                    );
                }
                Change::TaskRevised(task) => {
                    let data = task_data(task);
                    self.push(
                        &mut state,
                        ts,
                        FeedEventKind::TaskUpdated,
                        Some(task.task_id),
                        task.node_id.clone(),
                        data,
                    );
                }
                Change::RunSaved(run) if run.status == RunStatus::Stopped => {
                    let data = run_data(run);
                    self.push(
                        &mut state,
                        ts,
                        FeedEventKind::RunStopped,
                        Some(run.task_id),
                        run.node_id.clone(),
                        data,
                    );
                }
                Change::NodeSaved(node) => {
                    let previous = state.node_status.insert(node.node_id.clone(), node.status);
                    for kind in node_event_kinds(previous, node.status) {
                        let data = node_data(node, previous);
                        self.push(&mut state, ts, kind, None, Some(node.node_id.clone()), data);
                    }
                }
                // A run's progress shows in its task's events (a run stopped by scaling down,
                // which changes no task status, has its own). A node command's status is
                // not a node status: what a command does to the node (draining, drained,
                // offline and back for a restart) arrives as `node_updated`; the command
                // itself is read from `GET /api/v1/nodes/commands`.
                Change::RunSaved(_) | Change::CommandSaved(_) => {}
                // Every saved step of a scale-out or shrink: the console follows operations
                // live; the whole record stays at `GET /api/v1/operations/{id}`.
                Change::OperationSaved(op) => {
                    let data = serde_json::json!({
                        "id": op.operation_id.to_string(),
                        "dag_id": op.operation_id,
                        "name": op.kind.title(),
                        "operation": op.kind.as_str(),
                        "stage": op.stage,
                        "stage_name": op.stage_name(),
                        "max_stage": op.max_stage(),
                        "state": op.state.as_str(),
                        "operator": op.operator,
                        "error": op.additional_data.get("error"),
                    });
                    self.push(
                        &mut state,
                        ts,
                        FeedEventKind::OperationUpdated,
                        None,
                        None,
                        EventData::Other(data),
                    );
                }
            }
        }
        self.send(&mut state);
    }
}

/// Whether a node with this status is part of the pool.
fn present(status: NodeStatus) -> bool {
    !matches!(status, NodeStatus::Offline | NodeStatus::Removed)
}

/// `node_updated` for every status change; `node_joined` before it when the node enters the
/// pool (first seen, or back from offline); `node_left` after it when it goes offline.
fn node_event_kinds(previous: Option<NodeStatus>, status: NodeStatus) -> Vec<FeedEventKind> {
    if previous == Some(status) {
        return Vec::new();
    }
    let mut kinds = Vec::with_capacity(2);
    if present(status) && previous.is_none_or(|p| !present(p)) {
        kinds.push(FeedEventKind::NodeJoined);
    }
    kinds.push(FeedEventKind::NodeUpdated);
    if !present(status) && previous.is_some_and(present) {
        kinds.push(FeedEventKind::NodeLeft);
    }
    kinds
}

fn task_data(task: &TaskState) -> EventData {
    EventData::Task(TaskEventData {
        task_id: task.task_id,
        status: task.status,
        node_id: task.node_id.clone(),
        attempts: task.attempts,
        error: task
            .error
            .as_ref()
            .map(|e| e.chars().take(MAX_EVENT_ERROR_CHARS).collect()),
        points: task.points,
    })
}

fn run_data(run: &RunRecord) -> EventData {
    EventData::Run(RunEventData {
        task_id: run.task_id,
        run_id: run.run_id,
        node_id: run.node_id.clone(),
        point: run.point,
        status: run.status,
        error: run
            .error
            .as_ref()
            .map(|e| e.chars().take(MAX_EVENT_ERROR_CHARS).collect()),
    })
}

fn node_data(node: &NodeRecord, previous: Option<NodeStatus>) -> EventData {
    EventData::Node(NodeEventData {
        node_id: node.node_id.clone(),
        status: node.status,
        previous_status: previous,
        hostname: node.hostname.clone(),
        node_type: node.node_type.clone(),
        zone: node.zone.clone(),
    })
}

/// The `lagged` notice for a gap, as sent.
pub fn lagged_message(after_seq: u64, missed: Option<u64>, detail: String) -> Bytes {
    encode(&FeedMessage {
        event: FeedEventKind::Lagged,
        data: to_value(&LaggedData { missed, detail }),
        seq: after_seq,
        ts: unix_now(),
    })
}

fn to_value<T: serde::Serialize>(data: &T) -> Value {
    // Plain structs of strings and numbers: this cannot fail, but never panic on it.
    serde_json::to_value(data).unwrap_or(Value::Null)
}

fn encode(message: &FeedMessage) -> Bytes {
    serde_json::to_vec(message).map_or_else(
        |e| {
            tracing::error!(error = %e, seq = message.seq, "could not encode a feed event");
            Bytes::from_static(b"{}")
        },
        Bytes::from,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NewTask, TaskLimits, TaskRecord};
    use lull_shared::{NodeResources, SubmitRequest};

    fn state(task_id: TaskId, status: TaskStatus, node: Option<&str>) -> TaskState {
        TaskState {
            task_id,
            status,
            result: None,
            error: None,
            attempts: 1,
            losses: 0,
            points: 1,
            node_id: node.map(str::to_string),
            started_at: None,
            completed_at: None,
        }
    }

    fn created(task_id: TaskId) -> Change {
        let NewTask { spec, .. } = NewTask::from_request(
            SubmitRequest {
                code: Some("print(1)".into()),
                ..SubmitRequest::default()
            },
            &TaskLimits::default(),
        )
        .expect("valid");
        Change::TaskCreated(TaskRecord {
            task_id,
            spec,
            state: state(task_id, TaskStatus::Pending, None),
            created_at: 0.0,
        })
    }

    fn node(id: &str, status: NodeStatus) -> Change {
        Change::NodeSaved(NodeRecord {
            node_id: id.into(),
            hostname: "h".into(),
            node_type: "cpu".into(),
            zone: None,
            resources: NodeResources {
                cpu_cores: 2.0,
                memory_mb: 1024.0,
            },
            meta: serde_json::Map::new(),
            status,
            version: None,
            joined_at: 0.0,
            last_heartbeat: 0.0,
            sandbox: None,
            executor: None,
            drain: None,
            group: crate::model::NodeGroup {
                id: 1,
                operation_id: None,
            },
        })
    }

    fn message(event: &Event) -> FeedMessage {
        serde_json::from_slice(event.json()).expect("a feed message")
    }

    fn drain(rx: &mut broadcast::Receiver<Arc<Group>>) -> Vec<(u64, FeedEventKind)> {
        let mut out = Vec::new();
        while let Ok(group) = rx.try_recv() {
            out.extend(group.events().iter().map(|e| (e.seq, e.kind)));
        }
        out
    }

    #[test]
    fn a_commit_s_events_are_broadcast_in_groups_of_at_most_group_events() {
        let feed = Feed::new(&FeedConfig::default(), []);
        let mut sub = feed.subscribe(None);
        let large = GROUP_EVENTS * 2 + 3;
        feed.committed(&(1..=large as TaskId).map(created).collect::<Vec<_>>());
        feed.committed(&[created(100)]);
        feed.committed(&[]);
        feed.publish(FeedEventKind::OperationUpdated, None, None, Value::Null);
        let mut groups = Vec::new();
        while let Ok(group) = sub.live.try_recv() {
            groups.push(group);
        }
        let sizes: Vec<usize> = groups.iter().map(|g| g.events().len()).collect();
        assert_eq!(sizes, vec![GROUP_EVENTS, GROUP_EVENTS, 3, 1, 1]);
        let seqs: Vec<u64> = groups
            .iter()
            .flat_map(|g| g.events().iter().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, (1..=large as u64 + 2).collect::<Vec<_>>());
        for group in &groups {
            assert_eq!(group.first_seq(), group.events()[0].seq);
            // The array is the group's messages, as each is sent alone, in order.
            let array: Vec<Value> = serde_json::from_slice(group.array()).expect("an array");
            let each: Vec<Value> = group
                .events()
                .iter()
                .map(|e| serde_json::from_slice(e.json()).expect("a message"))
                .collect();
            assert_eq!(array, each);
        }
    }

    #[test]
    fn a_task_s_changes_become_its_events_in_commit_order() {
        let feed = Feed::new(&FeedConfig::default(), []);
        let mut sub = feed.subscribe(None);
        feed.committed(&[
            created(1),
            Change::TaskUpdated(state(1, TaskStatus::Running, Some("n1"))),
            Change::TaskUpdated(state(1, TaskStatus::Pending, None)),
            Change::TaskUpdated(state(1, TaskStatus::Completed, Some("n1"))),
        ]);
        assert_eq!(
            drain(&mut sub.live),
            vec![
                (1, FeedEventKind::TaskCreated),
                (2, FeedEventKind::TaskStarted),
                (3, FeedEventKind::TaskRequeued),
                (4, FeedEventKind::TaskCompleted),
            ]
        );
        let replay = feed.subscribe(Some(3));
        assert_eq!(replay.gap, None);
        let last = message(&replay.backlog[0]);
        assert_eq!(last.seq, 4);
        assert_eq!(last.data["task_id"], 1);
        assert_eq!(last.data["status"], "completed");
        assert_eq!(last.data["node_id"], "n1");
    }

    #[test]
    fn events_are_encoded_only_when_sent_and_then_once() {
        let feed = Feed::new(&FeedConfig::default(), []);
        feed.committed(&[
            created(1),
            Change::TaskUpdated(state(1, TaskStatus::Running, Some("n1"))),
        ]);
        let replay = feed.subscribe(Some(0));
        assert!(
            replay.backlog.iter().all(|e| e.json.get().is_none()),
            "nobody has sent them yet"
        );
        let first = replay.backlog[1].json().clone();
        let again = feed.subscribe(Some(1)).backlog[0].json().clone();
        assert_eq!(first.as_ptr(), again.as_ptr(), "one encoding, shared");
        let message: FeedMessage = serde_json::from_slice(&first).expect("a feed message");
        assert_eq!(message.event, FeedEventKind::TaskStarted);
        assert_eq!(message.seq, 2);
        assert_eq!(message.data["node_id"], "n1");
        assert!(
            replay.backlog[0].json.get().is_none(),
            "the other not sent yet"
        );
    }

    #[test]
    fn every_saved_operation_step_is_an_operation_updated_event() {
        use crate::operations::{OperationKind, OperationRecord};
        let feed = Feed::new(&FeedConfig::default(), []);
        let mut sub = feed.subscribe(None);
        let mut op = OperationRecord::new(4, OperationKind::Shrink, serde_json::Map::new(), 1.0);
        let ready = Change::OperationSaved(op.clone());
        op.start(2.0).expect("starts");
        feed.committed(&[ready, Change::OperationSaved(op)]);
        assert_eq!(
            drain(&mut sub.live),
            vec![
                (1, FeedEventKind::OperationUpdated),
                (2, FeedEventKind::OperationUpdated),
            ]
        );
        let replay = feed.subscribe(Some(1));
        let last = message(&replay.backlog[0]);
        assert_eq!(last.data["state"], "RUNNING");
        assert_eq!(last.data["id"], "4");
        assert_eq!(last.data["stage_name"], "select_nodes");
    }

    #[test]
    fn nodes_join_change_and_leave_once_per_status_change() {
        let feed = Feed::new(
            &FeedConfig::default(),
            [("old".to_string(), NodeStatus::Idle)],
        );
        let mut sub = feed.subscribe(None);
        feed.committed(&[
            node("old", NodeStatus::Idle),
            node("new", NodeStatus::Idle),
            node("new", NodeStatus::Busy),
            node("new", NodeStatus::Offline),
            node("new", NodeStatus::Idle),
        ]);
        let kinds: Vec<FeedEventKind> = drain(&mut sub.live).into_iter().map(|e| e.1).collect();
        use FeedEventKind::*;
        assert_eq!(
            kinds,
            vec![
                NodeJoined,
                NodeUpdated,
                NodeUpdated,
                NodeUpdated,
                NodeLeft,
                NodeJoined,
                NodeUpdated
            ]
        );
    }

    #[test]
    fn replay_past_the_ring_reports_the_gap() {
        let feed = Feed::new(
            &FeedConfig {
                history: 3,
                buffer: 16,
            },
            [],
        );
        feed.committed(&(1..=5).map(created).collect::<Vec<_>>());
        let sub = feed.subscribe(Some(0));
        assert_eq!(
            sub.gap,
            Some(Gap::Missed {
                after: 0,
                missed: 2
            })
        );
        let seqs: Vec<u64> = sub.backlog.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(feed.subscribe(Some(2)).gap, None);
        assert_eq!(
            feed.subscribe(Some(9)).gap,
            Some(Gap::Ahead {
                since: 9,
                newest: 5
            })
        );
        assert!(feed.subscribe(Some(5)).backlog.is_empty());
    }

    #[test]
    fn filters_match_kind_task_and_node() {
        let feed = Feed::new(&FeedConfig::default(), []);
        feed.committed(&[
            created(1),
            Change::TaskUpdated(state(1, TaskStatus::Running, Some("n1"))),
            node("n1", NodeStatus::Busy),
            created(2),
        ]);
        let all = feed.subscribe(Some(0)).backlog;
        let pick = |f: Filter| -> Vec<u64> {
            all.iter().filter(|e| f.matches(e)).map(|e| e.seq).collect()
        };
        assert_eq!(pick(Filter::default()).len(), all.len());
        assert_eq!(
            pick(Filter {
                task_id: Some(1),
                ..Filter::default()
            }),
            vec![1, 2]
        );
        let on_n1 = pick(Filter {
            node_id: Some("n1".into()),
            ..Filter::default()
        });
        assert!(on_n1.contains(&2) && !on_n1.contains(&1) && !on_n1.contains(&5));
        assert_eq!(
            pick(Filter {
                events: Some(vec![FeedEventKind::TaskCreated]),
                ..Filter::default()
            }),
            vec![1, 5]
        );
    }
}
