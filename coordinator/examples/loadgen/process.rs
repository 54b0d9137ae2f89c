//! Processes the benchmarks start and watch: the release `lull-coordinator` (started on
//! 127.0.0.1:0 with its data in a directory the caller owns, stopped by PID: SIGTERM, then
//! SIGKILL after 30 s), CPU and memory read from `/proc`, and the `--json` records both
//! append. Shared by `loadgen` and `ws_fanout`.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

/// A child this program started; stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Started {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub name: &'static str,
}

impl Started {
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        // Reaped already (it exited on its own): nothing to signal.
        if self.child.try_wait()?.is_none() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .with_context(|| format!("SIGTERM to {} ({})", self.name, self.pid))?;
            if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .is_err()
            {
                eprintln!("{} ({}) ignored SIGTERM; killing it", self.name, self.pid);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

pub fn release_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(|examples| examples.parent())
        .map(Path::to_path_buf)
        .context("cannot locate the release directory")
}

pub async fn start_coordinator(data_dir: &Path, sync: &str) -> anyhow::Result<(Started, String)> {
    let bin = release_dir()?.join("lull-coordinator");
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--local-agents",
            "0",
            "--sync",
            sync,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))?;
    let pid = child.id().context("coordinator has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let started = Started {
        child,
        pid,
        name: "lull-coordinator",
    };
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(url) = line.strip_prefix("Lull is listening on ") {
            return Ok((started, url.trim().to_string()));
        }
    }
    started.stop().await?;
    bail!("lull-coordinator did not say where it listens")
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`), as MB.
pub fn status_mb(pid: &str, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} for {pid}"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("odd status line")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// CPU and memory of one process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub cpu: f64,
    pub rss_mb: f64,
}

pub fn sample(pid: &str) -> Sample {
    Sample {
        at: Instant::now(),
        cpu: cpu_seconds(pid).unwrap_or(f64::NAN),
        rss_mb: status_mb(pid, "VmRSS").unwrap_or(f64::NAN),
    }
}

/// Cores used between two samples.
pub fn cores(a: &Sample, b: &Sample) -> f64 {
    (b.cpu - a.cpu) / b.at.duration_since(a.at).as_secs_f64()
}

/// Every process below `root` (children, grandchildren, ...), as (pid, ppid, comm).
pub fn descendants(root: u32) -> Vec<(u32, u32, String)> {
    let mut all = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        all.push((pid, ppid, comm));
    }
    let mut found = vec![root];
    let mut out = Vec::new();
    while let Some(parent) = found.pop() {
        for p in all.iter().filter(|p| p.1 == parent) {
            found.push(p.0);
            out.push(p.clone());
        }
    }
    out
}

/// Appends `record` as one line to the `--json` file (which `bench/charts.py` reads).
pub fn append_record(path: &Path, record: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("could not open {}", path.display()))?;
    writeln!(file, "{record}")?;
    Ok(())
}
