//! End-to-end HTTPS (issue 6): a coordinator serving TLS (`--tls-cert`, `--tls-key`) with a
//! certificate from a private CA, agents that trust that CA (`--ca-cert`), the live feed over
//! WSS, and a plain-HTTP client on the TLS port that is turned away without harm.

mod certs;

use certs::TestCerts;
use lull_tests::{Coordinator, bin_dir, poll_until, start_agent};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const COORD_FAST: &[&str] = &["--heartbeat-interval", "0.3", "--node-ttl", "5"];

fn tls_coordinator(dir: &std::path::Path, certs: &TestCerts, local_agents: &str) -> Coordinator {
    let tls = certs.coordinator_args();
    let mut args: Vec<&str> = vec!["--local-agents", local_agents];
    args.extend_from_slice(COORD_FAST);
    args.extend(tls.iter().map(String::as_str));
    let c = Coordinator::start_tls(&dir.join("coord"), &args, &certs.ca).expect("coordinator");
    assert!(c.url.starts_with("https://127.0.0.1:"), "{}", c.url);
    c
}

/// The task completed once: one run, completed, with the expected output.
fn assert_completed_once(task: &Value, stdout: &str) {
    assert_eq!(task["status"], "completed", "{task}");
    let runs = task["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{task}");
    assert_eq!(runs[0]["status"], "completed", "{task}");
    assert_eq!(runs[0]["stdout"], stdout, "{task}");
}

#[tokio::test]
async fn an_agent_with_ca_cert_runs_a_task_over_https() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = TestCerts::create(dir.path());
    let c = tls_coordinator(dir.path(), &certs, "0");

    // The certificate is really checked: a client trusting only the public roots is refused.
    let untrusting = reqwest::Client::new().get(&c.url).send().await;
    assert!(untrusting.is_err(), "{untrusting:?}");

    let ca = certs.ca.display().to_string();
    let _agent = start_agent(
        &c.url,
        &dir.path().join("agent"),
        &[
            "--node-id",
            "tls-node",
            "--heartbeat-interval",
            "0.3",
            "--ca-cert",
            &ca,
        ],
    )
    .expect("agent");
    c.wait_for_nodes(1).await;
    let id = c.submit("print(6 * 7)").await.expect("submit over https");
    let task = c.wait_ended(id).await;
    assert_completed_once(&task, "42\n");
    assert_eq!(task["runs"][0]["node_id"], "tls-node", "{task}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_fails_cleanly_and_https_keeps_serving() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = TestCerts::create(dir.path());
    let c = tls_coordinator(dir.path(), &certs, "0");
    let plain_url = c.url.replacen("https://", "http://", 1);

    for _ in 0..3 {
        // A raw HTTP/1.1 request: the server must end the connection (no hang, no HTTP answer).
        let mut stream = tokio::net::TcpStream::connect(c.addr())
            .await
            .expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .ok();
        assert!(
            !answer.starts_with(b"HTTP/"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // reqwest over http:// to the same port fails as a request, not as a hang.
        let plain = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
            .get(format!("{plain_url}/health"))
            .send()
            .await;
        assert!(plain.as_ref().is_err_and(|e| !e.is_timeout()), "{plain:?}");
    }

    // The server is still there, over HTTPS.
    let health = c.get("/health").await.expect("health over https");
    assert_eq!(health["status"], "healthy", "{health}");
    let id = c.submit("print('still here')").await.expect("submit");
    assert!(id > 0);
}

/// The embedded agent reaches its own HTTPS coordinator (over loopback, trusting the
/// served chain), and the live feed is served as WSS on the same port: Python's
/// `websockets` follows a task submitted with `urllib`, both verifying the certificate
/// through `SSL_CERT_FILE`.
#[tokio::test]
async fn the_local_agent_and_the_live_feed_work_over_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = TestCerts::create(dir.path());
    let c = tls_coordinator(dir.path(), &certs, "1");
    c.wait_for_nodes(1).await;
    let script = r#"
import asyncio, json, sys, urllib.request
from websockets.asyncio.client import connect
BASE = sys.argv[1]
async def main():
    async with connect("wss" + BASE[len("https"):] + "/ws/updates?events=task_completed") as ws:
        request = urllib.request.Request(BASE + "/submit", data=json.dumps({"code": "print('over wss')"}).encode())
        task_id = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(request, timeout=30))["task_id"])
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["data"]["task_id"] == task_id:
                print(task_id, message["data"]["status"])
                return
asyncio.run(main())
"#;
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&c.url)
            .env("SSL_CERT_FILE", &certs.ca)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the script finishes")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (id, status) = stdout.trim().split_once(' ').expect("id and status");
    assert_eq!(status, "completed", "{stdout}");
    let task = c.task(id.parse().expect("task id")).await.expect("task");
    assert_completed_once(&task, "over wss\n");
}

/// Runs `lull-coordinator ARGS` that must refuse to start; its stderr. A coordinator that
/// starts instead is killed (by PID) and the test fails.
async fn refused_start(dir: &std::path::Path, args: &[&str]) -> String {
    let mut child = Command::new(bin_dir().join("lull-coordinator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--local-agents",
            "0",
            "--data-dir",
        ])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = poll_until(Duration::from_secs(30), || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    let Some(status) = exited else {
        // Child::kill is SIGKILL to this child's PID.
        let _ = child.kill();
        let _ = child.wait();
        panic!("{args:?}: the coordinator started instead of refusing");
    };
    assert!(!status.success(), "{args:?} must refuse to start");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    stderr
}

#[tokio::test]
async fn tls_flags_come_in_pairs_and_unusable_files_stop_the_start() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = TestCerts::create(dir.path());
    let data = dir.path().join("coord");
    let cert = certs.cert.display().to_string();
    let key = certs.key.display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();

    let alone = refused_start(&data, &["--tls-cert", &cert]).await;
    assert!(alone.contains("--tls-key"), "{alone}");
    let alone = refused_start(&data, &["--tls-key", &key]).await;
    assert!(alone.contains("--tls-cert"), "{alone}");
    let unreadable = refused_start(&data, &["--tls-cert", &cert, "--tls-key", &missing]).await;
    assert!(unreadable.contains("missing.pem"), "{unreadable}");
    // The key where the certificate belongs: no certificate in it.
    let swapped = refused_start(&data, &["--tls-cert", &key, "--tls-key", &cert]).await;
    assert!(swapped.contains(&key), "{swapped}");
}
