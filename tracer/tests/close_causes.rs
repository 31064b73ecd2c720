//! Abnormal ends: a refused connect, a connection reset with `SO_LINGER 0` and a connect that
//! is never answered get the right close cause on each side; the reset and retransmit counters
//! follow.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const SETTLE: Duration = Duration::from_secs(1);

fn delta(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(after, name, labels) - metric_value(before, name, labels)
}

fn assert_delta_at_least(before: &str, after: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    let d = delta(before, after, name, labels);
    assert!(
        d >= min,
        "{name}{labels:?} increased by {d}, expected at least {min}\n--- after ---\n{after}"
    );
}

#[test]
fn connect_to_a_port_without_listener_is_refused() {
    require_root();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let comm = std::thread::Builder::new()
        .name("tracer-refused".into())
        .spawn(move || {
            connect_refused(target);
            thread_comm()
        })
        .unwrap()
        .join()
        .unwrap();

    let events = agent.wait_for_exactly(is_client_of(target), 1, EVENT_TIMEOUT, SETTLE);
    let ev = &events[0];
    assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
    assert_eq!(ev_str(ev, "close"), "refused", "{ev}");
    assert_eq!(ev_states(ev), ["SYN_SENT", "CLOSE"], "{ev}");
    assert!(ev_u64(ev, "resets_received") >= 1, "{ev}");
    assert_eq!(ev_str(ev, "family"), "ipv4", "{ev}");
    assert_eq!(ev_str(ev, "saddr"), "127.0.0.1", "{ev}");
    assert_ne!(ev_u64(ev, "sport"), 0, "{ev}");
    assert!(ev["handshake_us"].is_null(), "never established: {ev}");
    assert_eq!(ev["seeded"], false, "{ev}");
    assert_eq!(ev_u64(ev, "pid"), u64::from(std::process::id()), "{ev}");
    assert_eq!(ev_str(ev, "comm"), comm, "{ev}");

    let after = agent.scrape();
    assert_delta_at_least(
        &before,
        &after,
        "tracer_connections_closed_total",
        &[("direction", "active"), ("close", "refused")],
        1.0,
    );
    assert_delta_at_least(
        &before,
        &after,
        "tracer_resets_total",
        &[("direction", "received")],
        1.0,
    );
    agent.stop();
}

#[test]
fn linger_zero_close_is_aborted_on_the_server_and_reset_received_on_the_client() {
    require_root();
    const N: usize = 3;
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    let server = Server::start("127.0.0.1:0".parse().unwrap(), ServerMode::ReadThenReset, N);
    let addr = server.addr;
    let (locals, client_comm) = run_clients(addr, ClientMode::ExpectReset, N, "tracer-client");
    server.join();
    let ports: std::collections::HashSet<u16> = locals.iter().map(SocketAddr::port).collect();

    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), ports);
    assert_eq!(dports(&servers), ports);
    for ev in &clients {
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert_eq!(ev_str(ev, "close"), "reset_received", "{ev}");
        assert_eq!(ev_states(ev), ["SYN_SENT", "ESTABLISHED", "CLOSE"], "{ev}");
        assert!(ev_u64(ev, "resets_received") >= 1, "{ev}");
        assert_eq!(ev_u64(ev, "pid"), u64::from(std::process::id()), "{ev}");
        assert_eq!(ev_str(ev, "comm"), client_comm, "{ev}");
    }
    for ev in &servers {
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(ev_str(ev, "close"), "aborted", "{ev}");
        assert_eq!(ev_states(ev), ["SYN_RECV", "ESTABLISHED", "CLOSE"], "{ev}");
        assert_eq!(ev_u64(ev, "resets_received"), 0, "{ev}");
    }

    let after = agent.scrape();
    let n = N as f64;
    let closed = "tracer_connections_closed_total";
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "active"), ("close", "reset_received")],
        n,
    );
    assert_delta_at_least(
        &before,
        &after,
        closed,
        &[("direction", "passive"), ("close", "aborted")],
        n,
    );
    assert_delta_at_least(
        &before,
        &after,
        "tracer_resets_total",
        &[("direction", "sent")],
        n,
    );
    assert_delta_at_least(
        &before,
        &after,
        "tracer_resets_total",
        &[("direction", "received")],
        n,
    );
    agent.stop();
}

#[test]
fn unanswered_connect_is_failed_with_syn_retransmits() {
    require_root();
    require_tool("ip");
    let ns = Netns::create();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    // SYN at 0 s, retransmitted at about 1 s and 3 s; the connect is given up at 3.5 s.
    let target = ns.silent_addr(9);
    match TcpStream::connect_timeout(&target, Duration::from_millis(3500)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("connect {target}: expected a timeout, got {other:?}"),
    }

    let events = agent.wait_for_exactly(is_client_of(target), 1, EVENT_TIMEOUT, SETTLE);
    let ev = &events[0];
    assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
    assert_eq!(ev_str(ev, "close"), "failed", "{ev}");
    assert_eq!(ev_states(ev), ["SYN_SENT", "CLOSE"], "{ev}");
    assert!(
        ev_u64(ev, "retransmits") >= 1,
        "the SYN was retransmitted: {ev}"
    );
    assert_eq!(ev_u64(ev, "resets_received"), 0, "{ev}");
    assert!(ev["handshake_us"].is_null(), "never established: {ev}");
    assert_eq!(ev_str(ev, "saddr"), ns.host_ip.to_string(), "{ev}");

    let after = agent.scrape();
    assert_delta_at_least(
        &before,
        &after,
        "tracer_connections_closed_total",
        &[("direction", "active"), ("close", "failed")],
        1.0,
    );
    assert_delta_at_least(
        &before,
        &after,
        "tracer_retransmits_total",
        &[("kind", "syn")],
        1.0,
    );
    agent.stop();
    drop(ns);
}
