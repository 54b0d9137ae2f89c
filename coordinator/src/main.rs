//! `lull-coordinator`: parse the command line, set up logging, bind, and call [`lull_coordinator::run`].

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use lull_coordinator::model::TaskLimits;
use lull_coordinator::store::SyncMode;
use lull_coordinator::{Config, run};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Lull coordinator: accepts Python tasks over HTTP and schedules them on idle machines.
#[derive(Debug, Parser)]
#[command(name = "lull-coordinator", version)]
struct Cli {
    /// Address to serve HTTP on.
    #[arg(long, env = "LULL_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Directory for the SQLite database and the local agents' state.
    #[arg(long, env = "LULL_DATA_DIR", default_value = "./lull-data")]
    data_dir: PathBuf,
    /// Agents to run inside this process (0 for a dedicated coordinator).
    #[arg(long, env = "LULL_LOCAL_AGENTS", default_value_t = 1)]
    local_agents: u32,
    /// SQLite durability: `full` (fsync per group commit) or `normal` (survives a killed process, not power loss).
    #[arg(long, env = "LULL_SYNC", default_value = "full")]
    sync: SyncMode,
    /// Seconds between agent heartbeats.
    #[arg(long, env = "LULL_HEARTBEAT_INTERVAL", default_value_t = 2.0)]
    heartbeat_interval: f64,
    /// Seconds without a heartbeat before a node is offline and its runs are requeued.
    #[arg(long, env = "LULL_NODE_TTL", default_value_t = 10.0)]
    node_ttl: f64,
    /// Longest task code accepted, in characters.
    #[arg(long, env = "LULL_MAX_CODE_CHARS", default_value_t = 10_000)]
    max_code_chars: usize,
    /// Longest task timeout accepted, in seconds.
    #[arg(long, env = "LULL_MAX_TIMEOUT", default_value_t = 604_800.0)]
    max_timeout: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "LULL_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Python interpreter for the local agents.
    #[arg(long, env = "LULL_PYTHON", default_value = "python3")]
    python: String,
    /// Runs a full node may hold beyond its capacity, to start the moment a slot frees
    /// (only tasks no other node has room for; 0 turns prefetching off).
    #[arg(long, env = "LULL_PREFETCH", default_value_t = lull_coordinator::scheduler::DEFAULT_PREFETCH)]
    prefetch: usize,
    /// Seconds a node command (drain, undrain, restart) may wait for its agent's outcome
    /// before it is marked expired.
    #[arg(long, env = "LULL_COMMAND_TTL", default_value_t = lull_coordinator::scheduler::DEFAULT_COMMAND_TTL)]
    command_ttl: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.heartbeat_interval > 0.0 && cli.node_ttl > cli.heartbeat_interval,
        "--node-ttl must be longer than --heartbeat-interval (got {} and {})",
        cli.node_ttl,
        cli.heartbeat_interval
    );
    anyhow::ensure!(
        cli.command_ttl.is_finite() && cli.command_ttl > 0.0,
        "--command-ttl must be a positive number of seconds (got {})",
        cli.command_ttl
    );
    let config = Config {
        local_agents: cli.local_agents,
        sync: cli.sync,
        heartbeat_interval: cli.heartbeat_interval,
        node_ttl: cli.node_ttl,
        limits: TaskLimits {
            max_code_chars: cli.max_code_chars,
            max_timeout_secs: cli.max_timeout,
            ..TaskLimits::default()
        },
        max_body_bytes: cli.max_body_bytes,
        python: cli.python,
        prefetch: cli.prefetch,
        command_ttl: cli.command_ttl,
        ..Config::new(cli.data_dir)
    };
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("could not listen on {}", cli.listen))?;
    let addr = listener
        .local_addr()
        .context("could not read the bound address")?;
    // One machine-readable line on stdout (logs go to stderr): tests that bind port 0
    // read the address from here, and a newcomer sees where to point curl.
    println!("Lull is listening on http://{addr}");
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    run(listener, config, shutdown).await?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
