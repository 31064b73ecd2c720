//! The results table printed at the end of a run.
use super::*;

pub(super) fn render_text(
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
            if let Some(r) = f.records_per_op {
                let _ = writeln!(
                    out,
                    "  kernel records     {r:.2} per operation (each carries one or more events)"
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
        out.push_str(&idle_text(idle));
    }
    out
}

/// The memory phase's figures.
pub(super) fn idle_text(idle: &idle::IdleResult) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
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
    if let Some(map) = idle.map_kib {
        let _ = writeln!(
            out,
            "  kernel memory of the agent's BPF maps (not in its RSS): {}",
            mib(map as f64)
        );
    }
    for note in &idle.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

/// What the tool itself reported: events counted, runs of the floor program, lost events.
pub(super) fn tool_column(result: &ConfigResult) -> String {
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
