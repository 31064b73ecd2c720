//! `GET /metrics` serves a valid Prometheus exposition with every documented family.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Documented families and their types.
const FAMILIES: &[(&str, &str)] = &[
    ("tracer_connections_opened_total", "counter"),
    ("tracer_connections_closed_total", "counter"),
    ("tracer_connections_active", "gauge"),
    ("tracer_connection_duration_seconds", "histogram"),
    ("tracer_handshake_duration_seconds", "histogram"),
    ("tracer_tcp_state_transitions_total", "counter"),
    ("tracer_retransmits_total", "counter"),
    ("tracer_resets_total", "counter"),
    ("tracer_events_total", "counter"),
    ("tracer_events_lost_total", "counter"),
    ("tracer_softirqs_unobserved_total", "counter"),
    ("tracer_kernel_path_slot_collisions_total", "counter"),
    ("tracer_connections_evicted_total", "counter"),
    ("tracer_build_info", "gauge"),
];

fn promtool_check(text: &str) {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let Some(_) = wait_timeout(&mut child, Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!("promtool check metrics did not finish");
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_pass_promtool_and_expose_every_documented_family() {
    require_root();
    require_tool("promtool");
    let mut agent = Agent::start(&[]);

    // Some traffic of each kind, so that labelled series exist.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        3,
    );
    run_clients(server.addr, ClientMode::CloseFirst, 3, "tracer-client");
    server.join();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), ServerMode::ReadThenReset, 1);
    run_clients(server.addr, ClientMode::ExpectReset, 1, "tracer-client");
    let addr = server.addr;
    server.join();
    agent.wait_for_events(is_server_of(addr), 1, EVENT_TIMEOUT);

    let resp = http_get(agent.listen, "/metrics", Duration::from_secs(10)).unwrap();
    assert_eq!(resp.status, 200);
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Content-Type of /metrics is {content_type:?}"
    );
    let text = resp.body;
    promtool_check(&text);

    for (family, kind) in FAMILIES {
        assert_eq!(
            metric_type(&text, family).as_deref(),
            Some(*kind),
            "metric family {family} ({kind}) is not exposed as documented\n{text}"
        );
    }

    // Every watched softirq vector has its series from the start (a missing one is no zero).
    for vector in ["timer", "net_rx", "tasklet", "hrtimer"] {
        metric_value(
            &text,
            "tracer_softirqs_unobserved_total",
            &[("vector", vector)],
        );
    }

    let build = matching_samples(&text, "tracer_build_info", &[]);
    assert_eq!(build.len(), 1, "one tracer_build_info series: {build:?}");
    assert_eq!(build[0].value, 1.0, "{build:?}");
    assert!(
        build[0]
            .labels
            .iter()
            .any(|(k, v)| k == "version" && v == env!("CARGO_PKG_VERSION")),
        "tracer_build_info has version=\"{}\": {build:?}",
        env!("CARGO_PKG_VERSION")
    );

    // Counters never go down between two scrapes.
    let second = agent.scrape();
    promtool_check(&second);
    for (family, kind) in FAMILIES {
        if *kind != "counter" {
            continue;
        }
        for s in matching_samples(&text, family, &[]) {
            let labels: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let later = metric_value(&second, family, &labels);
            assert!(
                later >= s.value,
                "{family}{labels:?} went from {} to {later}",
                s.value
            );
        }
    }
    agent.stop();
}

/// The harness reads scrapes with the parser it shares with the bench (tested in its own
/// crate); what it adds is that a missing series fails the test unless the caller asks for 0.
#[test]
fn harness_fails_on_a_missing_series_unless_zero_is_asked_for() {
    let text = "# TYPE a_total counter\n\
                a_total{direction=\"active\",close=\"local\"} 3\n\
                a_total{direction=\"passive\",close=\"lo,c\\\"al\"} 4\n";
    assert_eq!(metric_value(text, "a_total", &[]), 7.0);
    assert_eq!(metric_value(text, "a_total", &[("close", "lo,c\"al")]), 4.0);
    assert_eq!(
        metric_value_or_zero(text, "a_total", &[("close", "remote")]),
        0.0
    );
    let missing =
        std::panic::catch_unwind(|| metric_value(text, "a_total", &[("close", "remote")]));
    assert!(missing.is_err(), "a missing series read as {missing:?}");
    assert_eq!(metric_type(text, "a_total").as_deref(), Some("counter"));
}
