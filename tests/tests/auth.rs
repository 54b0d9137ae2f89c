//! End-to-end with auth on: keys made with `lull-coordinator keys create`, a coordinator
//! started with `--auth`, and real agents holding an agent key (signed) or a submitter key.

use lull_tests::{Coordinator, bin_dir, create_key, start_agent, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A client that sends `token` on every request.
fn client_with(token: &str) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    headers.insert("token", HeaderValue::from_str(token).expect("header"));
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

#[tokio::test]
async fn agent_with_agent_key_completes_work_and_submitter_key_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("coordinator");
    let (admin, _) = create_key(&data, "admin", "simple");
    let (agent_token, agent_secret) = create_key(&data, "agent", "signed");
    let agent_secret = agent_secret.expect("signed keys have a secret");
    let (submitter, _) = create_key(&data, "submitter", "simple");

    let listed = Command::new(bin_dir().join("lull-coordinator"))
        .args(["keys", "list", "--data-dir"])
        .arg(&data)
        .output()
        .expect("keys list");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(
        !listed.contains(&admin) && !listed.contains(&agent_secret),
        "{listed}"
    );

    let mut c = Coordinator::start(
        &data,
        &[
            "--auth",
            "--local-agents",
            "0",
            "--heartbeat-interval",
            "0.3",
            "--node-ttl",
            "2",
        ],
    )
    .expect("coordinator");
    // Without a key, nothing but / and /health.
    let anonymous = reqwest::get(format!("{}/stats", c.url)).await.expect("get");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    c.http = client_with(&admin);

    // Started first: it can never join, whatever it tries.
    let _refused = start_agent(
        &c.url,
        &dir.path().join("refused"),
        &[
            "--node-id",
            "refused",
            "--token",
            &submitter,
            "--heartbeat-interval",
            "0.3",
        ],
    )
    .expect("agent");
    let _agent = start_agent(
        &c.url,
        &dir.path().join("good"),
        &[
            "--node-id",
            "good",
            "--token",
            &agent_token,
            "--secret",
            &agent_secret,
            "--heartbeat-interval",
            "0.3",
        ],
    )
    .expect("agent");
    c.wait_for_nodes(1).await;

    let task_id = c.submit("print(6 * 7)").await.expect("submit");
    let status = wait_until(Duration::from_secs(60), "the task to finish", || async {
        let st = c.status(task_id).await.ok()?;
        matches!(st["status"].as_str(), Some("completed" | "failed")).then_some(st)
    })
    .await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(
        status["result"].as_str().map(str::trim),
        Some("42"),
        "{status}"
    );

    // The submitter-key agent's requests are refused by role...
    let refused = client_with(&submitter)
        .post(format!("{}/internal/heartbeat", c.url))
        .json(&json!({"node_id": "refused", "status": "idle",
                      "resources": {"cpu_cores": 1.0, "memory_mb": 512.0}}))
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("submitter")),
        "{body}"
    );
    // ...so the only node the coordinator knows is the agent-key one.
    let nodes = c.get("/api/v1/nodes").await.expect("nodes");
    let ids: Vec<&str> = nodes["items"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["good"], "{nodes}");
}

#[tokio::test]
async fn local_agents_work_with_auth_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    create_key(dir.path(), "admin", "simple");
    let (submitter, _) = create_key(dir.path(), "submitter", "simple");
    // Agent keys may make almost no requests: the local agents, which hold no key, are
    // not held to any budget and still complete the task.
    let mut c = Coordinator::start(
        dir.path(),
        &[
            "--auth",
            "--heartbeat-interval",
            "0.3",
            "--node-ttl",
            "2",
            "--agent-rate-limit",
            "0.001",
        ],
    )
    .expect("coordinator");
    c.http = client_with(&submitter);
    c.wait_for_nodes(1).await;
    let task_id = c.submit("print('ok')").await.expect("submit");
    let status = wait_until(Duration::from_secs(60), "the task to finish", || async {
        let st = c.status(task_id).await.ok()?;
        matches!(st["status"].as_str(), Some("completed" | "failed")).then_some(st)
    })
    .await;
    assert_eq!(status["status"], "completed", "{status}");
}

/// Runs `lull-coordinator` to completion (it is expected to refuse to start); answers
/// (exit success, stdout, stderr).
fn run_to_exit(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(bin_dir().join("lull-coordinator"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lull-coordinator");
    let pid = child.id();
    // Bounded: a coordinator that started after all is killed (by its pid) and the test fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("output");
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let _ = child.wait();
    panic!("lull-coordinator {args:?} kept running instead of refusing to start");
}

#[tokio::test]
async fn on_a_public_address_auth_is_on_and_an_admin_key_is_required() {
    let dir = tempfile::tempdir().expect("temp dir");
    let public = ["--listen", "0.0.0.0:0", "--local-agents", "0"];

    // No keys at all: refused, with what to do, before it ever listens.
    let (ok, stdout, stderr) = run_to_exit(dir.path(), &public);
    assert!(!ok, "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("no active admin key"), "{stderr}");
    assert!(stderr.contains("keys create --role admin"), "{stderr}");

    // Keys, but no admin among them, or only a revoked one: still refused.
    create_key(dir.path(), "submitter", "simple");
    let (ok, _, stderr) = run_to_exit(dir.path(), &public);
    assert!(!ok && stderr.contains("no active admin key"), "{stderr}");
    create_key(dir.path(), "admin", "simple");
    let revoke = Command::new(bin_dir().join("lull-coordinator"))
        .args(["keys", "revoke", "2", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("keys revoke");
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let (ok, _, stderr) = run_to_exit(dir.path(), &public);
    assert!(!ok && stderr.contains("no active admin key"), "{stderr}");

    // With an active admin key it starts, and auth is on without asking.
    let (admin, _) = create_key(dir.path(), "admin", "simple");
    let mut c = Coordinator::start_on("0.0.0.0:0", dir.path(), &["--local-agents", "0"])
        .expect("coordinator");
    // It listens on every interface; this test talks to it over loopback only.
    let port = c.url.rsplit(':').next().expect("port").to_string();
    c.url = format!("http://127.0.0.1:{port}");
    let anonymous = reqwest::get(format!("{}/stats", c.url)).await.expect("get");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let health = reqwest::get(format!("{}/health", c.url))
        .await
        .expect("get");
    assert_eq!(health.status(), StatusCode::OK);
    c.http = client_with(&admin);
    let stats = c
        .http
        .get(format!("{}/stats", c.url))
        .send()
        .await
        .expect("get");
    assert_eq!(stats.status(), StatusCode::OK);
}

#[tokio::test]
async fn insecure_no_auth_serves_without_keys_and_says_so_loudly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = KillOnDrop(
        Command::new(bin_dir().join("lull-coordinator"))
            .args([
                "--listen",
                "0.0.0.0:0",
                "--local-agents",
                "0",
                "--insecure-no-auth",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lull-coordinator"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let stderr = child.0.stderr.take().expect("stderr");
    // The warning comes before the address line; both are read on their own threads so a
    // coordinator that never prints cannot hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let warn_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("AUTHENTICATION IS OFF") {
                let _ = warn_tx.send(Ok(line));
            }
        }
    });
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(Err(line));
    });
    let mut warning = None;
    let mut url = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (warning.is_none() || url.is_none()) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(line)) => warning = Some(line),
            Ok(Err(line)) => url = Some(line),
            Err(_) => {}
        }
    }
    let warning = warning.expect("a loud warning on stderr");
    assert!(warning.contains("--insecure-no-auth"), "{warning}");
    let line = url.expect("the address line");
    let port = line.trim().rsplit(':').next().expect("port").to_string();
    let stats = reqwest::get(format!("http://127.0.0.1:{port}/stats"))
        .await
        .expect("get");
    assert_eq!(stats.status(), StatusCode::OK);
}

/// A child killed (by its pid) and reaped when dropped, even when an assertion fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_throttled_agent_loses_nothing_and_completes_each_task_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("coordinator");
    let (admin, _) = create_key(&data, "admin", "simple");
    let (agent_token, agent_secret) = create_key(&data, "agent", "signed");
    let agent_secret = agent_secret.expect("signed keys have a secret");
    // Four requests a second (bursts of eight) for the agent: its heartbeats, pulls and
    // results meet 429 now and then and must be retried, never dropped or doubled.
    let mut c = Coordinator::start(
        &data,
        &[
            "--auth",
            "--local-agents",
            "0",
            "--heartbeat-interval",
            "0.3",
            "--node-ttl",
            "30",
            "--rate-limit",
            "0",
            "--agent-rate-limit",
            "4",
        ],
    )
    .expect("coordinator");
    c.http = client_with(&admin);
    let _agent = start_agent(
        &c.url,
        &dir.path().join("agent"),
        &[
            "--node-id",
            "slow",
            "--token",
            &agent_token,
            "--secret",
            &agent_secret,
            "--heartbeat-interval",
            "0.5",
            "--cpus",
            "2",
        ],
    )
    .expect("agent");
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(c.submit(&format!("print({i} * 3)")).await.expect("submit"));
    }
    for (i, id) in ids.iter().enumerate() {
        let task = wait_until(Duration::from_secs(120), "the task to finish", || async {
            let t = c.get(&format!("/api/v1/tasks/{id}")).await.ok()?;
            matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
        })
        .await;
        assert_eq!(task["status"], "completed", "{task}");
        assert_eq!(task["result"], json!((i * 3).to_string()), "{task}");
        let completed = task["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .filter(|r| r["status"] == "completed")
            .count();
        assert_eq!(completed, 1, "{task}");
    }
    // The limit is real: twenty signed requests in a row on top of the agent's own traffic
    // cannot all fit in a budget of eight at once and four a second.
    let probe = reqwest::Client::new();
    let mut throttled = 0;
    for _ in 0..20 {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis()
            .to_string();
        let path = "/api/v1/tasks-probe";
        let sig = lull_shared::signing::sign(&agent_secret, &ts, "GET", path, b"");
        let resp = probe
            .get(format!("{}{path}", c.url))
            .header("token", &agent_token)
            .header("timestamp", ts)
            .header("sign_str", sig)
            .send()
            .await
            .expect("request");
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(resp.headers().contains_key("retry-after"));
            throttled += 1;
        }
    }
    assert!(throttled > 0, "an agent key at 4/s was never throttled");
}
