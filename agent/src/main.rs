//! `lull-agent`: parse flags and environment, set up logging, run the agent until SIGTERM or
//! SIGINT, exit 0 after a clean shutdown. Logs go to stderr; nothing is printed to stdout
//! but, in standby mode, the one line saying where it listens.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser;
use lull_agent::{AgentConfig, ExecutorKind, OwnerPolicy, Stopped};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Lull's worker daemon: lends this host's idle cycles to a Lull coordinator.
#[derive(Debug, Parser)]
#[command(name = "lull-agent", version, about)]
struct Cli {
    /// The coordinator's base URL.
    #[arg(
        long,
        env = "LULL_COORDINATOR",
        default_value = "http://127.0.0.1:8000"
    )]
    coordinator: String,
    /// PEM certificate(s) to trust for an https:// coordinator, in addition to the system's
    /// roots: a private CA, or the coordinator's self-signed certificate.
    #[arg(long, env = "LULL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Agent token, sent as the `token` header.
    #[arg(long, env = "LULL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A signed key's secret: every request is signed with it (HMAC-SHA256, see the README).
    #[arg(long, env = "LULL_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Node id; by default one is generated once and kept in the state directory.
    #[arg(long, env = "LULL_NODE_ID")]
    node_id: Option<String>,
    /// CPU cores to lend (default: all logical cores).
    #[arg(long, env = "LULL_CPUS")]
    cpus: Option<f64>,
    /// Memory to lend in MB (default: all of it).
    #[arg(long, env = "LULL_MEMORY_MB")]
    memory_mb: Option<f64>,
    /// Zone, matched by task constraints.
    #[arg(long, env = "LULL_ZONE")]
    zone: Option<String>,
    /// Node type, matched by task constraints (default: cpu).
    #[arg(long = "type", env = "LULL_TYPE")]
    node_type: Option<String>,
    /// Where the node id and the outbox of unacknowledged results are kept.
    #[arg(long, env = "LULL_STATE_DIR", default_value = "./lull-agent-state")]
    state_dir: PathBuf,
    /// Python interpreter to run tasks with.
    #[arg(long, env = "LULL_PYTHON", default_value = AgentConfig::DEFAULT_PYTHON)]
    python: String,
    /// Seconds between heartbeats.
    #[arg(long, env = "LULL_HEARTBEAT_INTERVAL", default_value = "2", value_parser = positive_seconds)]
    heartbeat_interval: Duration,
    /// Seconds running tasks get to finish on shutdown before they are handed back.
    #[arg(long, env = "LULL_SHUTDOWN_GRACE", default_value = "30", value_parser = seconds)]
    shutdown_grace: Duration,
    /// Seconds a run the coordinator stops (cancel, points lowered) has between SIGTERM and
    /// SIGKILL.
    #[arg(long, env = "LULL_STOP_GRACE", default_value = "10", value_parser = seconds)]
    stop_grace: Duration,
    /// Milliseconds a finished run's result may wait for others to share its post, only
    /// while more runs are queued for a slot than running (a busy node: fewer posts and
    /// commits per task); 0 posts every result at once.
    #[arg(long, env = "LULL_RESULTS_LINGER_MS", default_value_t = 2)]
    results_linger_ms: u64,
    /// Bytes of stdout and of stderr kept per task; the rest is discarded, and a task that
    /// writes 8 times more is killed.
    #[arg(long, env = "LULL_MAX_OUTPUT_BYTES")]
    max_output_bytes: Option<usize>,
    /// uid tasks run as when the agent is root.
    #[arg(long, env = "LULL_SANDBOX_UID", default_value_t = 65534)]
    sandbox_uid: u32,
    /// gid tasks run as when the agent is root.
    #[arg(long, env = "LULL_SANDBOX_GID", default_value_t = 65534)]
    sandbox_gid: u32,
    /// Processes (and threads) one task may have at once.
    #[arg(long, env = "LULL_MAX_PROCESSES", default_value_t = 64)]
    max_processes: u64,
    /// Largest file a task may write, in bytes.
    #[arg(long, env = "LULL_MAX_FILE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Files a task may have open at once.
    #[arg(long, env = "LULL_MAX_OPEN_FILES", default_value_t = 256)]
    max_open_files: u64,
    /// Size of a task's private /tmp (its working directory), in MB.
    #[arg(long, env = "LULL_DISK_MB", default_value_t = 256)]
    disk_mb: u64,
    /// Refuse to start when this host cannot sandbox tasks at least this well:
    /// none, basic, isolated or full.
    #[arg(long, env = "LULL_MIN_SANDBOX_LEVEL", default_value = "none", value_parser = level)]
    min_sandbox_level: lull_shared::SandboxLevel,
    /// Sandbox tasks at most this well, even where the host allows more: none, basic,
    /// isolated or full. For code trusted as much as the machine's own (and for measuring
    /// what each level costs); the agent reports the level it settled on.
    #[arg(long, env = "LULL_MAX_SANDBOX_LEVEL", default_value = "full", value_parser = level)]
    max_sandbox_level: lull_shared::SandboxLevel,
    /// The `lull-sandbox` launcher (default: next to this executable).
    #[arg(long, env = "LULL_SANDBOX_LAUNCHER")]
    sandbox_launcher: Option<PathBuf>,
    /// How tasks run: zygote (a fork of a warm Python per task; falls back to cold where it
    /// cannot start) or cold (a new python3 per task).
    #[arg(long, env = "LULL_EXECUTOR", default_value = "zygote", value_parser = executor_kind)]
    executor: ExecutorKind,
    /// Modules the zygote imports once for every task (comma-separated).
    #[arg(long, env = "LULL_PRELOAD", value_delimiter = ',')]
    preload: Vec<String>,
    /// The lull-zygote binary (default: next to this executable).
    #[arg(long, env = "LULL_ZYGOTE_BIN")]
    zygote_bin: Option<PathBuf>,
    /// Owner first: on (pause for the host's owner, resume, evict) or off (never pause).
    #[arg(long, env = "LULL_OWNER_POLICY", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    owner_policy: bool,
    /// The owner is busy above this share of the host's CPU (percent of all cores, not
    /// counting Lull's own use).
    #[arg(long, env = "LULL_OWNER_CPU_PERCENT", default_value = "50", value_parser = percent)]
    owner_cpu_percent: f64,
    /// ... or above this share of the host's memory (percent, not counting Lull's own use).
    #[arg(long, env = "LULL_OWNER_MEMORY_PERCENT", default_value = "90", value_parser = percent)]
    owner_memory_percent: f64,
    /// Seconds the owner must stay busy before the node pauses.
    #[arg(long, env = "LULL_OWNER_BUSY_FOR", default_value = "10", value_parser = seconds)]
    owner_busy_for: Duration,
    /// Seconds the owner must stay quiet before the node resumes.
    #[arg(long, env = "LULL_OWNER_QUIET_FOR", default_value = "30", value_parser = seconds)]
    owner_quiet_for: Duration,
    /// Seconds a pause may last before the node's runs are evicted (killed and requeued).
    #[arg(long, env = "LULL_OWNER_EVICT_AFTER", default_value = "600", value_parser = seconds)]
    owner_evict_after: Duration,
    /// Wait to be adopted by a coordinator's scale-out instead of joining one: serve the
    /// standby API on --listen; the coordinator pushes its URL, a key and the settings.
    #[arg(long, env = "LULL_STANDBY", requires_all = ["listen", "join_secret"])]
    standby: bool,
    /// Where standby mode listens (IP:PORT; port 0 picks one, printed on stdout).
    #[arg(long, env = "LULL_STANDBY_LISTEN", requires = "standby")]
    listen: Option<std::net::SocketAddr>,
    /// The secret the adopting coordinator must know (and this agent proves it knows).
    #[arg(
        long,
        env = "LULL_JOIN_SECRET",
        hide_env_values = true,
        requires = "standby"
    )]
    join_secret: Option<String>,
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{value:?} is not on or off")),
    }
}

fn percent(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

fn executor_kind(value: &str) -> Result<ExecutorKind, String> {
    ExecutorKind::parse(value)
        .ok_or_else(|| format!("{value:?} is not an executor: zygote or cold"))
}

fn level(value: &str) -> Result<lull_shared::SandboxLevel, String> {
    lull_shared::SandboxLevel::parse(value)
        .ok_or_else(|| format!("{value:?} is not a level: none, basic, isolated or full"))
}

impl Cli {
    fn into_config(self) -> AgentConfig {
        // An empty variable (`LULL_ZONE=`) means unset.
        let given = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        let mut config = AgentConfig::new(self.coordinator, self.state_dir);
        config.token = given(self.token);
        config.secret = given(self.secret);
        config.ca_cert = self.ca_cert;
        config.node_id = given(self.node_id);
        config.cpus = self.cpus;
        config.memory_mb = self.memory_mb;
        config.zone = given(self.zone);
        config.node_type = given(self.node_type);
        config.python = self.python;
        config.heartbeat_interval = self.heartbeat_interval;
        config.shutdown_grace = self.shutdown_grace;
        config.stop_grace = self.stop_grace;
        config.results_linger = Duration::from_millis(self.results_linger_ms);
        if let Some(max) = self.max_output_bytes {
            config.max_output_bytes = max;
        }
        config.sandbox = lull_agent::sandbox::SandboxSettings {
            uid: self.sandbox_uid,
            gid: self.sandbox_gid,
            max_processes: self.max_processes,
            max_file_bytes: self.max_file_bytes,
            max_open_files: self.max_open_files,
            disk_mb: self.disk_mb,
            ..lull_agent::sandbox::SandboxSettings::default()
        };
        config.sandbox_launcher = self.sandbox_launcher;
        config.min_sandbox_level = self.min_sandbox_level;
        config.max_sandbox_level = self.max_sandbox_level;
        config.executor = self.executor;
        config.preload = self
            .preload
            .into_iter()
            .filter(|m| !m.trim().is_empty())
            .collect();
        config.zygote_bin = self.zygote_bin;
        config.owner = OwnerPolicy {
            enabled: self.owner_policy,
            cpu_percent: self.owner_cpu_percent,
            memory_percent: self.owner_memory_percent,
            busy_for: self.owner_busy_for,
            quiet_for: self.owner_quiet_for,
            evict_after: self.owner_evict_after,
        };
        config
    }
}

fn seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{value:?} is not a usable duration"))
}

fn positive_seconds(value: &str) -> Result<Duration, String> {
    match seconds(value)? {
        duration if duration.is_zero() => Err("must be greater than zero".to_string()),
        duration => Ok(duration),
    }
}

// One runtime thread: the agent's work is waiting (on the coordinator, the zygote, runs'
// pipes), and with a second worker each hand-over between them was a cross-thread wake-up
// (`bench/executors.py`: 20 % less agent CPU per task, 0.35 -> 0.28 ms). Blocking work goes
// to `spawn_blocking` (the owner meter's /proc scan, file writes).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let standby = cli
        .standby
        .then(|| (cli.listen, cli.join_secret.clone().unwrap_or_default()));
    let config = cli.into_config();
    let outcome = match standby {
        Some((Some(listen), join_secret)) => {
            stand_by_until_signalled(listen, config, join_secret).await
        }
        Some((None, _)) => Err(anyhow::anyhow!("--standby needs --listen IP:PORT")),
        None => run_until_signalled(config).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled by the first SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    let shutdown = CancellationToken::new();
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                };
                if shutdown.is_cancelled() {
                    info!(signal = name, "already shutting down");
                } else {
                    info!(signal = name, "shutdown requested");
                    shutdown.cancel();
                }
            }
        }
    });
    Ok(shutdown)
}

/// Standby mode until SIGTERM or SIGINT. The first line on stdout says where it listens
/// (`Lull agent standing by on IP:PORT`), for whoever started it with port 0.
async fn stand_by_until_signalled(
    listen: std::net::SocketAddr,
    config: AgentConfig,
    join_secret: String,
) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    println!("Lull agent standing by on {addr}");
    lull_agent::serve_standby(listener, config, join_secret, shutdown)
        .await
        .context("standby mode failed")
}

/// Runs the agent until SIGTERM or SIGINT asks it to shut down. A `restart` command from the
/// coordinator ends in [`reexec`]: the same binary, arguments and environment, same pid.
async fn run_until_signalled(config: AgentConfig) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals()?;

    match lull_agent::run_once(config, shutdown)
        .await
        .context("the agent could not start")?
    {
        Stopped::Shutdown => Ok(()),
        Stopped::Decommission => {
            info!("decommissioned by the coordinator: exiting");
            Ok(())
        }
        Stopped::Restart => Err(reexec()),
    }
}

/// Replaces this process with a fresh start of the same binary (same arguments, same
/// environment, same pid). Only returns if that failed. The agent has shut down cleanly
/// by now: its runs are over or handed back, its executor is gone, its results are in the
/// outbox on disk, and every descriptor it holds is close-on-exec.
fn reexec() -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => return anyhow::Error::new(err).context("finding this executable to restart"),
    };
    info!(exe = %exe.display(), "restarting");
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::Error::new(err).context(format!("restarting {}", exe.display()))
}
