//! The zygote executor against the real `lull-zygote`, with the sandbox this host allows, and
//! compared with the cold executor on the same code.
//!
//! The binaries are looked up next to this test's target directory (`target/<profile>/`) or
//! in `LULL_BIN_DIR`; the test command builds them first (`cargo build --workspace --bins`).
//! Runs are watched from outside through `/proc`: a task renames itself (`/proc/self/comm`) to
//! a name unique to the test, which survives PID namespaces.

#[allow(dead_code)]
mod fake;

use fake::FakeCoordinator;
use lull_agent::sandbox::{self, SandboxSettings};
use lull_agent::{
    AgentConfig, ColdExecutor, Execution, Executor, ExecutorKind, Job, RunPoint, ZygoteExecutor,
    ZygoteSettings,
};
use lull_shared::{Assignment, Protections, Resources, RunOutcome, SandboxLevel};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MAX_OUTPUT: usize = 1024 * 1024;
/// Hang guard for every wait below; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(30);

fn bin_dir() -> PathBuf {
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
        "{} is missing: build it first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// What this host gives runs, found once (as the agent finds it at start).
struct Host {
    python: String,
    launcher: PathBuf,
    protections: Protections,
    settings: SandboxSettings,
}

async fn host() -> &'static Host {
    static HOST: OnceCell<Host> = OnceCell::const_new();
    HOST.get_or_init(|| async {
        let python = ColdExecutor::resolve_interpreter("python3").await;
        let launcher = binary("lull-sandbox");
        let mut settings = SandboxSettings::default();
        settings
            .expose
            .extend(ColdExecutor::interpreter_prefixes(&python).await);
        let protections =
            sandbox::probe(Some(&launcher), &settings, &python, SandboxLevel::Full).await;
        eprintln!("sandbox level for these tests: {}", protections.level);
        Host {
            python,
            launcher,
            protections,
            settings,
        }
    })
    .await
}

fn cold(host: &Host) -> ColdExecutor {
    ColdExecutor::new(host.python.clone(), MAX_OUTPUT).with_sandbox(
        host.launcher.clone(),
        host.protections.clone(),
        host.settings.clone(),
    )
}

fn zygote_settings(host: &Host) -> ZygoteSettings {
    ZygoteSettings {
        binary: binary("lull-zygote"),
        python: host.python.clone(),
        preload: Vec::new(),
        protections: host.protections.clone(),
        sandbox: host.settings.clone(),
        max_output_bytes: MAX_OUTPUT,
        fresh_interpreter: false,
    }
}

async fn zygote() -> ZygoteExecutor {
    let host = host().await;
    ZygoteExecutor::start(zygote_settings(host), cold(host))
        .await
        .expect("the zygote starts")
}

/// The zygote as the cold executor's launcher: each run execs a fresh interpreter.
async fn zygote_launching_cold() -> ZygoteExecutor {
    let host = host().await;
    let settings = ZygoteSettings {
        fresh_interpreter: true,
        ..zygote_settings(host)
    };
    ZygoteExecutor::start(settings, cold(host))
        .await
        .expect("the zygote starts as a launcher")
}

fn job(code: &str, timeout_secs: f64) -> Job {
    static NEXT_RUN: AtomicU32 = AtomicU32::new(1);
    Job {
        task_id: 7,
        run_id: i64::from(NEXT_RUN.fetch_add(1, Ordering::SeqCst)),
        code: code.to_string(),
        timeout: Duration::from_secs_f64(timeout_secs),
        resources: Resources::default(),
        point: RunPoint { index: 2, of: 3 },
        control: Default::default(),
    }
}

async fn run(executor: &impl Executor, code: &str) -> Execution {
    executor
        .run(job(code, 60.0), CancellationToken::new())
        .await
}

/// What a user sees of an execution (times excepted).
fn seen(execution: &Execution) -> (RunOutcome, Option<i32>, &str, &str, Option<&str>) {
    (
        execution.outcome,
        execution.exit_code,
        &execution.stdout,
        &execution.stderr,
        execution.error.as_deref(),
    )
}

/// Runs each program through both executors and asserts they report the same.
async fn assert_same_as_cold(programs: &[&str]) {
    let cold = cold(host().await);
    let zygote = zygote().await;
    for code in programs {
        let (from_cold, from_zygote) = (run(&cold, code).await, run(&zygote, code).await);
        assert_eq!(seen(&from_zygote), seen(&from_cold), "for {code:?}");
    }
}

/// A process name (`comm`, at most 15 bytes) no other test uses.
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Python that renames the current process to `name`.
fn rename_to(name: &str) -> String {
    format!("open('/proc/self/comm', 'w').write({name:?})")
}

/// Python lines that start a child process named `name` that sleeps, and return once it has
/// its name (so that a test that finds no such process afterwards has really seen it die).
fn start_named_sleeper(name: &str) -> Vec<String> {
    vec![
        "import os as _os, subprocess as _subprocess, sys as _sys, time as _time".to_string(),
        format!(
            "_subprocess.Popen([_sys.executable, '-c', {:?}])",
            format!("{}; import time; time.sleep(300)", rename_to(name))
        ),
        "def _named(pid):".to_string(),
        "    try:".to_string(),
        format!("        return open(f'/proc/{{pid}}/comm').read().strip() == {name:?}"),
        "    except OSError:".to_string(),
        "        return False".to_string(),
        "while not any(_named(p) for p in _os.listdir('/proc') if p.isdigit()):".to_string(),
        "    _time.sleep(0.01)".to_string(),
    ]
}

/// Live (not zombie) processes named `name`, by host pid.
fn processes_named(name: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
                && is_running(pid)
        })
        .collect()
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// True while `pid` exists and is not a zombie.
fn is_running(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|fields| fields.first().cloned())
        .is_some_and(|state| state != "Z" && state != "X")
}

fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `code` on `executor` in a task of its own; cancelling the token stops it.
fn spawn_run(
    executor: &Arc<ZygoteExecutor>,
    code: String,
) -> (CancellationToken, tokio::task::JoinHandle<Execution>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let executor = Arc::clone(executor);
        let cancel = cancel.clone();
        async move { executor.run(job(&code, 60.0), cancel).await }
    });
    (cancel, task)
}

#[tokio::test]
async fn hello_world_completes_with_its_output() {
    let execution = run(&zygote().await, "print('Hello World')").await;

    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    assert_eq!(execution.stdout, "Hello World\n");
    assert_eq!(execution.exit_code, Some(0));
    assert_eq!(execution.error, None);
    assert!(execution.started_at <= execution.completed_at);
}

#[tokio::test]
async fn a_runs_cpu_time_and_peak_memory_are_reported() {
    // 80 MB touched, and a fixed amount of work (not a duration) for the CPU.
    let code = "b = bytearray(80 * 1024 * 1024)\n\
                for i in range(0, len(b), 4096): b[i] = 1\n\
                n = 0\n\
                for i in range(3_000_000): n += i\n\
                print(n)";
    let execution = run(&zygote().await, code).await;
    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    let cpu = execution.cpu_seconds.expect("cpu time reported");
    let rss = execution.max_rss_mb.expect("peak memory reported");
    assert!(cpu > 0.05, "3 million additions take more CPU than {cpu} s");
    assert!(rss >= 80.0, "80 MB were touched, peak reported {rss} MB");
}

/// A run's process says how it ended on fd 3 before its exit (zygote/src/report.rs), and the
/// zygote kills it on reading that. The descriptor is the run's own: code that writes a whole
/// report on it ends right there, as if it had called `os._exit` with that status (it can only
/// misreport itself), and code that writes anything else on it is killed.
#[tokio::test]
async fn a_run_that_writes_its_own_report_ends_there_and_a_garbled_one_is_killed() {
    let zygote = zygote().await;
    let forger = unique_name("forge");
    let forged = format!(
        "{}\nimport os, time\n\
         print('before', os.get_inheritable(3), flush=True)\n\
         os.write(3, bytes([5]) + bytes(16))\n\
         time.sleep(300)\n\
         print('after')",
        rename_to(&forger)
    );
    let execution = run(&zygote, &forged).await;
    assert_eq!(
        (
            execution.outcome,
            execution.exit_code,
            execution.stdout.as_str()
        ),
        (RunOutcome::Failed, Some(5), "before False\n"),
        "{execution:?}"
    );
    wait_until("the run that reported is gone", || {
        processes_named(&forger).is_empty().then_some(())
    })
    .await;

    let garbled = "import os, time\nos.write(3, b'not a report')\ntime.sleep(300)";
    let execution = run(&zygote, garbled).await;
    assert_eq!(execution.outcome, RunOutcome::Failed, "{execution:?}");
    assert_eq!(execution.exit_code, None, "{execution:?}");
    assert_eq!(
        execution.error.as_deref(),
        Some("killed by signal 9 (SIGKILL)")
    );

    // A run that closes the descriptor ends the usual way, reported at its reap; what it
    // puts on that number afterwards (here its own stdout again) gets nothing of the report.
    let closed = "import os, sys\nos.close(3)\nassert os.dup(1) == 3\nprint('done')\nsys.exit(3)";
    let execution = run(&zygote, closed).await;
    assert_eq!(
        (execution.exit_code, execution.stdout.as_str()),
        (Some(3), "done\n"),
        "{execution:?}"
    );
}

/// Prints every signal whose disposition is not the default, with what it is.
const SIGNALS_NOT_AT_DEFAULT: &str = "import signal as s\n\
     def what(h): return 'ignored' if h == s.SIG_IGN else getattr(h, '__name__', str(h))\n\
     print([(getattr(n, 'name', n), what(s.getsignal(n))) for n in s.valid_signals() \
     if s.getsignal(n) not in (s.SIG_DFL, None)])";

/// Signals ignored the way a shell's `&` or `nohup` leaves a program it starts: the test below
/// runs the next one with these ignored.
const IGNORED_BY_A_SHELL: [&str; 3] = ["HUP", "INT", "QUIT"];

/// An agent started with signals ignored (a shell's `&` ignores SIGINT and SIGQUIT, `nohup`
/// SIGHUP) still starts every run from the defaults, as a fresh `python3` started from a login
/// shell has them. This test runs [`signal_dispositions_of_every_kind_of_run`] in a copy of
/// this test binary started through a shell that ignores them.
#[tokio::test]
async fn runs_start_from_the_default_signals_whatever_the_agent_ignores() {
    let exe = std::env::current_exe().expect("this test binary");
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' {}; exec \"$0\" --exact signal_dispositions_of_every_kind_of_run \
             --ignored --nocapture",
            IGNORED_BY_A_SHELL.join(" ")
        ))
        .arg(&exe)
        .env("LULL_TEST_SIGNALS_IGNORED", "1")
        .output()
        .await
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A run starts from every signal's default but what CPython's own startup sets: SIGINT to its
/// handler, SIGPIPE and SIGXFSZ ignored; through each way a run starts. Run by the test above
/// with signals ignored in this process (which it checks first), or by hand.
#[tokio::test]
#[ignore = "run by runs_start_from_the_default_signals_whatever_the_agent_ignores"]
async fn signal_dispositions_of_every_kind_of_run() {
    if std::env::var_os("LULL_TEST_SIGNALS_IGNORED").is_some() {
        // SigIgn: a hex mask, bit N-1 for signal N.
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let ignored = status
            .lines()
            .find_map(|line| line.strip_prefix("SigIgn:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .expect("SigIgn in /proc/self/status");
        for name in IGNORED_BY_A_SHELL {
            let signal: Signal = format!("SIG{name}").parse().expect("a signal's name");
            assert!(
                ignored & (1 << (signal as i32 - 1)) != 0,
                "SIG{name} is not ignored in this test process: {ignored:#x}"
            );
        }
    }
    let expected =
        "[('SIGINT', 'default_int_handler'), ('SIGPIPE', 'ignored'), ('SIGXFSZ', 'ignored')]\n";
    let host = host().await;
    for (name, execution) in [
        ("zygote", run(&zygote().await, SIGNALS_NOT_AT_DEFAULT).await),
        ("cold", run(&cold(host), SIGNALS_NOT_AT_DEFAULT).await),
        (
            "cold, launched by the zygote",
            run(&zygote_launching_cold().await, SIGNALS_NOT_AT_DEFAULT).await,
        ),
    ] {
        assert_eq!(execution.stdout, expected, "{name}: {execution:?}");
    }
}

/// Prints whether the process is a fresh interpreter: its executable is python's own.
const IS_FRESH_PYTHON: &str =
    "import os, sys\nprint(os.path.realpath('/proc/self/exe') == os.path.realpath(sys.executable))";

/// What the agent's cold executor is where a zygote starts: runs the zygote forks and
/// sandboxes, each of which then execs a fresh `python3 -I -u -c`. They must be reported
/// exactly as runs `lull-sandbox` launches one by one, and be fresh interpreters (their
/// executable is python's, nothing of the zygote's is loaded, SIGINT has Python's handler).
#[tokio::test]
async fn cold_runs_the_zygote_launches_are_fresh_interpreters_reported_as_cold() {
    let cold = cold(host().await);
    let launched = zygote_launching_cold().await;
    assert_eq!(launched.kind(), "cold");
    let programs = [
        "print('hello')",
        "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
        "raise ValueError('boom')",
        "import sys; sys.exit('a message')",
        "raise KeyboardInterrupt",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        SIGNALS_NOT_AT_DEFAULT,
        "import os\nprint(sorted(kv for kv in os.environ.items() if kv[0] != 'LULL_RUN_ID'))",
        "import sys; print(sys.flags.isolated, sys.flags.unbuffered, sys.argv, sys.orig_argv[1:4])",
        IS_FRESH_PYTHON,
        "import sys; print(sorted(m for m in sys.modules if 'lull' in m or m == 'json'))",
        "import os; print(os.getcwd(), os.getuid(), sorted(os.listdir('/proc/self/fd')))",
        // The mounts under /dev and /proc: the host's are detached in the zygote's template.
        "print(sorted(l.split()[4] for l in open('/proc/self/mountinfo') if l.split()[4].startswith(('/dev', '/proc'))))",
    ];
    for code in programs {
        let (from_cold, from_launched) = (run(&cold, code).await, run(&launched, code).await);
        assert_eq!(seen(&from_launched), seen(&from_cold), "for {code:?}");
    }
    let fresh = run(&launched, IS_FRESH_PYTHON).await;
    assert_eq!(fresh.stdout, "True\n", "{fresh:?}");
    assert!(fresh.cpu_seconds.is_some(), "{fresh:?}");
}

#[tokio::test]
async fn runs_are_forks_of_the_zygote_with_the_real_python_as_sys_executable() {
    let host = host().await;
    let code = "import os, sys\nprint(os.readlink('/proc/self/exe'))\nprint(sys.executable)";
    let execution = run(&zygote().await, code).await;

    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    let lines: Vec<&str> = execution.stdout.lines().collect();
    assert!(lines[0].ends_with("/lull-zygote"), "{lines:?}");
    assert_eq!(lines[1], host.python);
}

#[tokio::test]
async fn exit_codes_and_exceptions_are_reported_as_cold_reports_them() {
    assert_same_as_cold(&[
        "import sys; sys.exit(3)",
        "import os; os._exit(7)",
        "1/0",
        "def f():\n    raise ValueError('deep')\n\ndef g():\n    f()\n\ng()",
        "try:\n    1/0\nexcept Exception as e:\n    raise KeyError('k') from e",
        "1 +",
        "import missing_module_xyz",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "import sys; print('out'); print('err', file=sys.stderr); sys.exit(2)",
        "import sys\nsys.excepthook = lambda *a: print('hooked', a[0].__name__, file=sys.stderr)\n1/0",
        "import atexit; atexit.register(lambda: print('at exit'))\nprint('body')",
        "import threading, time\nt = threading.Thread(target=lambda: (time.sleep(0.2), print('thread done')))\nt.start()\nprint('main done')",
        "raise KeyboardInterrupt",
    ])
    .await;
}

#[tokio::test]
async fn system_exit_variants_match_cold() {
    assert_same_as_cold(&[
        "import sys; sys.exit()",
        "import sys; sys.exit(None)",
        "import sys; sys.exit(0)",
        "import sys; sys.exit(5)",
        "import sys; sys.exit('a message')",
        "import sys; sys.exit(256)",
        "import sys; sys.exit(-1)",
        "import sys; sys.exit(2**70)",
        "raise SystemExit(True)",
        "raise SystemExit(3, 'two args')",
        "exit(4)",
        "quit()",
    ])
    .await;
}

#[tokio::test]
async fn unicode_and_binary_output_match_cold() {
    assert_same_as_cold(&[
        "print('héllo wörld ✓ 日本語 🐍')",
        "import sys; sys.stdout.buffer.write(b'\\xff\\xfe raw \\x00 bytes\\n')",
        "import sys; sys.stderr.buffer.write(b'\\xff err\\n'); sys.exit(1)",
        "print('\\udcff surrogate')",
        "import sys; sys.stderr.write('\\udcff on stderr\\n')",
        "import sys; print(sys.stdout.encoding, sys.stdout.errors, sys.stderr.errors, sys.stdout.line_buffering, sys.stdout.write_through)",
        "import sys; print(sys.argv, sys.stdin.read() == '', __name__, sorted(globals()))",
        "import os; print(sorted(k for k in os.environ if k not in ('HOME', 'TMPDIR', 'LULL_RUN_ID')))",
        // A run's own variables and the shared ones reach the processes it starts, too.
        "import os, subprocess; print(os.environ['LULL_TASK_ID'], subprocess.run(['sh', '-c', 'echo $LULL_TASK_ID $LANG'], capture_output=True, text=True).stdout)",
        "import sys; print(sys.orig_argv[1:], sys.stdin is sys.__stdin__, sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__)",
        "import locale, sys; print(locale.getpreferredencoding(False), sys.getfilesystemencoding())",
        "import sys; print(sys.path)",
        "print(__builtins__.__name__, __doc__, __package__, __spec__)",
    ])
    .await;
}

/// The agent leaves a run's output pipes alone for its first moments (a short run's writes
/// then wake nobody): a run that writes more than a pipe holds must still go on, and every
/// byte of both streams arrive, whether written before or after the agent reads.
#[tokio::test]
async fn output_beyond_a_pipes_capacity_arrives_whole_from_both_streams() {
    let code = "import sys\n\
                sys.stdout.write('o' * 300_000)\n\
                sys.stderr.write('e' * 200_000)\n\
                sys.stdout.write('O' * 100_000)\n";
    let execution = run(&zygote().await, code).await;

    assert_eq!(
        execution.outcome,
        RunOutcome::Completed,
        "{:?}",
        execution.error
    );
    assert_eq!(execution.stdout.len(), 400_000);
    assert!(execution.stdout.starts_with('o') && execution.stdout.ends_with('O'));
    assert_eq!(execution.stdout.matches('O').count(), 100_000);
    assert_eq!(execution.stderr, "e".repeat(200_000));
}

#[tokio::test]
async fn output_written_before_a_kill_is_kept() {
    let execution = zygote()
        .await
        .run(
            job(
                "import sys, time\nprint('before')\nsys.stderr.write('err before\\n')\ntime.sleep(60)",
                1.0,
            ),
            CancellationToken::new(),
        )
        .await;

    assert_eq!(execution.outcome, RunOutcome::Failed);
    assert_eq!(execution.exit_code, None);
    assert_eq!(execution.error.as_deref(), Some("timed out after 1 s"));
    assert_eq!(execution.stdout, "before\n");
    assert_eq!(execution.stderr, "err before\n");
}

#[tokio::test]
async fn cancel_kills_the_run_and_its_grandchild() {
    let executor = zygote().await;
    let name = unique_name("zc");
    let code = format!(
        "import subprocess, sys, time\n\
         subprocess.Popen([sys.executable, '-c', {:?}])\n\
         time.sleep(300)\n",
        format!("{}; import time; time.sleep(300)", rename_to(&name))
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { executor.run(job(&code, 120.0), cancel).await }
    });

    let grandchild = wait_until("the grandchild is running", || {
        processes_named(&name).first().copied()
    })
    .await;
    cancel.cancel();
    let execution = running.await.expect("the run's task");

    assert_eq!(execution.outcome, RunOutcome::Cancelled);
    assert_eq!(execution.exit_code, None);
    assert_eq!(execution.error.as_deref(), Some("cancelled"));
    wait_until("the grandchild is dead", || {
        (!is_running(grandchild)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_run_that_left_its_process_group_dies_at_its_timeout() {
    let name = unique_name("zs");
    let code = format!(
        "import os, signal, time\n\
         os.setsid()\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         {}\n\
         time.sleep(300)\n",
        rename_to(&name)
    );
    let executor = zygote().await;
    let running = tokio::spawn(async move {
        executor
            .run(job(&code, 3.0), CancellationToken::new())
            .await
    });

    let run_pid = wait_until("the run is running", || {
        processes_named(&name).first().copied()
    })
    .await;
    let execution = running.await.expect("the run's task");

    assert_eq!(execution.error.as_deref(), Some("timed out after 3 s"));
    wait_until("the run is dead", || (!is_running(run_pid)).then_some(())).await;
}

#[tokio::test]
async fn a_grandchild_left_behind_dies_when_the_run_ends() {
    let name = unique_name("zl");
    let mut code = start_named_sleeper(&name);
    code.push("print('started')".to_string());
    let code = code.join("\n");
    let execution = run(&zygote().await, &code).await;

    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    assert_eq!(execution.stdout, "started\n");
    wait_until("nothing of the run is left", || {
        processes_named(&name).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn multiprocessing_and_subprocess_use_the_real_python() {
    let host = host().await;
    let code = [
        "import multiprocessing as mp, os, subprocess, sys",
        "if __name__ == '__main__':",
        "    with mp.Pool(2) as pool:",
        "        print(pool.map(abs, [-1, -2, -3]))",
        // What a spawned worker runs must be importable: a `-c` program's own functions are not.
        "    with mp.get_context('spawn').Pool(2) as pool:",
        "        print(set(pool.map(os.readlink, ['/proc/self/exe'] * 4)))",
        "    done = subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True, text=True)",
        "    print(done.stdout.strip())",
    ]
    .join("\n");
    let execution = run(&zygote().await, &code).await;

    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    let lines: Vec<&str> = execution.stdout.lines().collect();
    assert_eq!(lines[0], "[1, 2, 3]");
    // Spawned workers exec sys.executable: the real interpreter, never the zygote.
    let real = std::fs::canonicalize(&host.python).expect("python path");
    assert_eq!(lines[1], format!("{{'{}'}}", real.display()));
    assert_eq!(lines[2], "1");
}

#[tokio::test]
async fn a_dead_zygote_hands_its_runs_back_and_a_new_one_takes_the_next() {
    let executor = std::sync::Arc::new(zygote().await);
    let name = unique_name("zk");
    let code = format!("{}\nimport time\ntime.sleep(300)", rename_to(&name));
    let running = tokio::spawn({
        let executor = std::sync::Arc::clone(&executor);
        async move {
            executor
                .run(job(&code, 120.0), CancellationToken::new())
                .await
        }
    });

    let run_pid = wait_until("the run is running", || {
        processes_named(&name).first().copied()
    })
    .await;
    // Up the tree from the run to the zygote: the ancestor this test process started.
    let mut zygote_pid = run_pid;
    while let Some(parent) = parent_of(zygote_pid) {
        if parent == std::process::id() as i32 {
            break;
        }
        assert!(
            parent > 1,
            "the run {run_pid} is not below this test's zygote"
        );
        zygote_pid = parent;
    }
    kill(Pid::from_raw(zygote_pid), Signal::SIGKILL).expect("kill the zygote");
    let execution = running.await.expect("the run's task");

    assert_eq!(execution.outcome, RunOutcome::Lost, "{execution:?}");
    assert_eq!(
        execution.error.as_deref(),
        Some("zygote died; run handed back")
    );
    assert_eq!(execution.exit_code, None);
    wait_until("the orphaned run is dead", || {
        (!is_running(run_pid)).then_some(())
    })
    .await;

    let next = run(
        &*executor,
        "import os; print(os.readlink('/proc/self/exe'))",
    )
    .await;
    assert_eq!(next.outcome, RunOutcome::Completed, "{next:?}");
    assert!(
        next.stdout.trim_end().ends_with("/lull-zygote"),
        "the next run went to a new zygote: {next:?}"
    );
}

#[tokio::test]
async fn without_namespaces_runs_get_a_private_workdir_and_their_group_dies_with_them() {
    let host = host().await;
    let mut settings = zygote_settings(host);
    settings.protections = Protections::none("this test: no sandbox");
    let executor = ZygoteExecutor::start(settings, cold(host))
        .await
        .expect("the zygote starts");
    let name = unique_name("zn");
    let mut code = start_named_sleeper(&name);
    code.push("import json, os".to_string());
    code.push("print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))".to_string());
    let code = code.join("\n");

    let execution = run(&executor, &code).await;
    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    let seen: serde_json::Value =
        serde_json::from_str(&execution.stdout).expect("the task printed json");
    let cwd = PathBuf::from(seen["cwd"].as_str().expect("cwd"));
    let env = seen["env"].as_object().expect("env");
    assert_eq!(env["HOME"].as_str().map(PathBuf::from), Some(cwd.clone()));
    assert_eq!(env["TMPDIR"].as_str().map(PathBuf::from), Some(cwd.clone()));
    assert_eq!(env["LULL_TASK_ID"], "7");
    assert_eq!(
        (&env["LULL_POINT_INDEX"], &env["LULL_POINTS"]),
        (&"2".into(), &"3".into())
    );
    let dir_name = cwd.file_name().map(|n| n.to_string_lossy().into_owned());
    assert!(
        dir_name.is_some_and(|n| n.starts_with("lull-run-")),
        "{cwd:?}"
    );
    assert!(
        !cwd.exists(),
        "the working directory {cwd:?} outlived the run"
    );
    wait_until("the run's leftover is dead", || {
        processes_named(&name).is_empty().then_some(())
    })
    .await;
}

/// A virtual environment as `--python`: its runs see the environment's `sys.prefix` and what
/// its `.pth` files do, on the zygote as on cold (`python3 -I` in the environment), and not
/// the base installation's `site-packages`.
#[tokio::test]
async fn a_virtual_environment_as_python_is_set_up_as_it_is_for_cold() {
    let host = host().await;
    // Not under /tmp (where this checkout may well be): a run gets a /tmp of its own, which
    // hides what the host has there, so an interpreter there cannot serve sandboxed runs.
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    assert!(
        !home.starts_with("/tmp"),
        "this test needs a HOME outside /tmp for its virtual environment"
    );
    let dir = tempfile::Builder::new()
        .prefix(".lull-test-venv-")
        .tempdir_in(&home)
        .expect("a temporary directory");
    let venv = dir.path().join("venv");
    let made = tokio::process::Command::new(&host.python)
        .args(["-I", "-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .await
        .expect("python3 -m venv runs");
    assert!(made.status.success(), "{made:?}");
    let python =
        ColdExecutor::resolve_interpreter(&venv.join("bin/python3").display().to_string()).await;
    let purelib = tokio::process::Command::new(&python)
        .args([
            "-I",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .await
        .expect("the environment's python runs");
    let site_packages = String::from_utf8_lossy(&purelib.stdout).trim().to_string();
    std::fs::write(
        Path::new(&site_packages).join("lull_probe.pth"),
        "import sys; sys.lull_pth = 'ran'\n",
    )
    .expect("a .pth file in the environment");

    // This host, with the environment's python and its prefixes exposed, as the agent would
    // set itself up for `--python <venv>/bin/python3`.
    let mut settings = host.settings.clone();
    settings
        .expose
        .extend(ColdExecutor::interpreter_prefixes(&python).await);
    let in_venv = Host {
        python,
        launcher: host.launcher.clone(),
        protections: host.protections.clone(),
        settings,
    };
    let on_cold = cold(&in_venv);
    let zygote = ZygoteExecutor::start(zygote_settings(&in_venv), cold(&in_venv))
        .await
        .expect("the zygote starts for the environment's python");

    let code = "import sys\n\
                print(sys.prefix, sys.exec_prefix, sys.base_prefix)\n\
                print(getattr(sys, 'lull_pth', None))\n\
                print(sys.path)";
    let (from_cold, from_zygote) = (run(&on_cold, code).await, run(&zygote, code).await);
    assert_eq!(from_cold.outcome, RunOutcome::Completed, "{from_cold:?}");
    assert!(
        from_cold
            .stdout
            .starts_with(&format!("{} ", venv.display())),
        "{from_cold:?}"
    );
    assert_eq!(seen(&from_zygote), seen(&from_cold));
}

#[tokio::test]
async fn preloaded_modules_are_there_and_a_missing_one_is_not_fatal() {
    let host = host().await;
    let mut settings = zygote_settings(host);
    settings.preload = vec!["decimal".into(), "no_such_module_xyz".into()];
    let executor = ZygoteExecutor::start(settings, cold(host))
        .await
        .expect("the zygote starts despite a missing preload");

    let code = "import sys; print('decimal' in sys.modules)";
    let execution = run(&executor, code).await;
    assert_eq!(execution.stdout, "True\n", "{execution:?}");
    let execution = run(&executor, "import no_such_module_xyz").await;
    assert_eq!(
        execution.error.as_deref(),
        Some("ModuleNotFoundError: No module named 'no_such_module_xyz'")
    );
}

/// The minor version of `python` (3.N), if it runs.
fn minor_version(python: &Path) -> Option<u32> {
    let output = std::process::Command::new(python)
        .args(["-I", "-c", "import sys; print(sys.version_info[1])"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// A Python 3 of another minor version than `own`, if this machine has one: `python3.N` on
/// PATH, or one of pyenv's installations.
fn python_of_another_version(own: &str) -> Option<PathBuf> {
    let own_minor = minor_version(Path::new(own))?;
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|dir| (6..=20).map(move |minor| dir.join(format!("python3.{minor}"))));
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pyenv")));
    let in_pyenv = pyenv_root
        .and_then(|root| std::fs::read_dir(root.join("versions")).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin").join("python3"));
    on_path
        .chain(in_pyenv)
        .filter(|python| python.is_file())
        .find(|python| minor_version(python).is_some_and(|m| m != own_minor))
}

/// A launcher runs no code of its own, so the Python its runs exec need not be the version
/// the zygote binary embeds (a warm zygote refuses one that is not).
#[tokio::test]
async fn a_launcher_execs_a_python_of_another_version_than_the_one_it_embeds() {
    let host = host().await;
    let Some(other) = python_of_another_version(&host.python) else {
        eprintln!("skipped: no Python 3 of another minor version on this machine");
        return;
    };
    let other = ColdExecutor::resolve_interpreter(&other.display().to_string()).await;
    let mut settings = ZygoteSettings {
        python: other.clone(),
        ..zygote_settings(host)
    };
    settings
        .sandbox
        .expose
        .extend(ColdExecutor::interpreter_prefixes(&other).await);
    let refused = ZygoteExecutor::start(settings.clone(), cold(host))
        .await
        .expect_err("a warm zygote of another version");
    // It says why on its stderr (the agent's log): "this zygote embeds Python 3.x".
    assert!(refused.contains("exited before it was ready"), "{refused}");

    settings.fresh_interpreter = true;
    let launched = ZygoteExecutor::start(settings, cold(host))
        .await
        .expect("a launcher starts whatever the version");
    let ran = run(
        &launched,
        "import os, sys; print(os.path.realpath(sys.executable))",
    )
    .await;
    assert_eq!(ran.outcome, RunOutcome::Completed, "{ran:?}");
    let expected = std::fs::canonicalize(&other).expect("the other python's path");
    assert_eq!(ran.stdout.trim(), expected.display().to_string(), "{ran:?}");
}

#[tokio::test]
async fn a_missing_zygote_binary_is_refused_at_start() {
    let host = host().await;
    let mut settings = zygote_settings(host);
    settings.binary = PathBuf::from("/nonexistent/lull-zygote");

    let err = ZygoteExecutor::start(settings, cold(host))
        .await
        .expect_err("no zygote without its binary");
    assert!(
        err.starts_with("could not start /nonexistent/lull-zygote: "),
        "{err}"
    );
}

/// The agent as an operator starts it, against a fake coordinator.
async fn agent_runs_one_task(
    executor: ExecutorKind,
    zygote_bin: PathBuf,
) -> (Option<String>, lull_shared::RunReport) {
    let fake = FakeCoordinator::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let mut config = AgentConfig::new(fake.url.clone(), state.path().to_path_buf());
    config.heartbeat_interval = Duration::from_millis(100);
    config.pull_wait = Duration::from_secs(1);
    config.python = host().await.python.clone();
    config.sandbox_launcher = Some(binary("lull-sandbox"));
    config.executor = executor;
    config.zygote_bin = Some(zygote_bin);
    // Other tests' load on this host is no owner to yield to.
    config.owner = lull_agent::OwnerPolicy::off();
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(lull_agent::run(config, shutdown.clone()));

    wait_until("the agent registered", || {
        fake.heartbeats().first().map(|_| ())
    })
    .await;
    fake.assign(Assignment {
        task_id: 1,
        run_id: 10,
        attempt: 1,
        code: "import os; print(os.readlink('/proc/self/exe'))".to_string(),
        timeout: 30.0,
        resources: Resources::default(),
        point: 0,
        points: 1,
    });
    let report = wait_until("the result arrived", || {
        fake.results().into_iter().find(|r| r.run_id == 10)
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, agent)
        .await
        .expect("the agent stopped in time")
        .expect("the agent task")
        .expect("the agent stopped cleanly");
    let executor = fake.heartbeats().first().and_then(|h| h.executor.clone());
    (executor, report)
}

#[tokio::test]
async fn the_agent_runs_tasks_on_the_zygote_by_default() {
    let (executor, report) =
        agent_runs_one_task(ExecutorKind::default(), binary("lull-zygote")).await;

    assert_eq!(executor.as_deref(), Some("zygote"));
    assert_eq!(report.outcome, RunOutcome::Completed, "{report:?}");
    assert!(
        report.stdout.trim_end().ends_with("/lull-zygote"),
        "{report:?}"
    );
}

#[tokio::test]
async fn the_agent_falls_back_to_cold_without_a_zygote() {
    let (executor, report) = agent_runs_one_task(
        ExecutorKind::Zygote,
        PathBuf::from("/nonexistent/lull-zygote"),
    )
    .await;

    assert_eq!(executor.as_deref(), Some("cold"));
    assert_eq!(report.outcome, RunOutcome::Completed, "{report:?}");
    assert!(
        !report.stdout.trim_end().ends_with("/lull-zygote"),
        "{report:?}"
    );
}

#[tokio::test]
async fn the_memory_limit_is_named_when_it_fires_in_a_zygote_run() {
    let host = host().await;
    if !host.protections.cgroups {
        eprintln!("no cgroups on this host: the memory limit is RLIMIT_AS alone");
        assert!(
            !std::path::Path::new("/sys/fs/cgroup/memory").exists()
                && !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
            "{:?}",
            host.protections
        );
        return;
    }
    // Several children, each under the per-process limit, together over the run's limit:
    // only the cgroup catches them, and only the zygote (the run's watcher) can say so.
    let code = r#"
import os, time
kids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        blocks = []
        for _ in range(60):
            blocks.append(bytearray(1024 * 1024))
            time.sleep(0.01)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
"#;
    let limited = |code: &str| {
        let mut job = job(code, 60.0);
        job.resources.memory = 192.0;
        job
    };
    // The zygote reuses run cgroups: a kill in one run must not be read as the next one's.
    let executor = zygote().await;
    for round in ["first", "after a run that stayed within its limit"] {
        let e = executor.run(limited(code), CancellationToken::new()).await;
        assert_eq!(e.outcome, RunOutcome::Failed, "{round}: {e:?}");
        assert!(
            e.error
                .as_deref()
                .is_some_and(|m| m.contains("memory limit 192 MB exceeded")),
            "{round}: {e:?}"
        );
        let e = executor
            .run(limited("print('fine')"), CancellationToken::new())
            .await;
        assert_eq!(e.outcome, RunOutcome::Completed, "{round}: {e:?}");
        assert_eq!(e.error, None, "{round}");
    }
}

#[tokio::test]
async fn a_run_may_start_its_own_session_and_has_no_terminal() {
    // As under `python3 -c`: the run's process is not a group leader, so setsid works; and
    // whatever terminal the agent was started from is out of its reach.
    let code = "import os\n\
                os.setsid()\n\
                try:\n    open('/dev/tty', 'rb')\n    print('tty reachable')\n\
                except OSError as e:\n    print('no tty', e.errno)\n";
    let execution = run(&zygote().await, code).await;
    assert_eq!(execution.outcome, RunOutcome::Completed, "{execution:?}");
    assert!(
        execution.stdout.starts_with("no tty"),
        "{:?}",
        execution.stdout
    );
}

/// On one zygote: starts `holder` (which renames itself `name` once it holds what it holds,
/// then sleeps), runs `looker` while it holds, stops the holder, and runs `looker` again.
/// Returns (holder, looker during, looker after).
async fn look_while_held_and_after(
    holder: &str,
    looker: &str,
    name: &str,
) -> (Execution, Execution, Execution) {
    let executor = Arc::new(zygote().await);
    let (cancel, holding) = spawn_run(&executor, holder.to_string());
    wait_until("the holder holds", || {
        (!processes_named(name).is_empty()).then_some(())
    })
    .await;
    let during = run(executor.as_ref(), looker).await;
    cancel.cancel();
    let held = holding.await.expect("the holder's task");
    let after = run(executor.as_ref(), looker).await;
    (held, during, after)
}

#[tokio::test]
async fn runs_share_no_socket_and_nothing_of_one_run_is_left_for_the_next() {
    let host = host().await;
    if !host.protections.namespaces {
        eprintln!("no namespaces on this host: runs share the host's network");
        return;
    }
    let name = unique_name("ns");
    // A holds an abstract Unix socket (network-namespace scoped) and SysV shared memory
    // (IPC-namespace scoped) while B, running at the same time, looks for both; C, after A
    // has ended, looks again.
    let holder = format!(
        "import socket, sys, time, ctypes\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.bind('\\0{name}')\n\
         s.listen()\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         shm = libc.shmget(0x4c554c4c, 4096, 0o1666)\n\
         print('holding', shm >= 0, flush=True)\n\
         open('/proc/self/comm', 'w').write({name:?})\n\
         time.sleep(30)\n"
    );
    let looker = format!(
        "import socket, ctypes\n\
         c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         try:\n    c.connect('\\0{name}')\n    print('socket reachable')\n\
         except OSError as e:\n    print('no socket', e.errno)\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         print('shm', libc.shmget(0x4c554c4c, 0, 0) >= 0)\n"
    );
    let (held, during, after) = look_while_held_and_after(&holder, &looker, &name).await;
    assert!(held.stdout.starts_with("holding True"), "{held:?}");
    assert!(during.stdout.starts_with("no socket"), "{during:?}");
    assert!(during.stdout.contains("shm False"), "{during:?}");
    assert!(after.stdout.starts_with("no socket"), "{after:?}");
    assert!(after.stdout.contains("shm False"), "{after:?}");
}

#[tokio::test]
async fn runs_copy_the_shared_mounts_but_keep_their_files_to_themselves() {
    let host = host().await;
    if !host.protections.namespaces {
        eprintln!("no namespaces on this host: runs share the host's files");
        return;
    }
    let name = unique_name("mnt");
    // A leaves a file in each of its own writable places while B, running at the same time,
    // looks for them; C looks again once A has ended. Every run copies its mounts from the
    // zygote's template: none of them may reach it, or the zygote's own namespace.
    let holder = format!(
        "import os, time\n\
         for d in ('/tmp', '/var/tmp', '/dev/shm'):\n    open(os.path.join(d, {name:?}), 'w').write('x')\n\
         print('left', flush=True)\n\
         open('/proc/self/comm', 'w').write({name:?})\n\
         time.sleep(30)\n"
    );
    let looker = format!(
        "import os\n\
         print(sorted(d for d in ('/tmp', '/var/tmp', '/dev/shm') if os.path.exists(os.path.join(d, {name:?}))))\n\
         for d in ('/dev', '/run', '/usr', '/'):\n    \
             try:\n        open(os.path.join(d, {name:?}), 'w')\n        print('wrote', d)\n    \
             except OSError as e:\n        print('refused', d, e.errno)\n\
         print(sorted(os.listdir('/dev')))\n"
    );
    let (held, during, after) = look_while_held_and_after(&holder, &looker, &name).await;
    assert!(held.stdout.starts_with("left"), "{held:?}");
    for seen in [&during, &after] {
        assert!(
            seen.stdout.starts_with("[]\n"),
            "another run's files: {seen:?}"
        );
        for dir in ["/dev", "/run", "/usr", "/"] {
            assert!(
                seen.stdout.contains(&format!("refused {dir} ")),
                "{dir} must be read-only: {seen:?}"
            );
        }
        assert!(
            seen.stdout.contains("'null'") && seen.stdout.contains("'shm'"),
            "{seen:?}"
        );
    }
    // The zygote itself is back in the mount namespace it started in (this test's).
    let own = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
    let zygotes: Vec<i32> = processes_named("lull-zygote")
        .into_iter()
        .filter(|&pid| parent_of(pid) == Some(std::process::id() as i32))
        .collect();
    assert!(!zygotes.is_empty(), "the zygote is this test's child");
    for pid in zygotes {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("zygote's namespace");
        assert_eq!(
            theirs, own,
            "zygote {pid} stayed in a run's or the template's namespace"
        );
    }
}

/// The zygote's children that are not `run` (by host pid).
fn other_children_of(zygote: i32, run: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{zygote}/task/{zygote}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .filter(|&pid| pid != run && is_running(pid))
        .collect()
}

/// What each descriptor above 2 of `pid` is (`pipe:[N]`, `socket:[N]`, ...).
fn descriptors_above_2(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|entry| {
                    let entry = entry.ok()?;
                    let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(entry.path()).ok()?;
                    (fd > 2).then(|| target.display().to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_zygote_forks_the_next_run_ahead_holding_nothing_of_other_runs() {
    let host = host().await;
    if !host.protections.namespaces {
        eprintln!("no namespaces on this host: each run is forked when it comes");
        return;
    }
    let executor = Arc::new(zygote().await);
    let holder_name = unique_name("held");
    let (cancel, holding) = spawn_run(
        &executor,
        format!("{}\nimport time\ntime.sleep(60)", rename_to(&holder_name)),
    );
    let holder = wait_until("the holder runs", || {
        processes_named(&holder_name).first().copied()
    })
    .await;
    let zygote = parent_of(holder).expect("the holder's parent");
    // While the holder sleeps, the zygote forks the next run's process ahead of it.
    let spare = wait_until("a spare is forked", || {
        other_children_of(zygote, holder).first().copied()
    })
    .await;
    // It was forked while the zygote held the holder's stderr: a copy kept open would keep
    // the holder's reader from ever seeing the end of its output.
    let held = descriptors_above_2(spare);
    assert!(
        held.iter().all(|what| !what.starts_with("pipe:")),
        "the spare holds pipes: {held:?}"
    );
    // Its namespaces and mounts are made while it waits, off the next run's path.
    let namespace =
        |pid: i32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    wait_until(
        "the spare makes its namespaces before its run comes",
        || {
            ["mnt", "uts", "ipc"]
                .iter()
                .all(|kind| {
                    let theirs = namespace(spare, kind);
                    theirs.is_some() && theirs != namespace(zygote, kind)
                })
                .then_some(())
        },
    )
    .await;
    // So is its seccomp filter (mode 2 in its status: "filter").
    if host.protections.seccomp {
        wait_until("the spare installs its filter before its run comes", || {
            std::fs::read_to_string(format!("/proc/{spare}/status"))
                .ok()?
                .lines()
                .any(|line| line.split_whitespace().eq(["Seccomp:", "2"]))
                .then_some(())
        })
        .await;
    }
    cancel.cancel();
    let stopped = holding.await.expect("the holder's task");
    assert_eq!(stopped.outcome, RunOutcome::Cancelled, "{stopped:?}");

    let name = unique_name("next");
    let (stop_next, next) = spawn_run(
        &executor,
        format!(
            "{}\nimport os, time\nprint('ran', *(os.environ.get(name, '-') for name in {:?}), \
             'LULL_RUN_ID' in os.environ, flush=True)\ntime.sleep(60)",
            rename_to(&name),
            [
                "LULL_TASK_ID",
                "LULL_POINT_INDEX",
                "LULL_POINTS",
                "LANG",
                "PYTHONIOENCODING"
            ],
        ),
    );
    let ran_in = wait_until("the next run runs", || {
        processes_named(&name).first().copied()
    })
    .await;
    assert_eq!(
        ran_in, spare,
        "the next run ran in the spare forked ahead of it"
    );
    stop_next.cancel();
    let execution = next.await.expect("the next run's task");
    // Its own variables came with its message, the rest with the zygote it was forked from.
    assert_eq!(
        execution.stdout, "ran 7 2 3 C.UTF-8 utf-8 True\n",
        "{execution:?}"
    );
}
