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
//! Woken for a group (one commit's events, see [`crate::feed`]), a connection writes every
//! group already queued for it (up to [`FRAMES_PER_FLUSH`] events) into one buffer and
//! flushes once: one `send` syscall per wake-up, not per frame. Frames are one event each,
//! unless the client asked for `?batch=true`: then the events of one commit that the
//! connection wants are one text message, a JSON array of the same objects in the same
//! order, so a client following thousands of events a second handles one message per
//! commit, not per event. A connection that wants every event sends the group's array as
//! the feed encoded it, once for all such connections: nothing of it is copied but by the
//! WebSocket layer into its write buffer. (Joining the arrays of several commits into one
//! message cost the coordinator a fifth of its CPU when fanning out: a second copy of
//! every byte, into memory no cache held.) Its read buffer is small ([`READ_BUFFER_BYTES`]): clients
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
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

/// Events written to a connection before one flush: what was already queued for it, up to
/// this many (about 50 kB of events, below the 128 kB write buffer that would flush early).
/// Also the most events in one `?batch=true` array.
const FRAMES_PER_FLUSH: usize = 256;

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
    /// `true`: each message is a JSON array: the events of one commit (at most 16) that
    /// the connection wants, or up to 256 of a replay.
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
        loop {
            let first = tokio::select! {
                _ = stopping.cancelled() => return Err(Ended::Stopping),
                incoming = connection.socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(Ended::Gone),
                    Some(Ok(_)) => continue,
                },
                received = connection.live.recv() => received,
            };
            tokio::select! {
                _ = stopping.cancelled() => return Err(Ended::Stopping),
                sent = connection.send_queued(first) => sent?,
            }
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
    /// `?batch=true` and every event wanted: groups go into arrays whole.
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

/// One `?batch=true` message being built: `[` and the events so far, comma-separated.
#[derive(Default)]
struct Batch {
    json: Vec<u8>,
    events: usize,
    /// The length of the last message: the next one's first allocation (an idle connection
    /// holds no buffer; the last one left with its message).
    last_len: usize,
}

impl Batch {
    fn push(&mut self, event: &[u8]) {
        if self.events == 0 {
            self.json = Vec::with_capacity(self.last_len.max(event.len() + 2));
            self.json.push(b'[');
        } else {
            self.json.push(b',');
        }
        self.json.extend_from_slice(event);
        self.events += 1;
    }

    /// The array as one text message, if it holds any event; the next starts empty.
    fn take(&mut self) -> Option<Result<Message, std::string::FromUtf8Error>> {
        if self.events == 0 {
            return None;
        }
        self.json.push(b']');
        self.events = 0;
        self.last_len = self.json.len();
        // Events built by `serde_json` joined with ASCII: UTF-8, checked with a cheap scan.
        Some(
            String::from_utf8(std::mem::take(&mut self.json))
                .map(|text| Message::Text(Utf8Bytes::from(text))),
        )
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
    /// [`FRAMES_PER_FLUSH`] events), in one flush.
    async fn send_queued(&mut self, first: Result<Arc<Group>, RecvError>) -> Result<(), Ended> {
        let mut received = Some(first);
        let mut events = 0;
        while let Some(next) = received.take() {
            match next {
                Ok(group) => {
                    events += group.events().len();
                    self.queue_group(&group).await?;
                }
                Err(RecvError::Lagged(_)) => {
                    // Counted in groups; the notice counts events, from the next group's seq.
                    self.lagged = true;
                    events += 1;
                }
                Err(RecvError::Closed) => {
                    self.flush().await?;
                    return Err(Ended::Stopping);
                }
            }
            if events < FRAMES_PER_FLUSH {
                received = match self.live.try_recv() {
                    Ok(group) => Some(Ok(group)),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                };
            }
        }
        self.flush().await
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
        if self.whole_groups {
            // The notice, if any, goes first, in an array of its own; then the group's
            // array, as encoded once for every connection that takes it whole.
            self.send_batch().await?;
            let array = Utf8Bytes::try_from(group.array().clone()).map_err(|_| Ended::Gone)?;
            self.socket
                .feed(Message::Text(array))
                .await
                .map_err(|_| Ended::Gone)?;
            if let Some(last) = group.events().last() {
                self.last_seen = last.seq;
            }
            return Ok(());
        }
        for event in group.events() {
            self.last_seen = event.seq;
            self.queue_event(event).await?;
        }
        // With `?batch=true`, what this connection wants of one commit is one array.
        self.send_batch().await
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
