//! Standby mode (scale-out, seed 002): `lull-agent --standby --listen IP:PORT --join-secret S`
//! serves a small HTTP API and waits for a coordinator to adopt it. Until then it does not
//! heartbeat, probe its sandbox or run anything.
//!
//! Adoption (see `lull_shared::standby` for the proofs): `GET /standby` hands out a
//! challenge; `POST /standby/authenticate` checks the coordinator's proof and answers the
//! agent's own, opening a session; signed `POST /standby/configure` takes the coordinator
//! URL, an agent key and the operator's settings (refused with a 422 that says why);
//! signed `POST /standby/start` starts the executor and the agent proper, which heartbeats
//! from then on; signed `POST /standby/leave` stops it (runs finish within the shutdown
//! grace, the rest are handed back) and returns to standby. A `decommission` command from
//! the coordinator returns it to standby the same way.
//!
//! Architecture Invariant: the join secret never leaves this process, and nothing an
//! unauthenticated caller sends changes the agent's state (only a fresh challenge is made).

use crate::agent::PreparedExecutor;
use crate::{AgentConfig, ExecutorKind, Stopped, resolve_node_id};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lull_shared::standby::{
    self, AdoptRequest, AuthenticateRequest, AuthenticateResponse, SEQUENCE_HEADER, SESSION_HEADER,
    SIGNATURE_HEADER, StandbyAnswer, StandbyHello, StandbyState,
};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a challenge may wait for its authentication.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Challenges outstanding at once (older ones are forgotten).
const MAX_CHALLENGES: usize = 16;
/// How long a session may be used.
const SESSION_TTL: Duration = Duration::from_secs(600);

/// Why standby mode could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Agent(#[from] crate::AgentError),
    #[error("the standby server failed: {0}")]
    Serve(std::io::Error),
}

struct Session {
    id: String,
    key: String,
    last_sequence: u64,
    opened: Instant,
}

enum Phase {
    Standby,
    Configured {
        config: Box<AgentConfig>,
    },
    /// The executor is starting (between `start` being called and the agent running).
    Starting {
        coordinator: String,
    },
    Adopted {
        coordinator: String,
        generation: u64,
        stop: CancellationToken,
        task: Option<JoinHandle<()>>,
    },
}

struct Inner {
    challenges: VecDeque<(String, Instant)>,
    session: Option<Session>,
    phase: Phase,
    generation: u64,
}

struct Standby {
    base: AgentConfig,
    join_secret: String,
    node_id: String,
    inner: Mutex<Inner>,
}

impl Standby {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self, inner: &Inner) -> (StandbyState, Option<String>) {
        match &inner.phase {
            Phase::Standby => (StandbyState::Standby, None),
            Phase::Configured { config } => {
                (StandbyState::Configured, Some(config.coordinator.clone()))
            }
            Phase::Starting { coordinator } | Phase::Adopted { coordinator, .. } => {
                (StandbyState::Adopted, Some(coordinator.clone()))
            }
        }
    }

    fn answer(&self, executor: Option<String>) -> Json<StandbyAnswer> {
        let (state, _) = self.state(&self.inner());
        Json(StandbyAnswer {
            state,
            node_id: self.node_id.clone(),
            executor,
        })
    }
}

/// Serves standby mode on `listener` until `shutdown`; an adopted agent is stopped
/// gracefully first. `base` holds everything not pushed by the coordinator (state
/// directory, sandbox, interpreter); its `coordinator` is ignored.
pub async fn serve_standby(
    listener: TcpListener,
    base: AgentConfig,
    join_secret: String,
    shutdown: CancellationToken,
) -> Result<(), StandbyError> {
    if join_secret.is_empty() {
        return Err(crate::AgentError::InvalidConfig(
            "standby mode needs a non-empty join secret".into(),
        )
        .into());
    }
    let node_id = resolve_node_id(&base).await?;
    let addr = listener.local_addr().map_err(StandbyError::Serve)?;
    info!(%addr, node_id, "standing by to be adopted by a coordinator");
    let standby = Arc::new(Standby {
        base,
        join_secret,
        node_id,
        inner: Mutex::new(Inner {
            challenges: VecDeque::new(),
            session: None,
            phase: Phase::Standby,
            generation: 0,
        }),
    });
    let router = Router::new()
        .route("/standby", get(hello))
        .route("/standby/authenticate", post(authenticate))
        .route("/standby/configure", post(configure))
        .route("/standby/start", post(start))
        .route("/standby/leave", post(leave))
        .with_state(Arc::clone(&standby));
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(StandbyError::Serve);
    stop_adopted(&standby).await;
    served
}

fn refuse(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": detail.into() }))).into_response()
}

async fn hello(State(standby): State<Arc<Standby>>) -> Json<StandbyHello> {
    let challenge = hex::encode(rand::random::<[u8; 32]>());
    let mut inner = standby.inner();
    let now = Instant::now();
    inner
        .challenges
        .retain(|(_, at)| now.duration_since(*at) < CHALLENGE_TTL);
    while inner.challenges.len() >= MAX_CHALLENGES {
        inner.challenges.pop_front();
    }
    inner.challenges.push_back((challenge.clone(), now));
    let (state, coordinator) = standby.state(&inner);
    Json(StandbyHello {
        state,
        node_id: standby.node_id.clone(),
        challenge,
        version: env!("CARGO_PKG_VERSION").to_string(),
        coordinator,
    })
}

async fn authenticate(State(standby): State<Arc<Standby>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<AuthenticateRequest>(&body) else {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "expected {\"challenge\", \"nonce\", \"proof\"}",
        );
    };
    let mut inner = standby.inner();
    let now = Instant::now();
    let Some(position) = inner
        .challenges
        .iter()
        .position(|(c, at)| c == &request.challenge && now.duration_since(*at) < CHALLENGE_TTL)
    else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unknown or expired challenge: ask GET /standby for a fresh one",
        );
    };
    // Single use, whatever the outcome.
    inner.challenges.remove(position);
    if request.nonce.len() < 16
        || !standby::verify_coordinator_proof(
            &standby.join_secret,
            &request.challenge,
            &request.nonce,
            &request.proof,
        )
    {
        warn!("refused a coordinator that does not know the join secret");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "wrong proof: the coordinator does not know this agent's join secret",
        );
    }
    let session = hex::encode(rand::random::<[u8; 16]>());
    inner.session = Some(Session {
        id: session.clone(),
        key: standby::session_key(&standby.join_secret, &request.challenge, &request.nonce),
        last_sequence: 0,
        opened: now,
    });
    info!("a coordinator authenticated");
    Json(AuthenticateResponse {
        session,
        proof: standby::agent_proof(&standby.join_secret, &request.challenge, &request.nonce),
    })
    .into_response()
}

/// Checks a signed call against the open session (and consumes its sequence number).
/// `Err` says why it is refused (a 401).
fn verify(
    standby: &Standby,
    headers: &HeaderMap,
    path: &str,
    body: &[u8],
) -> Result<(), &'static str> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(id), Some(sequence), Some(signature)) = (
        header(SESSION_HEADER),
        header(SEQUENCE_HEADER),
        header(SIGNATURE_HEADER),
    ) else {
        return Err("not authenticated: a session, a sequence and a signature are required");
    };
    let Ok(sequence) = sequence.parse::<u64>() else {
        return Err("the sequence must be a number");
    };
    let mut inner = standby.inner();
    let Some(session) = inner.session.as_mut() else {
        return Err("no session is open: authenticate first");
    };
    if session.id != id || session.opened.elapsed() > SESSION_TTL {
        return Err("unknown or expired session: authenticate again");
    }
    if sequence <= session.last_sequence {
        return Err("replayed call: the sequence must grow");
    }
    if !standby::verify_call(&session.key, sequence, "POST", path, body, &signature) {
        return Err("bad signature");
    }
    session.last_sequence = sequence;
    Ok(())
}

async fn configure(
    State(standby): State<Arc<Standby>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(why) = verify(&standby, &headers, "/standby/configure", &body) {
        return refuse(StatusCode::UNAUTHORIZED, why);
    }
    let request = match serde_json::from_slice::<AdoptRequest>(&body) {
        Ok(request) => request,
        Err(e) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("config rejected: {e}"),
            );
        }
    };
    let config = match adopted_config(&standby.base, &standby.node_id, &request) {
        Ok(config) => config,
        Err(why) => {
            warn!(%why, "refused the pushed configuration");
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("config rejected: {why}"),
            );
        }
    };
    {
        let mut inner = standby.inner();
        match &inner.phase {
            Phase::Standby | Phase::Configured { .. } => {}
            Phase::Starting { coordinator } | Phase::Adopted { coordinator, .. } => {
                return refuse(
                    StatusCode::CONFLICT,
                    format!("already adopted by {coordinator}"),
                );
            }
        }
        info!(coordinator = %config.coordinator, "configured by a coordinator");
        inner.phase = Phase::Configured {
            config: Box::new(config),
        };
    }
    standby.answer(None).into_response()
}

async fn start(State(standby): State<Arc<Standby>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = verify(&standby, &headers, "/standby/start", &body) {
        return refuse(StatusCode::UNAUTHORIZED, why);
    }
    let config = {
        let mut inner = standby.inner();
        let config = match std::mem::replace(&mut inner.phase, Phase::Standby) {
            Phase::Configured { config } => *config,
            other => {
                let refusal = match &other {
                    Phase::Standby => {
                        refuse(StatusCode::CONFLICT, "not configured: configure first")
                    }
                    _ => refuse(StatusCode::CONFLICT, "already started"),
                };
                inner.phase = other;
                return refusal;
            }
        };
        inner.phase = Phase::Starting {
            coordinator: config.coordinator.clone(),
        };
        config
    };
    let executor = PreparedExecutor::start(&config).await;
    let kind = executor.kind().to_string();
    let stop = CancellationToken::new();
    let generation = {
        let mut inner = standby.inner();
        inner.generation += 1;
        inner.generation
    };
    let task = tokio::spawn(run_adopted(
        Arc::clone(&standby),
        config.clone(),
        executor,
        stop.clone(),
        generation,
    ));
    {
        let mut inner = standby.inner();
        if matches!(inner.phase, Phase::Starting { .. }) {
            inner.phase = Phase::Adopted {
                coordinator: config.coordinator.clone(),
                generation,
                stop,
                task: Some(task),
            };
        }
    }
    info!(coordinator = %config.coordinator, executor = kind, "adopted: the agent is running");
    standby.answer(Some(kind)).into_response()
}

/// The agent proper, for as long as it is adopted; then back to standby.
async fn run_adopted(
    standby: Arc<Standby>,
    config: AgentConfig,
    mut executor: PreparedExecutor,
    stop: CancellationToken,
    generation: u64,
) {
    loop {
        match executor.run(config.clone(), stop.clone()).await {
            Ok(Stopped::Restart) => {
                info!("restarting the adopted agent in process");
                executor = PreparedExecutor::start(&config).await;
            }
            Ok(Stopped::Decommission) => {
                info!("decommissioned by the coordinator: back in standby");
                break;
            }
            Ok(Stopped::Shutdown) => {
                info!("left the coordinator: back in standby");
                break;
            }
            Err(err) => {
                warn!(%err, "the adopted agent could not run: back in standby");
                break;
            }
        }
    }
    let mut inner = standby.inner();
    if matches!(inner.phase, Phase::Adopted { generation: g, .. } if g == generation) {
        inner.phase = Phase::Standby;
    }
}

async fn leave(State(standby): State<Arc<Standby>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = verify(&standby, &headers, "/standby/leave", &body) {
        return refuse(StatusCode::UNAUTHORIZED, why);
    }
    stop_adopted(&standby).await;
    standby.answer(None).into_response()
}

/// Stops an adopted agent (gracefully) or forgets a pushed configuration: standby again.
async fn stop_adopted(standby: &Standby) {
    let task = {
        let mut inner = standby.inner();
        match std::mem::replace(&mut inner.phase, Phase::Standby) {
            Phase::Adopted { stop, task, .. } => {
                stop.cancel();
                task
            }
            Phase::Starting { coordinator } => {
                // `start` is still bringing the executor up; it sees this and stops.
                inner.phase = Phase::Starting { coordinator };
                None
            }
            Phase::Standby | Phase::Configured { .. } => None,
        }
    };
    if let Some(task) = task
        && let Err(err) = task.await
    {
        warn!(%err, "the adopted agent's task failed");
    }
}

/// The agent's configuration once adopted: `base` with what the coordinator pushed. Every
/// key of `configs` must be known and valid; the first that is not is the refusal.
fn adopted_config(
    base: &AgentConfig,
    node_id: &str,
    request: &AdoptRequest,
) -> Result<AgentConfig, String> {
    let url = request.coordinator_url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("coordinator_url {url:?} is not an http(s) URL"));
    }
    let mut config = base.clone();
    config.coordinator = url.trim_end_matches('/').to_string();
    config.node_id = Some(node_id.to_string());
    config.token = request.token.clone().filter(|t| !t.is_empty());
    config.secret = None;
    for (key, value) in &request.configs {
        let text = match value {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(format!("{key} must be a string or a number")),
        };
        let positive = |what: &str| -> Result<f64, String> {
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
                _ => Err(format!("{what} must be a positive number, got {text:?}")),
            }
        };
        match key.as_str() {
            "type" | "node_type" => {
                if text.is_empty() {
                    return Err(format!("{key} must not be empty"));
                }
                config.node_type = Some(text);
            }
            "zone" => config.zone = Some(text).filter(|z| !z.is_empty()),
            "cpus" => config.cpus = Some(positive("cpus")?),
            "memory_mb" => config.memory_mb = Some(positive("memory_mb")?),
            "heartbeat_interval" => {
                config.heartbeat_interval = Duration::from_secs_f64(positive("heartbeat_interval")?)
            }
            "executor" => {
                config.executor = ExecutorKind::parse(&text).ok_or_else(|| {
                    format!("executor {text:?} is not an executor: zygote or cold")
                })?;
            }
            other => {
                return Err(format!(
                    "unknown setting {other:?}; expected type, zone, cpus, memory_mb, executor, heartbeat_interval"
                ));
            }
        }
    }
    if let Some(zone) = request.zone.as_deref().filter(|z| !z.trim().is_empty()) {
        config.zone = Some(zone.to_string());
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn request(configs: Value) -> AdoptRequest {
        let Value::Object(configs) = configs else {
            panic!("configs must be an object");
        };
        AdoptRequest {
            coordinator_url: "http://10.0.0.1:8000/".into(),
            token: Some("t".into()),
            zone: Some("z2".into()),
            configs,
        }
    }

    fn base() -> AgentConfig {
        let mut base = AgentConfig::new("http://ignored", "/tmp/x".into());
        base.secret = Some("old".into());
        base
    }

    #[test]
    fn pushed_settings_override_the_base() {
        let config = adopted_config(
            &base(),
            "n1",
            &request(json!({"type": "gpu", "cpus": "2", "memory_mb": 1024, "executor": "cold", "heartbeat_interval": "0.5", "zone": "z1"})),
        )
        .expect("valid");
        assert_eq!(config.coordinator, "http://10.0.0.1:8000");
        assert_eq!(config.node_id.as_deref(), Some("n1"));
        assert_eq!(config.token.as_deref(), Some("t"));
        assert_eq!(config.secret, None);
        assert_eq!(config.node_type.as_deref(), Some("gpu"));
        assert_eq!((config.cpus, config.memory_mb), (Some(2.0), Some(1024.0)));
        assert_eq!(config.executor, ExecutorKind::Cold);
        assert_eq!(config.heartbeat_interval, Duration::from_millis(500));
        // The request's zone wins over configs.zone.
        assert_eq!(config.zone.as_deref(), Some("z2"));
    }

    #[test]
    fn unknown_or_bad_settings_are_refused_with_the_reason() {
        for (configs, needle) in [
            (
                json!({"mysql_port": "2881"}),
                "unknown setting \"mysql_port\"",
            ),
            (json!({"cpus": "-1"}), "cpus must be a positive number"),
            (json!({"executor": "gpu"}), "not an executor"),
            (json!({"type": ""}), "must not be empty"),
            (json!({"cpus": [1]}), "must be a string or a number"),
        ] {
            let err = adopted_config(&base(), "n1", &request(configs)).expect_err("refused");
            assert!(err.contains(needle), "{err}");
        }
        let mut bad_url = request(Value::Object(Map::new()));
        bad_url.coordinator_url = "ftp://x".into();
        assert!(adopted_config(&base(), "n1", &bad_url).is_err());
    }
}
