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
mod idle;
mod load;
mod profile;
mod report;
mod ringbuf;
mod sys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::value_parser;

use crate::{require_root, step, workspace_root};
use configs::{Config, Env, Kind, Running, Snapshot};
use load::RoundLoad;
use report::{Json, Summary, int, mib};

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

    step("profile: the agent's eBPF programs with kernel run-time statistics on");
    let profile = profile::run(&env, &server, args.clients, duration, args.experiments)?;
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

const CHURN_TRACEPOINT: &str = "inet_sock_set_state";
const TIMER_TRACEPOINTS: [&str; 3] = ["timer_start", "timer_cancel", "timer_expire_entry"];

fn tracer_config() -> Config {
    Config::new(
        "tracer",
        "tracer run --events none: tp_btf hooks, ring buffer, the agent tracking every connection",
        Kind::Tracer {
            ring_buffer_bytes: None,
        },
    )
}

fn bpftrace_config(
    name: &'static str,
    description: String,
    script: String,
    bpftrace: Option<&String>,
) -> Config {
    let mut config = Config::new(name, description, Kind::Bpftrace { script });
    if bpftrace.is_none() {
        config.unavailable = Some("bpftrace is not available".into());
    }
    config
}

/// The raw-tracepoint floor: bpftrace's `rawtracepoint:` when it has it, else (decided while
/// probing) the bench's own counter program.
fn raw_floor_config(tracepoints: &[&'static str], bpftrace: Option<&String>) -> Config {
    let probes: Vec<String> = tracepoints
        .iter()
        .map(|t| format!("rawtracepoint:{t}"))
        .collect();
    let mut config = Config::new(
        "floor-raw",
        format!("bpftrace, empty action on {}", probes.join(", ")),
        Kind::Bpftrace {
            script: configs::empty_script(&probes),
        },
    );
    if bpftrace.is_none() {
        own_raw_floor(&mut config, tracepoints, "bpftrace is not available".into());
    }
    config
}

fn own_raw_floor(config: &mut Config, tracepoints: &[&'static str], why: String) {
    config.kind = Kind::RawFloor {
        tracepoints: tracepoints.to_vec(),
    };
    config.description = format!(
        "the bench's own raw_tp program (a per-CPU counter) on {}",
        tracepoints.join(", ")
    );
    config.note = Some(format!(
        "{why}; measured with the bench's own raw_tp program"
    ));
}

fn perf_config(events: &[&'static str], perf: bool) -> Config {
    let mut config = Config::new(
        "perf-count",
        format!("perf stat -a -e {} (counting, no BPF)", events.join(",")),
        Kind::Perf {
            events: events.to_vec(),
        },
    );
    if !perf {
        config.unavailable = Some("perf is not installed: skipped".into());
    }
    config
}

fn churn_configs(bpftrace: Option<&String>, perf: bool, experiments: bool) -> Vec<Config> {
    let classic = format!("tracepoint:sock:{CHURN_TRACEPOINT}");
    let mut configs = vec![
        Config::new("none", "nothing attached", Kind::None),
        tracer_config(),
        bpftrace_config(
            "bpftrace-tcplife",
            format!(
                "bpftrace tcplife-style script on {classic}: birth time and pid per socket, duration printed at close (output discarded)"
            ),
            configs::tcplife_script(),
            bpftrace,
        ),
        bpftrace_config(
            "floor-classic",
            format!("bpftrace, empty action on {classic}"),
            configs::empty_script(std::slice::from_ref(&classic)),
            bpftrace,
        ),
        raw_floor_config(&[CHURN_TRACEPOINT], bpftrace),
        perf_config(&["sock:inet_sock_set_state"], perf),
    ];
    if experiments {
        for (name, batched, how) in [
            (
                "exp-ring-wakeup",
                false,
                "default wake-ups (the reader is woken whenever it had caught up)",
            ),
            (
                "exp-ring-batched",
                true,
                "BPF_RB_NO_WAKEUP, forced wake-up past 256 KiB pending, reader polling every 10 ms",
            ),
        ] {
            configs.push(Config::new(
                name,
                format!(
                    "the bench's own raw_tp program sending a 96-byte record per {CHURN_TRACEPOINT} event through an 8 MiB BPF ring buffer, drained by a thread doing nothing else; {how}"
                ),
                Kind::Ringbuf {
                    tracepoints: vec![CHURN_TRACEPOINT],
                    batched,
                },
            ));
        }
    }
    configs
}

fn timer_configs(bpftrace: Option<&String>, perf: bool) -> Vec<Config> {
    let classic: Vec<String> = TIMER_TRACEPOINTS
        .iter()
        .map(|t| format!("tracepoint:timer:{t}"))
        .collect();
    vec![
        Config::new("none", "nothing attached", Kind::None),
        tracer_config(),
        bpftrace_config(
            "floor-classic",
            format!("bpftrace, empty action on {}", classic.join(", ")),
            configs::empty_script(&classic),
            bpftrace,
        ),
        raw_floor_config(&TIMER_TRACEPOINTS, bpftrace),
        perf_config(
            &[
                "timer:timer_start",
                "timer:timer_cancel",
                "timer:timer_expire_entry",
            ],
            perf,
        ),
    ]
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

/// Each round's rate over the `none` rate of the same round.
fn round_ratios(result: &ConfigResult, none: Option<&ConfigResult>) -> Vec<f64> {
    let Some(none) = none else {
        return Vec::new();
    };
    result
        .rates()
        .iter()
        .zip(none.rates())
        .filter(|(_, base)| *base > 0.0)
        .map(|(rate, base)| rate / base)
        .collect()
}

fn ratio(value: f64, base: Option<Summary>) -> Option<f64> {
    base.filter(|b| b.median > 0.0).map(|b| value / b.median)
}

fn workload_json(workload: &Workload) -> Json {
    let none = workload.results.first().and_then(ConfigResult::summary);
    let baseline = workload.results.first();
    Json::obj([
        ("name", Json::str(workload.key)),
        ("title", Json::str(workload.title.as_str())),
        ("unit", Json::str(workload.unit)),
        (
            "configs",
            Json::Arr(
                workload
                    .results
                    .iter()
                    .map(|result| {
                        let summary = result.summary();
                        Json::obj([
                            ("name", Json::str(result.config.name)),
                            ("description", Json::str(result.config.description.as_str())),
                            ("measured", Json::Bool(summary.is_some())),
                            (
                                "unavailable",
                                Json::opt_str(result.config.unavailable.as_deref()),
                            ),
                            ("note", Json::opt_str(result.config.note.as_deref())),
                            ("error", Json::opt_str(result.error.as_deref())),
                            ("rate", summary.map_or(Json::Null, |s| s.json())),
                            (
                                "ratio_to_none",
                                Json::opt(summary.and_then(|s| ratio(s.median, none))),
                            ),
                            (
                                "rounds",
                                Json::Arr(result.rates().into_iter().map(Json::num).collect()),
                            ),
                            (
                                "ratio_per_round",
                                Json::Arr(
                                    round_ratios(result, baseline)
                                        .into_iter()
                                        .map(Json::num)
                                        .collect(),
                                ),
                            ),
                            ("load_errors", Json::num(result.errors() as f64)),
                            ("noisy_rounds", Json::num(result.noisy() as f64)),
                            (
                                "tool_events_per_s",
                                result.event_rates().map_or(Json::Null, |s| s.json()),
                            ),
                            ("tool_events_lost", Json::opt(result.sum(Round::lost))),
                            (
                                "interrupts_per_s",
                                result.irq_rates().map_or(Json::Null, |[iwi, res, cal]| {
                                    Json::obj([
                                        ("irq_work", Json::num(iwi)),
                                        ("resched_ipi", Json::num(res)),
                                        ("call_function_ipi", Json::num(cal)),
                                    ])
                                }),
                            ),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

/// The agent's own figures over the `tracer` rounds of a workload.
struct AgentFigures {
    events_per_s: Option<Summary>,
    events_per_op: Option<f64>,
    lost: Option<f64>,
    cpu_us_per_event: Option<f64>,
    cpu_share: Option<f64>,
    wakeups_per_s: Option<f64>,
    events_per_wakeup: Option<f64>,
    peak_rss_kib: Option<u64>,
}

/// Fewest events for a per-event figure.
const MIN_EVENTS: f64 = 10_000.0;

fn agent_figures(workload: &Workload) -> Option<AgentFigures> {
    let result = workload
        .results
        .iter()
        .find(|r| r.config.name == "tracer")?;
    if result.rounds.is_empty() {
        return None;
    }
    let events = result.sum(Round::events);
    let cpu = result.sum(Round::cpu_seconds);
    let wakeups = result.sum(Round::wakeups);
    Some(AgentFigures {
        events_per_s: result.event_rates(),
        events_per_op: events.map(|e| e / result.ops().max(1.0)),
        lost: result.sum(Round::lost),
        // Per-event figures mean nothing over a handful of events (and 10 ms CPU ticks).
        cpu_us_per_event: cpu
            .zip(events)
            .and_then(|(c, e)| (e >= MIN_EVENTS).then(|| c / e * 1e6)),
        cpu_share: cpu.map(|c| c / result.seconds()),
        wakeups_per_s: wakeups.map(|w| w / result.seconds()),
        events_per_wakeup: events
            .zip(wakeups)
            .and_then(|(e, w)| (w > 0.0 && e >= MIN_EVENTS).then(|| e / w)),
        peak_rss_kib: result.rounds.iter().filter_map(|r| r.hwm_kib).max(),
    })
}

fn tracer_json(workload: &Workload) -> Json {
    let Some(f) = agent_figures(workload) else {
        return Json::Null;
    };
    Json::obj([
        (
            "events_per_s",
            f.events_per_s.map_or(Json::Null, |s| s.json()),
        ),
        ("events_per_op", Json::opt(f.events_per_op)),
        ("events_lost", Json::opt(f.lost)),
        ("cpu_us_per_event", Json::opt(f.cpu_us_per_event)),
        ("cpu_share_of_one_core", Json::opt(f.cpu_share)),
        ("wakeups_per_s", Json::opt(f.wakeups_per_s)),
        ("events_per_wakeup", Json::opt(f.events_per_wakeup)),
        ("peak_rss_kib", Json::opt(f.peak_rss_kib.map(|v| v as f64))),
    ])
}

fn render_text(
    workloads: &[&Workload],
    loss: &LossTest,
    profile: &profile::Profile,
    idle: Option<&idle::IdleResult>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for workload in workloads {
        let none = workload.results.first().and_then(ConfigResult::summary);
        let baseline = workload.results.first();
        let rounds = workload
            .results
            .iter()
            .map(|r| r.rounds.len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "\n{} — medians of {rounds} alternating rounds",
            workload.title
        );
        let _ = writeln!(
            out,
            "{:<17} {:>14} {:>10} {:>10} {:>8} {:>13}   tool",
            "config",
            format!("median {}", workload.unit.split('/').next().unwrap_or("")),
            "min",
            "max",
            "vs none",
            "round ratios"
        );
        for result in &workload.results {
            let name = result.config.name;
            let Some(s) = result.summary() else {
                let why = result
                    .config
                    .unavailable
                    .as_deref()
                    .or(result.error.as_deref())
                    .unwrap_or("no rounds");
                let _ = writeln!(out, "{name:<17} not measured: {why}");
                continue;
            };
            let ratio = ratio(s.median, none).map_or("-".into(), |r| format!("{r:.3}"));
            let spread = if std::ptr::eq(result, &workload.results[0]) {
                String::new()
            } else {
                Summary::of(&round_ratios(result, baseline))
                    .map_or("-".into(), |r| format!("{:.2}-{:.2}", r.min, r.max))
            };
            let _ = writeln!(
                out,
                "{name:<17} {:>14} {:>10} {:>10} {:>8} {:>13}   {}",
                int(s.median),
                int(s.min),
                int(s.max),
                ratio,
                spread,
                tool_column(result)
            );
        }
        for result in &workload.results {
            if let Some(note) = &result.config.note {
                let _ = writeln!(out, "  note, {}: {note}", result.config.name);
            }
            if result.noisy() > 0 {
                let _ = writeln!(
                    out,
                    "  note, {}: {} of {} rounds started on a busy machine",
                    result.config.name,
                    result.noisy(),
                    result.rounds.len()
                );
            }
            if result.errors() > 0 {
                let _ = writeln!(
                    out,
                    "  note, {}: {} failed connection attempts",
                    result.config.name,
                    result.errors()
                );
            }
        }
        let _ = writeln!(
            out,
            "interrupts/s, whole system (median): IRQ work / rescheduling IPI / function-call IPI"
        );
        for result in &workload.results {
            if let Some([iwi, res, cal]) = result.irq_rates() {
                let _ = writeln!(
                    out,
                    "  {:<17} {:>10} {:>10} {:>10}",
                    result.config.name,
                    int(iwi),
                    int(res),
                    int(cal)
                );
            }
        }
        if let Some(f) = agent_figures(workload) {
            let _ = writeln!(out, "agent (tracer rounds):");
            if let Some(e) = f.events_per_s {
                let _ = writeln!(
                    out,
                    "  events handled     {} /s (min {}, max {}){}",
                    int(e.median),
                    int(e.min),
                    int(e.max),
                    f.events_per_op
                        .map(|p| format!(", {p:.2} per operation"))
                        .unwrap_or_default()
                );
            }
            let _ = writeln!(
                out,
                "  events lost        {}",
                match f.lost {
                    Some(0.0) => "0".to_owned(),
                    Some(l) => format!("{} — NOT ZERO: the agent fell behind at this rate", int(l)),
                    None => "unknown (metrics unreadable)".into(),
                }
            );
            match f.cpu_us_per_event {
                Some(c) => {
                    let _ = writeln!(
                        out,
                        "  agent CPU          {c:.2} µs per event (user + system time of the process)"
                    );
                }
                None => {
                    let _ = writeln!(out, "  agent CPU          per event: too few events to say");
                }
            }
            if let Some(share) = f.cpu_share {
                let _ = writeln!(
                    out,
                    "  agent CPU share    {:.1}% of one core",
                    share * 100.0
                );
            }
            if let Some(w) = f.wakeups_per_s {
                let _ = writeln!(
                    out,
                    "  agent wake-ups     {} /s{}",
                    int(w),
                    f.events_per_wakeup
                        .map(|e| format!(", {e:.1} events per wake-up"))
                        .unwrap_or_default()
                );
            }
            if let Some(kib) = f.peak_rss_kib {
                let _ = writeln!(out, "  agent peak RSS     {} (VmHWM)", mib(kib as f64));
            }
        }
    }

    let _ = writeln!(
        out,
        "\nLoss test: ring buffer of {} bytes under churn ({}, {} conn/s): {} events handled, {} lost — {}",
        loss.ring_buffer_bytes,
        loss.how(),
        int(loss.load.rate()),
        loss.events.map_or("?".into(), int),
        loss.lost.map_or("?".into(), int),
        if loss.lost.is_some_and(|l| l > 0.0) {
            "loss is counted in tracer_events_lost_total"
        } else {
            "no loss provoked (or not counted)"
        }
    );

    out.push_str(&profile.render());

    if let Some(idle) = idle {
        let kib = |v: Option<u64>| v.map_or("?".into(), |k| mib(k as f64));
        let _ = writeln!(
            out,
            "\nMemory with idle connections: {} of {} loopback connections open in {:.1} s ({} helper process pairs, {} ports)",
            int(idle.connected as f64),
            int(idle.wanted as f64),
            idle.open_seconds,
            idle.helper_pairs,
            idle.listeners
        );
        let _ = writeln!(
            out,
            "  agent RSS: {} before, {} with them open ({} tracked), {} after closing; peak {}{}",
            kib(idle.rss_before_kib),
            kib(idle.rss_with_kib),
            idle.tracked_with.map_or("?".into(), int),
            kib(idle.rss_after_kib),
            kib(idle.hwm_kib),
            idle.bytes_per_socket()
                .map(|b| format!("; about {} bytes per tracked socket", int(b)))
                .unwrap_or_default()
        );
        for note in &idle.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    out
}

/// What the tool itself reported: events counted, runs of the floor program, lost events.
fn tool_column(result: &ConfigResult) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = result.event_rates() {
        let what = match result.config.kind {
            Kind::Tracer { .. } => "events/s",
            Kind::RawFloor { .. } => "hook runs/s",
            Kind::Ringbuf { .. } => "records/s",
            Kind::Perf { .. } => "events/s counted",
            _ => "events/s",
        };
        parts.push(format!("{} {what}", int(rate.median)));
    }
    if let Some(lost) = result.sum(Round::lost)
        && (lost > 0.0 || matches!(result.config.kind, Kind::Tracer { .. }))
    {
        parts.push(format!("{} lost", int(lost)));
    }
    if let (Kind::Bpftrace { .. }, Some(cpu)) =
        (&result.config.kind, result.sum(Round::cpu_seconds))
    {
        parts.push(format!(
            "bpftrace process {:.0}% CPU",
            cpu / result.seconds() * 100.0
        ));
    }
    parts.join(", ")
}
