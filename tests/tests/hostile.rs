//! Hostile programs against a real agent, once per executor (`cold`, `zygote`), and once more
//! for `cold` where no zygote can start, so that `lull-sandbox` launches every run.
//!
//! Each test starts its own coordinator and one agent whose runs execute as a uid of their
//! own, so that the two tests can run side by side and each can find its runs' processes by
//! uid. It then runs a few dozen programs that try to hurt the host, the agent or later tasks,
//! one after another, each with a small timeout and 256 MB. Every program has an expected
//! outcome; after every program no process of the sandbox uid may remain, and the agent (and
//! its zygote) must still be the processes they were. After the suite: a normal task
//! completes, no file of any run remains, host memory is where it was, and the node reports
//! the best sandbox level this host allows.
//!
//! Programs that would damage the host if they ran unconfined (a fork bomb as root,
//! `kill(-1, 9)`, 16 GB written to the host's disk) run only once a probe has shown that runs
//! really are confined (the sandbox uid, a PID namespace of their own). Otherwise they are
//! reported as not run, and the test fails.
//!
//! Every result is collected before anything is asserted, so one failing run reports every
//! program's outcome (on stderr) rather than the first one only.

use lull_tests::{Coordinator, Process, poll_until, start_agent_with_env};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Memory every hostile program is given (`resources.memory`, MB).
const MEMORY_MB: u64 = 256;
/// The agent's default output cap per stream, which these tests do not change.
const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Why a dangerous program was not run.
const NOT_CONFINED: &str = "not run: runs were not shown to be confined (the sandbox uid and a \
     PID namespace of their own), and this program would harm an unconfined host";
const PROBE_NAME: &str = "confinement probe";
/// How long the runs of a program may take to disappear once its task is terminal.
const CLEANUP_LIMIT: Duration = Duration::from_secs(15);
/// Host memory may differ this much after the suite (other work shares the machine).
const MEMORY_MARGIN_KB: u64 = 1024 * 1024;
/// Forks or threads: this many before a refusal means no per-run limit stopped the program
/// (per-run limits are far below it; a host's own, such as `pid_max`, are above it).
const UNBOUNDED: u64 = 4096;

/// The executor under test and the uid/gid its runs get: not the default (65534), so that no
/// other agent's runs on this machine are mistaken for ours, and one per executor so the
/// two tests can run at the same time.
#[derive(Debug, Clone, Copy)]
struct ExecutorUnderTest {
    name: &'static str,
    /// The agent's `--executor`.
    executor: &'static str,
    /// More flags for the agent.
    flags: &'static [&'static str],
    uid: u32,
    gid: u32,
}

/// Cold runs, launched by the zygote (each execs a fresh interpreter).
const COLD: ExecutorUnderTest = ExecutorUnderTest {
    name: "cold",
    executor: "cold",
    flags: &[],
    uid: 65533,
    gid: 65533,
};

/// Cold runs where no zygote starts: one `lull-sandbox` per run.
const COLD_LAUNCHER: ExecutorUnderTest = ExecutorUnderTest {
    name: "cold-sandbox",
    executor: "cold",
    flags: &["--zygote-bin", "/nonexistent/lull-zygote"],
    uid: 65531,
    gid: 65531,
};

const ZYGOTE: ExecutorUnderTest = ExecutorUnderTest {
    name: "zygote",
    executor: "zygote",
    flags: &[],
    uid: 65532,
    gid: 65532,
};

#[tokio::test]
async fn hostile_programs_are_contained_cold() {
    Suite::start(COLD).await.run().await;
}

#[tokio::test]
async fn hostile_programs_are_contained_cold_launched_by_lull_sandbox() {
    Suite::start(COLD_LAUNCHER).await.run().await;
}

#[tokio::test]
async fn hostile_programs_are_contained_zygote() {
    Suite::start(ZYGOTE).await.run().await;
}

// ---------------------------------------------------------------------------------------------
// The host side: what the programs aim at, and what the test checks afterwards
// ---------------------------------------------------------------------------------------------

/// What the programs aim at on the host, and the directories the agent uses. Removes every
/// file a program could have left outside them when dropped, so a failing run leaves no
/// trace in `/etc`.
struct Host {
    executor: ExecutorUnderTest,
    /// A root-owned 0755 directory on the host's disk. Not under `/tmp`: a sandboxed run has
    /// a private `/tmp` and would not see it there, which would make the checks vacuous.
    dir: tempfile::TempDir,
    /// A root-only (0600) file in `dir`.
    secret_path: PathBuf,
    secret: String,
    /// A world-writable (0777) directory in `dir`: only a read-only view of the host keeps
    /// runs out of such directories (`/run/lock` is one on most hosts).
    world_writable: PathBuf,
    /// A world-writable (1777) file system of its own in `dir`, as a host's `/home`, `/var`
    /// or `/srv` partition may be: mounted by the test (as root; `None` otherwise), before
    /// the agent starts, and unmounted when dropped.
    separate_mount: Option<PathBuf>,
    /// The agent's `TMPDIR`, where it would make per-run directories.
    agent_tmp: PathBuf,
    state_dir: PathBuf,
    /// Given to the agent as `--token` and in its environment: on its command line, which any
    /// process that sees the agent's `/proc` entry can read.
    token: String,
    /// Unique per executor: the file name programs write under.
    tag: String,
    tcp: TcpListener,
    udp: UdpSocket,
    host_namespaces: BTreeMap<String, String>,
    /// This process's hard limit on open files (the agent inherits it).
    open_files_hard_limit: u64,
    /// Whether this host lets root limit a group of processes' memory and count.
    has_cgroups: bool,
}

impl Host {
    fn new(executor: ExecutorUnderTest) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("lull-hostile-")
            .tempdir_in(host_side_base())
            .expect("test directory");
        set_mode(dir.path(), 0o755);
        let secret = format!("lull-secret-{}-{}", executor.name, std::process::id());
        let secret_path = dir.path().join("secret.txt");
        std::fs::write(&secret_path, &secret).expect("secret file");
        set_mode(&secret_path, 0o600);
        let world_writable = dir.path().join("world-writable");
        std::fs::create_dir(&world_writable).expect("world-writable dir");
        set_mode(&world_writable, 0o777);
        let separate_mount = this_process_is_root().then(|| {
            let point = dir.path().join("separate-mount");
            std::fs::create_dir(&point).expect("mount point");
            nix::mount::mount(
                Some("tmpfs"),
                &point,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("size=1m,mode=1777"),
            )
            .expect("a tmpfs of the test's own");
            point
        });
        let agent_tmp = dir.path().join("agent-tmp");
        std::fs::create_dir(&agent_tmp).expect("agent tmp dir");
        let state_dir = dir.path().join("agent-state");
        let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp listener");
        tcp.set_nonblocking(true).expect("nonblocking listener");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        udp.set_nonblocking(true).expect("nonblocking udp socket");
        Host {
            executor,
            secret_path,
            secret,
            world_writable,
            separate_mount,
            agent_tmp,
            state_dir,
            token: format!("lull-token-{}-{}", executor.name, std::process::id()),
            tag: format!("lull-hostile-{}-{}", executor.name, std::process::id()),
            tcp,
            udp,
            host_namespaces: namespaces_of_this_process(),
            open_files_hard_limit: open_files_hard_limit(),
            has_cgroups: host_has_cgroups(),
            dir,
        }
    }

    /// Host paths programs try to write. None may exist on the host after its run.
    fn forbidden_paths(&self) -> Vec<PathBuf> {
        let tag = &self.tag;
        let mut paths = vec![
            PathBuf::from(format!("/etc/{tag}")),
            self.dir.path().join(tag),
            self.world_writable.join(tag),
            PathBuf::from(format!("/var/tmp/{tag}")),
            PathBuf::from(format!("/dev/shm/{tag}")),
            PathBuf::from(format!("/tmp/{tag}")),
        ];
        paths.extend(self.separate_mount.iter().map(|point| point.join(tag)));
        paths
    }

    fn existing_forbidden_paths(&self) -> Vec<PathBuf> {
        self.forbidden_paths()
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .collect()
    }

    /// Whether anything connected to the test's TCP listener since the last call.
    fn tcp_connection_arrived(&self) -> bool {
        self.tcp.accept().is_ok()
    }

    /// Whether any datagram reached the test's UDP socket since the last call.
    fn datagram_arrived(&self) -> bool {
        let mut buf = [0u8; 512];
        self.udp.recv_from(&mut buf).is_ok()
    }

    /// `lull-run-*` entries the runs left: anywhere under the agent's temp and state
    /// directories, and in the machine's `/tmp` when owned by this test's sandbox uid.
    fn leftover_run_dirs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for root in [&self.agent_tmp, &self.state_dir] {
            find_named(root, "lull-run-", &mut found);
        }
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for entry in entries.flatten() {
                let named = entry.file_name().to_string_lossy().starts_with("lull-run-");
                let ours = entry
                    .metadata()
                    .is_ok_and(|m| m.uid() == self.executor.uid || m.gid() == self.executor.gid);
                if named && ours {
                    found.push(entry.path());
                }
            }
        }
        found
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for path in self.forbidden_paths() {
            let _ = std::fs::remove_file(&path);
        }
        if let Some(point) = &self.separate_mount {
            let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Where the test's host-side directory goes: the target directory's temp, unless that is
/// under a directory every run gets fresh and empty (a clone in `/tmp`), where a run would not
/// see it at all and every check aimed at it would pass for nothing; then `/var/lib`.
fn host_side_base() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let private = ["/tmp", "/var/tmp", "/dev/shm", "/run"];
    if !private.iter().any(|dir| target.starts_with(dir)) {
        return target;
    }
    let base = PathBuf::from("/var/lib/lull-hostile-tests");
    std::fs::create_dir_all(&base).expect("a host-side test directory");
    set_mode(&base, 0o755);
    base
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn find_named(dir: &Path, prefix: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(entry.path());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&entry.path(), prefix, found);
        }
    }
}

const NAMESPACES: [&str; 5] = ["pid", "mnt", "net", "ipc", "uts"];

fn namespaces_of_this_process() -> BTreeMap<String, String> {
    NAMESPACES
        .iter()
        .filter_map(|ns| {
            let link = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()?;
            Some((ns.to_string(), link.display().to_string()))
        })
        .collect()
}

/// A `Key:  value` line of `/proc/<pid>/status`.
fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(|value| value.trim().to_string())
}

fn open_files_hard_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(u64::MAX)
}

fn this_process_is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status_field(&status, "Uid")
        .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Whether root can put a run in a cgroup limiting memory and processes: cgroup v2 with both
/// controllers, or the v1 `memory` and `pids` hierarchies.
fn host_has_cgroups() -> bool {
    if !this_process_is_root() {
        return false;
    }
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory") && c.contains("pids"));
    let v1 = Path::new("/sys/fs/cgroup/memory/tasks").exists()
        && Path::new("/sys/fs/cgroup/pids/tasks").exists();
    v2 || v1
}

/// The strongest level an agent can reach here, from what this host offers (the sandbox
/// levels are defined in `lull_shared::SandboxLevel`): namespaces as root, or through
/// unprivileged user namespaces; dropping to another uid only as root.
fn best_sandbox_level_for_this_host() -> &'static str {
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| status_field(&s, "Seccomp").is_some());
    let namespaces = NAMESPACES
        .iter()
        .all(|ns| Path::new(&format!("/proc/self/ns/{ns}")).exists());
    let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .is_ok_and(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0));
    match (seccomp, namespaces, this_process_is_root()) {
        (false, _, _) => "none",
        (true, true, true) => "full",
        (true, true, false) if user_namespaces => "isolated",
        (true, _, _) => "basic",
    }
}

fn mem_available_kb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    status_field(&meminfo, "MemAvailable")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemAvailable in /proc/meminfo")
}

/// A process as seen in the host's `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostProcess {
    pid: i32,
    ppid: i32,
    /// Clock ticks since boot: with the pid, tells a process from a later one reusing its pid.
    start_time: u64,
    state: char,
    name: String,
    uids: Vec<u32>,
}

impl HostProcess {
    fn read(pid: i32) -> Option<HostProcess> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let (head, rest) = stat.rsplit_once(") ")?;
        let name = head.split_once(" (")?.1.to_string();
        // Fields from the third on: state, ppid, ..., starttime is the 22nd field overall.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(HostProcess {
            pid,
            ppid: fields.get(1)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
            state: fields.first()?.chars().next()?,
            name,
            uids: status_field(&status, "Uid")?
                .split_whitespace()
                .filter_map(|u| u.parse().ok())
                .collect(),
        })
    }

    fn all() -> Vec<HostProcess> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(HostProcess::read)
            .collect()
    }

    fn is_alive(&self) -> bool {
        HostProcess::read(self.pid).is_some_and(|now| {
            now.start_time == self.start_time && now.state != 'Z' && now.state != 'X'
        })
    }
}

/// Every process with `uid` as its real, effective, saved or fs uid. Unlike
/// `lull_tests::processes_of_uid`, zombies count (a run nobody reaps is a leak too) and each
/// comes with what the failure message shows.
fn processes_owned_by(uid: u32) -> Vec<HostProcess> {
    HostProcess::all()
        .into_iter()
        .filter(|p| p.uids.contains(&uid))
        .collect()
}

/// The agent's long-lived helpers (its zygote): its direct children that are not runs. Cold
/// launchers (`lull-sandbox`) belong to one run each, those waiting for their run included.
fn helpers_of(agent: i32, uid: u32) -> Vec<HostProcess> {
    HostProcess::all()
        .into_iter()
        .filter(|p| p.ppid == agent && !p.uids.contains(&uid) && p.name != "lull-sandbox")
        .collect()
}

fn describe_processes(processes: &[HostProcess]) -> String {
    processes
        .iter()
        .map(|p| format!("{} {:?} ({})", p.pid, p.name, p.state))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Programs and their expected outcomes
// ---------------------------------------------------------------------------------------------

/// How a task ended, as `GET /api/v1/tasks/{id}` shows it (its last run's output).
#[derive(Debug)]
struct Outcome {
    status: String,
    error: String,
    result: String,
    stdout: String,
    stderr: String,
    exit_code: Option<i64>,
}

impl Outcome {
    fn of(task: &Value) -> Outcome {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let last_run = task["runs"]
            .as_array()
            .and_then(|runs| runs.last())
            .cloned()
            .unwrap_or(Value::Null);
        Outcome {
            status: text(&task["status"]),
            error: text(&task["error"]),
            result: text(&task["result"]),
            stdout: text(&last_run["stdout"]),
            stderr: text(&last_run["stderr"]),
            exit_code: last_run["exit_code"].as_i64(),
        }
    }

    fn summary(&self) -> String {
        format!(
            "status {:?}, error {:?}, exit code {:?}, stdout {:?}, stderr {:?}",
            self.status,
            self.error,
            self.exit_code,
            clip(&self.stdout),
            clip(&self.stderr),
        )
    }

    /// One line for the log of a run that went as expected.
    fn brief(&self) -> String {
        let shown = if self.status == "completed" {
            self.stdout.lines().next().unwrap_or_default()
        } else {
            &self.error
        };
        let shown: String = shown.chars().take(120).collect();
        format!("{}: {shown}", self.status)
    }

    fn completed(&self) -> Check {
        ensure(self.status == "completed", || "expected completed".into())
    }

    /// Failed, with an error containing one of `errors`.
    fn failed_with(&self, errors: &[&str]) -> Check {
        ensure(
            self.status == "failed" && errors.iter().any(|e| self.error.contains(e)),
            || format!("expected failed with an error containing one of {errors:?}"),
        )
    }

    fn failed_with_exactly(&self, error: &str) -> Check {
        ensure(self.status == "failed" && self.error == error, || {
            format!("expected failed with error {error:?}")
        })
    }

    fn stdout_has(&self, needle: &str) -> Check {
        ensure(self.stdout.contains(needle), || {
            format!("expected {needle:?} in stdout")
        })
    }

    fn stdout_lacks(&self, needle: &str) -> Check {
        ensure(!self.stdout.contains(needle), || {
            format!("did not expect {needle:?} in stdout")
        })
    }

    /// The JSON object the program printed as its result.
    fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.result).map_err(|e| format!("result is not JSON: {e}"))
    }

    /// The number after `prefix` in stdout (`refused after 63 forks` → 63).
    fn count_after(&self, prefix: &str) -> Result<u64, String> {
        self.stdout
            .split_once(prefix)
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("expected {prefix:?} followed by a number in stdout"))
    }
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

type Check = Result<(), String>;

fn ensure(condition: bool, what: impl FnOnce() -> String) -> Check {
    if condition { Ok(()) } else { Err(what()) }
}

type Expectation = Box<dyn Fn(&Outcome, &Host) -> Check>;

struct Program {
    name: &'static str,
    code: String,
    timeout_secs: u64,
    /// Would damage the host if it ran unconfined: runs only once confinement is shown.
    needs_confinement: bool,
    expect: Expectation,
}

impl Program {
    fn new(
        name: &'static str,
        timeout_secs: u64,
        code: &str,
        expect: impl Fn(&Outcome, &Host) -> Check + 'static,
    ) -> Program {
        Program {
            name,
            code: code.to_string(),
            timeout_secs,
            needs_confinement: false,
            expect: Box::new(expect),
        }
    }

    fn dangerous(mut self) -> Program {
        self.needs_confinement = true;
        self
    }

    /// Replaces `@KEY@` placeholders (Python braces stay untouched).
    fn with(mut self, key: &str, value: impl std::fmt::Display) -> Program {
        self.code = self.code.replace(&format!("@{key}@"), &value.to_string());
        self
    }
}

fn timed_out(secs: u64) -> String {
    format!("timed out after {secs} s")
}

/// The programs, in the order they run. The benign control comes first and last.
fn programs(host: &Host, coordinator_port: u16) -> Vec<Program> {
    let tag = host.tag.clone();
    vec![
        control("control (first): print('ok') completes"),
        Program::new(PROBE_NAME, 5, PROBE, |o, host| {
            o.completed()?;
            let probe = o.json()?;
            check_confinement(&probe, host)
        }),
        // Every process of the bomb forks until the process limit refuses it and keeps
        // trying: only the clock ends it. Which clock speaks first (the wall-clock timeout or
        // RLIMIT_CPU) depends on scheduling; both end the whole tree.
        Program::new("fork bomb", 3, FORK_BOMB, |o, _| {
            o.failed_with(&[&timed_out(3), "cpu time limit", "SIGXCPU", "SIGKILL"])
        })
        .dangerous(),
        // The same limit, observed: forking sleepers until refused must stop far below the
        // host's own limits. The sleepers must die with the run.
        Program::new(
            "fork until refused: the process limit",
            5,
            FORK_UNTIL_REFUSED,
            |o, _| {
                o.completed()?;
                let forks = o.count_after("refused after")?;
                ensure(forks < UNBOUNDED, || {
                    format!("{forks} forks before a refusal")
                })?;
                o.stdout_has("errno 11")
            },
        )
        .dangerous(),
        // Threads count as processes (RLIMIT_NPROC, pids cgroup) and each reserves a stack
        // against the address-space limit: either refuses early.
        Program::new("thread bomb", 5, THREAD_BOMB, |o, _| {
            o.completed()?;
            let threads = o.count_after("refused after")?;
            ensure(threads < UNBOUNDED, || {
                format!("{threads} threads before a refusal")
            })
        })
        .dangerous(),
        // Which ends it first, the wall clock or RLIMIT_CPU (the timeout plus a little), is
        // up to the scheduler; the program shows the CPU limit is there.
        Program::new("CPU spin", 3, CPU_SPIN, |o, _| {
            o.failed_with(&[&timed_out(3), "cpu time limit", "SIGXCPU"])?;
            let limit = o.count_after("cpu limit")?;
            ensure(limit <= 3 + 5, || format!("RLIMIT_CPU of {limit} s"))
        }),
        // stdin is closed or empty: reading it ends at once (None or EOF), never waits.
        Program::new(
            "read stdin",
            5,
            "import sys\nprint(repr(sys.stdin.read()))\n",
            |o, _| {
                if o.status == "completed" {
                    ensure(o.result == "''", || "expected an empty stdin".into())
                } else {
                    o.failed_with(&["AttributeError", "ValueError", "OSError"])
                }
            },
        ),
        Program::new(
            "sleep past the timeout",
            2,
            "import time\ntime.sleep(10**6)\n",
            |o, _| {
                o.failed_with_exactly(&timed_out(2))?;
                ensure(o.exit_code.is_none(), || "expected no exit code".into())
            },
        ),
        // PID 1 of a namespace cannot stop itself (the kernel drops SIGSTOP sent to a
        // namespace's init from inside), so a child stops itself too and the main process
        // waits for it: either way only the wall clock ends the run, stopped child included.
        Program::new("SIGSTOP to itself", 2, SIGSTOP_ITSELF, |o, _| {
            o.failed_with_exactly(&timed_out(2))?;
            o.stdout_lacks("child resumed")
        }),
        Program::new("SIGTERM ignored", 2, SIGTERM_IGNORED, |o, _| {
            o.failed_with_exactly(&timed_out(2))
        }),
        Program::new(
            "process-group escape: a setsid child spins on after the main process",
            2,
            SETSID_SPINNER,
            |o, _| o.failed_with_exactly(&timed_out(2)),
        )
        .dangerous(),
        // Unconfined, on a host that overcommits, this would touch 50 GB.
        Program::new("50 GB allocation", 5, "bytearray(50 * 2**30)\n", |o, _| {
            o.failed_with_exactly("MemoryError")
        })
        .dangerous(),
        // 50 GB fails on most hosts even without a limit (more than RAM and swap); 1 GiB
        // does not, so this one shows the address-space limit itself.
        Program::new(
            "1 GiB allocation, four times the task's memory",
            5,
            "bytearray(2**30)\nprint('allocated 1 GiB')\n",
            |o, _| {
                o.failed_with_exactly("MemoryError")?;
                o.stdout_lacks("allocated")
            },
        ),
        // 4 children of 100 MiB each: every one is within the per-process address-space
        // limit, only a per-run cgroup sees the 400 MiB they hold together. The child the OOM
        // killer picks, a MemoryError in a child, or the whole run killed are all fine;
        // holding it all is not. A host without cgroups can only hold it (a reported
        // degradation: the node's `cgroups` is false).
        Program::new(
            "slow memory growth spread over 4 children",
            5,
            SLOW_MEMORY_GROWTH,
            |o, host| {
                if host.has_cgroups {
                    ensure(o.status == "failed", || "expected failed".into())?;
                    o.stdout_lacks("held")
                } else {
                    Ok(())
                }
            },
        ),
        Program::new(
            "infinite stdout",
            5,
            "while True:\n    print('x' * 65536)\n",
            |o, _| {
                flood_stopped(o)?;
                ensure(o.stdout.len() <= MAX_OUTPUT_BYTES + 256, || {
                    format!("{} bytes of stdout kept", o.stdout.len())
                })
            },
        ),
        Program::new(
            "infinite stderr",
            5,
            "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n",
            |o, _| {
                flood_stopped(o)?;
                ensure(o.stderr.len() <= MAX_OUTPUT_BYTES + 256, || {
                    format!("{} bytes of stderr kept", o.stderr.len())
                })
            },
        ),
        // The file-size limit (EFBIG, or SIGXFSZ where the interpreter does not ignore it,
        // as an embedded one may not) or the private /tmp's size (ENOSPC), whichever is
        // smaller, stops it.
        Program::new("16 GB file write", 5, BIG_FILE, |o, _| {
            o.failed_with(&[
                "File too large",
                "No space left on device",
                "file size limit",
                "SIGXFSZ",
            ])?;
            o.stdout_lacks("wrote")
        })
        .dangerous(),
        // A sparse file takes no space: only the file-size limit stops it.
        Program::new("sparse 1 TiB file", 5, SPARSE_FILE, |o, _| {
            o.failed_with(&["File too large", "file size limit", "SIGXFSZ"])?;
            o.stdout_lacks("wrote")
        }),
        Program::new("a million tiny files", 5, MILLION_FILES, |o, _| {
            o.failed_with(&["No space left on device", "Disk quota exceeded"])?;
            o.stdout_lacks("created")
        })
        .dangerous(),
        // The program first raises its soft limit to its hard limit: the run's hard limit
        // must be below the agent's own.
        Program::new("a million open fds", 5, MILLION_FDS, |o, host| {
            o.completed()?;
            let fds = o.count_after("refused after")?;
            o.stdout_has("errno 24")?;
            ensure(fds + 16 < host.open_files_hard_limit, || {
                format!(
                    "{fds} fds opened: the run's limit is not below the agent's ({})",
                    host.open_files_hard_limit
                )
            })
        }),
        Program::new(
            "outbound TCP to a port the test listens on at 127.0.0.1",
            5,
            TCP_CONNECT,
            |o, host| {
                o.failed_with(&["Error"])?;
                o.stdout_lacks("connected")?;
                ensure(!host.tcp_connection_arrived(), || {
                    "the test's listener accepted a connection from the run".into()
                })
            },
        )
        .with("PORT", host.tcp.local_addr().expect("tcp addr").port()),
        Program::new(
            "TCP to the coordinator's own port",
            5,
            TCP_CONNECT,
            |o, _| {
                o.failed_with(&["Error"])?;
                o.stdout_lacks("connected")
            },
        )
        .with("PORT", coordinator_port),
        // The host may have no resolver at all, which would make getaddrinfo fail for the
        // wrong reason; so the program also sends a DNS query to a UDP socket of the test's
        // own, which must not arrive.
        Program::new("DNS lookup", 5, DNS_LOOKUP, |o, host| {
            o.failed_with(&["Error"])?;
            o.stdout_has("getaddrinfo failed")?;
            o.stdout_lacks("query sent")?;
            ensure(!host.datagram_arrived(), || {
                "the test's UDP socket received the run's query".into()
            })
        })
        .with("PORT", host.udp.local_addr().expect("udp addr").port()),
        // PermissionError from the uid; FileNotFoundError if the sandbox hides host paths.
        Program::new(
            "read a root-only file of the test's",
            5,
            "print(open(@PATH@).read())\n",
            |o, host| {
                o.failed_with(&["PermissionError", "FileNotFoundError"])?;
                o.stdout_lacks(&host.secret)
            },
        )
        .with("PATH", py_str(&host.secret_path.display().to_string())),
        // The agent's token is on its command line: visible to any run that sees its /proc
        // entry. The program spells the token reversed so its own command line (`-c CODE`)
        // does not contain it.
        Program::new(
            "look for host secrets: the agent's token, /etc/shadow",
            5,
            HOST_SECRETS,
            |o, _| {
                o.completed()?;
                let found = o.json()?;
                ensure(found["token_in"] == json!([]), || {
                    format!("the agent's token was readable in {}", found["token_in"])
                })?;
                ensure(found["shadow"] != "read", || {
                    "/etc/shadow was readable".into()
                })
            },
        )
        .with(
            "REVERSED",
            py_str(&host.token.chars().rev().collect::<String>()),
        ),
        // /var/tmp and /dev/shm are private tmpfs in a run: writing there may succeed, but
        // nothing may reach the host (checked after every program). /etc and the test's
        // directory must refuse.
        Program::new(
            "write outside the working directory",
            5,
            WRITE_OUTSIDE,
            |o, host| {
                o.completed()?;
                let written = o.json()?;
                let etc = format!("/etc/{}", host.tag);
                let test_dir = host.dir.path().join(&host.tag).display().to_string();
                for refused in [etc, test_dir] {
                    ensure(written[refused.as_str()] != "written", || {
                        format!("{refused} was written")
                    })?;
                }
                Ok(())
            },
        )
        .with(
            "PATHS",
            py_list(&[
                format!("/etc/{tag}"),
                host.dir.path().join(&tag).display().to_string(),
                format!("/var/tmp/{tag}"),
                format!("/dev/shm/{tag}"),
            ]),
        ),
        // The host's /sys named its network interfaces and their addresses, and every other
        // run's cgroup with its memory use: a run sees none of it. Python still counts the
        // CPUs (glibc reads /proc instead).
        Program::new("look at the host's /sys", 5, HOST_SYS, |o, _| {
            o.completed()?;
            o.stdout_has("sys: []")?;
            o.stdout_has("cpus: ok")
        }),
        // EACCES/EROFS: only a read-only view of the host keeps a run out of a world-writable
        // host directory.
        Program::new(
            "write into a world-writable host directory",
            5,
            "open(@PATH@, 'w').write('x')\nprint('written')\n",
            |o, _| {
                o.failed_with(&[
                    "PermissionError",
                    "Read-only file system",
                    "FileNotFoundError",
                ])
            },
        )
        .with(
            "PATH",
            py_str(&host.world_writable.join(&tag).display().to_string()),
        ),
        // The coordinator's database (every task's code and results) and the agent's state
        // (results not yet delivered) are on this host, in directories a run must not enter,
        // wherever they are (here under the test's 0755 directory).
        Program::new(
            "read the coordinator's database and the agent's state",
            5,
            LIST_DIRS,
            |o, host| {
                o.completed()?;
                let listed = o.json()?;
                for dir in [host.dir.path().join("coordinator"), host.state_dir.clone()] {
                    let dir = dir.display().to_string();
                    ensure(listed[dir.as_str()] == "PermissionError", || {
                        format!("{dir}: {}", listed[dir.as_str()])
                    })?;
                }
                Ok(())
            },
        )
        .with(
            "PATHS",
            py_list(&[
                host.dir.path().join("coordinator").display().to_string(),
                host.state_dir.display().to_string(),
            ]),
        ),
        // The same on a file system of the host's own (a `/home` or `/srv` partition): the
        // remount of `/` read-only leaves other mounts as they were.
        Program::new(
            "write into a world-writable host directory on a mount of its own",
            5,
            "import os\np = @PATH@\nif p:\n    open(p, 'w').write('x')\n    print('written')\nelse:\n    print('no separate mount here')\n",
            |o, host| {
                if host.separate_mount.is_none() {
                    return o.completed();
                }
                o.failed_with(&["PermissionError", "Read-only file system"])
            },
        )
        .with(
            "PATH",
            match &host.separate_mount {
                Some(point) => py_str(&point.join(&tag).display().to_string()),
                None => "None".to_string(),
            },
        ),
        Program::new(
            "leave files in /tmp, /var/tmp, /dev/shm, cwd",
            5,
            LEAVE_FILES,
            |o, _| {
                o.completed()?;
                o.stdout_has("left 4 files")
            },
        )
        .with("PATHS", py_list(&leftovers(&tag))),
        Program::new(
            "look for the files the previous task left",
            5,
            LOOK_FOR_FILES,
            |o, _| {
                o.completed()?;
                let seen = o.json()?;
                let found: Vec<&String> = seen
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(_, v)| **v != json!(false))
                            .map(|(k, _)| k)
                            .collect()
                    })
                    .unwrap_or_default();
                ensure(
                    seen.as_object().is_some_and(|m| m.len() == 4) && found.is_empty(),
                    || format!("the next task found {found:?}"),
                )
            },
        )
        .with("PATHS", py_list(&leftovers(&tag))),
        // Syscalls the seccomp filter refuses; unprivileged, unshare(CLONE_NEWUSER), clone
        // with it and keyctl would succeed and io_uring_setup(1, NULL) would fail with EFAULT
        // instead.
        Program::new(
            "refused syscalls: unshare, keyctl, io_uring_setup, mount, clone(CLONE_NEWUSER), clone3",
            5,
            REFUSED_SYSCALLS,
            |o, _| {
                o.completed()?;
                let errnos = o.json()?;
                let want = json!({
                    "unshare": 1, "keyctl": 1, "io_uring_setup": 1, "mount": 1,
                    "clone_newuser": 1, "clone3": 38,
                });
                ensure(errnos == want, || {
                    format!("errnos {errnos}, expected {want}")
                })
            },
        ),
        Program::new("ptrace", 5, PTRACE, |o, _| {
            o.completed()?;
            let errnos = o.json()?;
            let want = json!({"attach": 1, "traceme": 1});
            ensure(errnos == want, || {
                format!("errnos {errnos}, expected {want} (EPERM)")
            })
        }),
        Program::new(
            "segfault the interpreter",
            5,
            "import ctypes\nctypes.string_at(0)\n",
            |o, _| o.failed_with(&["SIGSEGV"]),
        ),
        Program::new("re-run sys.executable", 5, RERUN_EXECUTABLE, |o, _| {
            o.completed()?;
            ensure(o.result == "7", || "expected the result 7".into())
        }),
        Program::new(
            "multiprocessing (spawn) starts a real python",
            5,
            MULTIPROCESSING_SPAWN,
            |o, _| {
                o.completed()?;
                o.stdout_has("hello from a spawned child")?;
                o.stdout_has("child exit code 0")
            },
        ),
        Program::new("double-fork + setsid daemon", 5, DAEMON, |o, _| {
            o.completed()?;
            o.stdout_has("done")
        }),
        // Without a PID namespace the parent is the agent (cold) or the zygote; in one, the
        // code is PID 1 and its parent is outside (getppid() is 0: kill(0) hits its own
        // group, which the kernel does not let kill its init). Surviving or dying by the
        // signal are both fine; the agent and zygote surviving is checked after every program.
        Program::new("os.kill(os.getppid(), 9)", 5, KILL_PARENT, |o, _| {
            survived_or_killed(o)
        })
        .dangerous(),
        Program::new("os.kill(-1, 9)", 5, KILL_EVERYONE, |o, _| {
            survived_or_killed(o)
        })
        .dangerous(),
        control("control (last): print('ok') completes"),
    ]
}

fn control(name: &'static str) -> Program {
    Program::new(name, 5, "print('ok')\n", |o, _| {
        o.completed()?;
        ensure(o.result == "ok", || "expected the result ok".into())
    })
}

fn leftovers(tag: &str) -> Vec<String> {
    vec![
        format!("/tmp/{tag}"),
        format!("/var/tmp/{tag}"),
        format!("/dev/shm/{tag}"),
        format!("{tag}-in-cwd"),
    ]
}

/// The agent stopped a flood by killing the run, not by waiting for its timeout.
fn flood_stopped(o: &Outcome) -> Check {
    o.failed_with(&["output"])?;
    ensure(!o.error.contains("timed out"), || {
        "the flood ran until its timeout".into()
    })
}

fn survived_or_killed(o: &Outcome) -> Check {
    if o.status == "completed" {
        o.stdout_has("still here")
    } else {
        o.failed_with_exactly("killed by signal 9 (SIGKILL)")
    }
}

fn check_confinement(probe: &Value, host: &Host) -> Check {
    let ExecutorUnderTest { uid, gid, .. } = host.executor;
    ensure(probe["uid"] == json!([uid, uid, uid]), || {
        format!(
            "runs as uid {} (real, effective, saved), expected {uid}",
            probe["uid"]
        )
    })?;
    ensure(probe["gid"] == json!([gid, gid, gid]), || {
        format!("runs as gid {}, expected {gid}", probe["gid"])
    })?;
    ensure(probe["groups"] == json!([]), || {
        format!("supplementary groups {}", probe["groups"])
    })?;
    for (ns, ours) in &host.host_namespaces {
        ensure(probe["ns"][ns] != json!(ours), || {
            format!("the run shares the host's {ns} namespace")
        })?;
    }
    ensure(probe["cwd"] == "/tmp" && probe["home"] == "/tmp", || {
        format!(
            "working directory {} and HOME {}, expected /tmp",
            probe["cwd"], probe["home"]
        )
    })?;
    ensure(probe["tmp_is_tmpfs"] == true, || {
        "/tmp is not a tmpfs".into()
    })?;
    ensure(probe["no_new_privs"] == "1", || {
        "no_new_privs is not set".into()
    })?;
    ensure(probe["seccomp"] == "2", || {
        format!("seccomp mode {}, expected 2 (filter)", probe["seccomp"])
    })
}

/// Whether the probe shows what the dangerous programs need: the sandbox uid and a PID
/// namespace of the run's own.
fn is_confined(probe: &Value, host: &Host) -> bool {
    let uid = host.executor.uid;
    probe["uid"] == json!([uid, uid, uid])
        && host
            .host_namespaces
            .get("pid")
            .is_some_and(|ours| probe["ns"]["pid"] != json!(ours))
}

/// A Python string literal (the values here are plain ASCII paths and names).
fn py_str(value: &str) -> String {
    format!("{value:?}")
}

fn py_list(values: &[String]) -> String {
    let items: Vec<String> = values.iter().map(|v| py_str(v)).collect();
    format!("[{}]", items.join(", "))
}

const PROBE: &str = r#"import json, os
def ns(name):
    try:
        return os.readlink('/proc/self/ns/' + name)
    except OSError as e:
        return type(e).__name__
status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
mounts = [line.split() for line in open('/proc/self/mounts')]
print(json.dumps({
    'pid': os.getpid(),
    'uid': list(os.getresuid()),
    'gid': list(os.getresgid()),
    'groups': os.getgroups(),
    'ns': {n: ns(n) for n in ('pid', 'mnt', 'net', 'ipc', 'uts')},
    'cwd': os.getcwd(),
    'home': os.environ.get('HOME'),
    'tmp_is_tmpfs': any(m[1] == '/tmp' and m[2] == 'tmpfs' for m in mounts),
    'no_new_privs': status.get('NoNewPrivs', '').strip(),
    'seccomp': status.get('Seccomp', '').strip(),
}))
"#;

const CPU_SPIN: &str = r#"import resource
soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
print('cpu limit', 'unlimited' if soft == resource.RLIM_INFINITY else soft, flush=True)
while True:
    pass
"#;

const FORK_BOMB: &str = r#"import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"#;

const RERUN_EXECUTABLE: &str = r#"import subprocess, sys
subprocess.run([sys.executable, '-c', 'print(7)'], check=True)
"#;

const FORK_UNTIL_REFUSED: &str = r#"import os, time
n = 0
try:
    while n < 100000:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        n += 1
except OSError as e:
    print(f'refused after {n} forks: errno {e.errno}')
else:
    print(f'forked {n} processes')
"#;

const THREAD_BOMB: &str = r#"import threading, time
n = 0
try:
    while n < 100000:
        threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
        n += 1
except RuntimeError as e:
    print(f'refused after {n} threads: {e}')
else:
    print(f'started {n} threads')
"#;

const SIGSTOP_ITSELF: &str = r#"import os, signal
os.kill(os.getpid(), signal.SIGSTOP)
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(pid, 0)
print('child resumed')
"#;

const SIGTERM_IGNORED: &str = r#"import signal, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
    signal.signal(s, signal.SIG_IGN)
time.sleep(10**6)
"#;

const SETSID_SPINNER: &str = r#"import os, time
if os.fork() == 0:
    os.setsid()
    end = time.time() + 120
    while time.time() < end:
        pass
    os._exit(0)
time.sleep(10**6)
"#;

const SLOW_MEMORY_GROWTH: &str = r#"import os, select, sys, time
N, MIB = 4, 100
r, w = os.pipe()
for _ in range(N):
    if os.fork() == 0:
        os.close(r)
        held = []
        try:
            for _ in range(MIB):
                held.append(b'x' * 2**20)
                time.sleep(0.002)
        except MemoryError:
            os._exit(3)
        os.write(w, b'.')
        time.sleep(1000)
        os._exit(0)
os.close(w)
grown = 0
while grown < N:
    if select.select([r], [], [], 0.05)[0]:
        grown += len(os.read(r, N))
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        sys.exit(f'a child ended early: {os.waitstatus_to_exitcode(status)}')
print(f'held {N * MIB} MiB across {N} children')
"#;

const BIG_FILE: &str = r#"chunk = b'\0' * 2**20
with open('big', 'wb') as f:
    for _ in range(16 * 1024):
        f.write(chunk)
print('wrote 16 GiB')
"#;

const SPARSE_FILE: &str = r#"with open('sparse', 'wb') as f:
    f.seek(2**40)
    f.write(b'x')
print('wrote a byte at 1 TiB')
"#;

const MILLION_FILES: &str = r#"n = 0
try:
    for n in range(10**6):
        open(f'f{n}', 'w').close()
except OSError as e:
    print(f'stopped after {n} files: errno {e.errno}')
    raise
print('created a million files')
"#;

const MILLION_FDS: &str = r#"import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass
fds = []
try:
    while len(fds) < 10**6:
        fds.append(os.open('/dev/null', os.O_RDONLY))
except OSError as e:
    print(f'refused after {len(fds)} fds: errno {e.errno}')
else:
    print(f'opened {len(fds)} fds')
"#;

const TCP_CONNECT: &str = r#"import socket
s = socket.create_connection(('127.0.0.1', @PORT@), timeout=2)
s.sendall(b'GET /stats HTTP/1.0\r\n\r\n')
print('connected')
"#;

const DNS_LOOKUP: &str = r#"import socket
try:
    print('resolved', socket.getaddrinfo('example.com', 443))
except socket.gaierror as e:
    print('getaddrinfo failed:', e)
# A DNS query for example.com, type A, sent to the test's own socket.
query = bytes.fromhex('abcd01000001000000000000076578616d706c6503636f6d0000010001')
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(query, ('127.0.0.1', @PORT@))
print('query sent')
"#;

const HOST_SECRETS: &str = r#"import glob, json, os
token = @REVERSED@[::-1]
found = [k for k, v in os.environ.items() if token in k or token in v]
for path in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ'):
    try:
        with open(path, 'rb') as f:
            if token.encode() in f.read():
                found.append(path)
    except OSError:
        pass
try:
    open('/etc/shadow').read()
    shadow = 'read'
except OSError as e:
    shadow = type(e).__name__
print(json.dumps({'token_in': found, 'shadow': shadow}))
"#;

/// Tries to list each of `@PATHS@`: `listed` or the exception's name, per path, as JSON.
const LIST_DIRS: &str = r#"import json, os
outcome = {}
for path in @PATHS@:
    try:
        os.listdir(path)
        outcome[path] = 'listed'
    except OSError as e:
        outcome[path] = type(e).__name__
print(json.dumps(outcome))
"#;

/// What a run finds of the host's /sys (nothing, or no /sys at all), and whether Python can
/// still count the CPUs without it.
const HOST_SYS: &str = r#"
import os
seen = sorted(os.listdir("/sys")) if os.path.isdir("/sys") else []
print("sys:", seen)
print("cpus:", "ok" if (os.cpu_count() or 0) >= 1 else os.cpu_count())
"#;

const WRITE_OUTSIDE: &str = r#"import json
outcome = {}
for path in @PATHS@:
    try:
        with open(path, 'w') as f:
            f.write('x')
        outcome[path] = 'written'
    except OSError as e:
        outcome[path] = type(e).__name__
print(json.dumps(outcome))
"#;

const LEAVE_FILES: &str = r#"paths = @PATHS@
for path in paths:
    with open(path, 'w') as f:
        f.write('left behind')
print(f'left {len(paths)} files')
"#;

const LOOK_FOR_FILES: &str = r#"import json, os
print(json.dumps({path: os.path.exists(path) for path in @PATHS@}))
"#;

const REFUSED_SYSCALLS: &str = r#"import ctypes, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
KEYCTL = {'x86_64': 250, 'aarch64': 219}[platform.machine()]
IO_URING_SETUP = 425
CLONE = {'x86_64': 56, 'aarch64': 220}[platform.machine()]
CLONE3 = 435
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
def errno_of(result):
    return 0 if result != -1 else ctypes.get_errno()
def clone_newuser():
    # A raw clone as fork() makes it, plus a new user namespace; should it succeed, the child
    # leaves at once.
    pid = libc.syscall(CLONE, CLONE_NEWUSER | SIGCHLD, None, None, None, None)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
    return errno_of(pid)
errnos = {
    'unshare': errno_of(libc.unshare(CLONE_NEWUSER)),
    # KEYCTL_GET_KEYRING_ID of the session keyring, creating it
    'keyctl': errno_of(libc.syscall(KEYCTL, 0, ctypes.c_long(-3), 1)),
    'io_uring_setup': errno_of(libc.syscall(IO_URING_SETUP, 1, None)),
    # A target that does not exist: unfiltered, even root gets ENOENT, never a mount.
    'mount': errno_of(libc.mount(b'none', b'/nonexistent-lull-target', b'tmpfs', 0, None)),
    'clone_newuser': clone_newuser(),
    # Unfiltered, clone3 without its arguments is EFAULT or EINVAL; the filter answers ENOSYS
    # (so that libc falls back to clone, whose flags it can check).
    'clone3': errno_of(libc.syscall(CLONE3, None, 0)),
}
print(json.dumps(errnos))
"#;

const PTRACE: &str = r#"import ctypes, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_TRACEME, PTRACE_ATTACH = 0, 16
child = os.fork()
if child == 0:
    time.sleep(1000)
    os._exit(0)
def errno_of(result):
    return 0 if result == 0 else ctypes.get_errno()
errnos = {'attach': errno_of(libc.ptrace(PTRACE_ATTACH, child, None, None))}
os.kill(child, 9)
os.waitpid(child, 0)
errnos['traceme'] = errno_of(libc.ptrace(PTRACE_TRACEME, 0, None, None))
print(json.dumps(errnos))
"#;

const MULTIPROCESSING_SPAWN: &str = r#"import multiprocessing
ctx = multiprocessing.get_context('spawn')
p = ctx.Process(target=print, args=('hello from a spawned child',))
p.start()
p.join()
print('child exit code', p.exitcode)
"#;

const DAEMON: &str = r#"import os, signal, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for fd in range(3):
            os.close(fd)
        time.sleep(300)
        os._exit(0)
    os._exit(0)
os.wait()
print('done')
"#;

const KILL_PARENT: &str = r#"import os
try:
    os.kill(os.getppid(), 9)
    print('sent')
except OSError as e:
    print('refused:', type(e).__name__)
print('still here')
"#;

const KILL_EVERYONE: &str = r#"import os
try:
    os.kill(-1, 9)
    print('sent')
except OSError as e:
    print('refused:', type(e).__name__)
print('still here')
"#;

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

struct Suite {
    host: Host,
    coordinator: Coordinator,
    agent: Process,
    node_id: String,
    mem_available_before_kb: u64,
    /// Each program's (or final check's) name and verdict.
    verdicts: Vec<(String, Check)>,
}

impl Suite {
    async fn start(executor: ExecutorUnderTest) -> Suite {
        assert!(
            this_process_is_root(),
            "the hostile suite needs root: runs drop to a sandbox uid, and the test finds \
             their processes by that uid"
        );
        let host = Host::new(executor);
        let mem_available_before_kb = mem_available_kb();
        // Fast heartbeats as in e2e.rs, but the default node TTL: a bomb may starve the
        // agent for a moment, and a run declared lost would be retried (max_attempts is 1
        // below, so that a loss shows as a failure instead of a second bomb).
        let coordinator = Coordinator::start(
            &host.dir.path().join("coordinator"),
            &["--local-agents", "0", "--heartbeat-interval", "0.3"],
        )
        .expect("coordinator");
        let node_id = format!("hostile-{}", executor.name);
        let (uid, gid) = (executor.uid.to_string(), executor.gid.to_string());
        let mut flags = executor.flags.to_vec();
        flags.extend([
            "--node-id",
            &node_id,
            "--heartbeat-interval",
            "0.3",
            "--cpus",
            "1",
            "--memory-mb",
            "2048",
            "--token",
            &host.token,
            "--executor",
            executor.executor,
            "--sandbox-uid",
            &uid,
            "--sandbox-gid",
            &gid,
        ]);
        let agent = start_agent_with_env(
            &coordinator.url,
            &host.state_dir,
            &flags,
            &[
                ("TMPDIR", host.agent_tmp.as_os_str()),
                // Must not reach a run's environment (the secrets program looks for it).
                ("LULL_HOSTILE_AGENT_SECRET", OsStr::new(&host.token)),
            ],
        )
        .expect("agent");
        let mut suite = Suite {
            host,
            coordinator,
            agent,
            node_id,
            mem_available_before_kb,
            verdicts: Vec::new(),
        };
        suite.wait_for_the_agent().await;
        suite
    }

    async fn wait_for_the_agent(&mut self) {
        let c = &self.coordinator;
        let agent = &mut self.agent;
        let joined = poll_until(Duration::from_secs(60), || {
            let running = agent.is_running();
            async move {
                assert!(
                    running,
                    "the agent exited at start (see its stderr above: does it know \
                     --executor, --sandbox-uid and --sandbox-gid?)"
                );
                let stats = c.get("/stats").await.ok()?;
                let nodes = &stats["nodes"];
                (nodes["total"].as_u64()? > nodes["offline"].as_u64()?).then_some(())
            }
        })
        .await;
        assert!(joined.is_some(), "the agent did not join the coordinator");
    }

    async fn run(mut self) {
        let executor = self.host.executor;
        let port: u16 = self
            .coordinator
            .addr()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .expect("coordinator port");
        let programs = programs(&self.host, port);

        let mut confined: Option<bool> = None;
        let mut helpers: Option<Vec<HostProcess>> = None;
        for program in &programs {
            if program.needs_confinement && confined != Some(true) {
                self.verdicts
                    .push((program.name.to_string(), Err(NOT_CONFINED.into())));
                continue;
            }
            let (outcome, verdict) = self.run_one(program).await;
            if program.name == PROBE_NAME {
                confined = Some(
                    outcome
                        .as_ref()
                        .and_then(|o| o.json().ok())
                        .is_some_and(|probe| is_confined(&probe, &self.host)),
                );
            }
            let mut verdict = verdict;
            let problems = self.after_program(helpers.as_deref()).await;
            if !problems.is_empty() {
                let mut all = verdict.err().map(|e| vec![e]).unwrap_or_default();
                all.extend(problems);
                verdict = Err(all.join("; "));
            }
            eprintln!(
                "[{}] {}: {}",
                executor.name,
                program.name,
                match (&verdict, &outcome) {
                    (Ok(()), Some(o)) => format!("ok ({})", o.brief()),
                    (Ok(()), None) => "ok".to_string(),
                    (Err(e), _) => format!("FAILED: {e}"),
                }
            );
            self.verdicts.push((program.name.to_string(), verdict));
            if !self.agent.is_running() {
                self.verdicts
                    .push(("the agent survives".into(), Err("the agent died".into())));
                break;
            }
            // The agent's helpers (the zygote), as they are once the first run is over: the
            // same processes must serve to the end.
            if helpers.is_none() {
                let found = helpers_of(self.agent.pid(), executor.uid);
                eprintln!(
                    "[{}] the agent's helpers: {}",
                    executor.name,
                    describe_processes(&found)
                );
                helpers = Some(found);
            }
        }
        if self.agent.is_running() {
            self.after_the_suite(helpers.unwrap_or_default()).await;
        }
        self.report();
    }

    /// Submits one program, waits for its task to end (a hang is a failure), checks it.
    async fn run_one(&self, program: &Program) -> (Option<Outcome>, Check) {
        let c = &self.coordinator;
        let submitted = c
            .post(
                "/api/v1/tasks",
                &json!({
                    "code": program.code,
                    "timeout": program.timeout_secs,
                    "resources": {"cpu": 1, "memory": MEMORY_MB},
                    "max_attempts": 1,
                }),
            )
            .await;
        let id = match submitted.map(|task| task["task_id"].as_i64()) {
            Ok(Some(id)) => id,
            Ok(None) => return (None, Err("the submission answered no task_id".into())),
            Err(err) => return (None, Err(format!("could not submit: {err:#}"))),
        };
        // Far beyond the program's own timeout: only a run that never ends reaches it.
        let limit = Duration::from_secs(program.timeout_secs + 60);
        let task = poll_until(limit, || async {
            let task = c.task(id).await.ok()?;
            matches!(
                task["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
            .then_some(task)
        })
        .await;
        let Some(task) = task else {
            let now = c.task(id).await.map(|t| t.to_string()).unwrap_or_default();
            return (
                None,
                Err(format!("task {id} did not end within {limit:?}: {now}")),
            );
        };
        let outcome = Outcome::of(&task);
        let verdict = (program.expect)(&outcome, &self.host)
            .map_err(|e| format!("{e}; observed {}", outcome.summary()));
        (Some(outcome), verdict)
    }

    /// After each program: nothing of the run remains, and the agent and its helpers are
    /// the same processes. Strays are killed (by pid) so the next program starts clean.
    async fn after_program(&self, helpers: Option<&[HostProcess]>) -> Vec<String> {
        let mut problems = Vec::new();
        let uid = self.host.executor.uid;
        let strays = poll_until(CLEANUP_LIMIT, || async {
            let left = processes_owned_by(uid);
            left.is_empty().then_some(())
        })
        .await;
        if strays.is_none() {
            let left = processes_owned_by(uid);
            problems.push(format!(
                "{} process(es) of uid {uid} outlived the run by {CLEANUP_LIMIT:?}: {}",
                left.len(),
                describe_processes(&left)
            ));
            for p in &left {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        // Removed once reported, so that only the program that wrote a file is blamed.
        let on_host = self.host.existing_forbidden_paths();
        if !on_host.is_empty() {
            problems.push(format!("left on the host: {on_host:?}"));
            for path in on_host {
                let _ = std::fs::remove_file(path);
            }
        }
        for helper in helpers.unwrap_or_default() {
            if !helper.is_alive() {
                problems.push(format!(
                    "the agent's helper {} {:?} died",
                    helper.pid, helper.name
                ));
            }
        }
        problems
    }

    async fn after_the_suite(&mut self, helpers: Vec<HostProcess>) {
        let executor = self.host.executor;
        let normal = Program::new(
            "after the suite: a normal task completes",
            5,
            "print(sum(range(1000)))\n",
            |o, _| {
                o.completed()?;
                ensure(o.result == "499500", || "expected 499500".into())
            },
        );
        let (_, verdict) = self.run_one(&normal).await;
        self.verdicts.push((normal.name.into(), verdict));

        let left = processes_owned_by(executor.uid);
        self.verdicts.push((
            "after the suite: no process of the sandbox uid remains".into(),
            ensure(left.is_empty(), || describe_processes(&left)),
        ));

        let dead: Vec<HostProcess> = helpers.into_iter().filter(|h| !h.is_alive()).collect();
        self.verdicts.push((
            "after the suite: the agent and its helpers are the processes that started".into(),
            ensure(self.agent.is_running() && dead.is_empty(), || {
                format!("died: {}", describe_processes(&dead))
            }),
        ));
        // The zygote serves both executors (launching cold runs), unless kept from starting.
        if executor.flags.is_empty() {
            let helpers = helpers_of(self.agent.pid(), executor.uid);
            self.verdicts.push((
                "after the suite: a zygote process serves the agent".into(),
                ensure(helpers.iter().any(|h| h.name.contains("zygote")), || {
                    format!("the agent's children: {}", describe_processes(&helpers))
                }),
            ));
        }

        let dirs = self.host.leftover_run_dirs();
        self.verdicts.push((
            "after the suite: no run directory remains".into(),
            ensure(dirs.is_empty(), || format!("{dirs:?}")),
        ));
        let files = self.host.existing_forbidden_paths();
        self.verdicts.push((
            "after the suite: no file a program wrote exists on the host".into(),
            ensure(files.is_empty(), || format!("{files:?}")),
        ));

        // Bounded wait: memory held by a run (a tmpfs not yet unmounted) is freed shortly
        // after it ends; what never comes back is a leak.
        let before = self.mem_available_before_kb;
        let recovered = poll_until(Duration::from_secs(60), || async {
            (mem_available_kb() + MEMORY_MARGIN_KB >= before).then_some(())
        })
        .await;
        self.verdicts.push((
            "after the suite: host memory is unaffected".into(),
            ensure(recovered.is_some(), || {
                format!(
                    "MemAvailable {} kB, {} kB before the suite",
                    mem_available_kb(),
                    before
                )
            }),
        ));

        let node = self.node_record().await;
        self.verdicts.push((
            "the node reports the best sandbox level this host allows, and its executor".into(),
            node.and_then(|node| {
                let want = best_sandbox_level_for_this_host();
                ensure(node["sandbox"]["level"] == want, || {
                    format!(
                        "level {}, expected {want}: {node}",
                        node["sandbox"]["level"]
                    )
                })?;
                ensure(node["sandbox"]["cgroups"] == self.host.has_cgroups, || {
                    format!(
                        "cgroups {}, expected {} on this host: {node}",
                        node["sandbox"]["cgroups"], self.host.has_cgroups
                    )
                })?;
                ensure(node["executor"] == executor.executor, || {
                    format!(
                        "executor {}, expected {}",
                        node["executor"], executor.executor
                    )
                })
            }),
        ));
    }

    /// This agent's entry in `GET /api/v1/nodes`, once it carries the sandbox level.
    async fn node_record(&self) -> Result<Value, String> {
        let c = &self.coordinator;
        let node_id = &self.node_id;
        let found = poll_until(Duration::from_secs(10), || async {
            let nodes = c.get("/api/v1/nodes").await.ok()?;
            nodes["items"]
                .as_array()?
                .iter()
                .find(|n| n["node_id"] == json!(node_id) && n["sandbox"]["level"].is_string())
                .cloned()
        })
        .await;
        if let Some(node) = found {
            return Ok(node);
        }
        let answer = match c.http.get(format!("{}/api/v1/nodes", c.url)).send().await {
            Ok(resp) => format!(
                "{}: {}",
                resp.status(),
                clip(&resp.text().await.unwrap_or_default())
            ),
            Err(err) => err.to_string(),
        };
        Err(format!(
            "GET /api/v1/nodes has no entry for {node_id} with a sandbox level: {answer}"
        ))
    }

    /// Prints every verdict, then fails the test if any failed.
    fn report(self) {
        let executor = self.host.executor.name;
        let mut summary = String::new();
        let failed: Vec<&(String, Check)> =
            self.verdicts.iter().filter(|(_, v)| v.is_err()).collect();
        let _ = writeln!(
            summary,
            "{} of {} checks failed with the {executor} executor:",
            failed.len(),
            self.verdicts.len()
        );
        for (name, verdict) in &failed {
            if let Err(e) = verdict {
                let _ = writeln!(summary, "  - {name}: {e}");
            }
        }
        eprintln!("[{executor}] {summary}");
        assert!(failed.is_empty(), "{summary}");
    }
}
