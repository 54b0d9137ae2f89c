//! A run's own word on how it ended, sent to the zygote before its exit.
//!
//! A process's exit is not quick: the kernel tears its address space down (a copy of the
//! zygote's page tables) and then its mount, IPC and PID namespaces, and only then tells the
//! parent (0.57 ms p50 per run on the 2-core machine of BENCHMARKS.md, from `exit_group` to
//! the zygote's SIGCHLD). A run's process whose code is done therefore closes its stdout and
//! stderr (its reader sees their end at once), writes one [`EndReport`] on
//! `lull_agent::sandbox::REPORT_FD`, and exits; the zygote, on reading it, kills the run
//! (it is on its way out; nothing of it may outlive its report) and reports the exit to the
//! agent straight away. The reap that follows gives back what the run was lent, and reports
//! nothing more. A run that ends any other way (a signal, `os._exit`, a failed setup) writes
//! nothing, and is reported at its reap as before.
//!
//! The descriptor is the run's, so its code can write on it too: what it writes is believed
//! only as a whole report (then the run is killed at once, as if it had called
//! `os._exit(status)` with the usage it named), and anything else gets the run killed, and
//! reported at its reap as killed by SIGKILL. Either way a run can only misreport itself.

use nix::sys::resource::{Usage, UsageWho, getrusage};
use nix::sys::time::TimeValLike;

/// The size of a report: the exit status, then the CPU time in microseconds and the peak RSS
/// in KiB, both little-endian `u64`.
pub(crate) const REPORT_BYTES: usize = 17;

/// How a run's process ended, by its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndReport {
    /// What the kernel would report as its exit status (the low 8 bits of `_exit`'s).
    pub(crate) status: u8,
    /// User and system CPU of the process and of the children it waited for.
    pub(crate) cpu_micros: u64,
    /// The larger peak resident set of the process and of those children.
    pub(crate) max_rss_kib: u64,
}

impl EndReport {
    /// This process's report for exit status `status`, from its own resource usage.
    pub(crate) fn of_this_process(status: i32) -> EndReport {
        let micros = |usage: &Usage| {
            let total =
                usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
            u64::try_from(total).unwrap_or(0)
        };
        let rss = |usage: &Usage| u64::try_from(usage.max_rss()).unwrap_or(0);
        let own = getrusage(UsageWho::RUSAGE_SELF).ok();
        let children = getrusage(UsageWho::RUSAGE_CHILDREN).ok();
        let usages = [own, children];
        EndReport {
            // The low byte, as `_exit` passes it on.
            status: (status & 0xff) as u8,
            cpu_micros: usages.iter().flatten().map(micros).sum(),
            max_rss_kib: usages.iter().flatten().map(rss).max().unwrap_or(0),
        }
    }

    pub(crate) fn encode(&self) -> [u8; REPORT_BYTES] {
        let mut bytes = [0u8; REPORT_BYTES];
        bytes[0] = self.status;
        bytes[1..9].copy_from_slice(&self.cpu_micros.to_le_bytes());
        bytes[9..17].copy_from_slice(&self.max_rss_kib.to_le_bytes());
        bytes
    }

    /// A whole report, or `None` for anything else (short, long, or not one at all).
    pub(crate) fn decode(bytes: &[u8]) -> Option<EndReport> {
        let bytes: &[u8; REPORT_BYTES] = bytes.try_into().ok()?;
        let word =
            |range: std::ops::Range<usize>| bytes[range].try_into().ok().map(u64::from_le_bytes);
        Some(EndReport {
            status: bytes[0],
            cpu_micros: word(1..9)?,
            max_rss_kib: word(9..17)?,
        })
    }

    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.cpu_micros as f64 / 1e6
    }

    pub(crate) fn max_rss_mb(&self) -> f64 {
        self.max_rss_kib as f64 / 1024.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_as_written() {
        let report = EndReport {
            status: 3,
            cpu_micros: 1_234_567,
            max_rss_kib: 20_480,
        };
        let bytes = report.encode();

        assert_eq!(EndReport::decode(&bytes), Some(report));
        assert_eq!(report.cpu_seconds(), 1.234567);
        assert_eq!(report.max_rss_mb(), 20.0);
    }

    #[test]
    fn only_a_whole_report_is_one() {
        let bytes = EndReport {
            status: 0,
            cpu_micros: 1,
            max_rss_kib: 1,
        }
        .encode();

        assert_eq!(EndReport::decode(&bytes[..REPORT_BYTES - 1]), None);
        assert_eq!(EndReport::decode(&[bytes.as_slice(), b"x"].concat()), None);
        assert_eq!(EndReport::decode(b""), None);
    }

    #[test]
    fn this_process_reports_the_low_byte_of_its_status_and_its_own_usage() {
        let report = EndReport::of_this_process(256 + 7);

        assert_eq!(report.status, 7);
        assert!(report.max_rss_kib > 0, "{report:?}");
    }
}
