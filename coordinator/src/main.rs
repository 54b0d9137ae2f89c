//! `lull-coordinator`: parse the command line, set up logging, bind, and call [`lull_coordinator::run`].

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use lull_coordinator::keys::{KeyMode, NewKey, Role};
use lull_coordinator::model::TaskLimits;
use lull_coordinator::rate_limit::RateLimit;
use lull_coordinator::store::{KeyStore, SqliteStore, SyncMode};
use lull_coordinator::{Config, run};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: dispatch allocates many small, short-lived buffers
/// (requests, changes, events), and glibc's allocator took about a quarter of the
/// coordinator's CPU at full load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lull coordinator: accepts Python tasks over HTTP and schedules them on idle machines.
#[derive(Debug, Parser)]
#[command(name = "lull-coordinator", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve HTTP on (HTTPS with --tls-cert and --tls-key).
    #[arg(long, env = "LULL_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Directory for the SQLite database and the local agents' state.
    #[arg(
        long,
        env = "LULL_DATA_DIR",
        default_value = "./lull-data",
        global = true
    )]
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
    /// Most nodes one task may run on at once (its `points`, seed 000), at submission and
    /// through change_points.
    #[arg(long, env = "LULL_MAX_POINTS", default_value_t = lull_coordinator::model::DEFAULT_MAX_POINTS)]
    max_points: u32,
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
    /// Require API keys on every request but `/` and `/health` (always on when listening on
    /// a non-loopback address, unless --insecure-no-auth).
    #[arg(long, env = "LULL_AUTH")]
    auth: bool,
    /// Serve without authentication even on a non-loopback address. Anyone who can reach
    /// the port can run code on your agents.
    #[arg(long, env = "LULL_INSECURE_NO_AUTH", conflicts_with = "auth")]
    insecure_no_auth: bool,
    /// The secret shared with standby agents (`lull-agent --standby --join-secret S`); without
    /// it, scale-out is off.
    #[arg(long, env = "LULL_JOIN_SECRET", hide_env_values = true)]
    join_secret: Option<String>,
    /// The URL agents adopted by a scale-out reach this coordinator at (default: the
    /// listening address; loopback when listening on every interface).
    #[arg(long, env = "LULL_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Seconds a scale-out waits for an adopted agent's first heartbeat.
    #[arg(long, env = "LULL_SCALE_OUT_HEARTBEAT_TIMEOUT", default_value_t = 30.0)]
    scale_out_heartbeat_timeout: f64,
    /// Seconds an online shrink lets running work finish (unless its request says) before
    /// the rest is requeued.
    #[arg(long, env = "LULL_SHRINK_DRAIN_TIMEOUT", default_value_t = 300.0)]
    shrink_drain_timeout: f64,
    /// Requests per second each API key may make on average, with auth on (0: no limit).
    /// Agent keys have --agent-rate-limit instead; local agents and auth off have none.
    #[arg(long, env = "LULL_RATE_LIMIT", default_value_t = lull_coordinator::DEFAULT_RATE_LIMIT)]
    rate_limit: f64,
    /// Requests a key may make at once before --rate-limit applies.
    #[arg(long, env = "LULL_RATE_BURST", default_value_t = lull_coordinator::DEFAULT_RATE_BURST)]
    rate_burst: f64,
    /// Requests per second each agent key may make (burst: twice as many; 0: no limit).
    #[arg(long, env = "LULL_AGENT_RATE_LIMIT", default_value_t = lull_coordinator::DEFAULT_AGENT_RATE_LIMIT)]
    agent_rate_limit: f64,
    /// An origin browsers may call the API from with auth on, e.g. https://console.example:8443
    /// (repeatable; the env var is comma-separated). None: same-origin only. With auth off
    /// every origin may (`*`).
    #[arg(long = "cors-origin", env = "LULL_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    cors_origins: Vec<String>,
    /// Seconds a request may take, its body included (the agents' long-poll, task reads
    /// with ?wait= and the live feed are bounded by their own limits instead).
    #[arg(long, env = "LULL_REQUEST_TIMEOUT", default_value_t = lull_coordinator::DEFAULT_REQUEST_TIMEOUT_SECS)]
    request_timeout: f64,
    /// PEM certificate chain to serve HTTPS and WSS with, on --listen (needs --tls-key).
    #[arg(long, env = "LULL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (needs --tls-cert).
    #[arg(long, env = "LULL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// A CORS origin: `scheme://host[:port]`, nothing after it, and never `*`.
fn parse_origin(raw: &str) -> Result<String, String> {
    let origin = raw.trim().trim_end_matches('/');
    if origin == "*" {
        return Err(
            "`*` is not allowed with auth on; list the origins (auth off already allows any)"
                .into(),
        );
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("{raw:?} is not an origin: expected http://HOST[:PORT] or https://HOST[:PORT]")
        })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) {
        return Err(format!(
            "{raw:?} is not an origin: expected scheme://host[:port] with no path"
        ));
    }
    Ok(origin.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage API keys in the data directory's database (works while the coordinator runs).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its token (and a signed key's secret) once.
    Create {
        /// admin, submitter, agent or viewer.
        #[arg(long)]
        role: Role,
        /// simple (the token alone) or signed (token plus an HMAC signature per request).
        #[arg(long, default_value = "simple")]
        mode: KeyMode,
        /// A label for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (never their tokens or secrets).
    List,
    /// Revoke a key by id; requests with it are refused from then on.
    Revoke {
        /// The key's id, as `keys list` shows it.
        id: i64,
    },
}

/// Whether to require API keys: asked for, or listening beyond loopback without the
/// explicit opt-out.
fn auth_required(listen: &SocketAddr, auth: bool, insecure_no_auth: bool) -> bool {
    auth || (!listen.ip().is_loopback() && !insecure_no_auth)
}

async fn keys_command(
    data_dir: &std::path::Path,
    sync: SyncMode,
    command: KeysCommand,
) -> anyhow::Result<()> {
    let store = SqliteStore::open(data_dir, sync)
        .await
        .with_context(|| format!("opening the database in {}", data_dir.display()))?;
    match command {
        KeysCommand::Create { role, mode, name } => {
            let new = NewKey::generate(&name, role, mode);
            let key = store
                .create_key(&new, lull_coordinator::engine::unix_now())
                .await?;
            println!("id:     {}", key.key_id);
            println!("role:   {}", key.role);
            println!("mode:   {}", key.mode);
            println!("token:  {}", new.token);
            if let Some(secret) = &new.secret {
                println!("secret: {secret}");
            }
            eprintln!("Store these now: they are not shown again.");
        }
        KeysCommand::List => {
            println!(
                "{:<6} {:<10} {:<7} {:<8} name",
                "id", "role", "mode", "state"
            );
            for key in store.keys().await? {
                let state = if key.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<6} {:<10} {:<7} {:<8} {}",
                    key.key_id, key.role, key.mode, state, key.name
                );
            }
        }
        KeysCommand::Revoke { id } => {
            match store
                .revoke_key(id, lull_coordinator::engine::unix_now())
                .await?
            {
                Some(key) => println!("revoked key {} ({}, {})", key.key_id, key.role, key.name),
                None => anyhow::bail!("no API key {id}"),
            }
        }
    }
    Ok(())
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
    let mut cli = Cli::parse();
    if let Some(command) = cli.command.take() {
        let Command::Keys(keys) = command;
        return keys_command(&cli.data_dir, cli.sync, keys).await;
    }
    let auth = auth_required(&cli.listen, cli.auth, cli.insecure_no_auth);
    if !auth && !cli.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %cli.listen,
            "AUTHENTICATION IS OFF (--insecure-no-auth) on a non-loopback address: anyone who \
             can reach this port can submit code and control nodes"
        );
    }
    anyhow::ensure!(
        cli.heartbeat_interval > 0.0 && cli.node_ttl > cli.heartbeat_interval,
        "--node-ttl must be longer than --heartbeat-interval (got {} and {})",
        cli.node_ttl,
        cli.heartbeat_interval
    );
    for (flag, value) in [
        ("--rate-limit", cli.rate_limit),
        ("--rate-burst", cli.rate_burst),
        ("--agent-rate-limit", cli.agent_rate_limit),
    ] {
        anyhow::ensure!(
            value.is_finite() && value >= 0.0,
            "{flag} must be a non-negative number (got {value})"
        );
    }
    anyhow::ensure!(
        cli.request_timeout.is_finite() && cli.request_timeout > 0.0,
        "--request-timeout must be a positive number of seconds (got {})",
        cli.request_timeout
    );
    if !cli.cors_origins.is_empty() && !auth {
        tracing::warn!("--cors-origin has no effect with auth off: every origin may call (`*`)");
    }
    anyhow::ensure!(
        cli.command_ttl.is_finite() && cli.command_ttl > 0.0,
        "--command-ttl must be a positive number of seconds (got {})",
        cli.command_ttl
    );
    for (flag, value) in [
        (
            "--scale-out-heartbeat-timeout",
            cli.scale_out_heartbeat_timeout,
        ),
        ("--shrink-drain-timeout", cli.shrink_drain_timeout),
    ] {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "{flag} must be a positive number of seconds (got {value})"
        );
    }
    // Read before binding, like the admin key check: a bad certificate stops the start.
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(lull_coordinator::tls::Tls::load(cert, key)?),
        // clap's `requires` refuses one without the other.
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config = Config {
        join_secret: cli.join_secret.filter(|s| !s.is_empty()),
        advertise_url: cli
            .advertise_url
            .map(|u| u.trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty()),
        scale_out_heartbeat_timeout: cli.scale_out_heartbeat_timeout,
        shrink_drain_timeout: cli.shrink_drain_timeout,
        local_agents: cli.local_agents,
        sync: cli.sync,
        heartbeat_interval: cli.heartbeat_interval,
        node_ttl: cli.node_ttl,
        limits: TaskLimits {
            max_code_chars: cli.max_code_chars,
            max_timeout_secs: cli.max_timeout,
            max_points: cli.max_points,
            ..TaskLimits::default()
        },
        max_body_bytes: cli.max_body_bytes,
        python: cli.python,
        prefetch: cli.prefetch,
        command_ttl: cli.command_ttl,
        auth,
        rate_limit: RateLimit::new(cli.rate_limit, cli.rate_burst),
        agent_rate_limit: RateLimit::new(cli.agent_rate_limit, 2.0 * cli.agent_rate_limit),
        cors_origins: cli.cors_origins,
        request_timeout: std::time::Duration::from_secs_f64(cli.request_timeout),
        tls,
        ..Config::new(cli.data_dir)
    };
    // Before binding: a coordinator that refuses to start never looks as if it listened.
    lull_coordinator::check_admin_key(&config).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("could not listen on {}", cli.listen))?;
    let addr = listener
        .local_addr()
        .context("could not read the bound address")?;
    // One machine-readable line on stdout (logs go to stderr): tests that bind port 0
    // read the address from here, and a newcomer sees where to point curl.
    println!("Lull is listening on {scheme}://{addr}");
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

#[cfg(test)]
mod tests {
    use super::{auth_required, parse_origin};

    #[test]
    fn cors_origins() {
        assert_eq!(
            parse_origin("https://console.example:8443/").as_deref(),
            Ok("https://console.example:8443")
        );
        assert!(parse_origin("*").is_err());
        assert!(parse_origin("console.example").is_err());
        assert!(parse_origin("https://console.example/ui").is_err());
        assert!(parse_origin("https://").is_err());
    }

    #[test]
    fn auth_defaults() {
        let lo = "127.0.0.1:8000".parse().expect("addr");
        let any = "0.0.0.0:8000".parse().expect("addr");
        assert!(!auth_required(&lo, false, false));
        assert!(auth_required(&lo, true, false));
        assert!(auth_required(&any, false, false));
        assert!(!auth_required(&any, false, true));
    }
}
