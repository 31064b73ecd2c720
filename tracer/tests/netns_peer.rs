//! A peer in another network namespace, reached over a veth pair: the host's socket and the
//! namespace's socket are both reported, each with its own namespace, and a refused connect
//! across the veth is reported as refused.
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

const SETTLE: Duration = Duration::from_secs(1);

#[test]
fn connection_to_a_server_in_another_namespace_is_seen_from_both_sides() {
    require_root();
    require_tool("ip");
    const N: usize = 3;
    let ns = Netns::create();
    let mut agent = Agent::start(&[]);

    let server = Server::start_in(
        &ns,
        SocketAddr::new(ns.ns_ip.into(), 0),
        ServerMode::EchoThenClose,
        N,
    );
    let addr = server.addr;
    let port = addr.port();
    let (locals, client_comm) = run_clients(addr, ClientMode::WaitServerClose, N, "tracer-client");
    server.join();
    let ports: HashSet<u16> = locals.iter().map(SocketAddr::port).collect();

    let host_ns = host_netns_inode();
    let peer_ns = ns.inode();
    assert_ne!(host_ns, peer_ns);
    let ns_ip = ns.ns_ip.to_string();
    let host_ip = ns.host_ip.to_string();

    // The host's client sockets.
    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), ports);
    for ev in &clients {
        assert_eq!(ev_str(ev, "daddr"), ns_ip, "{ev}");
        assert_eq!(ev_u64(ev, "dport"), u64::from(port), "{ev}");
        assert_eq!(ev_str(ev, "saddr"), host_ip, "{ev}");
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert_eq!(ev_str(ev, "close"), "remote", "{ev}");
        assert_eq!(ev_u64(ev, "netns"), host_ns, "{ev}");
        assert_eq!(ev_u64(ev, "pid"), u64::from(std::process::id()), "{ev}");
        assert_eq!(ev_str(ev, "comm"), client_comm, "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            "{ev}"
        );
    }

    // The server's sockets, inside the namespace.
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(dports(&servers), ports);
    for ev in &servers {
        let netns = ev_u64(ev, "netns");
        assert_ne!(
            netns, host_ns,
            "the server socket is not in the host's namespace: {ev}"
        );
        assert_eq!(netns, peer_ns, "netns is the namespace's inode: {ev}");
        assert_eq!(ev_str(ev, "saddr"), ns_ip, "{ev}");
        assert_eq!(ev_str(ev, "daddr"), host_ip, "{ev}");
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(ev_str(ev, "close"), "local", "{ev}");
        assert_eq!(
            ev_states(ev),
            ["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            "{ev}"
        );
    }

    // Nothing listens on port 7 in the fresh namespace: its kernel answers the SYN with a RST.
    let refused = ns.ns_addr(7);
    connect_refused(refused);
    let events = agent.wait_for_exactly(is_client_of(refused), 1, EVENT_TIMEOUT, SETTLE);
    let ev = &events[0];
    assert_eq!(ev_str(ev, "close"), "refused", "{ev}");
    assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
    assert_eq!(ev_str(ev, "saddr"), host_ip, "{ev}");
    assert_eq!(ev_u64(ev, "netns"), host_ns, "{ev}");
    assert_eq!(ev_states(ev), ["SYN_SENT", "CLOSE"], "{ev}");
    assert!(ev_u64(ev, "resets_received") >= 1, "{ev}");

    agent.stop();
    drop(ns);
}
