//! Delayed ACKs and the Nagle + delayed-ACK stall on loopback, compared with what the kernel
//! does: a client with Nagle on that writes a request in two small writes and then waits for
//! the reply loses one delayed-ACK timeout (~40 ms on Linux) per round, which the agent must
//! attribute to the client's connection and process; with TCP_NODELAY nothing is flagged; and
//! the host total of delayed ACKs equals the kernel's `TcpExtDelayedACKs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_latency;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_latency::*;

const ROUNDS: usize = 20;
/// Rounds that must stall: the first few are ACKed at once (the receiver starts in quick-ACK
/// mode), every later one waits for the delayed ACK.
const MIN_STALLS: u64 = 15;
/// What a delayed ACK costs on Linux: TCP_ATO_MIN is 40 ms; anything in this band is the
/// delayed-ACK timer, not scheduling noise.
const MIN_LOST_PER_STALL_US: u64 = 20_000;
const MAX_LOST_PER_STALL_US: u64 = 250_000;

const NAGLE_EVENT: &str = "nagle_delack_stall";

/// The events about the client socket of `run` (its local address as saddr/sport).
fn about_client(run: &WwrRun, event: &'static str) -> impl Fn(&Value) -> bool + Clone {
    let server = run.server;
    let client = run.client;
    move |e| {
        e["event"] == event
            && e["saddr"] == client.ip().to_string().as_str()
            && e["sport"] == client.port()
            && e["daddr"] == server.ip().to_string().as_str()
            && e["dport"] == server.port()
    }
}

/// The `connection_closed` event of the server's side of `run`.
fn about_server(run: &WwrRun) -> impl Fn(&Value) -> bool + Clone {
    let server = run.server;
    let client = run.client;
    move |e| {
        is_server_of(server)(e)
            && e["daddr"] == client.ip().to_string().as_str()
            && e["dport"] == client.port()
    }
}

fn delta(before: &str, after: &str, name: &str) -> f64 {
    metric_value(after, name, &[]) - metric_value(before, name, &[])
}

#[test]
fn write_write_read_with_nagle_stalls_on_the_delayed_ack_and_is_reported() {
    require_root();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    // Baseline: the same exchange without Nagle costs a loopback round trip.
    let quick = write_write_read(ROUNDS, true, "wwr-nodelay");
    let run = write_write_read(ROUNDS, false, "wwr-nagle");
    let per_round_excess_us =
        (run.total().as_secs_f64() - quick.total().as_secs_f64()) * 1e6 / ROUNDS as f64;
    eprintln!(
        "write-write-read, {ROUNDS} rounds on loopback: with Nagle {:.1} ms per round [{}], with \
         TCP_NODELAY {:.3} ms per round; excess {:.1} ms per round",
        run.mean().as_secs_f64() * 1e3,
        run.rounds_ms(),
        quick.mean().as_secs_f64() * 1e3,
        per_round_excess_us / 1e3
    );

    let closed = agent.wait_for_events(about_client(&run, "connection_closed"), 1, EVENT_TIMEOUT);
    assert_eq!(
        closed.len(),
        1,
        "one connection_closed per socket: {closed:?}"
    );
    let closed = &closed[0];
    // The final stall report is written at close, before connection_closed.
    let reports = agent.events(about_client(&run, NAGLE_EVENT));
    assert!(
        !reports.is_empty(),
        "no {NAGLE_EVENT} event for the client {} -> {} (its connection_closed: {closed})",
        run.client,
        run.server
    );
    let pid = u64::from(std::process::id());
    for ev in &reports {
        assert_eq!(ev_u64(ev, "pid"), pid, "the writer is this process: {ev}");
        assert_eq!(
            ev_str(ev, "comm"),
            run.comm,
            "the writer is the client thread: {ev}"
        );
        assert_eq!(ev_u64(ev, "netns"), host_netns_inode(), "{ev}");
        assert!(
            ev_str(ev, "fix").contains("TCP_NODELAY"),
            "the advice names TCP_NODELAY: {ev}"
        );
        assert!(
            ev_u64(ev, "held_writes") >= ev_u64(ev, "stalls"),
            "every stall is a held write: {ev}"
        );
    }
    // First stall reported at once, then at most every 10 s (this run lasts about a second),
    // and a final report at close: two reports, the first about one stall.
    let stalls: Vec<u64> = reports.iter().map(|e| ev_u64(e, "stalls")).collect();
    assert!(
        stalls.windows(2).all(|w| w[0] < w[1]),
        "each report covers new stalls: {stalls:?}"
    );
    assert_eq!(
        stalls[0], 1,
        "the first stall is reported at once: {reports:?}"
    );
    assert!(
        reports.len() <= 3,
        "reports are rate limited (10 s per connection): {reports:?}"
    );
    let last = reports.last().unwrap();
    eprintln!("stall reports: {reports:?}\nclient: {closed}");

    let n_stalls = ev_u64(closed, "nagle_stalls");
    let lost_us = ev_u64(closed, "nagle_lost_us");
    assert_eq!(
        n_stalls,
        ev_u64(last, "stalls"),
        "final report = connection: {last} {closed}"
    );
    assert_eq!(
        lost_us,
        ev_u64(last, "lost_us"),
        "final report = connection: {last} {closed}"
    );
    assert!(
        n_stalls >= MIN_STALLS && n_stalls <= ROUNDS as u64,
        "{n_stalls} stalls over {ROUNDS} write-write-read rounds, expected {MIN_STALLS}..={ROUNDS} \
         (rounds took [{}] ms): {closed}",
        run.rounds_ms()
    );
    let per_stall_us = lost_us / n_stalls;
    assert!(
        (MIN_LOST_PER_STALL_US..=MAX_LOST_PER_STALL_US).contains(&per_stall_us),
        "{per_stall_us} µs lost per stall, expected a delayed-ACK timeout \
         ({MIN_LOST_PER_STALL_US}..={MAX_LOST_PER_STALL_US} µs): {closed}"
    );
    // What the client measured: the stalled rounds carry all of the excess over the quick run.
    let measured_per_stall_us = per_round_excess_us * ROUNDS as f64 / n_stalls as f64;
    let ratio = per_stall_us as f64 / measured_per_stall_us;
    assert!(
        (0.5..=1.5).contains(&ratio),
        "reported {per_stall_us} µs lost per stall, the client measured {measured_per_stall_us:.0} \
         µs of excess per stalled round (ratio {ratio:.2}, expected within ±50%); rounds [{}] \
         ms: {closed}",
        run.rounds_ms()
    );

    // The server sent the delayed ACKs that released the held writes.
    let server = agent.wait_for_events(about_server(&run), 1, EVENT_TIMEOUT);
    let server = &server[0];
    assert!(
        ev_u64(server, "delayed_acks") >= n_stalls,
        "each stall was released by a delayed ACK of the server: server {server}, client {closed}"
    );
    assert!(
        ev_u64(server, "delayed_ack_us") >= ev_u64(server, "delayed_acks") * MIN_LOST_PER_STALL_US,
        "the server's delayed ACKs were held about 40 ms each: {server}"
    );
    assert_eq!(
        ev_u64(server, "nagle_stalls"),
        0,
        "the server never waited: {server}"
    );

    // Nothing about the TCP_NODELAY run.
    let quick_reports = agent.events(about_client(&quick, NAGLE_EVENT));
    assert!(
        quick_reports.is_empty(),
        "TCP_NODELAY flagged: {quick_reports:?}"
    );

    let after = agent.scrape();
    let counted = delta(&before, &after, "tracer_nagle_stalls_total");
    assert!(
        counted >= n_stalls as f64,
        "tracer_nagle_stalls_total grew by {counted}, the connection had {n_stalls} stalls"
    );
    let seconds = delta(&before, &after, "tracer_nagle_stall_seconds_total");
    assert!(
        seconds >= lost_us as f64 / 1e6 - 1e-3,
        "tracer_nagle_stall_seconds_total grew by {seconds}, the connection lost {lost_us} µs"
    );
    let delayed = delta(&before, &after, "tracer_delayed_acks_total");
    assert!(
        delayed >= n_stalls as f64,
        "tracer_delayed_acks_total grew by {delayed}, fewer than the {n_stalls} stalls"
    );
    let observed = delta(&before, &after, "tracer_delayed_ack_delay_seconds_count");
    assert!(
        observed >= n_stalls as f64,
        "tracer_delayed_ack_delay_seconds observed {observed} hold times, fewer than the \
         {n_stalls} stalls"
    );
    agent.stop();
}

#[test]
fn write_write_read_with_tcp_nodelay_is_not_flagged() {
    require_root();
    let mut agent = Agent::start(&[]);
    let run = write_write_read(ROUNDS, true, "wwr-nodelay");
    eprintln!(
        "write-write-read with TCP_NODELAY, {ROUNDS} rounds: {:.3} ms per round [{}]",
        run.mean().as_secs_f64() * 1e3,
        run.rounds_ms()
    );
    let closed = agent.wait_for_events(about_client(&run, "connection_closed"), 1, EVENT_TIMEOUT);
    let closed = &closed[0];
    assert_eq!(ev_u64(closed, "nagle_stalls"), 0, "{closed}");
    assert_eq!(ev_u64(closed, "nagle_lost_us"), 0, "{closed}");
    let server = agent.wait_for_events(about_server(&run), 1, EVENT_TIMEOUT);
    assert_eq!(ev_u64(&server[0], "nagle_stalls"), 0, "{}", server[0]);
    // connection_closed is written after any final stall report: none may exist.
    let reports = agent.events(about_client(&run, NAGLE_EVENT));
    assert!(reports.is_empty(), "TCP_NODELAY flagged: {reports:?}");
    let reports = agent.events(|e| {
        e["event"] == NAGLE_EVENT
            && (e["sport"] == run.server.port() || e["dport"] == run.server.port())
    });
    assert!(
        reports.is_empty(),
        "a stall on the TCP_NODELAY connection: {reports:?}"
    );
    // Consistency with the wall clock: without Nagle no round waits for a delayed ACK.
    let slow = run
        .rounds
        .iter()
        .filter(|d| d.as_micros() >= u128::from(MIN_LOST_PER_STALL_US))
        .count();
    assert!(
        slow <= 2,
        "{slow} of {ROUNDS} TCP_NODELAY rounds took 20 ms or more, yet nothing was flagged: [{}] ms",
        run.rounds_ms()
    );
    agent.stop();
}

/// How far the agent's delayed-ACK count may be from the kernel's over one window.
///
/// Both count the same thing (the delayed-ACK timer sending a pending ACK), but not at the same
/// instant: (1) the two counters are read one after the other, so a delayed ACK anywhere on the
/// host between `nstat` and the scrape is in one window only (the scrape's own loopback
/// connection can produce one); (2) when the timer fires while the application holds the socket
/// lock, the kernel defers the handler to `release_sock`, and data sent in between can carry
/// the ACK: the timer fired with an ACK pending (the agent counts it) but the kernel sent
/// none (it does not). A handful either way; the workload makes about 20.
const DELAYED_ACK_TOLERANCE: i64 = 3;
/// A window is quiet when the agent saw at most this many kernel events besides our traffic.
const QUIET_EXTRA_EVENTS: f64 = 40.0;
const WINDOW_ATTEMPTS: usize = 8;
const WINDOW_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn delayed_ack_total_matches_the_kernels_counter() {
    require_root();
    require_tool("nstat");
    let mut agent = Agent::start(&[]);
    let started = Instant::now();
    let mut tries = Vec::new();
    for attempt in 1..=WINDOW_ATTEMPTS {
        assert!(
            started.elapsed() < WINDOW_TIMEOUT,
            "no quiet window within {WINDOW_TIMEOUT:?}: {tries:#?}"
        );
        // Let delayed-ACK timers of earlier traffic (the previous scrape included) fire.
        thread::sleep(Duration::from_millis(300));
        let kernel_before = kernel_delayed_acks();
        let before = agent.scrape();
        let run = write_write_read(ROUNDS, false, "wwr-nagle");
        // Every delayed-ACK timer of the workload has fired (the longest is 200 ms).
        thread::sleep(Duration::from_millis(500));
        let kernel_after = kernel_delayed_acks();
        // The events of that last instant reach the agent.
        thread::sleep(Duration::from_millis(200));
        let after = agent.scrape();

        let kernel = i64::try_from(kernel_after - kernel_before).unwrap();
        let agent_count = delta(&before, &after, "tracer_delayed_acks_total");
        let agent_count = agent_count as i64;
        // TIME_WAIT timers of earlier tests' sockets expire meanwhile (two events each) and
        // have nothing to do with delayed ACKs: they do not make a window busy.
        let tw_timer_events = metric_value(
            &after,
            "tracer_events_total",
            &[("kind", "time_wait_timer")],
        ) - metric_value(
            &before,
            "tracer_events_total",
            &[("kind", "time_wait_timer")],
        );
        let all_events = delta(&before, &after, "tracer_events_total") - tw_timer_events;
        // Our traffic: two connections' lifecycles (~10 state events each), two held writes and
        // one or two delayed ACKs per round.
        let ours = (2 * 10 + 4 * ROUNDS) as f64;
        let quiet = all_events <= ours + QUIET_EXTRA_EVENTS;
        let line = format!(
            "attempt {attempt}: kernel TcpExtDelayedACKs +{kernel}, tracer_delayed_acks_total \
             +{agent_count}, agent events +{all_events} besides TIME_WAIT timers (ours about {ours}), rounds {:.1} ms \
             mean",
            run.mean().as_secs_f64() * 1e3
        );
        eprintln!("{line}");
        tries.push(line);
        if !quiet {
            continue;
        }
        assert!(
            kernel >= MIN_STALLS as i64,
            "the workload made only {kernel} delayed ACKs according to the kernel: {tries:#?}"
        );
        assert!(
            (agent_count - kernel).abs() <= DELAYED_ACK_TOLERANCE,
            "in a quiet window the agent counted {agent_count} delayed ACKs and the kernel \
             {kernel} (tolerance ±{DELAYED_ACK_TOLERANCE}): {tries:#?}"
        );
        // The hold times: one per counted ACK whose arming was seen, about 40 ms each.
        let count = delta(&before, &after, "tracer_delayed_ack_delay_seconds_count");
        let sum = delta(&before, &after, "tracer_delayed_ack_delay_seconds_sum");
        assert!(
            count >= MIN_STALLS as f64 && count <= agent_count as f64,
            "{count} hold times observed for {agent_count} delayed ACKs"
        );
        let mean_ms = sum / count * 1e3;
        assert!(
            (20.0..=250.0).contains(&mean_ms),
            "delayed ACKs held {mean_ms:.1} ms on average, expected about 40 ms"
        );
        agent.stop();
        return;
    }
    panic!(
        "the host was never quiet enough to compare delayed-ACK counts in {WINDOW_ATTEMPTS} \
         attempts: {tries:#?}"
    );
}
