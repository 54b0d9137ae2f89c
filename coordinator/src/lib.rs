//! Lull's coordinator: it takes Python code over HTTP, keeps the queue durable, and hands
//! runs to agents that pull them.
//!
//! Map of the crate:
//! - [`scheduler`]: pure scheduling rules over in-memory state (placement, leases, requeue).
//! - [`model`]: the records and [`model::Change`]s shared by the scheduler and the store.
//! - [`store`]: the storage trait, the SQLite backend and the group-commit writer.
//! - [`engine`]: joins scheduler, store and time; the only holder of the scheduler lock.
//! - [`feed`]: the live feed: events published after commit, a replay ring, bounded fan-out.
//! - [`history`]: the queue's recent length, sampled for the console's chart.
//! - [`operations`]: scale-out and shrink as durable, staged operations, and their drivers.
//! - [`http`]: the axum router, extractors and the `{"detail"}` error type.
//! - [`keys`], [`rate_limit`], [`replay`]: API keys and roles, per-key token buckets, and
//!   the signatures seen recently: pure rules the HTTP edge applies.
//! - [`tls`]: the certificate and key HTTPS is served with (`--tls-cert`, `--tls-key`).
//! - [`waiters`]: clients waiting for a task to finish, woken by the commit that finished it.
//!
//! [`run`] wires them together on a listener until a shutdown token fires.

#![forbid(unsafe_code)]

pub mod engine;
pub mod feed;
pub mod history;
pub mod http;
pub mod keys;
pub mod model;
pub mod operations;
pub mod rate_limit;
pub mod replay;
pub mod scheduler;
pub mod store;
pub mod tls;
pub mod waiters;

use engine::{Engine, EngineConfig};
use feed::{Feed, FeedConfig};
use model::TaskLimits;
use rate_limit::RateLimit;
use scheduler::{Scheduler, SchedulerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{CachedKeys, KeyStore, SqliteStore, Store, StoreError, SyncMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything the coordinator is configured with; built once in `main`.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Agents to run inside this process (the single-machine default is one).
    pub local_agents: u32,
    pub sync: SyncMode,
    /// Seconds between agent heartbeats (told to agents, and used for the TTL).
    pub heartbeat_interval: f64,
    /// Seconds without a heartbeat before a node is offline and its runs requeued.
    pub node_ttl: f64,
    pub limits: TaskLimits,
    pub max_body_bytes: usize,
    /// The interpreter local agents run tasks with.
    pub python: String,
    /// Runs a node may hold beyond its capacity, waiting for a slot there (see
    /// [`SchedulerConfig::prefetch`]).
    pub prefetch: usize,
    /// The live feed's replay ring and per-subscriber buffer.
    pub feed: FeedConfig,
    /// Seconds a node command may wait for its outcome before it is `expired`.
    pub command_ttl: f64,
    /// Require API keys on every request but `/` and `/health` (off: today's open API).
    /// The coordinator then refuses to start without an active admin key.
    pub auth: bool,
    /// The secret standby agents share with this coordinator; `None`: no scale-out.
    pub join_secret: Option<String>,
    /// The URL adopted agents are told to reach this coordinator at; `None`: from the
    /// listening address (loopback when bound to every interface).
    pub advertise_url: Option<String>,
    /// How long a scale-out waits for an adopted agent's first heartbeat, seconds.
    pub scale_out_heartbeat_timeout: f64,
    /// How long an online shrink lets running work finish unless the request says, seconds.
    pub shrink_drain_timeout: f64,
    /// How long a shrink waits for decommissioned agents to leave, seconds; `None`: the
    /// node TTL plus a minute (a silent agent is offline after the TTL anyway).
    pub shrink_leave_timeout: Option<f64>,
    /// Each key's request budget with auth on (agent keys have their own).
    pub rate_limit: RateLimit,
    /// Agent keys' budget: far above people's, so the agent protocol is never starved.
    pub agent_rate_limit: RateLimit,
    /// Origins browsers may call from with auth on (none: same-origin only).
    pub cors_origins: Vec<String>,
    /// Longest a request may take (long-polls and the live feed excepted).
    pub request_timeout: Duration,
    /// Serve HTTPS (and WSS) with this instead of plain HTTP.
    pub tls: Option<tls::Tls>,
}

/// Requests per second per key, and the burst, unless configured.
pub const DEFAULT_RATE_LIMIT: f64 = 50.0;
pub const DEFAULT_RATE_BURST: f64 = 100.0;
/// Requests per second per agent key (burst twice that), unless configured.
pub const DEFAULT_AGENT_RATE_LIMIT: f64 = 1000.0;
/// Seconds a request may take, unless configured.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: f64 = 30.0;

impl Config {
    /// The defaults `lull-coordinator` starts with, data under `data_dir`.
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            local_agents: 1,
            sync: SyncMode::Full,
            heartbeat_interval: 2.0,
            node_ttl: 10.0,
            limits: TaskLimits::default(),
            max_body_bytes: 8 * 1024 * 1024,
            python: "python3".into(),
            prefetch: scheduler::DEFAULT_PREFETCH,
            feed: FeedConfig::default(),
            command_ttl: scheduler::DEFAULT_COMMAND_TTL,
            auth: false,
            join_secret: None,
            advertise_url: None,
            scale_out_heartbeat_timeout: 30.0,
            shrink_drain_timeout: 300.0,
            shrink_leave_timeout: None,
            rate_limit: RateLimit::new(DEFAULT_RATE_LIMIT, DEFAULT_RATE_BURST),
            agent_rate_limit: RateLimit::new(
                DEFAULT_AGENT_RATE_LIMIT,
                2.0 * DEFAULT_AGENT_RATE_LIMIT,
            ),
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT_SECS),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not read the listener's address: {0}")]
    Listener(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "authentication is on but {data_dir} holds no active admin key, so nobody could manage \
         this coordinator; create one first: lull-coordinator keys create --role admin \
         --data-dir {data_dir}"
    )]
    NoAdminKey { data_dir: String },
}

/// With auth on, refuses to start without an active (not revoked) admin key: nobody could
/// manage keys or nodes through the API, and a coordinator that cannot be managed should
/// say so at start, not at the first request. `lull-coordinator` calls this before binding.
pub async fn check_admin_key(config: &Config) -> Result<(), CoordinatorError> {
    if !config.auth {
        return Ok(());
    }
    let store = SqliteStore::open(&config.data_dir, config.sync).await?;
    require_admin_key(store.as_ref(), &config.data_dir).await
}

async fn require_admin_key(
    keys: &dyn KeyStore,
    data_dir: &std::path::Path,
) -> Result<(), CoordinatorError> {
    let active_admin = keys
        .keys()
        .await?
        .iter()
        .any(|k| k.role == keys::Role::Admin && k.revoked_at.is_none());
    if active_admin {
        Ok(())
    } else {
        Err(CoordinatorError::NoAdminKey {
            data_dir: data_dir.display().to_string(),
        })
    }
}

/// Serves the coordinator on `listener` until `shutdown` is cancelled, then stops local
/// agents (letting them hand back their runs), then the server.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let addr = listener.local_addr().map_err(CoordinatorError::Listener)?;
    let sqlite = SqliteStore::open(&config.data_dir, config.sync).await?;
    let keys: Arc<dyn KeyStore> = Arc::new(CachedKeys::new(
        sqlite.clone(),
        store::key_cache::DEFAULT_TTL,
    ));
    if config.auth {
        require_admin_key(keys.as_ref(), &config.data_dir).await?;
    }
    let committer = Box::new(sqlite.committer()?);
    let store: Arc<dyn Store> = sqlite;
    let mut snapshot = store.load().await?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        active_tasks = snapshot.active_tasks.len(),
        active_runs = snapshot.active_runs.len(),
        nodes = snapshot.nodes.len(),
        "state loaded"
    );
    // Runs are numbered from above what a pull answered ahead of its lease's commit may have
    // been handed.
    let highest_run = snapshot.max_run_id;
    snapshot.max_run_id = engine::highest_run_ahead(highest_run);
    let unfinished_operations = std::mem::take(&mut snapshot.unfinished_operations);
    let max_operation_id = snapshot.max_operation_id;
    let feed = Arc::new(Feed::new(
        &config.feed,
        snapshot.nodes.iter().map(|n| (n.node_id.clone(), n.status)),
    ));
    let scheduler = Scheduler::restore(
        SchedulerConfig {
            node_ttl: config.node_ttl,
            reconcile_grace: (2.0 * config.heartbeat_interval).max(5.0),
            prefetch: config.prefetch,
            command_ttl: config.command_ttl,
            ..SchedulerConfig::default()
        },
        snapshot,
        engine::unix_now(),
    );
    let server_id = format!("{:08x}", rand::random::<u32>());
    let engine_stop = CancellationToken::new();
    let (engine, writer_stopped) = Engine::new(
        scheduler,
        store,
        committer,
        highest_run,
        feed.clone(),
        EngineConfig {
            limits: config.limits.clone(),
            heartbeat_interval: config.heartbeat_interval,
            tick_interval: Duration::from_millis(500),
            server_id: server_id.clone(),
            deferred_window: engine::DEFERRED_SUBMISSION_WINDOW,
        },
        engine_stop.clone(),
    )?;
    let engine = Arc::new(engine);
    let ticker = tokio::spawn(engine.clone().run_ticker());

    // In-process agents authenticate with a token made now and held only in memory.
    let local_token = (config.auth && config.local_agents > 0)
        .then(|| keys::NewKey::generate("local", keys::Role::Agent, keys::KeyMode::Simple).token);
    let operations = operations::Operations::new(
        engine.clone(),
        keys.clone(),
        operations::OperationsConfig {
            join_secret: config.join_secret.clone(),
            coordinator_url: config
                .advertise_url
                .clone()
                .unwrap_or_else(|| local_url(addr, config.tls.is_some())),
            auth: config.auth,
            heartbeat_timeout: Duration::from_secs_f64(config.scale_out_heartbeat_timeout),
            agent_timeout: Duration::from_secs(10),
            drain_timeout: config.shrink_drain_timeout,
            // A decommissioned agent says goodbye at once; a silent one is offline after
            // the node TTL.
            leave_timeout: Duration::from_secs_f64(
                config
                    .shrink_leave_timeout
                    .unwrap_or(config.node_ttl + 60.0),
            ),
        },
        max_operation_id,
        engine_stop.clone(),
    );
    // Before serving: nodes of an interrupted scale-out are held at once.
    operations.recover(unfinished_operations);
    let router = http::router(
        engine.clone(),
        keys,
        operations,
        &http::HttpConfig {
            max_body_bytes: config.max_body_bytes,
            auth: config.auth,
            local_agent_token_hash: local_token.as_deref().map(keys::hash_token),
            rate_limit: config.rate_limit,
            agent_rate_limit: config.agent_rate_limit,
            cors_origins: config.cors_origins.clone(),
            request_timeout: config.request_timeout,
        },
    );
    if config.auth {
        tracing::info!("authentication is on: every request but / and /health needs an API key");
    }
    let agents_stop = CancellationToken::new();
    let agents = start_local_agents(&config, addr, &agents_stop, local_token.as_deref());
    tracing::info!(%addr, server_id, local_agents = config.local_agents, "coordinator listening");

    let stopping = {
        let engine_stop = engine_stop.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: stopping local agents first");
            agents_stop.cancel();
            for agent in agents {
                let _ = agent.await;
            }
            engine_stop.cancel();
        }
    };
    let served = match &config.tls {
        None => axum::serve(listener, router)
            .with_graceful_shutdown(stopping)
            .await
            .map_err(CoordinatorError::Serve),
        Some(tls) => serve_tls(listener, router, tls, stopping).await,
    };
    engine_stop.cancel();
    let _ = ticker.await;
    drop(engine);
    let _ = writer_stopped.await;
    tracing::info!("coordinator stopped");
    served
}

/// Serves `router` over TLS on `listener` until `stopping` completes, then lets open
/// connections finish, as `axum::serve`'s graceful shutdown does. Each connection's
/// handshake runs in its own task: a client that is slow or speaks plain HTTP to this port
/// loses only its own connection.
async fn serve_tls(
    listener: TcpListener,
    router: axum::Router,
    tls: &tls::Tls,
    stopping: impl std::future::Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let listener = listener.into_std().map_err(CoordinatorError::Listener)?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(tls.server.clone()),
    )
    .handle(handle.clone())
    .serve(router.into_make_service());
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served.map_err(CoordinatorError::Serve),
        () = stopping => handle.graceful_shutdown(None),
    }
    server.await.map_err(CoordinatorError::Serve)
}

/// This coordinator's URL as agents on this host reach it: over loopback even when it
/// listens on every interface.
fn local_url(addr: SocketAddr, tls: bool) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

fn start_local_agents(
    config: &Config,
    addr: SocketAddr,
    stop: &CancellationToken,
    token: Option<&str>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let n = config.local_agents;
    if n == 0 {
        return Vec::new();
    }
    let url = local_url(addr, config.tls.is_some());
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    (1..=n)
        .map(|i| {
            let mut agent = lull_agent::AgentConfig::new(
                url.clone(),
                config.data_dir.join(format!("agent-{i}")),
            );
            agent.python = config.python.clone();
            agent.token = token.map(str::to_string);
            // A self-signed certificate is its own CA; a CA-issued one is in the roots anyway.
            agent.ca_cert = config.tls.as_ref().map(|tls| tls.cert_path.clone());
            agent.heartbeat_interval = Duration::from_secs_f64(config.heartbeat_interval);
            // The coordinator's host serves Lull: its other load is no owner to yield to
            // (and several local agents would count each other as one).
            agent.owner = lull_agent::OwnerPolicy::off();
            if n > 1 {
                // Several local agents share this host between them.
                agent.cpus = Some((host_cpus / f64::from(n)).max(1.0));
            }
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = lull_agent::run(agent, stop).await {
                    tracing::error!(error = %e, agent = i, "local agent stopped with an error");
                }
            })
        })
        .collect()
}
