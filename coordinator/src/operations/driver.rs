//! Runs operations: one tokio task per operation walks its stages, doing the IO each needs
//! (calls to standby agents, keys, waits on the scheduler through the engine) and records
//! every outcome on the [`OperationRecord`] (pure transitions), durably, before going on.
//!
//! One operation runs at a time: a scale-out and a shrink working on the pool at once
//! could each decide from a picture of the groups the other is changing.

use super::plan::{self, AgentAddress, InvalidShrink};
use super::standby::{CallFailure, Session, StandbyClient};
use super::{AfterRestart, OperationKind, OperationRecord, OperationState};
use crate::engine::{Engine, EngineError, unix_now};
use crate::keys::{KeyMode, NewKey, Role};
use crate::store::{KeyStore, OperationQuery};
use serde_json::{Map, Value, json};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a stage that waits on the pool looks again.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct OperationsConfig {
    /// The secret standby agents were started with; `None`: scale-out is off.
    pub join_secret: Option<String>,
    /// The URL adopted agents reach this coordinator at.
    pub coordinator_url: String,
    /// Whether requests need API keys (then every adopted agent gets an `agent` key).
    pub auth: bool,
    /// How long a scale-out waits for an adopted agent's first heartbeat.
    pub heartbeat_timeout: Duration,
    /// One call to a standby agent.
    pub agent_timeout: Duration,
    /// Default bound of an online shrink's drain, seconds.
    pub drain_timeout: f64,
    /// How long a shrink waits for decommissioned agents to leave.
    pub leave_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error(
        "scale-out is not configured: start the coordinator with --join-secret (LULL_JOIN_SECRET), the secret standby agents were started with"
    )]
    NotConfigured,
    #[error("operation {0} is still running; one operation runs at a time")]
    Busy(i64),
    #[error(transparent)]
    InvalidShrink(#[from] InvalidShrink),
    #[error("{0}")]
    NothingToRetry(String),
    #[error("{0}")]
    RetryMismatch(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A validated scale-out request.
#[derive(Debug, Clone)]
pub struct ScaleOutRequest {
    pub agents: Vec<AgentAddress>,
    pub zone: Option<String>,
    /// Passed to the agents as they are, minus `heartbeat_timeout` (the coordinator's).
    pub configs: Map<String, Value>,
    pub heartbeat_timeout: Option<Duration>,
    /// Where the agent should reach this coordinator, instead of the configured URL.
    pub coordinator_url: Option<String>,
}

/// A validated shrink request.
#[derive(Debug, Clone, Copy)]
pub struct ShrinkRequest {
    pub shrink_number: usize,
    pub online: bool,
    pub retry: bool,
    /// Drain bound (online), seconds.
    pub timeout: Option<f64>,
}

pub struct Operations {
    engine: Arc<Engine>,
    keys: Arc<dyn KeyStore>,
    config: OperationsConfig,
    client: StandbyClient,
    /// The operation running now.
    running: Mutex<Option<i64>>,
    next_id: AtomicI64,
    stop: CancellationToken,
}

/// Ends an operation's claim on the running slot when its task ends, however it ends.
struct Claim {
    operations: Arc<Operations>,
    operation_id: i64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut running = self
            .operations
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *running == Some(self.operation_id) {
            *running = None;
        }
    }
}

/// One agent being adopted, and what has been done to it (for the rollback).
#[derive(Debug)]
struct Adoptee {
    address: AgentAddress,
    node_id: String,
    challenge: String,
    held: bool,
    session: Option<Session>,
    configured: bool,
}

impl Operations {
    pub fn new(
        engine: Arc<Engine>,
        keys: Arc<dyn KeyStore>,
        config: OperationsConfig,
        max_operation_id: i64,
        stop: CancellationToken,
    ) -> Arc<Operations> {
        Arc::new(Operations {
            client: StandbyClient::new(config.agent_timeout),
            engine,
            keys,
            config,
            running: Mutex::new(None),
            next_id: AtomicI64::new(max_operation_id + 1),
            stop,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn claim(self: &Arc<Self>, operation_id: i64) -> Result<Claim, OperationError> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(other) = *running {
            return Err(OperationError::Busy(other));
        }
        *running = Some(operation_id);
        Ok(Claim {
            operations: Arc::clone(self),
            operation_id,
        })
    }

    /// Picks up operations a previous coordinator left unfinished: shrinks resume,
    /// scale-outs fail and are rolled back. Their nodes are held at once, before the
    /// coordinator serves, so that no heartbeat slips a half-adopted agent into the pool.
    pub fn recover(self: &Arc<Self>, unfinished: Vec<OperationRecord>) {
        for operation in unfinished {
            let id = operation.operation_id;
            match operation.after_restart() {
                AfterRestart::Nothing => {}
                AfterRestart::Resume => {
                    let Ok(claim) = self.claim(id) else {
                        // Only one operation is ever unfinished; a second is left as saved.
                        tracing::warn!(
                            operation_id = id,
                            "another operation runs; not resuming this one"
                        );
                        continue;
                    };
                    tracing::info!(
                        operation_id = id,
                        stage = operation.stage_name(),
                        "resuming shrink after a restart"
                    );
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        let _claim = claim;
                        this.run_shrink(operation).await;
                    });
                }
                AfterRestart::FailAndRollBack => {
                    for node_id in operation.node_ids() {
                        // Held by this operation alone: nothing else runs yet.
                        let _ = self.engine.hold(&node_id, id);
                    }
                    let Ok(claim) = self.claim(id) else {
                        continue;
                    };
                    tracing::info!(
                        operation_id = id,
                        stage = operation.stage_name(),
                        "failing scale-out interrupted by a restart"
                    );
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        let _claim = claim;
                        this.fail_after_restart(operation).await;
                    });
                }
            }
        }
    }

    // -------------------------------------------------------------------------------------------
    // Scale-out
    // -------------------------------------------------------------------------------------------

    /// Accepts a scale-out: the operation is saved `READY` and runs in the background.
    pub async fn scale_out(
        self: &Arc<Self>,
        request: ScaleOutRequest,
    ) -> Result<OperationRecord, OperationError> {
        let Some(join_secret) = self.config.join_secret.clone() else {
            return Err(OperationError::NotConfigured);
        };
        if let Some(duplicate) = plan::duplicate_agents(&request.agents, std::iter::empty()) {
            return Err(OperationError::Invalid(duplicate));
        }
        let operation_id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let claim = self.claim(operation_id)?;
        let mut data = Map::new();
        data.insert(
            "agents".into(),
            Value::Array(
                request
                    .agents
                    .iter()
                    .map(|a| json!({"ip": a.ip.to_string(), "port": a.port}))
                    .collect(),
            ),
        );
        data.insert("zone".into(), json!(request.zone));
        data.insert("configs".into(), Value::Object(request.configs.clone()));
        let operation =
            OperationRecord::new(operation_id, OperationKind::ScaleOut, data, unix_now());
        self.engine.save_operation(&operation).await?;
        tracing::info!(
            operation_id,
            agents = request.agents.len(),
            "scale-out accepted"
        );
        let this = Arc::clone(self);
        let answer = operation.clone();
        tokio::spawn(async move {
            let _claim = claim;
            this.run_scale_out(operation, request, join_secret).await;
        });
        Ok(answer)
    }

    async fn run_scale_out(
        &self,
        mut op: OperationRecord,
        request: ScaleOutRequest,
        join_secret: String,
    ) {
        if self
            .transition(&mut op, |o, now| o.start(now))
            .await
            .is_err()
        {
            return;
        }
        let mut adoptees: Vec<Adoptee> = request
            .agents
            .iter()
            .map(|address| Adoptee {
                address: address.clone(),
                node_id: String::new(),
                challenge: String::new(),
                held: false,
                session: None,
                configured: false,
            })
            .collect();
        let mut key_ids = Vec::new();
        let outcome = self
            .scale_out_stages(&mut op, &mut adoptees, &mut key_ids, &request, &join_secret)
            .await;
        match outcome {
            Ok(()) => {
                tracing::info!(operation_id = op.operation_id, "scale-out succeeded");
            }
            Err(Stop::Shutdown) => {}
            Err(Stop::Failed(reason)) => {
                tracing::warn!(
                    operation_id = op.operation_id,
                    stage = op.stage_name(),
                    reason,
                    "scale-out failed; rolling back"
                );
                let now = unix_now();
                if let Err(e) = op.stage_failed(&reason, now) {
                    tracing::error!(error = %e, "operation transition refused");
                }
                let undone = self
                    .roll_back_scale_out(op.operation_id, &mut adoptees, &key_ids, &join_secret)
                    .await;
                op.note_rollback(&undone);
                self.save(&op).await;
            }
        }
    }

    async fn scale_out_stages(
        &self,
        op: &mut OperationRecord,
        adoptees: &mut [Adoptee],
        key_ids: &mut Vec<i64>,
        request: &ScaleOutRequest,
        join_secret: &str,
    ) -> Result<(), Stop> {
        let operation_id = op.operation_id;

        // 1. check_agent_reachable: each agent answers, is in standby, is no member.
        for a in adoptees.iter_mut() {
            let address = a.address.display();
            let hello = self.client.hello(&address).await.map_err(|e| match e {
                CallFailure::Unreachable(why) => {
                    Stop::Failed(format!("agent {address} is unreachable: {why}"))
                }
                other => Stop::Failed(format!(
                    "agent {address} is not a standby Lull agent: {other}"
                )),
            })?;
            let known = self
                .engine
                .node(&hello.node_id)
                .ok()
                .map(|n| n.record.status);
            plan::check_hello(&address, &hello, known).map_err(Stop::Failed)?;
            a.node_id = hello.node_id;
            a.challenge = hello.challenge;
        }
        if let Some(duplicate) =
            plan::duplicate_agents(&[], adoptees.iter().map(|a| a.node_id.as_str()))
        {
            return Err(Stop::Failed(duplicate));
        }
        for a in adoptees.iter_mut() {
            self.engine
                .hold(&a.node_id, operation_id)
                .map_err(|e| Stop::Failed(e.to_string()))?;
            a.held = true;
        }
        let node_ids: Vec<String> = adoptees.iter().map(|a| a.node_id.clone()).collect();
        op.additional_data
            .insert("node_ids".into(), json!(node_ids));
        if let Value::Array(agents) = op
            .additional_data
            .entry("agents")
            .or_insert(Value::Array(Vec::new()))
        {
            for (agent, a) in agents.iter_mut().zip(adoptees.iter()) {
                agent["node_id"] = json!(a.node_id);
            }
        }
        self.next_stage(op, format!("in standby: {}", describe_agents(adoptees)))
            .await?;

        // 2. authenticate: both ways, HMAC over the agent's challenge and our nonce.
        for a in adoptees.iter_mut() {
            let address = a.address.display();
            let session = self
                .client
                .authenticate(&address, join_secret, &a.challenge)
                .await
                .map_err(|e| match e {
                    CallFailure::Refused { status: 401, detail } => Stop::Failed(format!(
                        "the agent at {address} refused our proof ({detail}): it was started with another join secret"
                    )),
                    other => Stop::Failed(format!("agent {address}: {other}")),
                })?;
            let Some(session) = session else {
                return Err(Stop::Failed(format!(
                    "the agent at {address} could not prove it knows the join secret"
                )));
            };
            a.session = Some(session);
        }
        self.next_stage(
            op,
            "the coordinator and every agent proved they know the join secret".into(),
        )
        .await?;

        // 3. push_config: a fresh agent key each (with auth on), coordinator URL, configs.
        let coordinator_url = request
            .coordinator_url
            .clone()
            .unwrap_or_else(|| self.config.coordinator_url.clone());
        for a in adoptees.iter_mut() {
            let address = a.address.display();
            let token = if self.config.auth {
                let key = NewKey::generate(
                    &format!("scale-out {operation_id}: {}", a.node_id),
                    Role::Agent,
                    KeyMode::Simple,
                );
                let stored = self
                    .keys
                    .create_key(&key, unix_now())
                    .await
                    .map_err(|e| Stop::Failed(format!("could not create an agent key: {e}")))?;
                key_ids.push(stored.key_id);
                op.additional_data.insert("key_ids".into(), json!(key_ids));
                self.save(op).await;
                Some(key.token)
            } else {
                None
            };
            let body = json!({
                "coordinator_url": coordinator_url,
                "token": token,
                "zone": request.zone,
                "configs": Value::Object(request.configs.clone()),
            });
            let Some(session) = a.session.as_mut() else {
                return Err(Stop::Failed(format!("no session with {address}")));
            };
            self.client
                .call(&address, session, "configure", &body)
                .await
                .map_err(|e| match e {
                    CallFailure::Refused {
                        status: 422,
                        detail,
                    } => Stop::Failed(format!(
                        "config rejected by the agent at {address}: {}",
                        detail.trim_start_matches("config rejected: ")
                    )),
                    CallFailure::Refused {
                        status: 409,
                        detail,
                    } => Stop::Failed(format!(
                        "already a member: the agent at {address} says {detail}"
                    )),
                    other => Stop::Failed(format!("agent {address}: {other}")),
                })?;
            a.configured = true;
        }
        let credentials = if self.config.auth {
            "with an agent key each"
        } else {
            "no key needed: auth is off"
        };
        self.next_stage(
            op,
            format!(
                "coordinator {} and configs pushed ({credentials})",
                self.config.coordinator_url
            ),
        )
        .await?;

        // 4. start_executor.
        let mut started = Vec::new();
        for a in adoptees.iter_mut() {
            let address = a.address.display();
            let Some(session) = a.session.as_mut() else {
                return Err(Stop::Failed(format!("no session with {address}")));
            };
            let answer = self
                .client
                .call(&address, session, "start", &json!({}))
                .await
                .map_err(|e| {
                    Stop::Failed(format!("the agent at {address} could not start: {e}"))
                })?;
            started.push(format!(
                "{}: {}",
                a.node_id,
                answer.executor.as_deref().unwrap_or("started")
            ));
        }
        self.next_stage(op, format!("executors running ({})", started.join(", ")))
            .await?;

        // 5. wait_first_heartbeat.
        let limit = request
            .heartbeat_timeout
            .unwrap_or(self.config.heartbeat_timeout);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let silent: Vec<&str> = adoptees
                .iter()
                .filter(|a| self.engine.held_heartbeat_at(&a.node_id).is_none())
                .map(|a| a.node_id.as_str())
                .collect();
            if silent.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "no heartbeat from node {} within {} s",
                    silent.join(", "),
                    limit.as_secs_f64()
                )));
            }
            self.pause().await?;
        }
        self.next_stage(op, "every node heartbeated".into()).await?;

        // 6. mark_node_ready: admitted as one group, in the same commit as this stage.
        let node_ids: Vec<String> = adoptees.iter().map(|a| a.node_id.clone()).collect();
        let joined = node_ids.join(", ");
        self.engine
            .admit(&node_ids, op, |group| {
                format!("node {joined} ready in group {}", group.id)
            })
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?;
        Ok(())
    }

    /// Undoes what a failed scale-out did, and says what.
    async fn roll_back_scale_out(
        &self,
        operation_id: i64,
        adoptees: &mut [Adoptee],
        key_ids: &[i64],
        join_secret: &str,
    ) -> String {
        let mut done = Vec::new();
        for a in adoptees.iter_mut() {
            let address = a.address.display();
            let mut keep_held = false;
            if a.configured {
                match self
                    .send_back(&address, a.session.take(), join_secret)
                    .await
                {
                    Ok(()) => done.push(format!("agent {address} is back in standby")),
                    Err(why) => {
                        keep_held = true;
                        done.push(format!(
                            "agent {address} could not be sent back to standby ({why}); node {} is kept out of the pool",
                            a.node_id
                        ));
                    }
                }
            }
            if a.held && !keep_held {
                self.engine.unhold(&a.node_id, operation_id);
            }
        }
        for key_id in key_ids {
            match self.keys.revoke_key(*key_id, unix_now()).await {
                Ok(_) => done.push(format!("key {key_id} revoked")),
                Err(e) => done.push(format!("key {key_id} could not be revoked: {e}")),
            }
        }
        if done.is_empty() {
            "nothing to undo".into()
        } else {
            done.join("; ")
        }
    }

    /// Tells an agent to leave and return to standby, authenticating anew if needed.
    async fn send_back(
        &self,
        address: &str,
        session: Option<Session>,
        join_secret: &str,
    ) -> Result<(), String> {
        let mut session = match session {
            Some(s) => s,
            None => {
                let hello = self
                    .client
                    .hello(address)
                    .await
                    .map_err(|e| e.to_string())?;
                self.client
                    .authenticate(address, join_secret, &hello.challenge)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the agent could not prove it knows the join secret")?
            }
        };
        self.client
            .call(address, &mut session, "leave", &json!({}))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// A scale-out found unfinished after a restart: failed at its stage, rolled back.
    async fn fail_after_restart(&self, mut op: OperationRecord) {
        let now = unix_now();
        if op.state == OperationState::Ready {
            let _ = op.start(now);
        }
        let stage = op.stage_name().to_string();
        if let Err(e) = op.stage_failed(
            format!("the coordinator restarted during stage {stage}; the scale-out was abandoned"),
            now,
        ) {
            tracing::error!(error = %e, "operation transition refused");
        }
        let join_secret = self.config.join_secret.clone().unwrap_or_default();
        let node_ids = op.node_ids();
        let mut adoptees: Vec<Adoptee> = op
            .additional_data
            .get("agents")
            .and_then(Value::as_array)
            .map(|agents| {
                agents
                    .iter()
                    .filter_map(|a| {
                        let ip = a["ip"].as_str()?.parse().ok()?;
                        let port = u16::try_from(a["port"].as_u64()?).ok()?;
                        let node_id = a["node_id"].as_str()?.to_string();
                        Some(Adoptee {
                            address: AgentAddress { ip, port },
                            held: node_ids.contains(&node_id),
                            node_id,
                            challenge: String::new(),
                            session: None,
                            // We cannot know how far it got: ask it back to standby.
                            configured: true,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let key_ids: Vec<i64> = op
            .additional_data
            .get("key_ids")
            .and_then(Value::as_array)
            .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let undone = self
            .roll_back_scale_out(op.operation_id, &mut adoptees, &key_ids, &join_secret)
            .await;
        op.note_rollback(&undone);
        self.save(&op).await;
    }

    // -------------------------------------------------------------------------------------------
    // Shrink
    // -------------------------------------------------------------------------------------------

    /// Accepts a shrink (or the retry of the last failed one): the operation is saved and
    /// runs in the background.
    pub async fn shrink(
        self: &Arc<Self>,
        request: ShrinkRequest,
    ) -> Result<OperationRecord, OperationError> {
        if request.retry {
            return self.retry_shrink(request).await;
        }
        let (node_ids, group_ids) =
            plan::select_for_shrink(&self.engine.groups(), request.shrink_number)?;
        let operation_id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let claim = self.claim(operation_id)?;
        let mut data = Map::new();
        data.insert("shrink_number".into(), json!(request.shrink_number));
        data.insert("online".into(), json!(request.online));
        data.insert(
            "timeout".into(),
            json!(request.timeout.unwrap_or(self.config.drain_timeout)),
        );
        data.insert("node_ids".into(), json!(node_ids));
        data.insert("group_ids".into(), json!(group_ids));
        let operation = OperationRecord::new(operation_id, OperationKind::Shrink, data, unix_now());
        self.engine.save_operation(&operation).await?;
        tracing::info!(operation_id, nodes = ?node_ids, online = request.online, "shrink accepted");
        let this = Arc::clone(self);
        let answer = operation.clone();
        tokio::spawn(async move {
            let _claim = claim;
            this.run_shrink(operation).await;
        });
        Ok(answer)
    }

    async fn retry_shrink(
        self: &Arc<Self>,
        request: ShrinkRequest,
    ) -> Result<OperationRecord, OperationError> {
        let last = self
            .engine
            .operations(&OperationQuery {
                kind: Some(OperationKind::Shrink),
                state: None,
                limit: 1,
                offset: 0,
            })
            .await?
            .into_iter()
            .next();
        let Some(mut operation) = last else {
            return Err(OperationError::NothingToRetry(
                "no shrink to retry: none has run".into(),
            ));
        };
        if operation.state != OperationState::Failed {
            return Err(OperationError::NothingToRetry(format!(
                "no failed shrink to retry: the last shrink, {}, is {}",
                operation.operation_id,
                operation.state.as_str()
            )));
        }
        let recorded = operation
            .additional_data
            .get("shrink_number")
            .and_then(Value::as_u64)
            .unwrap_or_default();
        if recorded != request.shrink_number as u64 {
            return Err(OperationError::RetryMismatch(format!(
                "shrink_number {} does not match the failed shrink {} being retried ({recorded})",
                request.shrink_number, operation.operation_id
            )));
        }
        let claim = self.claim(operation.operation_id)?;
        operation
            .retry(unix_now())
            .map_err(|e| OperationError::Invalid(e.to_string()))?;
        self.engine.save_operation(&operation).await?;
        tracing::info!(
            operation_id = operation.operation_id,
            stage = operation.stage_name(),
            "retrying shrink"
        );
        let this = Arc::clone(self);
        let answer = operation.clone();
        tokio::spawn(async move {
            let _claim = claim;
            this.run_shrink(operation).await;
        });
        Ok(answer)
    }

    /// Runs a shrink from its current stage: a new one from the first, a resumed or
    /// retried one from where it stopped (every stage can be carried out again).
    async fn run_shrink(&self, mut op: OperationRecord) {
        if op.state == OperationState::Ready
            && self
                .transition(&mut op, |o, now| o.start(now))
                .await
                .is_err()
        {
            return;
        }
        match self.shrink_stages(&mut op).await {
            Ok(()) => tracing::info!(operation_id = op.operation_id, "shrink succeeded"),
            Err(Stop::Shutdown) => {}
            Err(Stop::Failed(reason)) => {
                tracing::warn!(
                    operation_id = op.operation_id,
                    stage = op.stage_name(),
                    reason,
                    "shrink failed"
                );
                if let Err(e) = op.stage_failed(reason, unix_now()) {
                    tracing::error!(error = %e, "operation transition refused");
                }
                self.save(&op).await;
            }
        }
    }

    async fn shrink_stages(&self, op: &mut OperationRecord) -> Result<(), Stop> {
        let node_ids = op.node_ids();
        let online = op
            .additional_data
            .get("online")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let timeout = op
            .additional_data
            .get("timeout")
            .and_then(Value::as_f64)
            .unwrap_or(self.config.drain_timeout);
        let group_ids: Vec<String> = op
            .additional_data
            .get("group_ids")
            .and_then(Value::as_array)
            .map(|ids| ids.iter().map(Value::to_string).collect())
            .unwrap_or_default();

        if op.stage == 1 {
            self.next_stage(
                op,
                format!(
                    "node {} (group {})",
                    node_ids.join(", "),
                    group_ids.join(", ")
                ),
            )
            .await?;
        }

        if op.stage == 2 {
            // Online: running work may finish until the deadline, then it is stopped and
            // requeued. Offline: deadline now, so running work is requeued at once.
            let drain_for = if online { timeout } else { 0.0 };
            for node_id in &node_ids {
                let status = self.node_status(node_id)?;
                if status == lull_shared::NodeStatus::Removed {
                    continue;
                }
                self.engine
                    .drain(node_id, Some(drain_for))
                    .await
                    .map_err(|e| Stop::Failed(e.to_string()))?;
            }
            let limit = Duration::from_secs_f64(drain_for + 30.0);
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                let views = self.views(&node_ids)?;
                let running = plan::still_running(
                    views
                        .iter()
                        .map(|(id, status, runs)| (id.as_str(), *status, *runs)),
                );
                if running.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Stop::Failed(format!(
                        "node {} still holds runs {} s after the drain began",
                        running.join(", "),
                        limit.as_secs_f64()
                    )));
                }
                self.pause().await?;
            }
            let how = if online {
                format!("running work finished (bounded by {timeout} s)")
            } else {
                "running work requeued at once".to_string()
            };
            self.next_stage(op, format!("drained: {how}")).await?;
        }

        if op.stage == 3 {
            let mut told = Vec::new();
            for (node_id, status, _) in self.views(&node_ids)? {
                if matches!(
                    status,
                    lull_shared::NodeStatus::Offline | lull_shared::NodeStatus::Removed
                ) {
                    continue;
                }
                self.engine
                    .decommission(&node_id)
                    .await
                    .map_err(|e| Stop::Failed(e.to_string()))?;
                told.push(node_id);
            }
            let deadline = tokio::time::Instant::now() + self.config.leave_timeout;
            loop {
                let views = self.views(&node_ids)?;
                let staying =
                    plan::not_left(views.iter().map(|(id, status, _)| (id.as_str(), *status)));
                if staying.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Stop::Failed(format!(
                        "node {} did not leave within {} s of its decommission command",
                        staying.join(", "),
                        self.config.leave_timeout.as_secs_f64()
                    )));
                }
                self.pause().await?;
            }
            let message = if told.is_empty() {
                "every node had already left".to_string()
            } else {
                format!("node {} decommissioned and left", told.join(", "))
            };
            self.next_stage(op, message).await?;
        }

        if op.stage == 4 {
            for node_id in &node_ids {
                self.engine
                    .remove_node(node_id)
                    .await
                    .map_err(|e| Stop::Failed(e.to_string()))?;
            }
            self.next_stage(op, format!("node {} removed", node_ids.join(", ")))
                .await?;
        }
        Ok(())
    }

    fn node_status(&self, node_id: &str) -> Result<lull_shared::NodeStatus, Stop> {
        self.engine
            .node(node_id)
            .map(|n| n.record.status)
            .map_err(|e| Stop::Failed(e.to_string()))
    }

    /// Each node's status and how many runs it holds.
    fn views(
        &self,
        node_ids: &[String],
    ) -> Result<Vec<(String, lull_shared::NodeStatus, usize)>, Stop> {
        node_ids
            .iter()
            .map(|id| {
                let view = self
                    .engine
                    .node(id)
                    .map_err(|e| Stop::Failed(e.to_string()))?;
                Ok((id.clone(), view.record.status, view.running.len()))
            })
            .collect()
    }

    // -------------------------------------------------------------------------------------------
    // Plumbing
    // -------------------------------------------------------------------------------------------

    /// Applies a transition and saves it. A refused transition is a bug: logged, and the
    /// operation is left as it was saved.
    async fn transition(
        &self,
        op: &mut OperationRecord,
        f: impl FnOnce(&mut OperationRecord, f64) -> Result<(), super::TransitionError>,
    ) -> Result<(), ()> {
        if let Err(e) = f(op, unix_now()) {
            tracing::error!(error = %e, "operation transition refused");
            return Err(());
        }
        self.save(op).await;
        Ok(())
    }

    async fn next_stage(&self, op: &mut OperationRecord, message: String) -> Result<(), Stop> {
        if self.stop.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        self.transition(op, |o, now| o.stage_succeeded(message, now))
            .await
            .map_err(|()| Stop::Failed("internal error: the stage could not be recorded".into()))
    }

    async fn save(&self, op: &OperationRecord) {
        if let Err(e) = self.engine.save_operation(op).await {
            tracing::error!(operation_id = op.operation_id, error = %e, "could not save the operation");
        }
    }

    async fn pause(&self) -> Result<(), Stop> {
        tokio::select! {
            () = tokio::time::sleep(POLL) => Ok(()),
            () = self.stop.cancelled() => Err(Stop::Shutdown),
        }
    }
}

/// Why a driver stopped early.
#[derive(Debug)]
enum Stop {
    /// The stage failed; the operation fails with this reason.
    Failed(String),
    /// The coordinator is stopping: leave the operation as saved (a restart picks it up).
    Shutdown,
}

fn describe_agents(adoptees: &[Adoptee]) -> String {
    adoptees
        .iter()
        .map(|a| format!("{} (node {})", a.address.display(), a.node_id))
        .collect::<Vec<_>>()
        .join(", ")
}
