//! Orderly TCP lifecycles on loopback: each connection is reported once per socket with the
//! right direction, close cause, state path, owner and addresses, and the counters follow.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(1);

fn ports_of(locals: &[SocketAddr]) -> HashSet<u16> {
    locals.iter().map(SocketAddr::port).collect()
}

fn assert_delta_at_least(before: &str, after: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    let d = metric_value(after, name, labels) - metric_value(before, name, labels);
    assert_grew(d, after, name, labels, min);
}

/// Like [`assert_delta_at_least`] for a label set the agent creates at its first increment
/// (`tracer_tcp_state_transitions_total`): absent before the traffic means none yet, but it
/// must exist after.
fn assert_created_at_least(
    before: &str,
    after: &str,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
) {
    let d = metric_value(after, name, labels) - metric_value_or_zero(before, name, labels);
    assert_grew(d, after, name, labels, min);
}

fn assert_grew(d: f64, after: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    assert!(
        d >= min,
        "{name}{labels:?} increased by {d}, expected at least {min}\n--- after ---\n{after}"
    );
}

/// Checks what every orderly connection's event carries, whoever closed first.
fn assert_common(ev: &Value, family: &str, local_ip: &str, remote_ip: &str) {
    assert_eq!(ev_str(ev, "event"), "connection_closed", "{ev}");
    assert_eq!(ev_str(ev, "family"), family, "{ev}");
    assert_eq!(ev_str(ev, "saddr"), local_ip, "{ev}");
    assert_eq!(ev_str(ev, "daddr"), remote_ip, "{ev}");
    assert_ne!(ev_u64(ev, "sport"), 0, "{ev}");
    assert_ne!(ev_u64(ev, "dport"), 0, "{ev}");
    assert_eq!(ev_u64(ev, "netns"), host_netns_inode(), "{ev}");
    assert_eq!(ev["seeded"], false, "{ev}");
    assert_eq!(ev["complete"], true, "{ev}");
    assert_eq!(ev_u64(ev, "resets_sent"), 0, "{ev}");
    assert_eq!(ev_u64(ev, "resets_received"), 0, "{ev}");
    let duration = ev_u64(ev, "duration_us");
    let last_t = ev["states"]
        .as_array()
        .and_then(|s| s.last())
        .and_then(|s| s["t_us"].as_u64())
        .unwrap_or_else(|| panic!("states without t_us: {ev}"));
    assert!(
        last_t <= duration,
        "the CLOSE stamp is after the duration: {ev}"
    );
}

#[test]
fn client_closing_first_is_local_for_the_client_and_remote_for_the_server() {
    require_root();
    const N: usize = 50;
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let (locals, client_comm) = run_clients(addr, ClientMode::CloseFirst, N, "tracer-client");
    let report = server.join();
    let server_comm = report.comms[0].clone();
    assert!(report.comms.iter().all(|c| *c == server_comm));

    let clients = agent.wait_for_exactly(
        |e| is_client_of(addr)(e) && e["direction"] == "active",
        N,
        EVENT_TIMEOUT,
        SETTLE,
    );
    let servers = agent.wait_for_exactly(
        |e| is_server_of(addr)(e) && e["direction"] == "passive",
        N,
        EVENT_TIMEOUT,
        SETTLE,
    );
    // Nothing else about these connections: no event with another direction.
    assert_eq!(agent.events(is_client_of(addr)).len(), N);
    assert_eq!(agent.events(is_server_of(addr)).len(), N);

    // Each client socket exactly once, identified by its local port.
    assert_eq!(sports(&clients), ports_of(&locals));
    assert_eq!(dports(&servers), ports_of(&locals));

    let pid = u64::from(std::process::id());
    for ev in &clients {
        assert_common(ev, "ipv4", "127.0.0.1", "127.0.0.1");
        assert_eq!(ev_str(ev, "close"), "local", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            "{ev}"
        );
        assert_eq!(
            ev["states"][0]["t_us"], 0,
            "the path starts at the open: {ev}"
        );
        assert_eq!(ev_u64(ev, "pid"), pid, "{ev}");
        assert_eq!(ev_str(ev, "comm"), client_comm, "{ev}");
        let handshake = ev_u64(ev, "handshake_us");
        assert!(handshake <= ev_u64(ev, "duration_us"), "{ev}");
    }
    for ev in &servers {
        assert_common(ev, "ipv4", "127.0.0.1", "127.0.0.1");
        assert_eq!(ev_str(ev, "close"), "remote", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            "{ev}"
        );
        // The server closes in its own close() (CLOSE_WAIT -> LAST_ACK): the owner is known.
        assert_eq!(ev_u64(ev, "pid"), pid, "{ev}");
        assert_eq!(ev_str(ev, "comm"), server_comm, "{ev}");
    }

    let after = agent.scrape();
    let n = N as f64;
    let opened = "tracer_connections_opened_total";
    let closed = "tracer_connections_closed_total";
    assert_delta_at_least(&before, &after, opened, &[("direction", "active")], n);
    assert_delta_at_least(&before, &after, opened, &[("direction", "passive")], n);
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "active"), ("close", "local")],
        n,
    );
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "passive"), ("close", "remote")],
        n,
    );
    let durations = "tracer_connection_duration_seconds_count";
    assert_delta_at_least(&before, &after, durations, &[("direction", "active")], n);
    assert_delta_at_least(&before, &after, durations, &[("direction", "passive")], n);
    assert_delta_at_least(
        &before,
        &after,
        "tracer_handshake_duration_seconds_count",
        &[],
        n,
    );
    let transitions = "tracer_tcp_state_transitions_total";
    for (from, to) in [
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "CLOSE"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ] {
        assert_created_at_least(
            &before,
            &after,
            transitions,
            &[("from", from), ("to", to)],
            n,
        );
    }
    assert_delta_at_least(&before, &after, "tracer_events_total", &[], (N * 2) as f64);
    agent.stop();
}

#[test]
fn server_closing_first_is_remote_for_the_client_and_local_for_the_server() {
    require_root();
    const N: usize = 10;
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    let server = Server::start("127.0.0.1:0".parse().unwrap(), ServerMode::EchoThenClose, N);
    let addr = server.addr;
    let (locals, client_comm) = run_clients(addr, ClientMode::WaitServerClose, N, "tracer-client");
    let report = server.join();
    let server_comm = report.comms[0].clone();

    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), ports_of(&locals));
    assert_eq!(dports(&servers), ports_of(&locals));

    let pid = u64::from(std::process::id());
    for ev in &clients {
        assert_common(ev, "ipv4", "127.0.0.1", "127.0.0.1");
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert_eq!(ev_str(ev, "close"), "remote", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            "{ev}"
        );
        assert_eq!(ev_u64(ev, "pid"), pid, "{ev}");
        assert_eq!(ev_str(ev, "comm"), client_comm, "{ev}");
        ev_u64(ev, "handshake_us");
    }
    for ev in &servers {
        assert_common(ev, "ipv4", "127.0.0.1", "127.0.0.1");
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(ev_str(ev, "close"), "local", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            "{ev}"
        );
        // The server closes first in its own close() (ESTABLISHED -> FIN_WAIT1).
        assert_eq!(ev_u64(ev, "pid"), pid, "{ev}");
        assert_eq!(ev_str(ev, "comm"), server_comm, "{ev}");
    }

    let after = agent.scrape();
    let closed = "tracer_connections_closed_total";
    let n = N as f64;
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "active"), ("close", "remote")],
        n,
    );
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "passive"), ("close", "local")],
        n,
    );
    agent.stop();
}

#[test]
fn ipv6_loopback_connections_are_reported_as_ipv6() {
    require_root();
    const N: usize = 5;
    let mut agent = Agent::start(&[]);

    let server = Server::start(
        "[::1]:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let (locals, _) = run_clients(addr, ClientMode::CloseFirst, N, "tracer-client6");
    server.join();

    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), ports_of(&locals));
    assert_eq!(dports(&servers), ports_of(&locals));
    for ev in &clients {
        assert_common(ev, "ipv6", "::1", "::1");
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert_eq!(ev_str(ev, "close"), "local", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            "{ev}"
        );
    }
    for ev in &servers {
        assert_common(ev, "ipv6", "::1", "::1");
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(ev_str(ev, "close"), "remote", "{ev}");
    }
    agent.stop();
}
