//! Live-feed fan-out benchmark (not a test): N WebSocket clients on `/ws/updates` of a release
//! coordinator while tasks flow, reporting the events published per second, the messages
//! delivered, the delay from publication (`ts` in the message) to receipt, `lagged` notices,
//! and the CPU the coordinator and this program each used.
//!
//! ```sh
//! cargo build --release -p lull-coordinator --bins --examples
//! target/release/examples/ws_fanout --clients 1000 --events-per-second 5000 --seconds 10
//! target/release/examples/ws_fanout --clients 1000 --tasks 2000     # as fast as it goes
//! ```
//!
//! `--json FILE` appends one JSON record per run (`"bench": "fanout"`), which
//! `bench/charts.py` draws.
//!
//! It starts `lull-coordinator` (next to `examples/`, `--local-agents 0`, data in a temporary
//! directory) and stops it by PID afterwards. The events are real: tasks flow through the
//! `loadgen` benchmark's simulated agents (`loadgen/sim.rs`: batches to
//! `POST /api/v1/tasks/batch`, long-polls of `GET /internal/task`, results together to
//! `POST /internal/results`), and each task publishes three events (created, started,
//! completed). With `--events-per-second R` the tasks are submitted open loop at R/3 per
//! second for `--seconds`; without it, `--tasks` as fast as they are answered.
//!
//! With `--batch-messages` the clients subscribe with `?batch=true`: each message is a JSON array of
//! the events of one commit (at most 16).
//!
//! The clients share this machine's cores with the coordinator; the CPU each side used (from
//! `/proc/PID/stat`, over the same window) says what the coordinator itself costs. A client
//! does not parse each event whole: it scans the message for each event's `seq` and `ts`
//! (a message holding a `lagged` notice is parsed whole), checks that the seqs follow one
//! another with no gap a notice does not account for, and records each event's delay.

#![forbid(unsafe_code)]

// Shared with `loadgen`, which uses all of it.
#[path = "loadgen/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "loadgen/sim.rs"]
#[allow(dead_code)]
mod sim;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use process::{cores, sample, start_coordinator};
use sim::{Phase, Plan};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Events each task publishes: `task_created`, `task_started`, `task_completed`.
const EVENTS_PER_TASK: f64 = 3.0;

#[derive(Debug, Parser)]
#[command(name = "ws_fanout", about = "Lull live-feed fan-out benchmark")]
struct Cli {
    /// WebSocket clients on `/ws/updates`, all following every event.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Publish at this many events per second (open loop) for `--seconds`; without it,
    /// `--tasks` tasks flow as fast as the coordinator takes them.
    #[arg(long)]
    events_per_second: Option<f64>,
    /// With `--events-per-second`: how long to publish.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Without `--events-per-second`: tasks to run (three events each).
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Tasks per submission (`POST /api/v1/tasks/batch`; 1: `POST /submit`).
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Submissions in flight at once.
    #[arg(long, default_value_t = 4)]
    submitters: usize,
    /// SQLite durability of the coordinator.
    #[arg(long, default_value = "normal")]
    sync: String,
    /// Longest the clients may take, after the last task, to receive the newest event.
    #[arg(long, default_value_t = 120.0)]
    drain_seconds: f64,
    /// Subscribe with `?batch=true` (messages are arrays of events).
    #[arg(long)]
    batch_messages: bool,
    /// Append one JSON record of the run to this file (for bench/charts.py).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One event as a client's scan finds it.
struct Seen {
    seq: u64,
    ts: f64,
    /// `Some` for a `lagged` notice: how many events it says were dropped (0 for `null`).
    missed: Option<u64>,
}

/// The events of one message (an object, or an array of them), in order. The feed encodes
/// each as `{"event":"…","data":{…},"seq":N,"ts":T}` with `serde_json` (no spaces), and an
/// unescaped `"` cannot occur inside a JSON string, so `"seq":` is found only where it is a
/// key: no `data` of these events has a key of that name. A message holding a `lagged`
/// notice (rare) is parsed whole instead. The numbers after the keys are read by hand
/// ([`integer`], [`decimal`]): the clients share the coordinator's cores, and what they
/// spend per event is taken from it.
fn scan(text: &str, mut each: impl FnMut(Seen) -> anyhow::Result<()>) -> anyhow::Result<()> {
    const SEQ_KEY: &[u8] = br#""seq":"#;
    const TS_KEY: &[u8] = br#","ts":"#;
    static SEQ: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(SEQ_KEY));
    static LAGGED: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(br#""event":"lagged""#));
    if LAGGED.find(text.as_bytes()).is_some() {
        return scan_whole(text, each);
    }
    let mut rest = text.as_bytes();
    let mut found = false;
    while let Some(at) = SEQ.find(rest) {
        rest = &rest[at + SEQ_KEY.len()..];
        let (seq, used) = integer(rest).context("seq")?;
        rest = rest[used..].strip_prefix(TS_KEY).context("ts after seq")?;
        let (ts, used) = decimal(rest).context("ts")?;
        rest = &rest[used..];
        each(Seen {
            seq,
            ts,
            missed: None,
        })?;
        found = true;
    }
    anyhow::ensure!(found, "a message without an event: {text:.200}");
    Ok(())
}

/// The unsigned integer `bytes` start with, and how many bytes it takes.
fn integer(bytes: &[u8]) -> Option<(u64, usize)> {
    let len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for &digit in &bytes[..len] {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(digit - b'0'))?;
    }
    (len > 0).then_some((value, len))
}

/// The number `bytes` start with, and how many bytes it takes: `I` or `I.F` read by hand
/// (what `serde_json` writes for a time of day in seconds), anything else (an exponent, a
/// sign) by `str::parse`.
fn decimal(bytes: &[u8]) -> Option<(f64, usize)> {
    let end = bytes
        .iter()
        .position(|&b| matches!(b, b',' | b'}' | b']'))
        .unwrap_or(bytes.len());
    let number = &bytes[..end];
    let plain = || {
        let (whole, used) = integer(number)?;
        match number[used..].split_first() {
            None => Some(whole as f64),
            Some((b'.', fraction)) => {
                let (digits, len) = integer(fraction)?;
                (len == fraction.len() && len <= 18)
                    .then(|| whole as f64 + digits as f64 / 10f64.powi(len as i32))
            }
            Some(_) => None,
        }
    };
    let value = plain().or_else(|| std::str::from_utf8(number).ok()?.parse().ok())?;
    Some((value, end))
}

/// [`scan`] by parsing every event of the message.
fn scan_whole(text: &str, mut each: impl FnMut(Seen) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let events: Vec<lull_shared::FeedMessage> = if text.starts_with('[') {
        serde_json::from_str(text)
    } else {
        serde_json::from_str(text).map(|one| vec![one])
    }
    .context("a feed message")?;
    for event in events {
        let missed = (event.event == lull_shared::FeedEventKind::Lagged)
            .then(|| event.data["missed"].as_u64().unwrap_or(0));
        each(Seen {
            seq: event.seq,
            ts: event.ts,
            missed,
        })?;
    }
    Ok(())
}

/// Delays in buckets from 10 µs up, [`BUCKETS_PER_OCTAVE`] to each doubling (a million
/// clients' worth of frames would not fit as a list): percentiles are read to within 0.8 %.
/// A delay's bucket comes from the bits of its `f64` (exponent and top of the mantissa), not
/// a logarithm: it is taken for every event every client receives.
#[derive(Clone)]
struct Delays {
    buckets: Vec<u64>,
    count: u64,
    max: f64,
}

const SMALLEST_DELAY: f64 = 1e-5;
const BUCKETS_PER_OCTAVE: usize = 128;
/// Octaves above 10 µs: 10 µs × 2^30 ≈ 3 hours.
const OCTAVES: usize = 30;
const BUCKETS: usize = 1 + OCTAVES * BUCKETS_PER_OCTAVE;

impl Delays {
    fn new() -> Delays {
        Delays {
            buckets: vec![0; BUCKETS],
            count: 0,
            max: 0.0,
        }
    }

    /// Bucket 0 holds delays up to 10 µs; bucket `1 + o × B + m` those in octave `o` above
    /// it whose mantissa's top bits say `m` (of `B` equal parts of the octave).
    fn index(seconds: f64) -> usize {
        let ratio = seconds / SMALLEST_DELAY;
        if ratio.is_nan() || ratio <= 1.0 {
            return 0;
        }
        let bits = ratio.to_bits();
        let octave = ((bits >> 52) & 0x7ff) as usize - 1023;
        let part = ((bits >> (52 - BUCKETS_PER_OCTAVE.trailing_zeros())) as usize)
            & (BUCKETS_PER_OCTAVE - 1);
        (1 + octave * BUCKETS_PER_OCTAVE + part).min(BUCKETS - 1)
    }

    /// The largest delay bucket `index` holds.
    fn upper_bound(index: usize) -> f64 {
        if index == 0 {
            return SMALLEST_DELAY;
        }
        let octave = (index - 1) / BUCKETS_PER_OCTAVE;
        let part = (index - 1) % BUCKETS_PER_OCTAVE;
        SMALLEST_DELAY
            * 2f64.powi(octave as i32)
            * (1.0 + (part + 1) as f64 / BUCKETS_PER_OCTAVE as f64)
    }

    fn record(&mut self, seconds: f64) {
        let seconds = seconds.max(0.0);
        self.buckets[Delays::index(seconds)] += 1;
        self.count += 1;
        self.max = self.max.max(seconds);
    }

    fn merge(&mut self, other: &Delays) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The `p`th percentile (0–100), seconds: the upper bound of its bucket.
    fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Delays::upper_bound(i).min(self.max);
            }
        }
        self.max
    }
}

struct ClientReport {
    delays: Delays,
    /// WebSocket messages received (with `--batch-messages`, each holds one or more events).
    messages: u64,
    lagged: u64,
    /// Events the `lagged` notices said were dropped.
    missed: u64,
}

/// One subscriber: reads until it has seen `target` (once it is known), recording delays.
async fn client(
    url: String,
    mut target: watch::Receiver<Option<u64>>,
    connected: Arc<AtomicUsize>,
) -> anyhow::Result<ClientReport> {
    // A read buffer of 8 kB, not 128: the WebSocket layer zeroes its free part before each
    // read, and 1,000 clients doing so took 5 % of the two cores from the coordinator.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), false)
        .await
        .context("connect")?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut report = ClientReport {
        delays: Delays::new(),
        messages: 0,
        lagged: 0,
        missed: 0,
    };
    let mut newest = 0;
    loop {
        if target.borrow().is_some_and(|t| newest >= t) {
            return Ok(report);
        }
        tokio::select! {
            changed = target.changed() => {
                if changed.is_err() {
                    anyhow::bail!("gave up at seq {newest}");
                }
            }
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let received = unix_now();
                    report.messages += 1;
                    scan(&text, |event| {
                        // Every event arrives once, in order: a seq that does not follow
                        // the last one must be accounted for by a `lagged` notice.
                        if let Some(missed) = event.missed {
                            report.lagged += 1;
                            report.missed += missed;
                            newest = event.seq + missed;
                            return Ok(());
                        }
                        anyhow::ensure!(
                            newest == 0 || event.seq == newest + 1,
                            "seq {} after {newest}, with no lagged notice between",
                            event.seq
                        );
                        report.delays.record(received - event.ts);
                        newest = event.seq;
                        Ok(())
                    })?;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("read: {e}"),
                None => anyhow::bail!("the coordinator closed the feed"),
            },
        }
    }
}

async fn newest_seq(http: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let health: serde_json::Value = http
        .get(format!("{base}/health"))
        .send()
        .await?
        .json()
        .await?;
    health["feed"]["newest_seq"]
        .as_u64()
        .context("/health without feed.newest_seq")
}

fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

async fn fanout(
    cli: &Cli,
    pid: u32,
    base: &str,
    clients_runtime: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let http = sim::http_client()?;
    let ws_url = format!(
        "ws{}/ws/updates{}",
        base.trim_start_matches("http"),
        if cli.batch_messages {
            "?batch=true"
        } else {
            ""
        }
    );
    let (target_tx, target_rx) = watch::channel(None);
    let connected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..cli.clients)
        .map(|_| {
            clients_runtime.spawn(client(ws_url.clone(), target_rx.clone(), connected.clone()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < cli.clients {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} clients connected",
            connected.load(Ordering::Relaxed),
            cli.clients
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (tasks, task_rate) = match cli.events_per_second {
        Some(rate) => (
            (rate * cli.seconds / EVENTS_PER_TASK).round() as usize,
            Some(rate / EVENTS_PER_TASK),
        ),
        None => (cli.tasks, None),
    };
    eprintln!(
        "{} clients connected; {tasks} tasks at {}",
        cli.clients,
        task_rate.map_or("full speed".into(), |r| format!("{r:.0} tasks/s"))
    );
    let plan = Plan {
        nodes: 4,
        pullers: 4,
        slots: 64,
        tasks,
        submitters: cli.submitters,
        task_rate,
        batch: cli.batch.clamp(1, 1000),
        batch_results: true,
        ..Plan::new(base)
    };
    let first_seq = newest_seq(&http, base).await?;
    let (me, coordinator) = (std::process::id().to_string(), pid.to_string());
    let mut marks = Vec::new();
    let outcome = sim::run(plan, |phase| {
        if phase == Phase::WindowStart {
            marks.push((sample(&coordinator), sample(&me)));
        }
    })
    .await?;
    anyhow::ensure!(
        outcome.exactly_once(tasks),
        "not every task completed exactly once ({} of {tasks})",
        outcome.completed_once
    );
    let published_by = sample(&coordinator);
    let newest = newest_seq(&http, base).await?;
    let _ = target_tx.send(Some(newest));

    let mut delays = Delays::new();
    let (mut messages, mut lagged, mut missed, mut failed) = (0, 0, 0, 0);
    let drain = tokio::time::sleep(Duration::from_secs_f64(cli.drain_seconds));
    tokio::pin!(drain);
    let mut waiting = futures::stream::iter(clients).buffer_unordered(cli.clients.max(1));
    loop {
        tokio::select! {
            next = waiting.next() => match next {
                None => break,
                Some(Ok(Ok(report))) => {
                    delays.merge(&report.delays);
                    messages += report.messages;
                    lagged += report.lagged;
                    missed += report.missed;
                }
                Some(Ok(Err(e))) => {
                    failed += 1;
                    eprintln!("client failed: {e:#}");
                }
                Some(Err(e)) => {
                    failed += 1;
                    eprintln!("client panicked: {e}");
                }
            },
            _ = &mut drain => {
                // Dropping the sender tells every client still reading to give up.
                drop(target_tx);
                let rest: Vec<_> = waiting.collect().await;
                failed += rest.iter().filter(|r| !matches!(r, Ok(Ok(_)))).count();
                break;
            }
        }
    }
    let [(c0, l0)] = marks[..] else {
        anyhow::bail!("the window start was not sampled");
    };
    let (c1, l1) = (sample(&coordinator), sample(&me));
    let window = c1.at.duration_since(c0.at).as_secs_f64();
    let publishing = outcome.dispatch.as_secs_f64();
    let published = newest - first_seq;
    let events_per_s = published as f64 / publishing;
    let coordinator_cores = cores(&c0, &c1);
    let us_per_event = (c1.cpu - c0.cpu) * 1e6 / delays.count.max(1) as f64;
    let fanout_cores = cores(&l0, &l1);
    println!(
        "clients {} | published {published} events in {publishing:.2} s: {events_per_s:.0} events/s{} | \
         delivered {} events in {messages} messages{} in {window:.2} s: {:.0} events/s to \
         clients | \
         delay p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | \
         lagged notices {lagged} ({missed} events dropped) | failed clients {failed}",
        cli.clients,
        cli.events_per_second
            .map_or(String::new(), |r| format!(" (asked {r:.0})")),
        delays.count,
        if cli.batch_messages {
            " (?batch=true)"
        } else {
            ""
        },
        delays.count as f64 / window,
        ms(delays.percentile(50.0)),
        ms(delays.percentile(99.0)),
        ms(delays.max),
    );
    println!(
        "CPU over the {window:.2} s: coordinator {coordinator_cores:.2} cores ({:.2} while \
         publishing, {us_per_event:.2} µs per event delivered), ws_fanout (clients + publisher) \
         {fanout_cores:.2} cores; load average {}",
        cores(&c0, &published_by),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(path) = &cli.json {
        let record = serde_json::json!({
            "bench": "fanout",
            "clients": cli.clients,
            "batch_messages": cli.batch_messages,
            "asked_events_per_s": cli.events_per_second,
            "seconds": cli.seconds,
            "events_per_s": events_per_s,
            "delivered": delays.count,
            "delivered_per_s": delays.count as f64 / window,
            "messages": messages,
            "delay": {
                "p50_ms": ms(delays.percentile(50.0)),
                "p99_ms": ms(delays.percentile(99.0)),
                "max_ms": ms(delays.max),
            },
            "lagged": lagged,
            "missed": missed,
            "failed_clients": failed,
            "coordinator_cores": coordinator_cores,
            "coordinator_us_per_event": us_per_event,
            "ws_fanout_cores": fanout_cores,
        });
        process::append_record(path, &record)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The clients get threads of their own: busy reading, they would otherwise delay the
    // publisher's requests in one shared run queue (as they would not, in separate programs).
    let clients_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ws-client")
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (coordinator, base) = start_coordinator(dir.path(), &cli.sync).await?;
    let result = fanout(&cli, coordinator.pid, &base, clients_runtime.handle()).await;
    coordinator.stop().await?;
    clients_runtime.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_as_str_parse_reads_them() {
        assert_eq!(integer(b"123,"), Some((123, 3)));
        assert_eq!(integer(b",1"), None);
        assert_eq!(integer(b"99999999999999999999"), None);
        for text in ["1764000000.123456", "0.5", "12", "1.5e3", "1764000000.1"] {
            let (value, used) = decimal(format!("{text}}}").as_bytes()).expect(text);
            assert_eq!(used, text.len());
            let expected: f64 = text.parse().expect("a number");
            assert!(
                (value - expected).abs() <= expected * 1e-15,
                "{text}: {value}"
            );
        }
        assert_eq!(decimal(b"x}"), None);
    }

    #[test]
    fn a_message_s_events_are_scanned_in_order() {
        let text = r#"[{"event":"task_created","data":{"task_id":1},"seq":7,"ts":1.25},{"event":"task_started","data":{"task_id":1},"seq":8,"ts":2}]"#;
        let mut seen = Vec::new();
        scan(text, |e| {
            seen.push((e.seq, e.ts, e.missed));
            Ok(())
        })
        .expect("scanned");
        assert_eq!(seen, vec![(7, 1.25, None), (8, 2.0, None)]);
    }

    #[test]
    fn a_delay_s_bucket_holds_it_and_is_at_most_one_part_in_128_wide() {
        for delay in [
            0.0, 1e-6, 1e-5, 1.5e-5, 3e-4, 0.0999, 0.1, 0.25, 7.0, 3600.0,
        ] {
            let index = Delays::index(delay);
            let upper = Delays::upper_bound(index);
            assert!(delay <= upper, "{delay} above its bucket's bound {upper}");
            if index > 0 {
                let lower = Delays::upper_bound(index - 1);
                assert!(
                    delay >= lower * (1.0 - 1e-12) || index == BUCKETS - 1,
                    "{delay} below {lower}"
                );
                assert!(
                    upper / lower <= 1.0 + 1.0 / 128.0 + 1e-12,
                    "{lower}..{upper}"
                );
            }
        }
        let mut delays = Delays::new();
        for ms in 1..=100 {
            delays.record(ms as f64 / 1000.0);
        }
        let p99 = delays.percentile(99.0);
        assert!((0.099..=0.099 * 1.008).contains(&p99), "p99 {p99}");
    }
}
