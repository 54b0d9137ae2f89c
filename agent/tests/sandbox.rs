//! The sandbox through the real `lull-sandbox` launcher: what the probe finds, and what a
//! run sees from inside. Needs the workspace binaries built (`cargo build --workspace --bins`).

use lull_agent::executor::{ColdExecutor, Executor, Job};
use lull_agent::sandbox::{self, SandboxSettings};
use lull_shared::{Protections, Resources, RunOutcome, SandboxLevel};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn launcher() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/lull-sandbox
    let exe = std::env::current_exe().expect("test exe");
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("lull-sandbox");
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// What this host should reach: root with namespaces → full.
fn host_allows_full() -> bool {
    nix::unistd::geteuid().is_root() && std::path::Path::new("/proc/self/ns/pid").exists()
}

/// The host's `python3` and the settings these tests run it with (an unprivileged uid of
/// their own; the interpreter's prefix exposed).
async fn python_and_settings() -> (String, SandboxSettings) {
    let python = ColdExecutor::resolve_interpreter("python3").await;
    let mut settings = SandboxSettings {
        uid: 64_010,
        gid: 64_010,
        ..SandboxSettings::default()
    };
    settings.expose = ColdExecutor::interpreter_prefixes(&python).await;
    (python, settings)
}

async fn setup() -> (ColdExecutor, Protections) {
    let (python, settings) = python_and_settings().await;
    let protections =
        sandbox::probe(Some(&launcher()), &settings, &python, SandboxLevel::Full).await;
    let executor =
        ColdExecutor::new(python, 1 << 20).with_sandbox(launcher(), protections.clone(), settings);
    (executor, protections)
}

fn job(run_id: i64, code: &str, memory_mb: f64) -> Job {
    Job {
        task_id: 1,
        run_id,
        code: code.to_string(),
        timeout: Duration::from_secs(30),
        resources: Resources {
            cpu: 1.0,
            memory: memory_mb,
        },
        point: Default::default(),
        control: Default::default(),
    }
}

#[tokio::test]
async fn the_probe_reaches_the_level_the_host_allows() {
    let (_, p) = setup().await;
    if host_allows_full() {
        assert_eq!(p.level, SandboxLevel::Full, "{p:?}");
        assert!(
            p.namespaces && p.drop_user && p.seccomp && p.launcher,
            "{p:?}"
        );
    } else {
        assert!(p.level < SandboxLevel::Full, "{p:?}");
        assert!(!p.missing.is_empty(), "what is missing is said: {p:?}");
    }
    assert_eq!(p.level, p.derived_level());
}

#[tokio::test]
async fn a_missing_launcher_is_reported_not_pretended() {
    let p = sandbox::probe(
        Some(std::path::Path::new("/nonexistent/lull-sandbox")),
        &SandboxSettings::default(),
        "python3",
        SandboxLevel::Full,
    )
    .await;
    assert_eq!(p.level, SandboxLevel::None);
    assert!(p.missing[0].contains("launcher was not found"), "{p:?}");
}

/// `--max-sandbox-level`: the probe settles on the strongest protections at or below the cap,
/// says that it was capped, and runs get exactly those.
#[tokio::test]
async fn a_capped_probe_settles_at_or_below_the_cap_and_says_so() {
    let (python, settings) = python_and_settings().await;
    let code = "import os\nstatus = open('/proc/self/status').read()\nprint(os.getuid(), [l.split()[1] for l in status.splitlines() if l.startswith('Seccomp:')], os.readlink('/proc/self/ns/net'))\n";
    let host_net =
        std::fs::read_link("/proc/self/ns/net").expect("this process's network namespace");

    let basic = sandbox::probe(Some(&launcher()), &settings, &python, SandboxLevel::Basic).await;
    assert!(basic.level <= SandboxLevel::Basic, "{basic:?}");
    assert!(
        basic
            .missing
            .first()
            .is_some_and(|m| m.contains("capped at basic")),
        "{basic:?}"
    );
    if host_allows_full() {
        // Without a mount namespace the unprivileged uid may not reach an interpreter under a
        // closed directory (pyenv under /root): then basic keeps the agent's user, and says so.
        assert_eq!(
            (basic.level, basic.namespaces, basic.seccomp),
            (SandboxLevel::Basic, false, true),
            "{basic:?}"
        );
        let uid = if basic.drop_user {
            64_010
        } else {
            nix::unistd::geteuid().as_raw()
        };
        let executor = ColdExecutor::new(python.clone(), 1 << 20).with_sandbox(
            launcher(),
            basic.clone(),
            settings.clone(),
        );
        let out = executor
            .run(job(7_101, code, 256.0), CancellationToken::new())
            .await;
        assert_eq!(out.outcome, RunOutcome::Completed, "{out:?}");
        // The seccomp filter, but the host's network namespace.
        assert_eq!(
            out.stdout.trim(),
            format!("{uid} ['2'] {}", host_net.display()),
            "{out:?}"
        );
    }

    let none = sandbox::probe(Some(&launcher()), &settings, &python, SandboxLevel::None).await;
    assert_eq!(
        (none.level, none.launcher, none.namespaces, none.seccomp),
        (SandboxLevel::None, false, false, false),
        "{none:?}"
    );
    assert!(none.missing[0].contains("capped at none"), "{none:?}");

    // Capped, and no launcher either: both are said, the cap first.
    let nowhere = std::path::Path::new("/nonexistent/lull-sandbox");
    let lost = sandbox::probe(Some(nowhere), &settings, &python, SandboxLevel::Basic).await;
    assert_eq!(lost.level, SandboxLevel::None, "{lost:?}");
    assert!(lost.missing[0].contains("capped at basic"), "{lost:?}");
    assert!(
        lost.missing[1].contains("launcher was not found"),
        "{lost:?}"
    );

    let executor =
        ColdExecutor::new(python.clone(), 1 << 20).with_sandbox(launcher(), none, settings);
    let out = executor
        .run(job(7_102, "print('ok')", 256.0), CancellationToken::new())
        .await;
    assert_eq!(
        (out.outcome, out.stdout.trim()),
        (RunOutcome::Completed, "ok"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_sandboxed_run_sees_every_protection_from_inside() {
    let (executor, p) = setup().await;
    if p.level != SandboxLevel::Full {
        assert!(
            !host_allows_full(),
            "this host allows full but the probe found {p:?}"
        );
        return;
    }
    let code = r#"
import ctypes, os, socket, sys
print("uid", os.getuid(), os.getgid(), os.getgroups())
print("pid", os.getpid())
print("cwd", os.getcwd(), os.listdir("."))
print("home", os.environ["HOME"], sorted(k for k in os.environ if k.startswith("LULL")))
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1); print("net open")
except OSError as e:
    print("net", e.errno)
libc = ctypes.CDLL(None, use_errno=True)
print("ptrace", libc.ptrace(0, 0, 0, 0), ctypes.get_errno())
print("unshare", libc.unshare(0x20000000), ctypes.get_errno())
try:
    open("/etc/lull-test", "w"); print("etc writable")
except OSError as e:
    print("etc", e.errno)
print("root", os.listdir("/root"))
try:
    open("/run/lock/lull-test", "w"); print("run/lock writable")
except OSError as e:
    print("run/lock", e.errno)
print("run", os.listdir("/run"))
print("dev", sorted(os.listdir("/dev")))
with open("/dev/null", "w") as f:
    f.write("x")
print("urandom", len(open("/dev/urandom", "rb").read(8)))
print("host", socket.gethostname())
print("mounts", sorted((l.split()[4], l.split(" - ")[1].split()[0]) for l in open("/proc/self/mountinfo") if l.split()[4].startswith(("/dev", "/proc"))))
"#;
    let e = executor
        .run(job(4242, code, 512.0), CancellationToken::new())
        .await;
    assert_eq!(e.outcome, RunOutcome::Completed, "{e:?}");
    let out = e.stdout;
    assert!(out.contains("uid 64010 64010 []"), "{out}");
    assert!(out.contains("pid 1\n"), "{out}");
    assert!(out.contains("cwd /tmp []"), "{out}");
    // The host's /dev and /proc (with devpts, shm, ...) are not even under the run's own.
    assert!(
        out.contains("mounts [('/dev', 'tmpfs'), ('/dev/shm', 'tmpfs'), ('/proc', 'proc')]"),
        "{out}"
    );
    assert!(
        out.contains(
            "home /tmp ['LULL_POINTS', 'LULL_POINT_INDEX', 'LULL_RUN_ID', 'LULL_TASK_ID']"
        ),
        "{out}"
    );
    assert!(out.contains("net 101"), "ENETUNREACH: {out}");
    assert!(out.contains("ptrace -1 1"), "EPERM: {out}");
    assert!(out.contains("unshare -1 1"), "EPERM: {out}");
    assert!(out.contains("etc 30"), "EACCES or EROFS: {out}");
    assert!(
        out.contains("root ['.pyenv']") || out.contains("root []"),
        "the agent's home is hidden: {out}"
    );
    assert!(
        out.contains("run/lock 2"),
        "nothing of the host's /run: {out}"
    );
    assert!(out.contains("run []"), "no host sockets under /run: {out}");
    assert!(
        out.contains(
            "dev ['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'tty', 'urandom', 'zero']"
        ),
        "{out}"
    );
    assert!(out.contains("urandom 8"), "{out}");
    assert!(out.contains("host lull"), "{out}");
}

#[tokio::test]
async fn the_memory_limit_is_named_when_it_fires() {
    let (executor, p) = setup().await;
    if !p.cgroups {
        assert!(
            !host_allows_full() || !std::path::Path::new("/sys/fs/cgroup/memory").exists(),
            "{p:?}"
        );
        return;
    }
    // Several children, each under the per-process limit, together over the run's limit.
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
    let e = executor
        .run(job(4243, code, 192.0), CancellationToken::new())
        .await;
    assert_eq!(e.outcome, RunOutcome::Failed, "{e:?}");
    assert!(
        e.error
            .as_deref()
            .is_some_and(|m| m.contains("memory limit 192 MB exceeded")),
        "{e:?}"
    );
}

/// Live processes owned by `uid`.
fn processes_of_uid(uid: u32) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                let field = |k: &str| {
                    s.lines()
                        .find_map(|l| l.strip_prefix(k).map(str::trim).map(str::to_string))
                };
                field("Uid:").and_then(|u| u.split_whitespace().next().map(str::to_string))
                    == Some(uid.to_string())
                    && field("State:").is_some_and(|st| !st.starts_with('Z'))
            })
        })
        .count()
}

#[tokio::test]
async fn a_run_dies_with_its_watcher_even_after_leaving_its_session() {
    let (_, p) = setup().await;
    if p.level != SandboxLevel::Full {
        assert!(!host_allows_full(), "{p:?}");
        return;
    }
    const UID: u32 = 64_012;
    let python = ColdExecutor::resolve_interpreter("python3").await;
    let mut settings = SandboxSettings {
        uid: UID,
        gid: UID,
        ..SandboxSettings::default()
    };
    settings.expose = ColdExecutor::interpreter_prefixes(&python).await;
    let policy =
        sandbox::RunPolicy::for_job(4244, &p, &settings, 256.0, Duration::from_secs(60), None);
    // PID 1 leaves the watcher's session, so killing the watcher's group misses it: only
    // the parent-death signal (which dropping the uid clears, and the sandbox restores) and
    // the PID namespace can take it down.
    let mut watcher = tokio::process::Command::new(launcher())
        .arg("--policy")
        .arg(serde_json::to_string(&policy).expect("policy"))
        .args([
            "--",
            &python,
            "-I",
            "-c",
            "import os, time; os.setsid(); time.sleep(60)",
        ])
        .env_clear()
        .kill_on_drop(true)
        .spawn()
        .expect("launcher");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processes_of_uid(UID) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.start_kill().expect("kill the watcher");
    let _ = watcher.wait().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processes_of_uid(UID) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run outlived its watcher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_timeout_that_fires_while_the_sandbox_is_being_set_up_still_kills_the_run() {
    let (executor, p) = setup().await;
    if !p.launcher {
        assert!(!host_allows_full(), "{p:?}");
        return;
    }
    // The deadline passes before the launcher can have made its process group.
    let mut j = job(4245, "import time\ntime.sleep(10**7)", 256.0);
    j.timeout = Duration::from_millis(1);
    let run = executor.run(j, CancellationToken::new());
    let e = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run was killed, not left to sleep");
    assert_eq!(e.outcome, RunOutcome::Failed, "{e:?}");
    assert_eq!(e.error.as_deref(), Some("timed out after 0.001 s"), "{e:?}");
}

/// This process's `lull-sandbox` children (other tests' included).
fn launchers_of_this_process() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|kids| {
            kids.split_whitespace()
                .filter_map(|pid| pid.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "lull-sandbox")
        })
        .collect()
}

/// Whether `pid` exists and has not exited (a zombie waits for its reap).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[tokio::test]
async fn a_cold_run_starts_on_a_launcher_started_ahead_of_it_with_its_own_limits() {
    let (executor, p) = setup().await;
    if !(p.namespaces && p.cgroups) {
        eprintln!("no namespaces and cgroups here: each launcher starts with its run");
        return;
    }
    let first = executor
        .run(job(4300, "print('first')", 256.0), CancellationToken::new())
        .await;
    assert_eq!(first.stdout, "first\n", "{first:?}");
    // The first run's launcher started with it, and one more for the next run. While it
    // waits, a launcher has made the run's network namespace already (fresh, its own): not
    // this process's. Listed anew each time: the first run's launcher may still be on its
    // way out (a zombie has no namespaces to read) when the list is first taken.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let own = std::fs::read_link("/proc/self/ns/net").expect("own network namespace");
    let waiting = loop {
        let waiting: Vec<u32> = launchers_of_this_process()
            .into_iter()
            .filter(|pid| is_alive(*pid))
            .collect();
        let apart = waiting.iter().all(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|theirs| theirs != own)
        });
        if !waiting.is_empty() && apart {
            break waiting;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no launcher waits for the next run in a network namespace of its own: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The run's cgroup, read from here while the run waits (a run does not see the host's
    // /sys): its own memory limit (128 MB) must have replaced the one the launcher was
    // started with. The run ends once told, by its cancellation.
    let second = job(4301, "import time\ntime.sleep(60)\n", 128.0);
    let process = second.control.process.clone();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let executor = executor.clone();
        let cancel = cancel.clone();
        async move { executor.run(second, cancel).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = process.pid() {
            break pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        waiting.contains(&pid),
        "the run's launcher {pid} is not one that waited: {waiting:?}"
    );
    let wanted = (128u64 << 20).to_string();
    let mut seen = None;
    while seen.as_deref() != Some(wanted.as_str()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run's cgroup never had its own limit: {seen:?}"
        );
        seen = memory_limit_of(pid);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    let second = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends once cancelled")
        .expect("the run's task");
    assert_eq!(second.outcome, RunOutcome::Cancelled, "{second:?}");
}

/// The memory limit of `pid`'s cgroup (v1, else v2), as this process sees it.
fn memory_limit_of(pid: u32) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (path, v2) = cgroups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        match controllers {
            "memory" => Some((path.to_string(), false)),
            "" => Some((path.to_string(), true)),
            _ => None,
        }
    })?;
    let file = if v2 {
        format!("/sys/fs/cgroup{path}/memory.max")
    } else {
        format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
    };
    std::fs::read_to_string(file)
        .ok()
        .map(|limit| limit.trim().to_string())
}
