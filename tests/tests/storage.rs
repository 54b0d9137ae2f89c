//! The coordinator's storage seen from the kernel: how a durable commit reaches the disk.

use anyhow::{Context, Result};
use lull_tests::{Coordinator, wait_until};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `strace`, stopped (SIGKILL: the kernel detaches it from its tracee) and reaped if the test
/// ends before it has detached on its own.
struct Tracer(Child);

impl Drop for Tracer {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// With `--sync full` every commit syncs SQLite's write-ahead log before anyone is told it
/// is durable, and it does so with `fdatasync` (the data and the file's size), as SQLite's
/// own Linux builds do, not `fsync`, which also commits a journaled ext4's journal whenever
/// the file's times changed.
/// The bundled SQLite gets that through `.cargo/config.toml` (`HAVE_FDATASYNC`); without it
/// every sync here is an `fsync`. Watched with `strace` attached to the running coordinator.
#[tokio::test]
async fn a_durable_commit_syncs_the_write_ahead_log_with_fdatasync() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coordinator = Coordinator::start(dir.path(), &["--local-agents", "0", "--sync", "full"])?;
    let trace = dir.path().join("syncs.txt");
    let mut strace = Tracer(
        Command::new("strace")
            .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&trace)
            .arg("-p")
            .arg(coordinator.process.pid().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strace (scripts/test installs it)")?,
    );
    // strace says "Process N attached with M threads" once it traces all of them.
    let stderr = strace.0.stderr.take().context("strace's stderr")?;
    let (attached, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("attached") {
                let _ = attached.send(());
            }
        }
    });
    said.recv_timeout(Duration::from_secs(30))
        .context("strace did not attach to the coordinator within 30 s")?;
    for n in 0..3 {
        let code = format!("print({n})");
        coordinator
            .post("/api/v1/tasks", &json!({ "code": code }))
            .await?;
    }
    let wal_syncs = |text: &str, call: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("{call}(")) && l.contains("lull.db-wal>"))
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        "the write-ahead log's syncs in the trace",
        || async {
            let text = std::fs::read_to_string(&trace).ok()?;
            (wal_syncs(&text, "fdatasync") + wal_syncs(&text, "fsync") >= 3).then_some(())
        },
    )
    .await;
    // SIGINT: strace detaches and leaves the coordinator running.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    strace.0.wait()?;
    let text = std::fs::read_to_string(&trace)?;
    assert!(
        wal_syncs(&text, "fdatasync") >= 3,
        "each commit syncs the log with fdatasync:\n{text}"
    );
    assert_eq!(
        wal_syncs(&text, "fsync"),
        0,
        "no commit syncs the log with fsync:\n{text}"
    );
    Ok(())
}
