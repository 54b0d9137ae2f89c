//! The agent's configuration: one plain value, built by `main.rs` (from flags and environment)
//! or by the coordinator when it embeds an agent.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the agent needs to know, passed explicitly to [`crate::run`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator's base URL, e.g. `http://127.0.0.1:8000`.
    pub coordinator: String,
    /// Sent as the `token` header on every request when set.
    pub token: Option<String>,
    /// A signed key's secret: when set, every request carries `timestamp` and `sign_str`.
    pub secret: Option<String>,
    /// PEM certificates trusted for an `https://` coordinator, in addition to the system's
    /// and the Mozilla roots (a private CA, or a self-signed certificate itself).
    pub ca_cert: Option<PathBuf>,
    /// `None`: read `state_dir/node_id`, or create `{hostname}-{6 hex}` and save it there.
    pub node_id: Option<String>,
    /// Declared CPU capacity; `None`: the host's logical cores.
    pub cpus: Option<f64>,
    /// Declared memory capacity in MB; `None`: the host's total memory.
    pub memory_mb: Option<f64>,
    pub zone: Option<String>,
    /// The node type constraints match against; `None` means `"cpu"`.
    pub node_type: Option<String>,
    /// Created if missing; holds `node_id` and `outbox/`.
    pub state_dir: PathBuf,
    /// The Python interpreter runs are started with.
    pub python: String,
    pub heartbeat_interval: Duration,
    /// How long running runs may take to finish once shutdown starts before they are released.
    pub shutdown_grace: Duration,
    /// A run the coordinator stops (cancelled, or its task's points lowered) gets SIGTERM,
    /// then SIGKILL this long after if it is still there.
    pub stop_grace: Duration,
    /// Per stream (stdout, stderr) and per run; the rest is discarded.
    pub max_output_bytes: usize,
    /// How long one `GET /internal/task` long-poll waits for work.
    pub pull_wait: Duration,
    /// At most how long a finished run's result waits for others to share its post, only
    /// while more runs are queued for a slot than running (see `Refill::hold` in
    /// `outbox.rs`); zero: never.
    pub results_linger: Duration,
    /// Limits and the unprivileged user every run gets.
    pub sandbox: crate::sandbox::SandboxSettings,
    /// The `lull-sandbox` launcher; `None`: next to the running executable.
    pub sandbox_launcher: Option<PathBuf>,
    /// Refuse to start below this protection level.
    pub min_sandbox_level: lull_shared::SandboxLevel,
    /// Apply at most this protection level, even where the host allows more (the probe
    /// settles on the strongest at or below it).
    pub max_sandbox_level: lull_shared::SandboxLevel,
    /// `Zygote` (the default) falls back to `Cold` where no zygote can start.
    pub executor: crate::executor::ExecutorKind,
    /// Modules the zygote imports once, for every run.
    pub preload: Vec<String>,
    /// The `lull-zygote` binary; `None`: next to the running executable.
    pub zygote_bin: Option<PathBuf>,
    /// Owner first: when to pause for the host's owner, resume, and evict.
    pub owner: crate::owner::OwnerPolicy,
}

impl AgentConfig {
    pub const DEFAULT_NODE_TYPE: &'static str = "cpu";
    pub const DEFAULT_PYTHON: &'static str = "python3";
    pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;
    pub const DEFAULT_PULL_WAIT: Duration = Duration::from_secs(20);
    pub const DEFAULT_RESULTS_LINGER: Duration = Duration::from_millis(2);

    /// A configuration with every default: host capacity, a generated node id, `python3`.
    pub fn new(coordinator: impl Into<String>, state_dir: PathBuf) -> Self {
        AgentConfig {
            coordinator: coordinator.into(),
            token: None,
            secret: None,
            ca_cert: None,
            node_id: None,
            cpus: None,
            memory_mb: None,
            zone: None,
            node_type: None,
            state_dir,
            python: Self::DEFAULT_PYTHON.to_string(),
            heartbeat_interval: Self::DEFAULT_HEARTBEAT_INTERVAL,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            stop_grace: Self::DEFAULT_STOP_GRACE,
            max_output_bytes: Self::DEFAULT_MAX_OUTPUT_BYTES,
            pull_wait: Self::DEFAULT_PULL_WAIT,
            results_linger: Self::DEFAULT_RESULTS_LINGER,
            sandbox: crate::sandbox::SandboxSettings::default(),
            sandbox_launcher: None,
            min_sandbox_level: lull_shared::SandboxLevel::None,
            max_sandbox_level: lull_shared::SandboxLevel::Full,
            executor: crate::executor::ExecutorKind::default(),
            preload: Vec::new(),
            zygote_bin: None,
            owner: crate::owner::OwnerPolicy::default(),
        }
    }

    /// The node type announced in heartbeats.
    pub(crate) fn node_type_or_default(&self) -> &str {
        self.node_type.as_deref().unwrap_or(Self::DEFAULT_NODE_TYPE)
    }
}
