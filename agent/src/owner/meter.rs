//! The owner's load: the host's CPU and memory use minus Lull's own, read from `/proc`.
//!
//! Lull's own is the agent's process tree: the agent, its executors and every run (a run's
//! processes all descend from the agent: the zygote forks them, or the cold launcher does,
//! and a run's PID namespace reaps its orphans inside it). CPU is counted as a monotonic
//! counter over the tree: each live process's `utime + stime` plus `cutime + cstime` (the
//! time of children it has reaped), so a run that ended between two samples is still
//! counted as ours. Host CPU comes from `/proc/stat` in the same unit (clock ticks) over the
//! same interval. Memory is the resident set of the tree (an overestimate: pages the zygote
//! shares with its forks count once per process, so the owner's share errs low).
//!
//! Architecture Invariant: measuring never fails the agent; what cannot be read counts as
//! zero (a process that vanished mid-scan, a host without `/proc`).

use super::OwnerLoad;
use std::collections::HashMap;
use std::fs;

/// CPU ticks of the whole host: (busy, total) since boot.
fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some((busy, busy + idle + iowait + steal))
}

/// Bytes of memory in use on the host (total minus available) and in all.
fn host_memory() -> Option<(u64, u64)> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((total.saturating_sub(available) * 1024, total * 1024))
}

/// One process as `/proc/PID/stat` says.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    cpu_ticks: u64,
    rss_pages: u64,
}

/// Parses `/proc/PID/stat` (the command name may hold spaces and parentheses: the fields
/// start after the last `)`).
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is state (field 3 of the man page); field N is fields[N - 3].
    let at = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(at(4)?).ok()?,
        cpu_ticks: at(14)? + at(15)? + at(16)? + at(17)?,
        rss_pages: at(24)?,
    })
}

/// Every live process's stat, by pid.
fn all_processes() -> HashMap<u32, ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|entry| {
        let pid = entry.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
        let stat = parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        Some((pid, stat))
    })
    .collect()
}

/// The pids of `root` and every live process descending from it.
pub(super) fn descendants(root: u32) -> Vec<u32> {
    tree_of(root, &all_processes())
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// `root` and every process descending from it.
fn tree_of(root: u32, processes: &HashMap<u32, ProcStat>) -> Vec<(u32, ProcStat)> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, stat) in processes {
        children.entry(stat.ppid).or_default().push(*pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Some(stat) = processes.get(&pid) {
            out.push((pid, *stat));
        }
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().copied().filter(|kid| *kid != pid));
        }
    }
    out
}

/// CPU ticks (reaped children included) and resident pages of `root`'s whole tree.
fn ours(root: u32) -> (u64, u64) {
    let tree = tree_of(root, &all_processes());
    (
        tree.iter().map(|(_, p)| p.cpu_ticks).sum(),
        tree.iter().map(|(_, p)| p.rss_pages).sum(),
    )
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy)]
struct Reading {
    host_busy: u64,
    host_total: u64,
    ours: u64,
}

/// Measures the owner's load between consecutive calls.
#[derive(Debug)]
pub(crate) struct OwnerMeter {
    root: u32,
    page_bytes: u64,
    last: Option<Reading>,
}

impl OwnerMeter {
    /// Measures everything outside the process tree rooted at `root` (the agent's own pid).
    pub(crate) fn new(root: u32) -> Self {
        let page_bytes = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|bytes| u64::try_from(bytes).ok())
            .unwrap_or(4096);
        let mut meter = OwnerMeter {
            root,
            page_bytes,
            last: None,
        };
        // The first reading only primes the counters.
        let _ = meter.measure();
        meter
    }

    /// The owner's load since the previous call (zero CPU on the first).
    pub(crate) fn measure(&mut self) -> OwnerLoad {
        let (ours_ticks, ours_pages) = ours(self.root);
        let ours_bytes = ours_pages * self.page_bytes;

        let cpu_percent = match host_cpu_ticks() {
            Some((host_busy, host_total)) => {
                let now = Reading {
                    host_busy,
                    host_total,
                    ours: ours_ticks,
                };
                let percent = self.last.map_or(0.0, |last| owner_cpu_percent(last, now));
                self.last = Some(now);
                percent
            }
            None => 0.0,
        };
        let memory_percent = match host_memory() {
            Some((used, total)) if total > 0 => {
                used.saturating_sub(ours_bytes) as f64 * 100.0 / total as f64
            }
            _ => 0.0,
        };
        OwnerLoad {
            cpu_percent,
            memory_percent,
        }
    }
}

/// The owner's CPU share between two readings: host busy time minus ours, over all time.
fn owner_cpu_percent(before: Reading, after: Reading) -> f64 {
    let total = after.host_total.saturating_sub(before.host_total);
    if total == 0 {
        return 0.0;
    }
    let host_busy = after.host_busy.saturating_sub(before.host_busy);
    // A counter of ours can shrink when a process whose children were ours is reaped by
    // someone else; then this interval counts none of ours.
    let ours = after.ours.saturating_sub(before.ours);
    let owner = host_busy.saturating_sub(ours);
    (owner as f64 * 100.0 / total as f64).clamp(0.0, 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "1234 (a (weird) name) S 99 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 12345 1000000 321 18446744073709551615";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.ppid, 99);
        assert_eq!(stat.cpu_ticks, 250 + 50 + 7 + 3);
        assert_eq!(stat.rss_pages, 321);
    }

    #[test]
    fn the_owner_is_the_host_minus_us() {
        let before = Reading {
            host_busy: 1000,
            host_total: 5000,
            ours: 200,
        };
        let after = Reading {
            host_busy: 1150,
            host_total: 5200,
            ours: 250,
        };
        // 150 busy of 200, 50 of them ours: the owner used 100 of 200.
        assert_eq!(owner_cpu_percent(before, after), 50.0);
    }

    #[test]
    fn we_never_make_the_owner_negative() {
        let before = Reading {
            host_busy: 0,
            host_total: 0,
            ours: 0,
        };
        let after = Reading {
            host_busy: 10,
            host_total: 100,
            ours: 40,
        };
        assert_eq!(owner_cpu_percent(before, after), 0.0);
    }

    #[test]
    fn the_tree_holds_descendants_only() {
        let stat = |ppid| ProcStat {
            ppid,
            cpu_ticks: 1,
            rss_pages: 1,
        };
        let processes: HashMap<u32, ProcStat> = [
            (10, stat(1)),
            (11, stat(10)),
            (12, stat(11)),
            (20, stat(1)),
            (21, stat(20)),
        ]
        .into_iter()
        .collect();
        assert_eq!(tree_of(10, &processes).len(), 3);
        assert_eq!(tree_of(20, &processes).len(), 2);
        assert_eq!(tree_of(99, &processes).len(), 0);
    }

    #[test]
    fn cpu_burnt_by_a_child_counts_as_ours_even_after_it_is_reaped() {
        let (before, _) = ours(std::process::id());
        let status = std::process::Command::new("python3")
            .args([
                "-c",
                "import time\ns = time.process_time()\nwhile time.process_time() - s < 0.5: pass",
            ])
            .status()
            .expect("python3 runs");
        assert!(status.success());
        let (after, _) = ours(std::process::id());
        // 0.5 s of CPU is 50 ticks at the usual 100 Hz; other threads only add.
        assert!(
            after - before >= 40,
            "ours grew by {} ticks",
            after - before
        );
    }

    #[test]
    fn this_process_measures_without_failing() {
        let mut meter = OwnerMeter::new(std::process::id());
        let load = meter.measure();
        assert!((0.0..=100.0).contains(&load.cpu_percent));
        assert!((0.0..=100.0).contains(&load.memory_percent));
    }
}
