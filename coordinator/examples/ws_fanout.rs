//! Live-feed fan-out benchmark (not a test): N WebSocket clients on `/ws/updates` of a release
//! coordinator while tasks flow, reporting events delivered per second and the delay from
//! publication (`ts` in the message) to receipt.
//!
//! ```sh
//! cargo build --release -p lull-coordinator --bins --examples
//! target/release/examples/ws_fanout --clients 1000 --tasks 2000
//! ```
//!
//! It starts `lull-coordinator` (next to `examples/`, `--local-agents 0 --sync normal`, data
//! in a temporary directory) unless `--url` names a running one. Tasks flow through seed
//! 001's hand-run worker protocol (`/submit`, `/get_task`, `/submit_result`), so each task
//! publishes three events (created, started, completed) without Python in the way: what is
//! measured is the feed.

use futures::StreamExt;
use serde::Deserialize;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

struct Options {
    clients: usize,
    tasks: usize,
    workers: usize,
    url: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        clients: 1000,
        tasks: 2000,
        workers: 16,
        url: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag} wants a number, got {value:?}"))
        };
        match flag.as_str() {
            "--clients" => o.clients = number()?,
            "--tasks" => o.tasks = number()?,
            "--workers" => o.workers = number()?.max(1),
            "--url" => o.url = Some(value.trim_end_matches('/').to_string()),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --clients N --tasks N --workers N --url URL"
                ));
            }
        }
    }
    Ok(o)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Deserialize)]
struct Frame {
    event: String,
    seq: u64,
    ts: f64,
}

#[derive(Default)]
struct ClientReport {
    delays: Vec<f64>,
    lagged: u64,
}

/// One subscriber: reads until it has seen `target` (once it is known), recording delays.
async fn client(
    url: String,
    mut target: watch::Receiver<Option<u64>>,
    connected: Arc<AtomicU64>,
) -> Result<ClientReport, String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut report = ClientReport::default();
    let mut newest = 0;
    loop {
        if target.borrow().is_some_and(|t| newest >= t) {
            return Ok(report);
        }
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    return Ok(report);
                }
            }
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let received = unix_now();
                    let frame: Frame = serde_json::from_str(&text).map_err(|e| format!("bad frame: {e}"))?;
                    if frame.event == "lagged" {
                        report.lagged += 1;
                    } else {
                        report.delays.push(received - frame.ts);
                        newest = frame.seq;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("the coordinator closed the feed".into()),
            },
        }
    }
}

async fn worker(http: reqwest::Client, base: String, tasks: usize) -> Result<(), String> {
    let fail = |e: reqwest::Error| e.to_string();
    for _ in 0..tasks {
        http.post(format!("{base}/submit"))
            .json(&serde_json::json!({"code": "print(1)"}))
            .send()
            .await
            .map_err(fail)?;
        let lease: serde_json::Value = http
            .get(format!("{base}/get_task"))
            .send()
            .await
            .map_err(fail)?
            .json()
            .await
            .map_err(fail)?;
        if let Some(task_id) = lease["task_id"].as_i64() {
            http.post(format!("{base}/submit_result"))
                .json(&serde_json::json!({"task_id": task_id, "run_id": lease["run_id"], "result": "1"}))
                .send()
                .await
                .map_err(fail)?;
        }
    }
    Ok(())
}

/// Starts the release coordinator next to this example; returns it and its URL.
async fn start_coordinator(
    data_dir: &std::path::Path,
) -> Result<(tokio::process::Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("lull-coordinator"))
        .ok_or("cannot locate lull-coordinator")?;
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--local-agents",
            "0",
            "--sync",
            "normal",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(url) = line.strip_prefix("Lull is listening on ") {
            return Ok((child, url.trim().to_string()));
        }
    }
    Err("lull-coordinator did not say where it listens".into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let o = options()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (_child, base) = match &o.url {
        Some(url) => (None, url.clone()),
        None => {
            let (child, url) = start_coordinator(dir.path()).await?;
            (Some(child), url)
        }
    };
    let http = reqwest::Client::new();
    let start_seq = http
        .get(format!("{base}/health"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json::<serde_json::Value>()
        .await
        .map_err(|e| e.to_string())?["feed"]["newest_seq"]
        .as_u64()
        .unwrap_or(0);

    let ws_url = format!("ws{}/ws/updates", base.trim_start_matches("http"));
    let (target_tx, target_rx) = watch::channel(None);
    let connected = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        clients.push(tokio::spawn(client(
            ws_url.clone(),
            target_rx.clone(),
            connected.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < o.clients as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} clients connected",
                connected.load(Ordering::Relaxed),
                o.clients
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} clients connected; running {} tasks", o.clients, o.tasks);

    let started = Instant::now();
    let per_worker = o.tasks.div_ceil(o.workers);
    let workers: Vec<_> = (0..o.workers)
        .map(|_| tokio::spawn(worker(http.clone(), base.clone(), per_worker)))
        .collect();
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let health: serde_json::Value = http
        .get(format!("{base}/health"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let newest = health["feed"]["newest_seq"].as_u64().unwrap_or(0);
    let _ = target_tx.send(Some(newest));
    let mut delays = Vec::new();
    let mut lagged = 0;
    let mut failed = 0;
    for c in clients {
        match c.await.map_err(|e| e.to_string())? {
            Ok(report) => {
                delays.extend(report.delays);
                lagged += report.lagged;
            }
            Err(e) => {
                failed += 1;
                eprintln!("client failed: {e}");
            }
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    let published = newest - start_seq;
    delays.sort_by(f64::total_cmp);
    let ms = |x: f64| x * 1000.0;
    println!(
        "clients {} | tasks {} | events published {} ({:.0}/s over {:.2} s of load)",
        o.clients,
        per_worker * o.workers,
        published,
        published as f64 / load_secs,
        load_secs
    );
    println!(
        "delivered {} messages in {:.2} s: {:.0} events/s | delay p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | lagged notices {} | failed clients {}",
        delays.len(),
        total_secs,
        delays.len() as f64 / total_secs,
        ms(percentile(&delays, 50.0)),
        ms(percentile(&delays, 99.0)),
        ms(delays.last().copied().unwrap_or(f64::NAN)),
        lagged,
        failed
    );
    Ok(())
}
