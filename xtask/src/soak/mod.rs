//! `cargo xtask soak --duration 30m` (as root, not in CI): the release agent under a long mixed
//! load, watched from outside. The load is the plots' mix in rounds (loopback churn, TIME_WAIT
//! toward one peer, connections through a namespace whose nftables drop packets, a Nagle
//! client) plus CLOSE_WAIT leaks and stalled connections (`held.rs`). Every `--sample-every`
//! it reads the agent's RSS and scrapes it. At the end it reports RSS over time, CPU, events and
//! lost events, and compares the agent with the kernel: the TIME_WAIT and CLOSE_WAIT gauges with
//! `ss`, the retransmit counter with `nstat`, over every network namespace.
mod held;
mod kernel;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tracer_scrape::Exposition;

use crate::bench::sys;
use crate::plots::traffic::{LossyNetns, Mix, stop_child};
use crate::{require_root, step, target_dir};

/// One round of the plots' mix; the soak runs as many as fit.
const ROUND: Duration = Duration::from_secs(150);
/// CLOSE_WAIT threshold given to the agent: leaks are reported this long after they start.
const LEAK_THRESHOLD: &str = "5s";
/// No leak is made this close to the end: each must pass `LEAK_THRESHOLD` while still held.
const LEAKS_STOP_BEFORE_END: Duration = Duration::from_secs(10);
/// Attempts at a quiet moment for comparing a gauge with the kernel, 300 ms apart: enough for
/// the TIME_WAIT sockets of the load's last minute to run out (a 30-minute run's 30 attempts
/// never found one while they expired at about 30 a second).
const ATTEMPTS: u32 = 300;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run: `90s`, `5m`, `1h`.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    duration: Duration,
    /// How often to sample the agent's RSS and scrape it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    sample_every: Duration,
    /// One CLOSE_WAIT leak this often.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leak_every: Duration,
    /// Stalled connections held at once (one is reset and replaced every 30 s).
    #[arg(long, default_value_t = 8)]
    stalls: usize,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and s, m or h"))?;
    let seconds = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    if seconds == 0 {
        return Err("must be more than zero".into());
    }
    Ok(Duration::from_secs(seconds))
}

/// One sample during the run.
struct Sample {
    at: Duration,
    rss_kib: u64,
    scraped: bool,
    lost: f64,
}

/// A gauge and the kernel's count at a quiet moment.
struct Agreement {
    gauge: f64,
    kernel: u64,
    quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    require_root("cargo xtask soak", "the agent loads eBPF programs")?;
    let binary = crate::build()?;
    let out_dir = target_dir().join("soak");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let log_path = out_dir.join("agent.log");

    step("creating the lossy network namespace (nftables drops)");
    let ns = LossyNetns::create()?;
    let port = sys::free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut agent = Command::new(&binary)
        .args(["run", "--listen", &listen.to_string(), "--events", "json"])
        .args(["--close-wait-threshold", LEAK_THRESHOLD])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let (events, leak_lines) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let stdout = agent.stdout.take().context("the agent's stdout")?;
    let (e, l) = (events.clone(), leak_lines.clone());
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            e.fetch_add(1, Ordering::Relaxed);
            // Bounded: one leak every few seconds at most from us, a few more from the host.
            if line.contains("\"event\":\"close_wait_leak\"")
                && let Ok(mut leaks) = l.lock()
                && leaks.len() < 100_000
            {
                leaks.push(line);
            }
        }
    });
    let result = soak(&args, &agent, listen, &ns, &events, &leak_lines);
    step("stopping the agent (SIGTERM)");
    stop_child(&mut agent);
    let _ = reader.join();
    drop(ns);
    let report = result?;
    let warnings = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    let report = format!(
        "{report}- agent log: {warnings} warning or error lines (`{}`)\n",
        log_path.display()
    );
    let path = out_dir.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("{report}");
    step(&format!("report written to {}", path.display()));
    Ok(())
}

fn soak(
    args: &Args,
    agent: &std::process::Child,
    listen: SocketAddr,
    ns: &LossyNetns,
    events: &AtomicU64,
    leak_lines: &Mutex<Vec<String>>,
) -> Result<String> {
    let pid = agent.id();
    wait_ready(listen)?;
    let before = sys::scrape(listen)?;
    let retrans_before = kernel::retrans_segs();
    let cpu_before = sys::cpu_ticks(pid).context("reading the agent's CPU time")?;
    let t0 = Instant::now();
    let end = t0 + args.duration;
    step(&format!(
        "soaking for {:?}: churn, TIME_WAIT, lossy, Nagle, leaks, stalls",
        args.duration
    ));
    // Leaks and stalls are held past the end, until the gauges are compared; the last leak is
    // made early enough to pass the agent's threshold before then.
    let held = held::Held::start(
        end + Duration::from_secs(600),
        end.checked_sub(LEAKS_STOP_BEFORE_END).unwrap_or(t0),
        args.leak_every,
        args.stalls,
        Duration::from_secs(30),
    )?;
    let mut samples = Vec::new();
    let mut next_sample = t0;
    while Instant::now() < end {
        let round = ROUND.min(end - Instant::now());
        let mix = Mix::start(round, ns)?;
        let round_end = Instant::now() + round;
        while Instant::now() < round_end {
            if Instant::now() >= next_sample {
                next_sample += args.sample_every;
                samples.push(sample(pid, listen, t0));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        mix.finish()?;
        // The mix's servers close their listeners on their own; let them before the next round.
        std::thread::sleep(Duration::from_secs(1));
    }
    samples.push(sample(pid, listen, t0));
    let elapsed = t0.elapsed();
    let cpu = sys::cpu_ticks(pid).context("reading the agent's CPU time")? - cpu_before;
    step("traffic over: comparing the agent with the kernel");
    std::thread::sleep(Duration::from_secs(3));
    let time_wait = agree(listen, "tracer_time_wait_sockets", || {
        let (total, mine) = kernel::time_wait_total(listen.port());
        (total, mine)
    })?;
    let close_wait = agree(listen, "tracer_close_wait_sockets", || {
        (kernel::close_wait_total(), 0)
    })?;
    let leaks_made = held.leaks.load(Ordering::SeqCst);
    let stalls_made = held.stalls.load(Ordering::SeqCst);
    let leak_port = held.leak_port;
    held.finish()?;
    let after = sys::scrape(listen)?;
    let retrans_after = kernel::retrans_segs();
    let kernel_retrans: u64 = retrans_after
        .iter()
        .filter_map(|(ns, after)| Some(after.saturating_sub(*retrans_before.get(ns)?)))
        .sum();
    let namespaces_both = retrans_after
        .keys()
        .filter(|ns| retrans_before.contains_key(ns))
        .count();
    let agent_retrans =
        total(&after, "tracer_retransmits_total") - total(&before, "tracer_retransmits_total");

    let mut r = String::new();
    let _ = writeln!(
        r,
        "Soak of {:.0} s (`cargo xtask soak --duration {}s`), kernel {}, {} CPUs:\n",
        elapsed.as_secs_f64(),
        args.duration.as_secs(),
        sys::kernel_release(),
        sys::online_cpus()
    );
    let _ = writeln!(
        r,
        "The agent traces the whole host: counts below include whatever else ran on it.\n"
    );
    let _ = writeln!(r, "{}", rss_table(&samples));
    let first = samples.first().map_or(0, |s| s.rss_kib);
    let last = samples.last().map_or(0, |s| s.rss_kib);
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let _ = writeln!(
        r,
        "- RSS: {:.1} MiB after start, {:.1} MiB at the end, {:.1} MiB at most (sampled every {} s)",
        mib(first),
        mib(last),
        mib(peak),
        args.sample_every.as_secs()
    );
    let _ = writeln!(
        r,
        "- CPU: {:.1} s in {:.0} s, {:.2}% of one core",
        cpu as f64 / sys::clock_ticks_per_second(),
        elapsed.as_secs_f64(),
        100.0 * cpu as f64 / sys::clock_ticks_per_second() / elapsed.as_secs_f64()
    );
    let scrapes_failed = samples.iter().filter(|s| !s.scraped).count();
    let _ = writeln!(
        r,
        "- scrapes: {} of {} answered 200",
        samples.len() - scrapes_failed,
        samples.len()
    );
    let _ = writeln!(
        r,
        "- events: {:.0} kernel events handled, {} JSON lines written, lost events {:.0} ({:.0} at the start)",
        total(&after, "tracer_events_total") - total(&before, "tracer_events_total"),
        events.load(Ordering::Relaxed),
        total(&after, "tracer_events_lost_total"),
        total(&before, "tracer_events_lost_total")
    );
    let ours = format!("\"sport\":{leak_port},");
    let (reported, all_reports) = leak_lines
        .lock()
        .map(|lines| {
            (
                lines.iter().filter(|l| l.contains(&ours)).count(),
                lines.len(),
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        r,
        "- leaks: {leaks_made} CLOSE_WAIT leaks made, {reported} of them reported ({all_reports} \
         leak reports in all on the host); {stalls_made} stalled connections opened (one reset \
         every 30 s)"
    );
    let _ = writeln!(r, "- TIME_WAIT: {}", describe(&time_wait));
    let _ = writeln!(r, "- CLOSE_WAIT: {}", describe(&close_wait));
    let _ = writeln!(
        r,
        "- retransmits: the agent counted {agent_retrans:.0}, nstat's TcpRetransSegs grew by \
         {kernel_retrans} over the {namespaces_both} namespaces present at both ends ({})",
        ratio(agent_retrans, kernel_retrans as f64)
    );
    Ok(r)
}

fn wait_ready(listen: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if sys::scrape(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the agent did not serve /metrics on {listen} within a minute")
}

fn sample(pid: u32, listen: SocketAddr, t0: Instant) -> Sample {
    let scrape = sys::scrape(listen).ok();
    Sample {
        at: t0.elapsed(),
        rss_kib: sys::status_kib(pid, "VmRSS").unwrap_or(0),
        scraped: scrape.is_some(),
        lost: scrape.map_or(f64::NAN, |s| total(&s, "tracer_events_lost_total")),
    }
}

/// The sum of a family's samples.
fn total(exposition: &Exposition, name: &str) -> f64 {
    exposition
        .samples()
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// `gauge` compared with `kernel()` (total, sockets on the agent's port) at a quiet moment: two
/// kernel reads around the scrape agree, but for the scrape's own socket.
fn agree(listen: SocketAddr, gauge: &str, kernel: impl Fn() -> (u64, u64)) -> Result<Agreement> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let (a, a_mine) = kernel();
        let value = total(&sys::scrape(listen)?, gauge);
        let (b, b_mine) = kernel();
        let quiet = a - a_mine == b - b_mine && b_mine >= a_mine && b_mine - a_mine <= 1;
        let found = Agreement {
            gauge: value,
            kernel: a,
            quiet,
        };
        if quiet && value == a as f64 {
            return Ok(found);
        }
        last = Some(found);
        std::thread::sleep(Duration::from_millis(300));
    }
    last.context("no comparison made")
}

fn describe(a: &Agreement) -> String {
    if a.quiet && a.gauge == a.kernel as f64 {
        format!(
            "gauge {:.0}, `ss` {} in all namespaces: equal",
            a.gauge, a.kernel
        )
    } else {
        format!(
            "gauge {:.0}, `ss` {} in all namespaces: {} (no quiet moment in {ATTEMPTS} attempts{})",
            a.gauge,
            a.kernel,
            if a.gauge == a.kernel as f64 {
                "equal"
            } else {
                "differ"
            },
            if a.quiet {
                ""
            } else {
                ": the host kept changing"
            }
        )
    }
}

fn ratio(agent: f64, kernel: f64) -> String {
    if kernel == 0.0 {
        return "nothing to compare".into();
    }
    format!("ratio {:.3}", agent / kernel)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// RSS over time, at most 13 rows evenly spread over the run (first and last included).
fn rss_table(samples: &[Sample]) -> String {
    let mut t = String::from("| time | RSS | events lost so far |\n| --- | --- | --- |\n");
    let n = samples.len();
    let rows = 13.min(n);
    let mut picked: Vec<usize> = (0..rows)
        .map(|i| {
            if rows <= 1 {
                0
            } else {
                i * (n - 1) / (rows - 1)
            }
        })
        .collect();
    picked.dedup();
    for i in picked {
        let s = &samples[i];
        let _ = writeln!(
            t,
            "| {}:{:02} | {:.1} MiB | {} |",
            s.at.as_secs() / 60,
            s.at.as_secs() % 60,
            mib(s.rss_kib),
            if s.lost.is_nan() {
                "no scrape".to_string()
            } else {
                format!("{:.0}", s.lost)
            }
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn the_rss_table_keeps_first_and_last() {
        let samples: Vec<Sample> = (0..100)
            .map(|i| Sample {
                at: Duration::from_secs(i * 10),
                rss_kib: 1024 * (10 + i),
                scraped: true,
                lost: 0.0,
            })
            .collect();
        let table = rss_table(&samples);
        assert_eq!(table.lines().count(), 2 + 13);
        assert!(table.contains("| 0:00 | 10.0 MiB | 0 |"), "{table}");
        assert!(table.contains("| 16:30 | 109.0 MiB | 0 |"), "{table}");
    }
}
