//! Every line the agent writes with `--events json` is one JSON object of a documented kind, and
//! the `connection_closed` events of the test's own connections have the documented shape.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::*;
use serde_json::Value;

const DIRECTIONS: &[&str] = &["active", "passive", "unknown"];
const CLOSES: &[&str] = &[
    "local",
    "remote",
    "reset_received",
    "aborted",
    "refused",
    "failed",
    "unknown",
];
const STATES: &[&str] = &[
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// The congestion state names `congestion_states` may hold.
const CA_STATES: &[&str] = &["open", "disorder", "cwr", "recovery", "loss"];

/// The retransmit kinds, as the metric's `kind` label.
const RETRANSMIT_KINDS: &[&str] = &["syn", "fast", "timeout", "other", "synack"];

/// The kinds of event `--events json` writes.
const KINDS: &[&str] = &[
    "connection_closed",
    "time_wait_ended",
    "nagle_delack_stall",
    "close_wait_leak",
];

type Matcher = Box<dyn Fn(&Value) -> bool>;

fn is_u64_or_null(v: &Value) -> bool {
    v.is_null() || v.as_u64().is_some()
}

/// One JSON object of a documented kind, whatever connection it is about.
fn check_line(line: &str) {
    let ev: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}"));
    assert!(ev.is_object(), "stdout line is not a JSON object: {line}");
    let kind = ev["event"].as_str().unwrap_or_default();
    assert!(KINDS.contains(&kind), "unknown event kind {kind:?}: {line}");
}

/// The documented shape of `connection_closed`.
fn check_event(ev: &Value) {
    let line = ev.to_string();
    let obj = ev
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {line}"));
    for key in [
        "ts",
        "event",
        "family",
        "saddr",
        "sport",
        "daddr",
        "dport",
        "netns",
        "direction",
        "pid",
        "comm",
        "cgroup",
        "workload",
        "workload_kind",
        "unit",
        "uid",
        "container_id",
        "runtime",
        "pod_uid",
        "qos",
        "states",
        "duration_us",
        "handshake_us",
        "retransmits",
        "resets_sent",
        "resets_received",
        "close",
        "seeded",
        "complete",
        "bytes_sent",
        "bytes_received",
        "seq_bytes_acked",
        "seq_bytes_received",
        "segs_out",
        "segs_in",
        "retransmits_by_kind",
        "kernel_retransmits",
        "srtt_us",
        "rttvar_us",
        "min_rtt_us",
        "cwnd",
        "max_cwnd",
        "congestion_states",
        "rwnd_limited_us",
        "reset_sent_reason",
        "reset_received",
        "cost_known",
    ] {
        assert!(obj.contains_key(key), "missing `{key}`: {line}");
    }
    check_cost(ev);
    let ts = ev_str(ev, "ts");
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
        "ts is not an RFC 3339 UTC time: {line}"
    );
    assert_eq!(ev_str(ev, "event"), "connection_closed", "{line}");
    let saddr: IpAddr = ev_str(ev, "saddr").parse().expect("saddr is an address");
    let daddr: IpAddr = ev_str(ev, "daddr").parse().expect("daddr is an address");
    let family = ev_str(ev, "family");
    match family {
        "ipv4" => assert!(saddr.is_ipv4() && daddr.is_ipv4(), "{line}"),
        "ipv6" => assert!(saddr.is_ipv6() && daddr.is_ipv6(), "{line}"),
        other => panic!("family {other:?}: {line}"),
    }
    assert!(ev_u64(ev, "sport") <= 65535, "{line}");
    assert!(ev_u64(ev, "dport") <= 65535, "{line}");
    ev_u64(ev, "netns");
    assert!(DIRECTIONS.contains(&ev_str(ev, "direction")), "{line}");
    assert!(CLOSES.contains(&ev_str(ev, "close")), "{line}");
    assert!(is_u64_or_null(&ev["pid"]), "{line}");
    assert!(ev["comm"].is_null() || ev["comm"].is_string(), "{line}");
    assert!(is_u64_or_null(&ev["cgroup"]), "{line}");
    assert!(
        ev["workload"].is_null() || ev["workload"].is_string(),
        "{line}"
    );
    assert!(is_u64_or_null(&ev["duration_us"]), "{line}");
    assert!(is_u64_or_null(&ev["handshake_us"]), "{line}");
    ev_u64(ev, "retransmits");
    ev_u64(ev, "resets_sent");
    ev_u64(ev, "resets_received");
    assert!(ev["seeded"].is_boolean(), "{line}");
    assert!(ev["complete"].is_boolean(), "{line}");
    let states = ev["states"].as_array().expect("states array");
    assert!(!states.is_empty(), "{line}");
    let mut last_t = 0;
    for s in states {
        let name = s["state"].as_str().expect("state name");
        assert!(STATES.contains(&name), "unknown state {name}: {line}");
        assert_ne!(
            name, "TIME_WAIT",
            "TIME_WAIT is not part of the path: {line}"
        );
        let t = s["t_us"].as_u64().expect("t_us");
        assert!(t >= last_t, "t_us goes back: {line}");
        last_t = t;
    }
    assert_eq!(
        states.last().and_then(|s| s["state"].as_str()),
        Some("CLOSE"),
        "a finished connection ends at CLOSE: {line}"
    );
}

/// The cost fields: numbers or null, as documented; this kernel has the feature, so every
/// connection the test made carries its cost.
fn check_cost(ev: &Value) {
    let line = ev.to_string();
    assert_eq!(ev["cost_known"], true, "{line}");
    for key in [
        "bytes_sent",
        "bytes_received",
        "srtt_us",
        "rttvar_us",
        "min_rtt_us",
        "rwnd_limited_us",
    ] {
        assert!(is_u64_or_null(&ev[key]), "{key}: {line}");
    }
    for key in [
        "seq_bytes_acked",
        "seq_bytes_received",
        "segs_out",
        "segs_in",
        "kernel_retransmits",
        "cwnd",
        "max_cwnd",
    ] {
        ev_u64(ev, key);
    }
    // The payload is the sequence count less the SYN and FIN, at most 2.
    for (payload, seq) in [
        ("bytes_sent", "seq_bytes_acked"),
        ("bytes_received", "seq_bytes_received"),
    ] {
        if let Some(p) = ev[payload].as_u64() {
            let s = ev_u64(ev, seq);
            assert!(p <= s && s <= p + 2, "{payload} vs {seq}: {line}");
        }
    }
    let kinds = ev["retransmits_by_kind"]
        .as_object()
        .expect("retransmits_by_kind");
    assert_eq!(kinds.len(), RETRANSMIT_KINDS.len(), "{line}");
    let sum: u64 = RETRANSMIT_KINDS
        .iter()
        .map(|k| kinds[*k].as_u64().expect("a count per kind"))
        .sum();
    assert_eq!(sum, ev_u64(ev, "retransmits"), "{line}");
    for state in ev["congestion_states"].as_array().expect("states") {
        assert!(
            CA_STATES.contains(&state.as_str().unwrap_or_default()),
            "{line}"
        );
    }
    let reason = &ev["reset_sent_reason"];
    assert!(reason.is_null() || reason.is_string(), "{line}");
    assert_eq!(reason.is_null(), ev_u64(ev, "resets_sent") == 0, "{line}");
    assert_eq!(
        ev["reset_received"].as_bool(),
        Some(ev_u64(ev, "resets_received") > 0),
        "{line}"
    );
}

#[test]
fn every_line_is_an_event_and_the_tests_connections_have_the_documented_shape() {
    require_root();
    let mut agent = Agent::start(&[]);

    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        5,
    );
    run_clients(server.addr, ClientMode::CloseFirst, 5, "tracer-client");
    let addr = server.addr;
    server.join();
    let server6 = Server::start("[::1]:0".parse().unwrap(), ServerMode::EchoThenClose, 2);
    run_clients(
        server6.addr,
        ClientMode::WaitServerClose,
        2,
        "tracer-client",
    );
    let addr6 = server6.addr;
    server6.join();
    let refused = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    connect_refused(refused);

    // This test's connections, each end seen once: the server ends by their local address,
    // the client ends by their peer's.
    let own: [(&str, Matcher, usize); 5] = [
        ("IPv4 server ends", Box::new(is_server_of(addr)), 5),
        ("IPv4 client ends", Box::new(is_client_of(addr)), 5),
        ("IPv6 server ends", Box::new(is_server_of(addr6)), 2),
        ("IPv6 client ends", Box::new(is_client_of(addr6)), 2),
        ("refused connect", Box::new(is_client_of(refused)), 1),
    ];
    for (_, matches, count) in &own {
        agent.wait_for_events(matches, *count, EVENT_TIMEOUT);
    }
    agent.stop();

    // Other lines are about other sockets of the host: connections of other programs, and
    // TIME_WAIT sockets of earlier tests that end while this one runs (up to 60 s later).
    // They are events all the same.
    let lines = agent.stdout_lines();
    for line in &lines {
        check_line(line);
    }
    let events = parse_events(&lines);
    for (what, matches, count) in &own {
        let found: Vec<&Value> = events.iter().filter(|e| matches(e)).collect();
        assert_eq!(found.len(), *count, "{what}: {found:?}");
        for ev in found {
            check_event(ev);
        }
    }
}
