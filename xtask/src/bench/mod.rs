//! `cargo xtask bench`: what tracing costs, measured against nothing attached in the same run.
//!
//! A benchmark, not a test: CI never runs it and nothing here is a pass/fail threshold. Each
//! workload runs every configuration once per round, in an order rotated every round, so slow
//! drifts of a noisy machine fall on all configurations alike; results are medians over rounds
//! and ratios to the `none` configuration of the same run.
//!
//! - Workload A, churn: loopback connections opened and closed as fast as client threads can
//!   (every connection is about ten `inet_sock_set_state` events).
//! - Workload B, timers: loopback ping-pong with a receive timeout, which arms and cancels
//!   kernel timers at a high rate: the agent's `timer_*` hooks fire for every kernel timer.
//! - The agent's own figures: events handled and lost, its CPU time per event, peak memory, and
//!   memory with many idle connections; a deliberately small ring buffer to show that loss is
//!   counted; and the kernel's run-time statistics of each of the agent's eBPF programs.
//!
//! Output: a table on stdout and `target/bench/results.json`.
mod bpf;
mod configs;
mod figures;
mod idle;
mod lineup;
mod load;
mod profile;
mod render;
mod report;
mod ringbuf;
pub(crate) mod sys;
use crate::{require_root, step, workspace_root};
use anyhow::{Context as _, Result, bail};
use clap::value_parser;
use configs::{Config, Env, Kind, Running, Snapshot};
use figures::*;
use lineup::*;
use load::RoundLoad;
use render::*;
use report::{Json, Summary, int, mib};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds; each round runs every configuration once, in a rotated order.
    #[arg(long, default_value_t = 5, value_parser = value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Seconds of load per configuration and round.
    #[arg(long, default_value_t = 3.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Client threads of the churn workload (and ping-pong pairs of the timer workload).
    #[arg(long, default_value_t = 2, value_parser = value_parser!(u32).range(1..=64))]
    clients: u32,
    /// Skip the phase that holds many idle connections open to measure the agent's memory.
    #[arg(long)]
    skip_idle: bool,
    /// Smoke test: 2 rounds of 1 s.
    #[arg(long, conflicts_with_all = ["rounds", "seconds"])]
    quick: bool,
    /// Add two experimental configurations to workload A: a bare BPF ring buffer transport
    /// with default wake-ups, and the same with batched wake-ups.
    #[arg(long)]
    experiments: bool,
    /// Measure this agent binary instead of building target/release/tracer.
    #[arg(long, value_name = "PATH")]
    tracer_bin: Option<PathBuf>,
    /// Only the memory phase (idle connections held open), for quick checks of the agent's
    /// memory; prints its figures and writes no results file.
    #[arg(long, conflicts_with_all = ["skip_idle", "quick"])]
    memory_only: bool,
    /// Only the eBPF program profile (kernel run time per call of each program, kernel records
    /// per operation), for quick checks of the kernel side; prints it and writes no results
    /// file.
    #[arg(long, conflicts_with_all = ["skip_idle", "quick", "memory_only"])]
    profile_only: bool,
    /// Idle connections held open in the memory phase.
    #[arg(long, default_value_t = 50_000, value_parser = value_parser!(u32).range(1..=500_000))]
    idle_connections: u32,

    /// (internal) Be a helper that accepts and holds connections on N listening ports.
    #[arg(long, hide = true, value_name = "N")]
    idle_server: Option<u32>,
    /// (internal) Be a helper that opens and holds N connections to --idle-targets.
    #[arg(long, hide = true, value_name = "N", requires = "idle_targets")]
    idle_client: Option<u32>,
    /// (internal) Loopback addresses for --idle-client.
    #[arg(long, hide = true, value_delimiter = ',', value_parser = idle::parse_target)]
    idle_targets: Vec<SocketAddr>,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.1..=600.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?} is not a duration between 0.1 and 600 seconds"
        )),
    }
}

/// One workload's configurations and their rounds.
struct Workload {
    key: &'static str,
    title: String,
    unit: &'static str,
    results: Vec<ConfigResult>,
}

struct ConfigResult {
    config: Config,
    rounds: Vec<Round>,
    /// A failure while measuring (the configuration was dropped from later rounds).
    error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Round {
    load: RoundLoad,
    before: Snapshot,
    after: Snapshot,
    /// Peak RSS of the tool's process at the end of the round, KiB.
    hwm_kib: Option<u64>,
    /// Events counted by `perf stat` over the round.
    perf_events: Option<f64>,
    /// System-wide interrupts during the load.
    irqs: Option<(sys::Interrupts, sys::Interrupts)>,
    /// The machine was not quiet before the round (busy CPUs or another tracer attached).
    noisy: bool,
}

impl Round {
    fn delta(&self, f: impl Fn(&Snapshot) -> Option<f64>) -> Option<f64> {
        Some(f(&self.after)? - f(&self.before)?)
    }
    fn events(&self) -> Option<f64> {
        self.delta(|s| s.events)
    }
    fn lost(&self) -> Option<f64> {
        self.delta(|s| s.lost)
    }
    fn records(&self) -> Option<f64> {
        self.delta(|s| s.records)
    }
    /// Interrupts per second of load: (IRQ work, rescheduling IPIs, function-call IPIs).
    fn irq_rates(&self) -> Option<[f64; 3]> {
        let (a, b) = self.irqs?;
        let s = self.load.seconds;
        Some([
            b.irq_work.saturating_sub(a.irq_work) as f64 / s,
            b.resched.saturating_sub(a.resched) as f64 / s,
            b.call.saturating_sub(a.call) as f64 / s,
        ])
    }
    fn wakeups(&self) -> Option<f64> {
        self.delta(|s| s.wakeups.map(|w| w as f64))
    }
    fn cpu_seconds(&self) -> Option<f64> {
        self.delta(|s| s.cpu_ticks.map(|t| t as f64))
            .map(|ticks| ticks / sys::clock_ticks_per_second())
    }
}

impl ConfigResult {
    fn rates(&self) -> Vec<f64> {
        self.rounds.iter().map(|r| r.load.rate()).collect()
    }
    fn summary(&self) -> Option<Summary> {
        Summary::of(&self.rates())
    }
    fn sum(&self, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.rounds.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
    fn seconds(&self) -> f64 {
        self.rounds.iter().map(|r| r.load.seconds).sum()
    }
    fn ops(&self) -> f64 {
        self.rounds.iter().map(|r| r.load.ops as f64).sum()
    }
    fn noisy(&self) -> usize {
        self.rounds.iter().filter(|r| r.noisy).count()
    }
    fn errors(&self) -> u64 {
        self.rounds.iter().map(|r| r.load.errors).sum()
    }
    /// Median interrupt rates over rounds: (IRQ work, rescheduling, function call) per second.
    fn irq_rates(&self) -> Option<[f64; 3]> {
        let rates: Vec<[f64; 3]> = self.rounds.iter().filter_map(Round::irq_rates).collect();
        let median = |i: usize| Summary::of(&rates.iter().map(|r| r[i]).collect::<Vec<_>>());
        Some([median(0)?.median, median(1)?.median, median(2)?.median])
    }
    /// Per-round rates of whatever the tool counted (events, hook runs, perf counts).
    fn event_rates(&self) -> Option<Summary> {
        let rates: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| Some(r.events().or(r.perf_events)? / r.load.seconds))
            .collect();
        Summary::of(&rates)
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(listeners) = args.idle_server {
        return load::idle_server(listeners);
    }
    if let Some(count) = args.idle_client {
        return load::idle_client(count, &args.idle_targets);
    }
    require_root("cargo xtask bench", "it attaches eBPF programs")?;
    let (rounds, seconds) = if args.quick {
        (2, 1.0)
    } else {
        (args.rounds, args.seconds)
    };
    let duration = Duration::from_secs_f64(seconds);
    let quiet_wait = Duration::from_secs(if args.quick { 5 } else { 60 });

    let tracer = match args.tracer_bin {
        Some(path) if path.is_file() => path,
        Some(path) => bail!("--tracer-bin: {} is not a file", path.display()),
        None => crate::build()?,
    };
    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let env = Env {
        tracer,
        out_dir: out_dir.clone(),
    };
    ensure_tracefs()?;
    let bpftrace = ensure_bpftrace();
    let perf = crate::output_of("perf", &["--version"]);
    // The churn needs no more than the default limit, but a raised soft limit costs nothing.
    if let Ok((_, hard)) = sys::nofile_limit() {
        let _ = sys::raise_nofile(hard);
    }

    if args.memory_only {
        step(&format!(
            "memory: the agent with {} idle connections held open",
            args.idle_connections
        ));
        let idle = idle::run(&env, args.idle_connections)?;
        print!("{}", render::idle_text(&idle));
        return Ok(());
    }

    // The kernel programs' run time, under the churn of `server` (with both phases' settings).
    let profile_of = |server: &load::ChurnServer| {
        step("profile: the agent's eBPF programs with kernel run-time statistics on");
        profile::run(
            &env,
            server,
            args.clients,
            duration,
            args.experiments,
            bpftrace.is_ok(),
        )
    };
    if args.profile_only {
        check_foreign();
        let server = load::ChurnServer::start()?;
        let profile = profile_of(&server)?;
        print!("{}", profile.render());
        return Ok(());
    }

    check_foreign();
    step("probing the configurations");
    let mut churn = Workload {
        key: "churn",
        title: format!(
            "Workload A: connection churn on loopback ({} client threads, server closes first)",
            args.clients
        ),
        unit: "conn/s",
        results: probe_all(
            churn_configs(bpftrace.as_ref().ok(), perf.is_some(), args.experiments),
            &bpftrace,
            &env,
        ),
    };
    let mut timers = Workload {
        key: "timers",
        title: format!(
            "Workload B: kernel timers ({} loopback ping-pong pairs with SO_RCVTIMEO)",
            args.clients
        ),
        unit: "round trips/s",
        results: probe_all(
            timer_configs(bpftrace.as_ref().ok(), perf.is_some()),
            &bpftrace,
            &env,
        ),
    };

    let server = load::ChurnServer::start()?;
    step(&format!(
        "workload A: {rounds} rounds x {} configurations x {seconds} s",
        churn.results.len()
    ));
    run_rounds(&mut churn, &env, rounds, quiet_wait, || {
        Ok(server.round(args.clients, duration))
    })?;
    check_foreign();
    step(&format!(
        "workload B: {rounds} rounds x {} configurations x {seconds} s",
        timers.results.len()
    ));
    run_rounds(&mut timers, &env, rounds, quiet_wait, || {
        load::timer_round(args.clients, duration)
    })?;

    check_foreign();
    step("loss test: the agent with a 64 KiB ring buffer under churn");
    let loss = loss_test(
        &env,
        &server,
        args.clients,
        duration.max(Duration::from_secs(2)),
    )?;

    let profile = profile_of(&server)?;
    drop(server);

    let idle = if args.skip_idle {
        None
    } else {
        step(&format!(
            "memory: the agent with {} idle connections held open",
            args.idle_connections
        ));
        Some(idle::run(&env, args.idle_connections)?)
    };

    check_foreign();

    let foreign = seen_foreign();
    let mut text = String::new();
    if !foreign.is_empty() {
        text.push_str(&format!(
            "\nNote: other processes held tracing eBPF programs at some point of the run ({}).\n\
             Rounds that began or ended with one attached are counted as noisy below.\n",
            foreign.join(", ")
        ));
    }
    text.push_str(&render_text(
        &[&churn, &timers],
        &loss,
        &profile,
        idle.as_ref(),
    ));
    print!("{text}");
    let json = Json::obj([
        ("kernel", Json::str(sys::kernel_release())),
        ("cpus", Json::num(sys::online_cpus() as f64)),
        ("rounds", Json::num(f64::from(rounds))),
        ("seconds_per_round", Json::num(seconds)),
        ("clients", Json::num(f64::from(args.clients))),
        (
            "bpftrace",
            Json::opt_str(bpftrace.as_ref().ok().map(String::as_str)),
        ),
        ("perf", Json::opt_str(perf.as_deref())),
        (
            "foreign_tracers",
            Json::Arr(foreign.iter().map(|f| Json::str(f.as_str())).collect()),
        ),
        (
            "workloads",
            Json::Arr(vec![workload_json(&churn), workload_json(&timers)]),
        ),
        ("tracer_churn", tracer_json(&churn)),
        ("tracer_timers", tracer_json(&timers)),
        ("loss_test", loss.json()),
        ("ebpf_programs", profile.json()),
        (
            "idle",
            idle.as_ref().map_or(Json::Null, idle::IdleResult::json),
        ),
    ]);
    let path = out_dir.join("results.json");
    std::fs::write(&path, json.render()).with_context(|| format!("writing {}", path.display()))?;
    step(&format!("results written to {}", path.display()));
    Ok(())
}

/// Other processes seen holding tracing eBPF programs during the run.
static FOREIGN: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Looks for other processes holding tracing eBPF programs (another agent, a profiler); says so
/// the first time each is seen. Returns true if there are any now.
fn check_foreign() -> bool {
    let now = bpf::foreign_tracers();
    if let Ok(mut seen) = FOREIGN.lock() {
        for tracer in &now {
            if seen.insert(tracer.clone()) {
                step(&format!(
                    "warning: {tracer} holds tracing eBPF programs: rounds it overlaps are noisy"
                ));
            }
        }
    }
    !now.is_empty()
}

fn seen_foreign() -> Vec<String> {
    FOREIGN
        .lock()
        .map(|seen| seen.iter().cloned().collect())
        .unwrap_or_default()
}

/// bpftrace and perf need tracefs, which a fresh machine may not have mounted.
fn ensure_tracefs() -> Result<()> {
    if sys::exists("/sys/kernel/tracing/events") {
        return Ok(());
    }
    step("mounting tracefs at /sys/kernel/tracing");
    crate::run_cmd(std::process::Command::new("mount").args([
        "-t",
        "tracefs",
        "tracefs",
        "/sys/kernel/tracing",
    ]))
}

/// bpftrace's version, installed from Debian when missing; or why it is not available.
fn ensure_bpftrace() -> Result<String, String> {
    if let Some(version) = configs::bpftrace_version() {
        return Ok(version);
    }
    step("installing bpftrace (Debian)");
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = apt(&["install", "-y", "-q", "--no-install-recommends", "bpftrace"])
        || (apt(&["update", "-q"])
            && apt(&["install", "-y", "-q", "--no-install-recommends", "bpftrace"]));
    match configs::bpftrace_version() {
        Some(version) => Ok(version),
        None if installed => Err("bpftrace was installed but does not run".into()),
        None => Err("bpftrace is missing and `apt-get install bpftrace` failed".into()),
    }
}

/// Starts and stops every optional configuration once, so that what the kernel or a tool
/// refuses is known (and said) before measuring. The raw floor falls back to the bench's own
/// program when bpftrace refuses raw tracepoints.
fn probe_all(
    configs: Vec<Config>,
    bpftrace: &Result<String, String>,
    env: &Env,
) -> Vec<ConfigResult> {
    configs
        .into_iter()
        .map(|mut config| {
            let optional = !matches!(config.kind, Kind::None | Kind::Tracer { .. });
            if optional && config.unavailable.is_none() {
                probe_or_fall_back(&mut config, bpftrace, env);
            }
            if let Some(why) = &config.unavailable {
                step(&format!("  {}: not measured: {why}", config.name));
            } else if let Some(note) = &config.note {
                step(&format!("  {}: {note}", config.name));
            }
            ConfigResult {
                config,
                rounds: Vec::new(),
                error: None,
            }
        })
        .collect()
}

fn probe_or_fall_back(config: &mut Config, bpftrace: &Result<String, String>, env: &Env) {
    let Err(err) = probe(config, env) else {
        return;
    };
    let Kind::Bpftrace { script } = &config.kind else {
        config.unavailable = Some(format!("{err:#}"));
        return;
    };
    if config.name != "floor-raw" {
        config.unavailable = Some(format!("{err:#}"));
        return;
    }
    let tracepoints: Vec<&'static str> = if script.contains("timer_") {
        TIMER_TRACEPOINTS.to_vec()
    } else {
        vec![CHURN_TRACEPOINT]
    };
    let version = bpftrace.as_deref().unwrap_or("bpftrace");
    own_raw_floor(
        config,
        &tracepoints,
        format!("{version} refused rawtracepoint probes ({err:#})"),
    );
    if let Err(err) = probe(config, env) {
        config.unavailable = Some(format!("the kernel refused it: {err:#}"));
    }
}

fn probe(config: &Config, env: &Env) -> Result<()> {
    Running::start(config, env)?.stop()?;
    Ok(())
}

/// Every round runs each available configuration once; round r starts at configuration r.
fn run_rounds(
    workload: &mut Workload,
    env: &Env,
    rounds: u32,
    quiet_wait: Duration,
    round: impl Fn() -> Result<RoundLoad>,
) -> Result<()> {
    for r in 0..rounds as usize {
        let active: Vec<usize> = (0..workload.results.len())
            .filter(|&i| {
                let result = &workload.results[i];
                result.config.unavailable.is_none() && result.error.is_none()
            })
            .collect();
        if active.is_empty() {
            bail!("no configuration of workload {} can run", workload.key);
        }
        for k in 0..active.len() {
            let result = &mut workload.results[active[(k + r) % active.len()]];
            // Let the previous configuration's teardown and the last round's sockets settle.
            std::thread::sleep(Duration::from_millis(500));
            match measure(&result.config, env, &round, quiet_wait) {
                Ok(measured) => {
                    step(&format!(
                        "  round {}/{rounds} {:<17} {:>9} {}",
                        r + 1,
                        result.config.name,
                        int(measured.load.rate()),
                        workload.unit
                    ));
                    result.rounds.push(measured);
                }
                Err(err) if matches!(result.config.kind, Kind::None | Kind::Tracer { .. }) => {
                    return Err(err.context(format!("measuring {}", result.config.name)));
                }
                Err(err) => {
                    step(&format!(
                        "  {}: failed, dropped from the next rounds: {err:#}",
                        result.config.name
                    ));
                    result.error = Some(format!("{err:#}"));
                }
            }
        }
    }
    Ok(())
}

/// Waits (at most `max`) until the machine is quiet: CPUs mostly idle and no other
/// process holding tracing programs. Returns false if it never was.
fn wait_for_quiet(max: Duration) -> bool {
    let deadline = std::time::Instant::now() + max;
    let mut said = false;
    loop {
        let idle = sys::idle_share(Duration::from_millis(300)).unwrap_or(1.0);
        let foreign = check_foreign();
        if idle >= QUIET_IDLE && !foreign {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            step(&format!(
                "  machine still busy (idle {:.0}%{}): measuring anyway, round marked noisy",
                idle * 100.0,
                if foreign {
                    ", another tracer attached"
                } else {
                    ""
                }
            ));
            return false;
        }
        if !said {
            step(&format!(
                "  waiting for a quiet machine (idle {:.0}%{})",
                idle * 100.0,
                if foreign {
                    ", another tracer attached"
                } else {
                    ""
                }
            ));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
}

/// Idle share of all CPUs required before a round.
const QUIET_IDLE: f64 = 0.85;

fn measure(
    config: &Config,
    env: &Env,
    round: &impl Fn() -> Result<RoundLoad>,
    quiet_wait: Duration,
) -> Result<Round> {
    let noisy = !wait_for_quiet(quiet_wait);
    let running = Running::start(config, env)?;
    let before = running.snapshot();
    let irqs_before = sys::interrupts();
    let load = round()?;
    let irqs = irqs_before.zip(sys::interrupts());
    let noisy = noisy | check_foreign();
    std::thread::sleep(running.settle());
    let after = running.snapshot();
    let hwm_kib = match &running {
        Running::Tracer(tracer) => sys::status_kib(tracer.pid(), "VmHWM"),
        _ => None,
    };
    let printed = running.stop()?;
    Ok(Round {
        load,
        before,
        after,
        hwm_kib,
        perf_events: printed.as_deref().and_then(configs::perf_total),
        irqs,
        noisy,
    })
}

/// The agent with the smallest ring buffer under churn: events must be lost, and counted.
struct LossTest {
    ring_buffer_bytes: u32,
    client_threads: u32,
    /// How long the agent was stopped (SIGSTOP) in the middle of the round, if it was.
    paused: Option<Duration>,
    load: RoundLoad,
    events: Option<f64>,
    lost: Option<f64>,
}

impl LossTest {
    fn json(&self) -> Json {
        Json::obj([
            (
                "ring_buffer_bytes",
                Json::num(f64::from(self.ring_buffer_bytes)),
            ),
            ("client_threads", Json::num(f64::from(self.client_threads))),
            (
                "agent_paused_ms",
                Json::opt(self.paused.map(|p| p.as_secs_f64() * 1e3)),
            ),
            ("connections_per_s", Json::num(self.load.rate())),
            ("events_handled", Json::opt(self.events)),
            ("events_lost", Json::opt(self.lost)),
            (
                "loss_counted",
                Json::Bool(self.lost.is_some_and(|l| l > 0.0)),
            ),
        ])
    }

    fn how(&self) -> String {
        match self.paused {
            Some(p) => format!(
                "{} client threads, the agent stopped (SIGSTOP) for {} ms mid-round",
                self.client_threads,
                p.as_millis()
            ),
            None => format!("{} client threads", self.client_threads),
        }
    }
}

/// First plain churn with more client threads than cores (the agent competes for CPU); if the
/// agent keeps up even so, the same with the agent stopped for a moment, a stalled reader.
fn loss_test(
    env: &Env,
    server: &load::ChurnServer,
    clients: u32,
    duration: Duration,
) -> Result<LossTest> {
    let ring_buffer_bytes = 65_536;
    let threads = clients * 4;
    let mut test = None;
    for paused in [None, Some(Duration::from_millis(300))] {
        wait_for_quiet(Duration::from_secs(10));
        let tracer = configs::Tracer::start(env, Some(ring_buffer_bytes))?;
        let before = tracer.snapshot();
        let pid = tracer.pid();
        let pauser = paused.map(|pause| {
            std::thread::spawn(move || {
                std::thread::sleep(duration / 3);
                let stopped = sys::signal(pid, sys::SIGSTOP);
                std::thread::sleep(pause);
                if stopped.is_ok() {
                    let _ = sys::signal(pid, sys::SIGCONT);
                }
            })
        });
        let load = server.round(threads, duration);
        if let Some(pauser) = pauser {
            let _ = pauser.join();
        }
        // The agent reads the kernel's lost counter once a second.
        std::thread::sleep(Duration::from_millis(1300));
        let after = tracer.snapshot();
        tracer.stop()?;
        let delta = |f: fn(&Snapshot) -> Option<f64>| Some(f(&after)? - f(&before)?);
        let lost = delta(|s| s.lost);
        test = Some(LossTest {
            ring_buffer_bytes,
            client_threads: threads,
            paused,
            load,
            events: delta(|s| s.events),
            lost,
        });
        if lost.is_some_and(|l| l > 0.0) {
            break;
        }
    }
    test.context("no loss test round ran")
}
