//! `WS /ws/updates`: the live feed over WebSocket.
//!
//! The query is checked and the subscription taken before the upgrade is answered, so a bad
//! parameter is an ordinary `{"detail"}` error, and a client whose handshake completed is
//! already subscribed (it misses nothing published after its `101`).
//!
//! Each connection is one task: it sends the gap notice and backlog, then forwards what the
//! feed broadcasts. When it cannot keep up, the broadcast drops the oldest events for it
//! alone and it sends `lagged` with the count. Client messages are read only to notice a
//! close; pings are answered by the WebSocket layer.
//!
//! Woken for a group of events (a commit's, see [`crate::feed`]), a connection writes every
//! event already queued for it (up to [`FRAMES_PER_FLUSH`]) as frames into one buffer and
//! flushes once: one `send` syscall per write, not per frame. While events keep coming it
//! writes at most once per [`WRITE_INTERVAL`], so that a busy feed goes out in fewer,
//! larger writes. With `?batch=true` the events of one write go as one text message, a JSON
//! array of the same objects in the same order: one frame per write for the WebSocket
//! layers on both sides, which is what a client following thousands of events a second
//! spends its time on. A connection that takes every event sends a lone group's array as
//! the feed encoded it, shared, and joins several groups' arrays without looking at their
//! events. Its read buffer is small ([`READ_BUFFER_BYTES`]): clients
//! send only control frames, and the WebSocket layer zeroes the free part of that buffer
//! on every read attempt.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::QueryParams;
use crate::engine::Engine;
use crate::feed::{Event, Filter, Gap, Group, Subscription, lagged_message};
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use bytes::Bytes;
use futures::SinkExt;
use lull_shared::{FeedEventKind, TaskId};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Events written to a connection before one flush: what was already queued for it, up to
/// this many (about 50 kB of events, below the 128 kB write buffer that would flush early).
/// Also the most events in one `?batch=true` array.
const FRAMES_PER_FLUSH: usize = 256;

/// The least time between two writes to one connection while events keep coming: an event
/// that finds the connection idle for longer is written at once; one that follows a write
/// closer than this waits for the rest of the interval, and goes with whatever else arrived
/// meanwhile. With 1,000 clients at 5,000 events/s this halved the messages each client
/// handles and the coordinator's `send`s, and cut the delay's p99 (`ws_fanout`,
/// BENCHMARKS.md), at the price of up to this much for an event that follows another
/// closely.
const WRITE_INTERVAL: Duration = Duration::from_millis(25);

/// Bytes a connection reads at once. Clients send pings, pongs and a close, each at most
/// 131 bytes; a larger message is read in several parts. (The default, 128 kB, was zeroed
/// on every poll of every connection: a quarter of the CPU when fanning out.)
const READ_BUFFER_BYTES: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedParams {
    /// Comma-separated event kinds.
    events: Option<String>,
    task_id: Option<String>,
    node_id: Option<String>,
    /// Replay what was published after this seq.
    since: Option<String>,
    /// `true`: each message is a JSON array of the events written together.
    batch: Option<String>,
    /// Credentials for browsers, which cannot set headers on a WebSocket: read by the auth
    /// middleware, ignored here.
    #[serde(rename = "token")]
    _token: Option<String>,
    #[serde(rename = "timestamp")]
    _timestamp: Option<String>,
    #[serde(rename = "sign_str")]
    _sign_str: Option<String>,
    #[serde(rename = "version")]
    _version: Option<String>,
}

impl FeedParams {
    fn filter(&self) -> Result<Filter, ApiError> {
        let events = match self.events.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(list) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(|name| {
                        FeedEventKind::parse(name).ok_or_else(|| {
                            let known: Vec<&str> =
                                FeedEventKind::ALL.iter().map(|k| k.as_str()).collect();
                            ApiError::unprocessable(format!(
                                "unknown event {name:?} in events; expected a comma-separated list of {}",
                                known.join(", ")
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let task_id = match self.task_id.as_deref() {
            None | Some("") => None,
            Some(raw) => Some(raw.parse::<TaskId>().map_err(|_| {
                ApiError::unprocessable(format!("task_id must be an integer, got {raw:?}"))
            })?),
        };
        let node_id = self.node_id.clone().filter(|id| !id.is_empty());
        Ok(Filter {
            events,
            task_id,
            node_id,
        })
    }

    fn batch(&self) -> Result<bool, ApiError> {
        match self.batch.as_deref().map(str::trim) {
            None | Some("" | "false" | "0") => Ok(false),
            Some("true" | "1") => Ok(true),
            Some(raw) => Err(ApiError::unprocessable(format!(
                "batch must be true or false, got {raw:?}"
            ))),
        }
    }

    fn since(&self) -> Result<Option<u64>, ApiError> {
        match self.since.as_deref() {
            None | Some("") => Ok(None),
            Some(raw) => raw.parse::<u64>().map(Some).map_err(|_| {
                ApiError::unprocessable(format!(
                    "since must be a non-negative integer (the seq of the last event received), got {raw:?}"
                ))
            }),
        }
    }
}

/// A submitter's feed: only its own tasks' events (node events pass; it may read nodes).
/// Whose a task is never changes, so each task is looked up once per connection.
struct OwnTasks {
    key_id: i64,
    engine: Arc<Engine>,
    known: HashMap<TaskId, bool>,
}

/// Tasks remembered per connection before the memo starts over.
const OWN_TASKS_MEMO: usize = 65_536;

impl OwnTasks {
    async fn admits(&mut self, event: &Event) -> bool {
        let Some(task_id) = event.task_id else {
            return true;
        };
        if let Some(&own) = self.known.get(&task_id) {
            return own;
        }
        // Published after its commit: the task is in the store by now.
        let Ok(task) = self.engine.task(task_id).await else {
            return false;
        };
        let own = task.spec.submitted_by == Some(self.key_id);
        if self.known.len() >= OWN_TASKS_MEMO {
            self.known.clear();
        }
        self.known.insert(task_id, own);
        own
    }
}

pub async fn updates(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<FeedParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let filter = params.filter()?;
    let since = params.since()?;
    let batch = params.batch()?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            format!(
                "/ws/updates is a WebSocket endpoint; connect with a WebSocket client ({rejection})"
            ),
        )
    })?;
    let own_tasks = caller.only_tasks_of().map(|key_id| OwnTasks {
        key_id,
        engine: app.engine.clone(),
        known: HashMap::new(),
    });
    let subscription = app.engine.feed().subscribe(since);
    let stopping = app.engine.stopping().clone();
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| serve(socket, subscription, filter, own_tasks, batch, stopping)))
}

/// Why a connection's loop ended early.
enum Ended {
    /// The client went away (or the socket failed).
    Gone,
    /// The coordinator is stopping.
    Stopping,
}

async fn serve(
    socket: WebSocket,
    subscription: Subscription,
    filter: Filter,
    own_tasks: Option<OwnTasks>,
    batch: bool,
    stopping: CancellationToken,
) {
    let Subscription {
        gap,
        backlog,
        live,
        newest,
    } = subscription;
    let mut connection = Connection {
        socket,
        live,
        whole_groups: batch && filter.takes_all() && own_tasks.is_none(),
        filter,
        own_tasks,
        last_seen: newest,
        lagged: false,
        batch: batch.then(Batch::default),
    };
    // Every step is raced against `stopping` as a whole, not frame by frame: a stuck client
    // (its socket full) cannot hold the coordinator's shutdown.
    let outcome: Result<(), Ended> = async {
        tokio::select! {
            _ = stopping.cancelled() => return Err(Ended::Stopping),
            sent = connection.send_replay(gap, backlog) => sent?,
        }
        // No wait before the first write.
        let mut next_write = Instant::now();
        loop {
            let first = tokio::select! {
                _ = stopping.cancelled() => return Err(Ended::Stopping),
                incoming = connection.socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(Ended::Gone),
                    Some(Ok(_)) => continue,
                },
                received = connection.live.recv() => received,
            };
            // Events keep coming: let them gather until the interval is up.
            if Instant::now() < next_write {
                tokio::select! {
                    _ = stopping.cancelled() => return Err(Ended::Stopping),
                    () = tokio::time::sleep_until(next_write) => {}
                }
            }
            let drained = tokio::select! {
                _ = stopping.cancelled() => return Err(Ended::Stopping),
                sent = connection.send_queued(first) => sent?,
            };
            // A connection that left events queued (it wrote its limit) goes on at once.
            next_write = if drained {
                Instant::now() + WRITE_INTERVAL
            } else {
                Instant::now()
            };
        }
    }
    .await;
    if let Err(Ended::Stopping) = outcome {
        let close = Message::Close(Some(CloseFrame {
            code: close_code::AWAY,
            reason: Utf8Bytes::from_static("coordinator stopping"),
        }));
        // Best effort, and never wait on a stuck client. An array cut short by the stop
        // goes out first, as single events already fed would.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            if connection.send_batch().await.is_ok() {
                let _ = connection.socket.send(close).await;
            }
        })
        .await;
    }
}

/// One subscriber's connection and where it is in the feed.
struct Connection {
    socket: WebSocket,
    live: Receiver<Arc<Group>>,
    filter: Filter,
    own_tasks: Option<OwnTasks>,
    /// `?batch=true` (so `batch` is `Some`) and every event wanted: groups go into arrays
    /// whole.
    whole_groups: bool,
    /// The seq of the last event handled (sent, filtered out, or reported missed).
    last_seen: u64,
    /// The broadcast dropped groups for this connection: the next group received says how
    /// many events that was (its first seq after `last_seen`), in the `lagged` notice sent
    /// before it.
    lagged: bool,
    /// With `?batch=true`: the array being built, sent as one message by `flush`.
    batch: Option<Batch>,
}

/// One `?batch=true` message being built: `[` and the events so far, comma-separated; or,
/// while it holds one group's array alone, that array, shared.
#[derive(Default)]
struct Batch {
    /// The message is exactly this group's array so far (nothing copied yet).
    shared: Option<Bytes>,
    json: Vec<u8>,
    events: usize,
    /// The length of the last message: the next one's first allocation (an idle connection
    /// holds no buffer; the last one left with its message).
    last_len: usize,
}

impl Batch {
    /// Adds one event's message.
    fn push(&mut self, event: &[u8]) {
        self.open(event.len());
        if self.events > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(event);
        self.events += 1;
    }

    /// Adds a group's array (`[e,...]`) of `events` events: kept as it is when the message
    /// holds nothing else (yet), else its events are copied in without their brackets.
    fn push_array(&mut self, array: &Bytes, events: usize) {
        let Some(inner) = array
            .strip_prefix(b"[")
            .and_then(|a| a.strip_suffix(b"]"))
            .filter(|inner| !inner.is_empty() && events > 0)
        else {
            return;
        };
        if self.events == 0 {
            self.shared = Some(array.clone());
        } else {
            self.open(inner.len());
            self.json.push(b',');
            self.json.extend_from_slice(inner);
        }
        self.events += events;
    }

    /// Makes `json` the message so far (`[` and its events) with room for `more` bytes.
    fn open(&mut self, more: usize) {
        if let Some(shared) = self.shared.take() {
            let so_far = &shared[..shared.len() - 1];
            self.json = Vec::with_capacity(self.last_len.max(so_far.len() + more + 2));
            self.json.extend_from_slice(so_far);
        } else if self.events == 0 {
            self.json = Vec::with_capacity(self.last_len.max(more + 2));
            self.json.push(b'[');
        }
    }

    /// The array as one text message, if it holds any event; the next starts empty.
    fn take(&mut self) -> Option<Result<Message, std::str::Utf8Error>> {
        if self.events == 0 {
            return None;
        }
        self.events = 0;
        // Events built by `serde_json` joined with ASCII: UTF-8, checked with a cheap scan.
        let bytes = match self.shared.take() {
            Some(shared) => shared,
            None => {
                self.json.push(b']');
                Bytes::from(std::mem::take(&mut self.json))
            }
        };
        self.last_len = bytes.len();
        Some(Utf8Bytes::try_from(bytes).map(Message::Text))
    }
}

impl Connection {
    /// The gap notice and the backlog of a `?since=` subscription, in one flush.
    async fn send_replay(
        &mut self,
        gap: Option<Gap>,
        backlog: Vec<Arc<Event>>,
    ) -> Result<(), Ended> {
        if let Some(gap) = gap {
            let (after, missed, detail) = match gap {
                Gap::Missed { after, missed } => (
                    after,
                    Some(missed),
                    format!(
                        "since={after} is older than the replay buffer holds: {missed} events are gone; refetch state over HTTP"
                    ),
                ),
                Gap::Ahead { since, newest } => (
                    newest,
                    None,
                    format!(
                        "since={since} is ahead of this coordinator's newest event ({newest}): it restarted and its feed began again at 1; refetch state over HTTP"
                    ),
                ),
            };
            self.queue(&lagged_message(after, missed, detail)).await?;
        }
        for event in backlog {
            self.queue_event(&event).await?;
        }
        self.flush().await
    }

    /// `first`, then whatever else is already waiting for this connection (up to
    /// [`FRAMES_PER_FLUSH`] events), in one flush. `Ok(true)` when it took everything that
    /// was waiting, `Ok(false)` when it stopped at the limit with more to send.
    async fn send_queued(&mut self, first: Result<Arc<Group>, RecvError>) -> Result<bool, Ended> {
        let mut received = Some(first);
        let mut events = 0;
        let mut drained = false;
        while let Some(next) = received.take() {
            match next {
                Ok(group) => {
                    events += group.events().len();
                    self.queue_group(&group).await?;
                }
                // Counted in groups; the notice counts events, from the next group's seq.
                Err(RecvError::Lagged(_)) => self.lagged = true,
                Err(RecvError::Closed) => {
                    self.flush().await?;
                    return Err(Ended::Stopping);
                }
            }
            if events < FRAMES_PER_FLUSH {
                received = match self.live.try_recv() {
                    Ok(group) => Some(Ok(group)),
                    Err(TryRecvError::Empty) => {
                        drained = true;
                        None
                    }
                    Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                };
            }
        }
        self.flush().await?;
        Ok(drained)
    }

    /// Queues what this subscriber wants of `group`, after the `lagged` notice for the
    /// events it lost before it, if any.
    async fn queue_group(&mut self, group: &Group) -> Result<(), Ended> {
        let first = group.first_seq();
        if std::mem::take(&mut self.lagged) && first > self.last_seen + 1 {
            let last_seen = self.last_seen;
            let missed = first - last_seen - 1;
            tracing::debug!(missed, after = last_seen, "feed subscriber lagged");
            let detail = format!(
                "this connection fell behind: {missed} events after seq {last_seen} were dropped for it; refetch state over HTTP"
            );
            self.queue(&lagged_message(last_seen, Some(missed), detail))
                .await?;
        }
        if !self.whole_groups {
            for event in group.events() {
                self.last_seen = event.seq;
                self.queue_event(event).await?;
            }
            return Ok(());
        }
        // The group goes whole into the array (starting a new one if it would not fit).
        let events = group.events().len();
        let pending = self.batch.as_ref().map_or(0, |batch| batch.events);
        if pending > 0 && pending + events > FRAMES_PER_FLUSH {
            self.send_batch().await?;
        }
        if let Some(batch) = &mut self.batch {
            batch.push_array(group.array(), events);
        }
        if let Some(last) = group.events().last() {
            self.last_seen = last.seq;
        }
        Ok(())
    }

    /// Queues `event` if this subscriber wants it.
    async fn queue_event(&mut self, event: &Arc<Event>) -> Result<(), Ended> {
        if !self.filter.matches(event) {
            return Ok(());
        }
        let admitted = match &mut self.own_tasks {
            Some(own) => own.admits(event).await,
            None => true,
        };
        if admitted {
            self.queue(event.json()).await?;
        }
        Ok(())
    }

    /// Adds one event's message to the write buffer (written out when it fills, or by
    /// `flush`); with `?batch=true`, to the array being built, which goes out whole at
    /// [`FRAMES_PER_FLUSH`] events (a long replay) or at `flush`.
    async fn queue(&mut self, json: &Bytes) -> Result<(), Ended> {
        if let Some(batch) = &mut self.batch {
            batch.push(json);
            if batch.events < FRAMES_PER_FLUSH {
                return Ok(());
            }
            return self.send_batch().await;
        }
        // Built by `serde_json`, so always UTF-8; the check is a cheap scan.
        let text = Utf8Bytes::try_from(json.clone()).map_err(|_| Ended::Gone)?;
        self.socket
            .feed(Message::Text(text))
            .await
            .map_err(|_| Ended::Gone)
    }

    /// Puts the array built so far (if any) into the write buffer as one message.
    async fn send_batch(&mut self) -> Result<(), Ended> {
        match self.batch.as_mut().and_then(Batch::take) {
            Some(Ok(message)) => self.socket.feed(message).await.map_err(|_| Ended::Gone),
            // Cannot happen (see `take`); as for a single event, the connection ends and the
            // client reconnects with `?since=` rather than miss it silently.
            Some(Err(_)) => Err(Ended::Gone),
            None => Ok(()),
        }
    }

    async fn flush(&mut self) -> Result<(), Ended> {
        self.send_batch().await?;
        self.socket.flush().await.map_err(|_| Ended::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn array(events: &[&str]) -> Bytes {
        Bytes::from(format!("[{}]", events.join(",")))
    }

    fn text(message: Message) -> Utf8Bytes {
        match message {
            Message::Text(text) => text,
            other => panic!("not text: {other:?}"),
        }
    }

    fn parsed(message: Message) -> Value {
        serde_json::from_str(text(message).as_str()).expect("an array")
    }

    #[test]
    fn a_lone_group_s_array_is_sent_as_it_is_and_several_are_joined() {
        let first = array(&[r#"{"seq":1}"#, r#"{"seq":2}"#]);
        let second = array(&[r#"{"seq":3}"#]);
        let mut batch = Batch::default();
        assert!(batch.take().is_none(), "nothing to send");

        batch.push_array(&first, 2);
        let sent = text(batch.take().expect("a message").expect("UTF-8"));
        assert_eq!(
            sent.as_str().as_ptr(),
            first.as_ptr(),
            "the group's bytes, not a copy"
        );
        assert!(batch.take().is_none(), "the next message starts empty");

        batch.push_array(&first, 2);
        batch.push_array(&second, 1);
        batch.push(br#"{"seq":4}"#);
        assert_eq!(batch.events, 4);
        let joined = parsed(batch.take().expect("a message").expect("UTF-8"));
        let seqs: Vec<u64> = joined
            .as_array()
            .expect("an array")
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);

        // A notice first, then a group: one array, in that order.
        batch.push(br#"{"event":"lagged","seq":0}"#);
        batch.push_array(&second, 1);
        let joined = parsed(batch.take().expect("a message").expect("UTF-8"));
        assert_eq!(joined[0]["event"], "lagged");
        assert_eq!(joined[1]["seq"], 3);
        assert_eq!(joined.as_array().map(Vec::len), Some(2));
    }
}
