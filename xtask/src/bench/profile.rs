//! Where the kernel-side time goes: the kernel's run-time statistics of each eBPF program
//! (`BPF_ENABLE_STATS`), read from `/proc/PID/fdinfo` before and after a round. They time the
//! program bodies, helpers included (a ring buffer wake-up raised inside `bpf_ringbuf_submit`
//! counts), not the hook around them; turning them on adds a little to every run.
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::bpf::{self, RawFloor};
use super::configs::{Bpftrace, Env, Tracer, aggregate_script};
use super::load::{self, ChurnServer, RoundLoad};
use super::report::{Json, int};
use super::ringbuf::RingbufExperiment;
use super::{CHURN_TRACEPOINT, wait_for_quiet};

pub struct Profile {
    phases: Vec<Phase>,
}

struct Phase {
    tool: &'static str,
    workload: &'static str,
    load: RoundLoad,
    programs: Vec<ProgCost>,
    /// Kernel records the agent read per operation of the workload (agent phases only).
    records_per_op: Option<f64>,
    /// Events by kind and kernel tables found full, per operation (agent phases only).
    breakdown: Vec<(String, f64)>,
}

/// `tracer_events_total` kinds.
const EVENT_KINDS: [&str; 6] = [
    "state",
    "time_wait_timer",
    "delayed_ack",
    "nagle_held_write",
    "retransmit",
    "reset",
];

struct ProgCost {
    name: String,
    calls: u64,
    ns: u64,
}

impl ProgCost {
    fn ns_per_call(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.ns as f64 / self.calls as f64)
    }
}

pub fn run(
    env: &Env,
    server: &ChurnServer,
    clients: u32,
    duration: Duration,
    experiments: bool,
    with_bpftrace: bool,
) -> Result<Profile> {
    let churn = || Ok(server.round(clients, duration));
    let timers = || load::timer_round(clients, duration);
    wait_for_quiet(Duration::from_secs(10));
    let _stats = bpf::Stats::enable()?;
    let mut phases = Vec::new();
    let tracer = Tracer::start(env, None)?;
    phases.push(phase(
        "tracer",
        "churn",
        Some(&tracer),
        tracer.pid(),
        &churn,
    )?);
    phases.push(phase(
        "tracer",
        "timers",
        Some(&tracer),
        tracer.pid(),
        &timers,
    )?);
    tracer.stop()?;
    // The same churn under an empty program and under the improvised aggregating script: a
    // program's ns per call only means something against what the hook costs on this machine
    // (the machines differ by 2x), and against what a user would run instead.
    let own = std::process::id();
    let floor = RawFloor::attach(&[CHURN_TRACEPOINT])?;
    phases.push(phase("floor-raw", "churn", None, own, &churn)?);
    drop(floor);
    if with_bpftrace {
        let script = Bpftrace::start(&aggregate_script(), &env.out_dir, "profile-aggregate")?;
        phases.push(phase(
            "bpftrace-aggregate",
            "churn",
            None,
            script.pid(),
            &churn,
        )?);
        script.stop()?;
    }
    if experiments {
        for (tool, batched) in [("exp-ring-wakeup", false), ("exp-ring-batched", true)] {
            let ring = RingbufExperiment::attach(&[CHURN_TRACEPOINT], batched)?;
            phases.push(phase(tool, "churn", None, own, &churn)?);
            drop(ring);
        }
    }
    Ok(Profile { phases })
}

fn phase(
    tool: &'static str,
    workload: &'static str,
    agent: Option<&Tracer>,
    pid: u32,
    round: &dyn Fn() -> Result<RoundLoad>,
) -> Result<Phase> {
    let scrape = || agent.and_then(|a| super::sys::scrape(a.metrics).ok());
    let page_before = scrape();
    let before = bpf::programs_of(pid)?;
    let load = round()?;
    let after = bpf::programs_of(pid)?;
    // The agent reads what is queued within its drain interval: let it.
    std::thread::sleep(Duration::from_millis(200));
    let page_after = scrape();
    // Records read, what they carried and which kernel tables overflowed, per operation.
    let mut records_per_op = None;
    let mut breakdown = Vec::new();
    if let (Some(b), Some(a)) = (&page_before, &page_after)
        && load.ops > 0
    {
        let per_op = |name: &str, labels: &[(&str, &str)]| {
            Some((a.sum(name, labels)? - b.sum(name, labels)?) / load.ops as f64)
        };
        records_per_op = per_op("tracer_kernel_records_total", &[]);
        for kind in EVENT_KINDS {
            if let Some(v) = per_op("tracer_events_total", &[("kind", kind)]).filter(|&v| v > 0.0) {
                breakdown.push((format!("{kind} events"), v));
            }
        }
        for table in ["paths", "cong", "time_wait_exits"] {
            if let Some(v) =
                per_op("tracer_kernel_table_full_total", &[("table", table)]).filter(|&v| v > 0.0)
            {
                breakdown.push((format!("{table} table full"), v));
            }
        }
    }
    let mut programs: Vec<ProgCost> = after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.id == a.id)?;
            Some(ProgCost {
                name: a.name.clone(),
                calls: a.run_cnt.saturating_sub(b.run_cnt),
                ns: a.run_time_ns.saturating_sub(b.run_time_ns),
            })
        })
        .collect();
    programs.sort_by_key(|p| std::cmp::Reverse(p.ns));
    Ok(Phase {
        tool,
        workload,
        load,
        programs,
        records_per_op,
        breakdown,
    })
}

impl Profile {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\neBPF program run time (kernel statistics, program bodies including helpers):"
        );
        for phase in &self.phases {
            let _ = writeln!(
                out,
                "  {} under {} ({} ops/s):",
                phase.tool,
                phase.workload,
                int(phase.load.rate())
            );
            if let Some(records) = phase.records_per_op {
                let _ = writeln!(out, "    kernel records: {records:.2} per operation");
            }
            if !phase.breakdown.is_empty() {
                let parts: Vec<String> = phase
                    .breakdown
                    .iter()
                    .map(|(what, v)| format!("{what} {v:.2}"))
                    .collect();
                let _ = writeln!(out, "    per operation: {}", parts.join(", "));
            }
            for p in phase.programs.iter().filter(|p| p.calls > 0) {
                let _ = writeln!(
                    out,
                    "    {:<20} {:>11} calls/s {:>7} ns/call {:>6.1}% of one core",
                    p.name,
                    int(p.calls as f64 / phase.load.seconds),
                    p.ns_per_call().map_or("-".into(), |n| format!("{n:.0}")),
                    p.ns as f64 / 1e9 / phase.load.seconds * 100.0
                );
            }
        }
        if let Some((state, floor)) = self.state_against_floor() {
            let _ = writeln!(
                out,
                "  inet_sock_set_state under churn: {state:.0} ns per call, {:.1}x the empty raw_tp \
                 program on the same hook ({floor:.0} ns)",
                state / floor
            );
        }
        out
    }

    /// The agent's state program and the empty `raw_tp` program, ns per call under churn.
    fn state_against_floor(&self) -> Option<(f64, f64)> {
        let per_call = |tool: &str, name: &str| {
            self.phases
                .iter()
                .find(|p| p.tool == tool && p.workload == "churn")?
                .programs
                .iter()
                .find(|p| p.name.contains(name))?
                .ns_per_call()
        };
        Some((
            per_call("tracer", "inet_sock_set_state")?,
            per_call("floor-raw", "")?,
        ))
    }

    pub fn json(&self) -> Json {
        Json::Arr(self.phases.iter().map(Phase::json).collect())
    }
}

impl Phase {
    fn json(&self) -> Json {
        let seconds = self.load.seconds;
        let programs = self
            .programs
            .iter()
            .map(|p| {
                Json::obj([
                    ("name", Json::str(p.name.as_str())),
                    ("calls_per_s", Json::num(p.calls as f64 / seconds)),
                    ("ns_per_call", Json::opt(p.ns_per_call())),
                    (
                        "cpu_share_of_one_core",
                        Json::num(p.ns as f64 / 1e9 / seconds),
                    ),
                ])
            })
            .collect();
        Json::obj([
            ("tool", Json::str(self.tool)),
            ("workload", Json::str(self.workload)),
            ("ops_per_s", Json::num(self.load.rate())),
            ("records_per_op", Json::opt(self.records_per_op)),
            ("programs", Json::Arr(programs)),
        ])
    }
}
