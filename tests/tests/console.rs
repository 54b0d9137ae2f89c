//! The web console end to end: a real coordinator and agent, and headless Chromium
//! (Debian's `chromium`) driven by Playwright (`tests/python/console_browser.py`) doing
//! what a person would: submit through the form and watch the task complete without a
//! reload, drain and undrain a node, cancel a task, sign in with keys of each role.
//!
//! Screenshots of every page (1280×800 and narrow) go to the folder each test prints.
//! A browser that cannot start fails the test, with the reason: it never passes silently.

use lull_tests::{Coordinator, Process, bin_dir, create_key, start_agent};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = "console-node";
/// Longer than every wait inside the script (each is bounded by 60 s) summed over a run.
const SCRIPT_LIMIT: Duration = Duration::from_secs(600);

fn chromium() -> PathBuf {
    std::env::var_os("LULL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Fails (never skips) when the browser or Playwright is missing.
fn require_browser() {
    let browser = chromium();
    assert!(
        browser.exists(),
        "the console tests need Chromium at {} (Debian's `chromium`; ./scripts/test installs it, \
         or set LULL_CHROMIUM)",
        browser.display()
    );
    let playwright = Command::new("python3")
        .args(["-c", "import playwright"])
        .output()
        .expect("python3 runs");
    assert!(
        playwright.status.success(),
        "the console tests need Python's playwright (`pip install playwright`; ./scripts/test \
         installs it): {}",
        String::from_utf8_lossy(&playwright.stderr)
    );
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/console_browser.py")
}

fn screenshots(scenario: &str) -> PathBuf {
    let dir = bin_dir().join("console-screenshots").join(scenario);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    println!("console screenshots ({scenario}): {}", dir.display());
    dir
}

/// Runs the browser script to its end (killed by PID past [`SCRIPT_LIMIT`]) and fails the
/// test with its output unless every step held.
fn run_browser(url: &str, scenario: &str, extra: &[&str]) {
    let shots = screenshots(scenario);
    let mut child = Command::new("python3")
        .arg(script())
        .args(["--url", url, "--scenario", scenario, "--node", NODE])
        .arg("--shots")
        .arg(&shots)
        .args(extra)
        .env("LULL_CHROMIUM", chromium())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let pid = child.id() as i32;
    let started = Instant::now();
    // Drain the pipes on threads so a chatty script cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the browser script") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_LIMIT {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    println!("{out}");
    eprintln!("{err}");
    match status {
        Some(s) if s.success() => {
            assert!(
                out.contains("passed, 0 failed"),
                "the browser script ended without its summary"
            );
        }
        Some(s) => panic!("the browser scenario {scenario} failed ({s}); screenshots in {shots:?}"),
        None => panic!("the browser scenario {scenario} ran past {SCRIPT_LIMIT:?}"),
    }
}

fn start_node(c: &Coordinator, dir: &Path, extra: &[&str]) -> Process {
    let mut args = vec![
        "--node-id",
        NODE,
        "--heartbeat-interval",
        "0.3",
        "--cpus",
        "2",
        "--memory-mb",
        "4096",
    ];
    args.extend_from_slice(extra);
    start_agent(&c.url, &dir.join(NODE), &args).expect("agent starts")
}

const COORD_FAST: &[&str] = &[
    "--local-agents",
    "0",
    "--heartbeat-interval",
    "0.3",
    "--node-ttl",
    "5",
];

/// Every task finished, none completed twice: at most one completed run each.
async fn assert_exactly_once(c: &Coordinator) {
    let list = c.get("/api/v1/tasks?limit=1000").await.expect("tasks");
    let items = list["items"].as_array().expect("items");
    assert!(!items.is_empty(), "no task was submitted: {list}");
    for t in items {
        let id = t["task_id"].as_i64().expect("id");
        let task = c.task(id).await.expect("task");
        let completed = task["runs"].as_array().map_or(0, |r| {
            r.iter().filter(|r| r["status"] == "completed").count()
        });
        match task["status"].as_str() {
            Some("completed") => assert_eq!(completed, 1, "{task}"),
            Some("cancelled") => assert_eq!(completed, 0, "{task}"),
            other => panic!("task {id} ended {other:?}: {task}"),
        }
    }
}

#[tokio::test]
async fn console_submits_follows_drains_and_cancels_in_a_real_browser() {
    require_browser();
    let dir = tempfile::tempdir().expect("temp dir");
    let c = Coordinator::start(&dir.path().join("coordinator"), COORD_FAST).expect("coordinator");
    let _agent = start_node(&c, dir.path(), &[]);
    c.wait_for_nodes(1).await;

    run_browser(&c.url, "open", &[]);

    assert_exactly_once(&c).await;
    let nodes = c.get("/api/v1/nodes").await.expect("nodes");
    let node: &Value = &nodes["items"][0];
    assert_eq!(node["status"], "idle", "undrained from the page: {node}");
    assert_eq!(node["meta"]["rack"], 7, "meta saved from the page: {node}");
}

#[tokio::test]
async fn console_with_auth_asks_for_a_key_and_follows_its_role() {
    require_browser();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("coordinator");
    let (admin, _) = create_key(&data, "admin", "simple");
    let (viewer, _) = create_key(&data, "viewer", "simple");
    let (submitter, secret) = create_key(&data, "submitter", "signed");
    let secret = secret.expect("a signed key has a secret");
    let (agent, _) = create_key(&data, "agent", "simple");
    let mut args = vec!["--auth"];
    args.extend_from_slice(COORD_FAST);
    let mut c = Coordinator::start(&data, &args).expect("coordinator");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "token",
        reqwest::header::HeaderValue::from_str(&admin).expect("header"),
    );
    c.http = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let _agent = start_node(&c, dir.path(), &["--token", &agent]);
    c.wait_for_nodes(1).await;
    // Someone else's task, which the submitter must not see.
    let others = c.submit("print('not yours')").await.expect("admin submits");
    let others = others.to_string();

    run_browser(
        &c.url,
        "auth",
        &[
            "--viewer",
            &viewer,
            "--submitter",
            &submitter,
            "--submitter-secret",
            &secret,
            "--admin",
            &admin,
            "--others-task",
            &others,
        ],
    );

    assert_exactly_once(&c).await;
    let nodes = c.get("/api/v1/nodes").await.expect("nodes");
    assert_eq!(nodes["items"][0]["status"], "drained", "{nodes}");
}

#[tokio::test]
async fn console_shrinks_a_node_from_the_operations_page() {
    require_browser();
    let dir = tempfile::tempdir().expect("temp dir");
    let c = Coordinator::start(&dir.path().join("coordinator"), COORD_FAST).expect("coordinator");
    let _agent = start_node(&c, dir.path(), &[]);
    c.wait_for_nodes(1).await;

    run_browser(&c.url, "shrink", &[]);

    // The task that ran through the online shrink completed exactly once.
    assert_exactly_once(&c).await;
    let nodes = c.get("/api/v1/nodes").await.expect("nodes");
    assert_eq!(nodes["items"][0]["status"], "removed", "{nodes}");
}
