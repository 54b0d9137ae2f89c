//! End-to-end with auth on: keys made with `lull-coordinator keys create`, a coordinator
//! started with `--auth`, and real agents holding an agent key (signed) or a submitter key.

use lull_tests::{Coordinator, bin_dir, start_agent, wait_until};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs `lull-coordinator keys create` and answers (token, secret).
fn create_key(data_dir: &Path, role: &str, mode: &str) -> (String, Option<String>) {
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
    let (submitter, _) = create_key(dir.path(), "submitter", "simple");
    let mut c = Coordinator::start(
        dir.path(),
        &["--auth", "--heartbeat-interval", "0.3", "--node-ttl", "2"],
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
