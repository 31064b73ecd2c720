//! What is attached during a round: nothing, the agent, bpftrace, the bench's own floor program
//! or `perf stat`. Each starts, waits until it is really attached, and stops cleanly.
use std::fs::File;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::bpf::RawFloor;
use super::ringbuf::RingbufExperiment;
use super::sys;

/// How a configuration attaches.
#[derive(Debug, Clone)]
pub enum Kind {
    None,
    Tracer {
        ring_buffer_bytes: Option<u32>,
        /// Stopped (SIGSTOP) once attached: its kernel programs run, the agent does not.
        paused: bool,
    },
    Bpftrace {
        script: String,
    },
    RawFloor {
        tracepoints: Vec<&'static str>,
    },
    Ringbuf {
        tracepoints: Vec<&'static str>,
        batched: bool,
    },
    Perf {
        events: Vec<&'static str>,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub name: &'static str,
    pub description: String,
    pub kind: Kind,
    /// Why it cannot run here, when it cannot (then it is reported, not measured).
    pub unavailable: Option<String>,
    /// Anything the reader must know (a substitution, a refusal by the kernel).
    pub note: Option<String>,
}

impl Config {
    pub fn new(name: &'static str, description: impl Into<String>, kind: Kind) -> Self {
        Self {
            name,
            description: description.into(),
            kind,
            unavailable: None,
            note: None,
        }
    }
}

/// Where the bench keeps the agent's binary and its logs.
#[derive(Debug, Clone)]
pub struct Env {
    pub tracer: PathBuf,
    pub out_dir: PathBuf,
}

/// A started configuration.
pub enum Running {
    None,
    Tracer(Tracer),
    Bpftrace(Bpftrace),
    Floor(RawFloor),
    Ring(RingbufExperiment),
    Perf(Perf),
}

/// Counters read before and after a round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Events the tool has seen (agent: `tracer_events_total`; floor: program runs).
    pub events: Option<f64>,
    /// Records the agent read from the kernel (`tracer_kernel_records_total`): one can carry
    /// several events.
    pub records: Option<f64>,
    /// Events the tool lost (agent: `tracer_events_lost_total`; bpftrace: "Lost N events").
    pub lost: Option<f64>,
    /// CPU time of the tool's process, clock ticks.
    pub cpu_ticks: Option<u64>,
    /// The agent's connection table size.
    pub active: Option<f64>,
    /// Voluntary context switches of the tool's process (its wake-ups).
    pub wakeups: Option<u64>,
}

impl Running {
    pub fn start(config: &Config, env: &Env) -> Result<Self> {
        Ok(match &config.kind {
            Kind::None => Running::None,
            Kind::Tracer {
                ring_buffer_bytes,
                paused,
            } => {
                let mut tracer = Tracer::start(env, *ring_buffer_bytes)?;
                if *paused {
                    tracer.pause()?;
                }
                Running::Tracer(tracer)
            }
            Kind::Bpftrace { script } => {
                Running::Bpftrace(Bpftrace::start(script, &env.out_dir, config.name)?)
            }
            Kind::RawFloor { tracepoints } => Running::Floor(RawFloor::attach(tracepoints)?),
            Kind::Ringbuf {
                tracepoints,
                batched,
            } => Running::Ring(RingbufExperiment::attach(tracepoints, *batched)?),
            Kind::Perf { events } => Running::Perf(Perf::start(events, &env.out_dir)?),
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        match self {
            Running::None | Running::Perf(_) => Snapshot::default(),
            Running::Tracer(tracer) => tracer.snapshot(),
            Running::Bpftrace(bt) => Snapshot {
                lost: Some(bt.lost.load(Ordering::Relaxed) as f64),
                cpu_ticks: sys::cpu_ticks(bt.child.id()),
                ..Snapshot::default()
            },
            Running::Floor(floor) => Snapshot {
                events: floor.count().ok().map(|n| n as f64),
                ..Snapshot::default()
            },
            Running::Ring(ring) => Snapshot {
                events: Some(ring.consumed() as f64),
                ..Snapshot::default()
            },
        }
    }

    /// Time for the tool to catch up after the load stops, before the closing snapshot.
    pub fn settle(&self) -> Duration {
        match self {
            // The agent refreshes its lost-event counter once a second.
            Running::Tracer(tracer) if !tracer.paused => Duration::from_millis(1300),
            Running::Bpftrace(_) => Duration::from_millis(300),
            Running::Ring(_) => Duration::from_millis(50),
            _ => Duration::ZERO,
        }
    }

    /// Stops the tool; returns what it printed that matters (perf's counts), if anything.
    pub fn stop(self) -> Result<Option<String>> {
        match self {
            Running::None | Running::Floor(_) | Running::Ring(_) => Ok(None),
            Running::Tracer(tracer) => tracer.stop().map(|()| None),
            Running::Bpftrace(bt) => bt.stop().map(|()| None),
            Running::Perf(perf) => perf.stop().map(Some),
        }
    }
}

/// The agent, `tracer run --events none`, serving metrics on a free loopback port.
pub struct Tracer {
    child: Child,
    pub metrics: SocketAddr,
    /// Stopped with SIGSTOP (see `pause`): it serves nothing until continued.
    paused: bool,
}

impl Tracer {
    pub fn start(env: &Env, ring_buffer_bytes: Option<u32>) -> Result<Self> {
        let port = sys::free_port()?;
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let log_path = env.out_dir.join("tracer.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&env.tracer);
        cmd.args(["run", "--events", "none", "--listen", &metrics.to_string()]);
        if let Some(bytes) = ring_buffer_bytes {
            cmd.args(["--ring-buffer-bytes", &bytes.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", env.tracer.display()))?;
        let mut tracer = Self {
            child,
            metrics,
            paused: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = tracer.child.try_wait()? {
                bail!(
                    "the agent exited during start-up ({status}); its log: {}",
                    log_path.display()
                );
            }
            if sys::scrape(metrics).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = sys::stop_child(&mut tracer.child, sys::SIGKILL, Duration::from_secs(1));
                bail!("the agent's /metrics did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the first refresh pass (lost counter, gauges) before the first snapshot.
        std::thread::sleep(Duration::from_millis(1100));
        Ok(tracer)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the agent's process (SIGSTOP) with its programs attached: what the kernel side
    /// costs alone. Its ring fills and the programs count their records as lost meanwhile.
    pub fn pause(&mut self) -> Result<()> {
        sys::signal(self.pid(), sys::SIGSTOP).context("stopping the agent (SIGSTOP)")?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            let _ = sys::signal(self.pid(), sys::SIGCONT);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        if self.paused {
            // A stopped agent answers no scrape.
            return Snapshot {
                cpu_ticks: sys::cpu_ticks(self.pid()),
                ..Snapshot::default()
            };
        }
        let page = sys::scrape(self.metrics).ok();
        let metric = |name| page.as_ref().and_then(|p| p.sum(name, &[]));
        Snapshot {
            events: metric("tracer_events_total"),
            records: metric("tracer_kernel_records_total"),
            lost: metric("tracer_events_lost_total"),
            cpu_ticks: sys::cpu_ticks(self.pid()),
            active: metric("tracer_connections_active"),
            wakeups: sys::voluntary_switches(self.pid()),
        }
    }

    pub fn stop(mut self) -> Result<()> {
        self.resume();
        let status = sys::stop_child(&mut self.child, sys::SIGTERM, Duration::from_secs(15))?;
        if !status.success() {
            bail!("the agent stopped with {status}");
        }
        Ok(())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.resume();
        if let Ok(None) = self.child.try_wait() {
            let _ = sys::stop_child(&mut self.child, sys::SIGTERM, Duration::from_secs(5));
        }
    }
}

/// bpftrace running a script whose `BEGIN` prints `ready` (it runs once every probe is
/// attached). Its output is read and thrown away by a thread, as if sent to /dev/null, except
/// that "Lost N events" lines are counted.
pub struct Bpftrace {
    child: Child,
    lost: Arc<AtomicU64>,
    stderr_path: PathBuf,
}

impl Bpftrace {
    pub fn start(script: &str, out_dir: &Path, name: &str) -> Result<Self> {
        let stderr_path = out_dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut child = Command::new("bpftrace")
            .args(["-e", script])
            .env("BPFTRACE_STRLEN", "16")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting bpftrace")?;
        let mut stdout = child.stdout.take().context("bpftrace stdout")?;
        let lost = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let counter = lost.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut carry: Vec<u8> = Vec::new();
            let mut ready_sent = false;
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                carry.extend_from_slice(&buf[..n]);
                let complete = carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                for line in carry[..complete].split(|&b| b == b'\n') {
                    if !ready_sent && line == b"ready" {
                        ready_sent = true;
                        let _ = ready_tx.send(());
                    } else if let Some(rest) = line.strip_prefix(b"Lost ") {
                        let n = String::from_utf8_lossy(rest)
                            .split_whitespace()
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0);
                        counter.fetch_add(n, Ordering::Relaxed);
                    }
                }
                carry.drain(..complete);
                // Read in large gulps rather than waking for every line.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut bt = Self {
            child,
            lost,
            stderr_path,
        };
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return Ok(bt);
            }
            if let Some(status) = bt.child.try_wait()? {
                bail!("bpftrace exited ({status}): {}", bt.error_text());
            }
            if Instant::now() > deadline {
                let _ = sys::stop_child(&mut bt.child, sys::SIGKILL, Duration::from_secs(1));
                bail!("bpftrace did not attach within 60 s");
            }
        }
    }

    /// bpftrace's error lines (its memlock warning is noise on kernels that account BPF memory
    /// to cgroups).
    fn error_text(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("RLIMIT_MEMLOCK") && !l.trim().is_empty())
            .collect();
        if lines.is_empty() {
            "no message".into()
        } else {
            lines.join(" / ")
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> Result<()> {
        sys::stop_child(&mut self.child, sys::SIGINT, Duration::from_secs(15))?;
        // Its stderr may report lost events too.
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        for line in text.lines() {
            if let Some(n) = line
                .split_whitespace()
                .skip_while(|w| *w != "Lost")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
            {
                self.lost.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = sys::stop_child(&mut self.child, sys::SIGINT, Duration::from_secs(5));
        }
    }
}

/// `perf stat -a` counting tracepoints (no BPF); stopped with SIGINT, which makes it print.
pub struct Perf {
    child: Child,
    output: PathBuf,
}

impl Perf {
    pub fn start(events: &[&str], out_dir: &Path) -> Result<Self> {
        let output = out_dir.join("perf-stat.csv");
        let child = Command::new("perf")
            .args(["stat", "-a", "-x", ","])
            .arg("-o")
            .arg(&output)
            .args(events.iter().flat_map(|e| ["-e", e]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf stat")?;
        let mut perf = Self { child, output };
        // perf has no ready signal; it opens its counters within milliseconds.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = perf.child.try_wait()? {
            bail!(
                "perf stat exited at once ({status}): {}",
                std::fs::read_to_string(&perf.output)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Ok(perf)
    }

    /// Stops counting; returns perf's CSV.
    pub fn stop(mut self) -> Result<String> {
        sys::stop_child(&mut self.child, sys::SIGINT, Duration::from_secs(10))?;
        Ok(std::fs::read_to_string(&self.output).unwrap_or_default())
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = sys::stop_child(&mut self.child, sys::SIGINT, Duration::from_secs(5));
        }
    }
}

/// Sums the counts in `perf stat -x,` output.
pub fn perf_total(csv: &str) -> Option<f64> {
    let mut total = None;
    for line in csv.lines().filter(|l| !l.starts_with('#')) {
        if let Some(n) = line.split(',').next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += n;
        }
    }
    total
}

/// The tcplife-style bpftrace script: per socket, birth time and owner at open; duration at
/// close, printed (the output is discarded), state deleted.
pub fn tcplife_script() -> String {
    r#"BEGIN { printf("ready\n"); }
tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate < 4 && @birth[$sk] == 0) { @birth[$sk] = nsecs; }
  if (args->newstate == 2 || args->newstate == 9) { @skpid[$sk] = pid; @skcomm[$sk] = comm; }
  if (args->newstate == 7) {
    $start = @birth[$sk];
    if ($start != 0) {
      printf("%d %s %d %d %d\n", @skpid[$sk], @skcomm[$sk], args->sport, args->dport,
             (nsecs - $start) / 1000);
    }
    delete(@birth[$sk]); delete(@skpid[$sk]); delete(@skcomm[$sk]);
  }
}
END { clear(@birth); clear(@skpid); clear(@skcomm); }
"#
    .to_owned()
}

/// What a user would improvise to watch connection lifetimes cheaply: birth time per socket
/// and a histogram of durations, both in kernel maps; nothing is printed per event (issue 11's
/// comparison point: aggregation in the kernel).
pub fn aggregate_script() -> String {
    r#"BEGIN { printf("ready\n"); }
tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate < 4 && @birth[$sk] == 0) { @birth[$sk] = nsecs; }
  if (args->newstate == 7) {
    $start = @birth[$sk];
    if ($start != 0) { @duration_us = hist((nsecs - $start) / 1000); }
    delete(@birth[$sk]);
  }
}
END { clear(@birth); clear(@duration_us); }
"#
    .to_owned()
}

/// An empty action on the given probes: the cost of the hook and a do-nothing program.
pub fn empty_script(probes: &[String]) -> String {
    format!(
        "BEGIN {{ printf(\"ready\\n\"); }}\n{} {{ }}\n",
        probes.join(",\n")
    )
}

/// bpftrace's version line, if it runs.
pub fn bpftrace_version() -> Option<String> {
    crate::output_of("bpftrace", &["--version"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_is_summed() {
        let csv = "# started on x\n\n33,,sock:inet_sock_set_state,4005378510,100.00,,\n\
                   92,,timer:timer_start,4005378951,100.00,,\n";
        assert_eq!(perf_total(csv), Some(125.0));
        assert_eq!(perf_total("<not counted>,,x\n"), None);
    }

    #[test]
    fn empty_script_lists_probes() {
        let s = empty_script(&["tracepoint:a:b".into(), "tracepoint:c:d".into()]);
        assert!(s.contains("tracepoint:a:b,\ntracepoint:c:d { }"));
    }
}
