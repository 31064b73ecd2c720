//! The configurations each workload compares: nothing attached, the agent, bpftrace, the
//! hook floors and perf.
use super::*;

pub(super) const CHURN_TRACEPOINT: &str = "inet_sock_set_state";

pub(super) const TIMER_TRACEPOINTS: [&str; 3] =
    ["timer_start", "timer_cancel", "timer_expire_entry"];

pub(super) fn tracer_config() -> Config {
    Config::new(
        "tracer",
        "tracer run --events none: tp_btf hooks, ring buffer, the agent tracking every connection",
        Kind::Tracer {
            ring_buffer_bytes: None,
            paused: false,
        },
    )
}

/// The agent attached and then stopped: its kernel programs' share of the cost, apart from
/// the agent's own CPU.
pub(super) fn tracer_paused_config() -> Config {
    Config::new(
        "tracer-paused",
        "tracer run --events none, stopped (SIGSTOP) once attached: its kernel programs run, the agent does not (its ring fills; records are counted lost)",
        Kind::Tracer {
            ring_buffer_bytes: None,
            paused: true,
        },
    )
}

pub(super) fn bpftrace_config(
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
pub(super) fn raw_floor_config(tracepoints: &[&'static str], bpftrace: Option<&String>) -> Config {
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

pub(super) fn own_raw_floor(config: &mut Config, tracepoints: &[&'static str], why: String) {
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

pub(super) fn perf_config(events: &[&'static str], perf: bool) -> Config {
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

pub(super) fn churn_configs(
    bpftrace: Option<&String>,
    perf: bool,
    experiments: bool,
) -> Vec<Config> {
    let classic = format!("tracepoint:sock:{CHURN_TRACEPOINT}");
    let mut configs = vec![
        Config::new("none", "nothing attached", Kind::None),
        tracer_config(),
        tracer_paused_config(),
        bpftrace_config(
            "bpftrace-tcplife",
            format!(
                "bpftrace tcplife-style script on {classic}: birth time and pid per socket, duration printed at close (output discarded)"
            ),
            configs::tcplife_script(),
            bpftrace,
        ),
        bpftrace_config(
            "bpftrace-aggregate",
            format!(
                "bpftrace on {classic}: birth time per socket and a duration histogram in kernel maps, nothing printed per event"
            ),
            configs::aggregate_script(),
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

pub(super) fn timer_configs(bpftrace: Option<&String>, perf: bool) -> Vec<Config> {
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
