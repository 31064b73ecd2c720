//! Ratios to the `none` configuration and the JSON results of a workload.
use super::*;

/// Each round's rate over the `none` rate of the same round.
pub(super) fn round_ratios(result: &ConfigResult, none: Option<&ConfigResult>) -> Vec<f64> {
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

pub(super) fn ratio(value: f64, base: Option<Summary>) -> Option<f64> {
    base.filter(|b| b.median > 0.0).map(|b| value / b.median)
}

pub(super) fn workload_json(workload: &Workload) -> Json {
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
pub(super) struct AgentFigures {
    pub(super) events_per_s: Option<Summary>,
    pub(super) events_per_op: Option<f64>,
    /// Records read from the kernel per operation (connection, under churn).
    pub(super) records_per_op: Option<f64>,
    pub(super) lost: Option<f64>,
    pub(super) cpu_us_per_event: Option<f64>,
    pub(super) cpu_share: Option<f64>,
    pub(super) wakeups_per_s: Option<f64>,
    pub(super) events_per_wakeup: Option<f64>,
    pub(super) peak_rss_kib: Option<u64>,
}

/// Fewest events for a per-event figure.
pub(super) const MIN_EVENTS: f64 = 10_000.0;

pub(super) fn agent_figures(workload: &Workload) -> Option<AgentFigures> {
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
        records_per_op: result
            .sum(Round::records)
            .map(|r| r / result.ops().max(1.0)),
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

pub(super) fn tracer_json(workload: &Workload) -> Json {
    let Some(f) = agent_figures(workload) else {
        return Json::Null;
    };
    Json::obj([
        (
            "events_per_s",
            f.events_per_s.map_or(Json::Null, |s| s.json()),
        ),
        ("events_per_op", Json::opt(f.events_per_op)),
        ("records_per_op", Json::opt(f.records_per_op)),
        ("events_lost", Json::opt(f.lost)),
        ("cpu_us_per_event", Json::opt(f.cpu_us_per_event)),
        ("cpu_share_of_one_core", Json::opt(f.cpu_share)),
        ("wakeups_per_s", Json::opt(f.wakeups_per_s)),
        ("events_per_wakeup", Json::opt(f.events_per_wakeup)),
        ("peak_rss_kib", Json::opt(f.peak_rss_kib.map(|v| v as f64))),
    ])
}
