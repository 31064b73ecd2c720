//! Bounded everything: far more connections than `--max-connections` (held open, churned, and
//! with closes lost to a tiny ring buffer while the agent is held stopped) leave the connection
//! table within its bound, the metric series as many as after warm-up, and the agent's resident
//! memory within a small margin of its level after warm-up.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_loss;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use common::*;
use support_loss::*;

const MAX: usize = 64;
/// Connections the agent keeps: `MAX` tracked plus at most `MAX` seeds (connections found by a
/// sock_diag dump, at start-up or after lost events, and not yet seen in an event).
const TABLE_BOUND: f64 = (2 * MAX) as f64;
/// Connections held open through the test, both ends: several times the table.
const HELD: usize = 150;
const PER_THREAD: usize = 1_500;
const ROUNDS: usize = 4;
/// The top-N of the breakdowns that follow the host's peers and listeners (other tests on the
/// host open listeners and TIME_WAIT sockets meanwhile): at most N series plus `other`.
const TOP_N: usize = 3;
const TOP_N_FAMILIES: [&str; 4] = [
    "tracer_time_wait_sockets_by_peer",
    "tracer_listen_overflows_by_listener_total",
    "tracer_listen_queue_length",
    "tracer_listen_queue_limit",
];
/// Allowed growth of the resident memory over its level after warm-up: a few allocator
/// pages, not a table growing with the connections seen (each round adds ~12 000).
const RSS_MARGIN_KIB: u64 = 8 * 1024;

/// One round of churn with the agent held stopped in the middle, so that events (closes among
/// them) are lost. The clients abort: the host keeps no TIME_WAIT socket from the churn, so the
/// agent's TIME_WAIT table (which follows every timewait socket of the host) stays the same
/// size and the memory measured is that of connections. Returns the connections made.
fn lossy_round(agent: &Agent, server: std::net::SocketAddr) -> usize {
    let burst = thread::spawn(move || churn(server, PER_THREAD, End::Abort));
    thread::sleep(Duration::from_millis(100));
    send_signal(agent.pid(), libc::SIGSTOP);
    thread::sleep(Duration::from_millis(500));
    send_signal(agent.pid(), libc::SIGCONT);
    burst.join().expect("burst")
}

fn check_table(text: &str, when: &str) {
    let active = metric_value(text, "tracer_connections_active", &[]);
    assert!(
        active <= TABLE_BOUND,
        "{when}: tracer_connections_active is {active}, above {TABLE_BOUND} (--max-connections \
         {MAX} tracked plus at most {MAX} seeds)"
    );
}

#[test]
fn tables_series_and_memory_stay_bounded_under_churn_and_loss() {
    require_root();
    let max = MAX.to_string();
    let top = TOP_N.to_string();
    let mut agent = Agent::start(&[
        "--max-connections",
        &max,
        "--ring-buffer-bytes",
        TINY_RING,
        "--time-wait-top-peers",
        &top,
        "--listen-overflow-top-ports",
        &top,
    ]);
    let server = ChurnServer::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let held = pairs(&listener, HELD);

    // Warm-up: every kind of event, loss and resync has happened once.
    let mut made = lossy_round(&agent, server.addr);
    // A resync follows lost events within 10 s; let the first one land.
    thread::sleep(Duration::from_secs(12));
    let warm = agent.scrape();
    check_table(&warm, "after warm-up");
    let warm_series = series_by_name(&warm);
    let warm_rss = rss_kib(agent.pid());

    let mut peak_rss = warm_rss;
    let mut rss_by_round = Vec::new();
    let mut series_seen: BTreeMap<String, usize> = warm_series.clone();
    for round in 0..ROUNDS {
        made += lossy_round(&agent, server.addr);
        let text = agent.scrape();
        check_table(&text, &format!("after round {round}"));
        for (name, n) in series_by_name(&text) {
            let seen = series_seen.entry(name).or_insert(0);
            *seen = (*seen).max(n);
        }
        let rss = rss_kib(agent.pid());
        rss_by_round.push(rss);
        peak_rss = peak_rss.max(rss);
    }
    thread::sleep(Duration::from_secs(12));
    let end = agent.scrape();
    check_table(&end, "at the end");
    let end_rss = rss_kib(agent.pid());
    peak_rss = peak_rss.max(end_rss);

    let lost = metric_value(&end, "tracer_events_lost_total", &[]);
    let evicted = metric_value(&end, "tracer_connections_evicted_total", &[]);
    let reconciled = metric_value(&end, "tracer_connections_reconciled_total", &[]);
    eprintln!(
        "{made} churned connections and {HELD} held pairs with --max-connections {MAX}: {lost} \
         events lost, {evicted} evicted, {reconciled} reconciled; active {} at the end; series \
         {} after warm-up, {} at most after; VmRSS {warm_rss} KiB after warm-up, {peak_rss} KiB \
         peak after ({rss_by_round:?} by round), {end_rss} KiB at the end",
        metric_value(&end, "tracer_connections_active", &[]),
        warm_series.values().sum::<usize>(),
        series_seen.values().sum::<usize>(),
    );
    assert!(
        lost > 0.0,
        "no event was lost with a {TINY_RING}-byte ring buffer and the agent stopped mid-churn: \
         the churn was too small to test closes lost"
    );
    assert!(
        evicted > 0.0,
        "nothing was evicted with {HELD} pairs held open and --max-connections {MAX}"
    );
    // Transition counters are created on first use: a rare pair may first show late, but they
    // are bounded by the pairs of TCP states. The top-N breakdowns follow the whole host (other
    // work opens listeners and peers meanwhile) and are bounded by N plus `other`. Every other
    // family must not grow at all once warmed up.
    let transitions = "tracer_tcp_state_transitions_total";
    let state_pairs = 13 * 13;
    assert!(
        series_seen.get(transitions).copied().unwrap_or(0) <= state_pairs,
        "{transitions} has more series than pairs of TCP states: {series_seen:?}"
    );
    for family in TOP_N_FAMILIES {
        let n = series_seen.get(family).copied().unwrap_or(0);
        assert!(
            n <= TOP_N + 1,
            "{family} has {n} series, above the top {TOP_N} plus other"
        );
    }
    let grown: Vec<String> = series_seen
        .iter()
        .filter(|(name, _)| *name != transitions && !TOP_N_FAMILIES.contains(&name.as_str()))
        .filter(|(name, n)| warm_series.get(*name).copied().unwrap_or(0) < **n)
        .map(|(name, n)| {
            format!(
                "{name}: {} -> {n}",
                warm_series.get(name).copied().unwrap_or(0)
            )
        })
        .collect();
    assert!(
        grown.is_empty(),
        "metric series grew with more churn after warm-up: {grown:?}"
    );
    assert!(
        peak_rss <= warm_rss + RSS_MARGIN_KIB,
        "VmRSS grew from {warm_rss} KiB after warm-up to {peak_rss} KiB with {ROUNDS} more rounds \
         of churn: more than {RSS_MARGIN_KIB} KiB"
    );
    drop(held);
    server.stop();
    agent.stop();
}
