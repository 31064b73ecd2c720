//! Connections opened before the agent started are known from sock_diag: counted as active at
//! once, and reported as seeded (direction inferred, no duration) when they close.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::time::Duration;

use common::*;

const SETTLE: Duration = Duration::from_secs(1);
const N: usize = 10;

#[test]
fn connections_open_before_start_are_seeded() {
    require_root();
    require_tool("ss");
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let held = HeldClients::open(addr, N);
    let client_ports = held.local_ports();
    assert_eq!(client_ports.len(), N);

    // What the kernel itself lists before the agent starts.
    let server_end = addr.to_string();
    let established = ss_established();
    let server_side = established.iter().filter(|(l, _)| *l == server_end).count();
    let client_side = established.iter().filter(|(_, p)| *p == server_end).count();
    assert_eq!(server_side, N, "ss -Htan server side: {established:?}");
    assert_eq!(client_side, N, "ss -Htan client side: {established:?}");

    let mut agent = Agent::start(&[]);
    let metrics = agent.scrape();
    let active = metric_value(&metrics, "tracer_connections_active", &[]);
    assert!(
        active >= (2 * N) as f64,
        "tracer_connections_active is {active}, expected at least {} (both ends of the {N} \
         connections opened before the agent)\n{metrics}",
        2 * N
    );
    assert!(
        agent.events(is_client_of(addr)).is_empty() && agent.events(is_server_of(addr)).is_empty(),
        "events for connections that are still open: {:?}",
        agent.stdout_lines()
    );

    held.close();
    server.join();

    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), client_ports);
    assert_eq!(dports(&servers), client_ports);
    for ev in &clients {
        assert_eq!(ev["seeded"], true, "{ev}");
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert!(ev["duration_us"].is_null(), "open time unknown: {ev}");
        assert!(ev["handshake_us"].is_null(), "handshake not seen: {ev}");
        assert_eq!(ev_str(ev, "close"), "local", "{ev}");
        let states = ev_states(ev);
        assert_eq!(
            states.first().map(String::as_str),
            Some("ESTABLISHED"),
            "{ev}"
        );
        assert_eq!(states.last().map(String::as_str), Some("CLOSE"), "{ev}");
        assert_eq!(ev_u64(ev, "netns"), host_netns_inode(), "{ev}");
    }
    for ev in &servers {
        assert_eq!(ev["seeded"], true, "{ev}");
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert!(ev["duration_us"].is_null(), "open time unknown: {ev}");
        assert_eq!(ev_str(ev, "close"), "remote", "{ev}");
        let states = ev_states(ev);
        assert_eq!(
            states.first().map(String::as_str),
            Some("ESTABLISHED"),
            "{ev}"
        );
        assert_eq!(states.last().map(String::as_str), Some("CLOSE"), "{ev}");
    }
    agent.stop();
}
