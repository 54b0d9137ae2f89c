//! Per-run latency of each executor on this host, one run at a time, with the sandbox the
//! agent would apply here. Not a test: it prints numbers.
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! target/release/examples/executor_latency [RUNS] [--unsandboxed] [--zygote-only | --cold-only] [--gap-ms=N]
//! ```
//!
//! RUNS defaults to 200. `--unsandboxed` measures the executors alone: no launcher,
//! protections `none`. `--zygote-only` skips the (slow) cold executor, which is measured
//! both ways it launches runs: from the zygote (what the agent uses), and with one
//! `lull-sandbox` per run (where no zygote can start). `--cold-only` measures only the cold
//! executor the agent uses (fresh interpreters launched by the zygote), for `perf stat`.
//!
//! `lull-sandbox` and `lull-zygote` are looked up in the directory above this example's
//! (`target/<profile>/`), or in `LULL_BIN_DIR`.

use lull_agent::sandbox::{self, SandboxSettings};
use lull_agent::{ColdExecutor, Executor, Job, ZygoteExecutor, ZygoteSettings};
use lull_shared::{Resources, RunOutcome};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CODE: &str = "print(sum(range(1000)))";
const MAX_OUTPUT: usize = 1024 * 1024;

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LULL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("executable path");
    // target/<profile>/examples/<this> -> target/<profile>
    exe.parent()
        .and_then(|dir| dir.parent())
        .map(PathBuf::from)
        .expect("target directory")
}

/// CPU seconds used so far by this process and every live process below it (the zygote and
/// its spare; reaped runs are included through their parents' children's times), from /proc: unlike the host's /proc/stat, this does not count what other programs
/// on the machine are doing.
fn own_cpu_seconds() -> f64 {
    // Clock ticks per second; 100 on Linux everywhere we run.
    const TICKS: f64 = 100.0;
    // Fields after the parenthesised command name, from `state` (index 0): ppid is 1, and
    // utime, stime, cutime, cstime are 11 to 14.
    let fields = |pid: &str| -> Option<Vec<i64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        Some(
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    };
    let times = |f: &[i64]| f[11..15].iter().sum::<i64>() as u64;
    let me = i64::from(std::process::id());
    let mut ticks = 0u64;
    if let Some(f) = fields("self") {
        ticks += times(&f);
    }
    // (pid, ppid, ticks) of every process, then the ones below this one.
    let all: Vec<(i64, i64, u64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid = name.to_str()?.parse::<i64>().ok()?;
            let f = fields(&pid.to_string())?;
            Some((pid, *f.get(1)?, times(&f)))
        })
        .collect();
    let mut parents = vec![me];
    while let Some(parent) = parents.pop() {
        for &(pid, ppid, t) in &all {
            if ppid == parent {
                ticks += t;
                parents.push(pid);
            }
        }
    }
    ticks as f64 / TICKS
}

async fn measure(name: &str, executor: &impl Executor, runs: usize, gap: Duration) {
    let mut latencies = Vec::with_capacity(runs);
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    for run_id in 0..runs {
        let job = Job {
            task_id: 1,
            run_id: run_id as i64 + 1,
            code: CODE.to_string(),
            timeout: Duration::from_secs(60),
            resources: Resources::default(),
            point: Default::default(),
            control: Default::default(),
        };
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let begun = Instant::now();
        let execution = executor.run(job, CancellationToken::new()).await;
        latencies.push(begun.elapsed());
        assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
        assert_eq!(execution.stdout, "499500\n");
    }
    let total = started.elapsed();
    let cpu = own_cpu_seconds() - cpu_before;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:>6}: {runs} runs, {:.0} runs/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, \
         {:.2} ms CPU per run (this process and its children)",
        runs as f64 / total.as_secs_f64(),
        at(0.50).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        at(1.0).as_secs_f64() * 1000.0,
        cpu * 1000.0 / runs as f64,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let unsandboxed = args.iter().any(|arg| arg == "--unsandboxed");
    let zygote_only = args.iter().any(|arg| arg == "--zygote-only");
    let cold_only = args.iter().any(|arg| arg == "--cold-only");
    let runs: usize = args
        .iter()
        .find(|arg| !arg.starts_with("--"))
        .map(|n| n.parse().expect("RUNS is a number"))
        .unwrap_or(200);
    // `--gap-ms=N`: wait N ms before each run, as a node that was quiet meets its next task.
    let gap = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--gap-ms="))
        .map(|n| Duration::from_millis(n.parse().expect("--gap-ms=N takes a number")))
        .unwrap_or_default();
    let dir = bin_dir();
    let python = ColdExecutor::resolve_interpreter("python3").await;
    let launcher = dir.join("lull-sandbox");
    let mut settings = SandboxSettings::default();
    settings
        .expose
        .extend(ColdExecutor::interpreter_prefixes(&python).await);
    let protections = if unsandboxed {
        lull_shared::Protections::none("--unsandboxed")
    } else {
        sandbox::probe(
            Some(&launcher),
            &settings,
            &python,
            lull_shared::SandboxLevel::Full,
        )
        .await
    };
    println!("python {python}, sandbox level {}", protections.level);

    let cold = ColdExecutor::new(python.clone(), MAX_OUTPUT).with_sandbox(
        launcher,
        protections.clone(),
        settings.clone(),
    );
    let zygote_settings = |fresh_interpreter| ZygoteSettings {
        binary: dir.join("lull-zygote"),
        python: python.clone(),
        preload: Vec::new(),
        protections: protections.clone(),
        sandbox: settings.clone(),
        max_output_bytes: MAX_OUTPUT,
        fresh_interpreter,
    };
    if !zygote_only {
        // What the agent's cold executor is: fresh interpreters launched by the zygote...
        let launched = ZygoteExecutor::start(zygote_settings(true), cold.clone())
            .await
            .expect("the zygote starts as a launcher");
        measure("cold", &launched, runs, gap).await;
        drop(launched);
        if cold_only {
            return;
        }
        // ...and where no zygote can start, one `lull-sandbox` per run.
        measure("cold, lull-sandbox per run", &cold, runs, gap).await;
    }
    let zygote = ZygoteExecutor::start(zygote_settings(false), cold.clone())
        .await
        .expect("the zygote starts");
    measure("zygote", &zygote, runs, gap).await;
}
