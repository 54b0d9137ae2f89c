//! A harness for end-to-end tests: real `lull-coordinator` and `lull-agent` processes on
//! 127.0.0.1, each owned by a handle that kills it (by PID) when dropped.
//!
//! The binaries are looked up next to the test executable (`target/<profile>/`), or in
//! `LULL_BIN_DIR`. The test command builds them first (`cargo build --workspace --bins`).

#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LULL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target directory")
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (or set LULL_BIN_DIR)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, for at most `limit`; panics with `what` otherwise.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match poll_until(limit, check).await {
        Some(value) => value,
        None => panic!("timed out waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, for at most `limit`; `None` if it never did (for a
/// test that reports a hang as one failure among many instead of stopping there).
pub async fn poll_until<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A child process killed with SIGKILL (and reaped) when dropped.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL now, and reap.
    pub fn kill9(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for a clean exit. Returns whether it exited 0.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {limit:?}; killing it", self.name);
        self.kill9();
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}

/// A running coordinator and a client for it.
pub struct Coordinator {
    pub process: Process,
    pub url: String,
    pub http: reqwest::Client,
}

impl Coordinator {
    /// Starts `lull-coordinator --listen 127.0.0.1:0 --data-dir DIR ARGS...` and reads the
    /// address it bound from its first line of stdout.
    pub fn start(data_dir: &Path, args: &[&str]) -> Result<Coordinator> {
        Coordinator::start_on("127.0.0.1:0", data_dir, args)
    }

    pub fn start_on(listen: &str, data_dir: &Path, args: &[&str]) -> Result<Coordinator> {
        Coordinator::start_with(listen, data_dir, args, reqwest::Client::builder())
    }

    /// As [`Coordinator::start`] for a coordinator serving HTTPS (`--tls-cert`, `--tls-key`
    /// among `args`): its client trusts the PEM certificates in `ca_cert` and nothing else.
    pub fn start_tls(data_dir: &Path, args: &[&str], ca_cert: &Path) -> Result<Coordinator> {
        let pem = std::fs::read(ca_cert).context("reading the test CA")?;
        let mut client = reqwest::Client::builder().tls_built_in_root_certs(false);
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)? {
            client = client.add_root_certificate(certificate);
        }
        Coordinator::start_with("127.0.0.1:0", data_dir, args, client)
    }

    fn start_with(
        listen: &str,
        data_dir: &Path,
        args: &[&str],
        client: reqwest::ClientBuilder,
    ) -> Result<Coordinator> {
        let mut command = Command::new(binary("lull-coordinator"));
        command
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args);
        let (process, url) =
            spawn_announcing(command, "lull-coordinator", "Lull is listening on ")?;
        Ok(Coordinator {
            url,
            process,
            http: client.timeout(Duration::from_secs(60)).build()?,
        })
    }

    /// The `host:port` the coordinator is bound to.
    pub fn addr(&self) -> &str {
        self.url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{}", self.url, path))
            .send()
            .await?;
        Ok(resp.json().await?)
    }

    /// `POST path` with a JSON body; the answer's body, or an error for a non-2xx status.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{}", self.url, path))
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let answer: Value = resp.json().await?;
        if !status.is_success() {
            bail!("POST {path} failed with {status}: {answer}");
        }
        Ok(answer)
    }

    pub async fn submit(&self, code: &str) -> Result<i64> {
        let resp = self
            .http
            .post(format!("{}/submit", self.url))
            .json(&json!({"code": code}))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("submit failed with {status}: {body}");
        }
        body["task_id"].as_i64().context("no task_id")
    }

    pub async fn status(&self, task_id: i64) -> Result<Value> {
        self.get(&format!("/status/{task_id}")).await
    }

    /// The task with its runs.
    pub async fn task(&self, task_id: i64) -> Result<Value> {
        self.get(&format!("/api/v1/tasks/{task_id}")).await
    }

    /// The task (`GET /api/v1/tasks/{id}`, with its runs) once `pred` holds for it; panics
    /// naming `what` after 120 s.
    pub async fn wait_task(
        &self,
        task_id: i64,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(
            Duration::from_secs(120),
            &format!("task {task_id} {what}"),
            || async { self.task(task_id).await.ok().filter(|t| pred(t)) },
        )
        .await
    }

    /// The task once it has ended (`completed`, `failed` or `cancelled`); panics after 120 s.
    pub async fn wait_ended(&self, task_id: i64) -> Value {
        self.wait_task(task_id, "to end", |t| {
            matches!(
                t["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }

    /// Waits until the coordinator knows `n` non-offline nodes.
    pub async fn wait_for_nodes(&self, n: u64) {
        wait_until(Duration::from_secs(30), "agents to join", || async {
            let stats = self.get("/stats").await.ok()?;
            let nodes = &stats["nodes"];
            let gone = nodes["offline"].as_u64()? + nodes["removed"].as_u64().unwrap_or(0);
            let live = nodes["total"].as_u64()? - gone;
            (live >= n).then_some(())
        })
        .await
    }
}

/// Starts `lull-agent --coordinator URL --state-dir DIR ARGS...`.
pub fn start_agent(coordinator_url: &str, state_dir: &Path, args: &[&str]) -> Result<Process> {
    start_agent_with_env(coordinator_url, state_dir, args, &[])
}

/// As [`start_agent`], with extra environment variables (e.g. `TMPDIR`). The owner-first
/// policy is off (`LULL_OWNER_POLICY=off`): on a test host, the other tests' load is no
/// owner to yield to. A test of the policy turns it on with `--owner-policy on`.
pub fn start_agent_with_env(
    coordinator_url: &str,
    state_dir: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
) -> Result<Process> {
    let level = std::env::var("LULL_TEST_LOG").unwrap_or_else(|_| "warn".into());
    spawn_agent(
        coordinator_url,
        state_dir,
        args,
        env,
        &level,
        Stdio::inherit(),
    )
}

/// As [`start_agent`], logging at `info` into `log` (a test reads there what the agent did,
/// e.g. that it started a run: [`agent_log_has`]).
pub fn start_agent_logging_to(
    coordinator_url: &str,
    state_dir: &Path,
    args: &[&str],
    log: &Path,
) -> Result<Process> {
    let file = std::fs::File::create(log).context("creating the agent's log")?;
    spawn_agent(
        coordinator_url,
        state_dir,
        args,
        &[],
        "info",
        Stdio::from(file),
    )
}

/// Whether a line of the agent's log (see [`start_agent_logging_to`]) holds every one of
/// `words`.
pub fn agent_log_has(log: &Path, words: &[&str]) -> bool {
    std::fs::read_to_string(log)
        .map(|text| {
            text.lines()
                .any(|line| words.iter().all(|word| line.contains(word)))
        })
        .unwrap_or(false)
}

fn spawn_agent(
    coordinator_url: &str,
    state_dir: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    log_level: &str,
    stderr: Stdio,
) -> Result<Process> {
    let child = Command::new(binary("lull-agent"))
        .arg("--coordinator")
        .arg(coordinator_url)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("LULL_OWNER_POLICY", "off")
        .envs(env.iter().copied())
        .env("RUST_LOG", log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting lull-agent")?;
    Ok(Process {
        child,
        name: "lull-agent".into(),
    })
}

/// Host pids of the live processes owned by `uid` (zombies count as gone). Sandboxed runs
/// execute as their agent's `--sandbox-uid`, so this sees a run's whole tree from outside.
pub fn processes_of_uid(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let alive = field("State:").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'));
            let owned = field("Uid:").and_then(|v| {
                v.split_whitespace()
                    .next()
                    .and_then(|u| u.parse::<u32>().ok())
            }) == Some(uid);
            alive && owned
        })
        .collect()
}

/// A `lull-agent --standby` waiting to be adopted, and where it listens.
pub struct StandbyAgent {
    pub process: Process,
    /// `ip:port` of its standby API.
    pub addr: String,
}

impl StandbyAgent {
    pub fn ip(&self) -> &str {
        self.addr.rsplit_once(':').map_or("", |(ip, _)| ip)
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0)
    }

    /// `{"ip", "port"}` for a scale-out request.
    pub fn agent_info(&self) -> Value {
        json!({"ip": self.ip(), "port": self.port()})
    }

    /// `GET /standby`: its state (`standby`, `configured`, `adopted`) and node id.
    pub async fn hello(&self) -> Result<Value> {
        Ok(reqwest::get(format!("http://{}/standby", self.addr))
            .await?
            .json()
            .await?)
    }
}

/// Starts `lull-agent --standby --listen IP:0 --join-secret SECRET --state-dir DIR ARGS...`
/// and reads the address it bound from its first line of stdout.
pub fn start_standby_agent(
    ip: &str,
    join_secret: &str,
    state_dir: &Path,
    args: &[&str],
) -> Result<StandbyAgent> {
    let mut command = Command::new(binary("lull-agent"));
    command
        .arg("--standby")
        .arg("--listen")
        .arg(format!("{ip}:0"))
        .arg("--join-secret")
        .arg(join_secret)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("LULL_OWNER_POLICY", "off");
    let (process, addr) = spawn_announcing(
        command,
        "lull-agent --standby",
        "Lull agent standing by on ",
    )?;
    Ok(StandbyAgent { process, addr })
}

/// Starts `command` (logs at `LULL_TEST_LOG`, stdin closed, stderr shown) and reads the
/// address it announces on its first line after `prefix`.
fn spawn_announcing(mut command: Command, name: &str, prefix: &str) -> Result<(Process, String)> {
    let mut child = command
        .env(
            "RUST_LOG",
            std::env::var("LULL_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{name} stdout"))?;
    let process = Process {
        child,
        name: name.into(),
    };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .with_context(|| format!("reading {name}'s address"))?;
    let Some(addr) = line.trim().strip_prefix(prefix) else {
        bail!("unexpected first line from {name}: {line:?}");
    };
    Ok((process, addr.to_string()))
}

/// The runs of `task` (as `GET /api/v1/tasks/{id}` shows it) with `status`.
pub fn runs_with<'a>(task: &'a Value, status: &str) -> Vec<&'a Value> {
    task["runs"]
        .as_array()
        .map(|runs| runs.iter().filter(|r| r["status"] == status).collect())
        .unwrap_or_default()
}

/// Runs `lull-coordinator keys create` (named after its role) against `data_dir` and answers
/// (token, secret): the secret only for `mode` `signed`.
pub fn create_key(data_dir: &Path, role: &str, mode: &str) -> (String, Option<String>) {
    let out = Command::new(bin_dir().join("lull-coordinator"))
        .args([
            "keys", "create", "--role", role, "--mode", mode, "--name", role,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("lull-coordinator keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    (field("token:").expect("token printed"), field("secret:"))
}
