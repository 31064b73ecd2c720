//! The dashboards proven end to end: a real Prometheus (Debian's `prometheus`, its own
//! temporary configuration and data directory, scraping every second) scrapes a running agent
//! while traffic flows: churn on loopback, TIME_WAIT toward one peer, retransmissions through a
//! veth whose namespace drops packets with nftables, a Nagle write-write-read client, resets
//! and refused connects, a CLOSE_WAIT leak, and connects to a listener that never accepts
//! (listen-queue overflows). Then every query of the Grafana dashboard (its
//! variables substituted as Grafana would) and every alert expression runs through
//! Prometheus's HTTP API: each must return data, or be listed here as quiet by design, with
//! the reason, and then return nothing. Prometheus's own evaluation of `alerts.yml` agrees:
//! every rule evaluates without error, and exactly the alerts with data are pending.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_latency;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Alerts whose expression must return nothing during the test, and why.
const QUIET_ALERTS: &[(&str, &str)] = &[
    (
        "TracerDown",
        "the agent is up and scraped every second; its expression selects failed scrapes",
    ),
    (
        "TracerMetricsAbsent",
        "absent() returns data only when no agent exports tracer_build_info",
    ),
    (
        "TracerEventsLost",
        "the default 4 MiB ring buffer keeps up with this traffic: nothing may be lost",
    ),
    (
        "TracerEventsMalformed",
        "the agent and its programs come from one build: every record decodes",
    ),
    (
        "ConnectionTableEvictions",
        "a few hundred connections stay far below --max-connections (262144)",
    ),
    (
        "TimeWaitPortExhaustion",
        "firing needs half of ip_local_port_range (thousands of ports) in TIME_WAIT toward one \
         peer, which this test does not pile up (and must not change the host's sysctls for); \
         the promtool unit tests (alerts_test.yml) show it firing",
    ),
    (
        "TimeWaitBucketsNearLimit",
        "firing needs 80% of tcp_max_tw_buckets in TIME_WAIT; the promtool unit tests show it",
    ),
    (
        "HighRetransmitRate",
        "firing needs 5 timeout or SYN retransmits a second over 5 minutes (1500), far more \
         than the bounded drops here make; the promtool unit tests show it firing",
    ),
];

/// How often Prometheus scrapes the agent and evaluates the rules.
const SCRAPE_INTERVAL: &str = "1s";
/// What Grafana's `$__rate_interval` would be with a 1 s scrape interval on a short range,
/// rounded up so that every rate sees several samples.
const RATE_INTERVAL: &str = "1m";
/// How long every query may take to return data while the traffic flows.
const DATA_TIMEOUT: Duration = Duration::from_secs(150);
/// At most this many rounds of the traffic mix.
const MAX_ROUNDS: u64 = 200;
/// At most this many Nagle client runs (25 write-write-read rounds each, about 1 s).
const MAX_NAGLE_RUNS: u64 = 300;
/// Connections per round of loopback churn and of TIME_WAIT toward one peer.
const CHURN: usize = 20;
/// Connections per round through the lossy veth.
const LOSSY: usize = 5;
/// CLOSE_WAIT sockets leaked (held, never closed) by the test.
const LEAKS: usize = 3;
/// Connects per round to the listener that never accepts: its accept queue is full after the
/// first round, so each of them overflows it.
const OVERFLOWS: usize = 10;
/// The port the namespace's server listens on (the namespace is the test's own).
const NS_PORT: u16 = 8080;
const NFT_TABLE: &str = "tracer_e2e";

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// The shared Prometheus runner (tracer-scrape), with the test's way of failing: a panic that
/// names the call, and Prometheus's log when the test fails.
struct Prometheus(tracer_scrape::prometheus::Prometheus);

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target` every second as job
    /// `tracer` and evaluating `alerts.yml`; waits until it is ready.
    fn start(target: SocketAddr) -> Prometheus {
        require_tool("prometheus");
        let dir = std::env::temp_dir().join(format!("tracer-prom-e2e-{}", std::process::id()));
        let alerts = dashboards_dir().join("prometheus/alerts.yml");
        let config = tracer_scrape::prometheus::Config {
            target,
            interval: SCRAPE_INTERVAL,
            rule_files: &[alerts.as_path()],
        };
        Prometheus(
            tracer_scrape::prometheus::Prometheus::start(&config, &dir)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer; panics otherwise.
    fn api(&self, path: &str) -> Value {
        self.0.api.get(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An instant query: its result as (labels, value) pairs, a scalar as one pair.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        self.0
            .api
            .query(promql)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter_map(|series| Some((series.labels, series.points.first()?.1)))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.0.log());
        }
    }
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

// ---------------------------------------------------------------------------------------------
// What to query
// ---------------------------------------------------------------------------------------------

/// One expression to run, where it comes from, and why it may return nothing (if it may).
struct Check {
    origin: String,
    promql: String,
    quiet: Option<&'static str>,
}

/// Every query of the dashboard, with Grafana's variables substituted for one selected
/// instance (Grafana escapes the value as a regular expression) and a range of `range_s`.
fn dashboard_checks(instance: &str, range_s: u64) -> Vec<Check> {
    let path = dashboards_dir().join("grafana/tracer-overview.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let escaped = instance.replace('.', "\\\\.");
    let mut checks = Vec::new();
    let mut stack = vec![&dashboard["panels"]];
    while let Some(list) = stack.pop() {
        for panel in list.as_array().into_iter().flatten() {
            stack.push(&panel["panels"]);
            if panel["type"] == "row" {
                continue;
            }
            // `$datasource` is the Prometheus this test queries.
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "a panel does not use the datasource variable: {}",
                panel["title"]
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                let promql = expr
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$__interval", SCRAPE_INTERVAL)
                    .replace("$__range", &format!("{range_s}s"))
                    .replace("${instance}", &escaped)
                    .replace("$instance", &escaped);
                assert!(
                    !promql.contains('$'),
                    "a dashboard query uses a variable this test does not substitute: {expr}"
                );
                checks.push(Check {
                    origin: format!(
                        "panel {} {:?} query {}",
                        panel["id"], panel["title"], target["refId"]
                    ),
                    promql,
                    quiet: None,
                });
            }
        }
    }
    checks
}

/// Every alert expression of `alerts.yml`.
fn alert_checks() -> Vec<Check> {
    let path = dashboards_dir().join("prometheus/alerts.yml");
    let text = std::fs::read_to_string(&path).expect("read alerts.yml");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("alerts.yml is YAML");
    let mut checks = Vec::new();
    for group in doc["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let name = rule["alert"].as_str().expect("an alert name");
            let severity = rule["labels"]["severity"].as_str().unwrap_or("?");
            checks.push(Check {
                origin: format!("alert {name} ({severity})"),
                promql: rule["expr"].as_str().expect("an alert expr").to_owned(),
                quiet: QUIET_ALERTS
                    .iter()
                    .find(|(quiet, _)| *quiet == name)
                    .map(|(_, why)| *why),
            });
        }
    }
    for (name, _) in QUIET_ALERTS {
        assert!(
            checks
                .iter()
                .any(|c| c.origin.starts_with(&format!("alert {name} "))),
            "QUIET_ALERTS names {name}, which alerts.yml does not define"
        );
    }
    checks
}

/// What the traffic mix must show, so that the data the dashboard returns is this test's
/// own: expressions that return nothing until the mix made its mark.
fn traffic_checks(instance: &str, tw_port: u16, slow_port: u16) -> Vec<Check> {
    let sel = format!("instance=\"{instance}\"");
    [
        (
            "SYN retransmits through the lossy veth",
            format!("tracer_retransmits_total{{{sel}, kind=\"syn\"}} > 0"),
        ),
        (
            "data retransmits through the lossy veth",
            format!("sum(tracer_retransmits_total{{{sel}, kind!~\"syn|synack\"}}) > 0"),
        ),
        (
            "TIME_WAIT toward the one peer",
            format!(
                "tracer_time_wait_sockets_by_peer{{{sel}, peer=\"127.0.0.1\", \
                 port=\"{tw_port}\"}} > 0"
            ),
        ),
        (
            "its port exhaustion ratio",
            format!(
                "tracer_time_wait_port_exhaustion_ratio{{{sel}, peer=\"127.0.0.1\", \
                 port=\"{tw_port}\"}} > 0"
            ),
        ),
        (
            "the leaked CLOSE_WAIT sockets",
            format!("tracer_close_wait_leaked_sockets{{{sel}}} >= {LEAKS}"),
        ),
        (
            "Nagle stalls",
            format!("tracer_nagle_stalls_total{{{sel}}} > 0"),
        ),
        (
            "resets received",
            format!("tracer_resets_total{{{sel}, direction=\"received\"}} > 0"),
        ),
        (
            "refused connects",
            format!("tracer_connections_closed_total{{{sel}, close=\"refused\"}} > 0"),
        ),
        (
            "listen-queue overflows of the listener that never accepts",
            format!("tracer_listen_overflows_by_listener_total{{{sel}, port=\"{slow_port}\"}} > 0"),
        ),
    ]
    .into_iter()
    .map(|(what, promql)| Check {
        origin: format!("traffic: {what}"),
        promql,
        quiet: None,
    })
    .collect()
}

/// Whether a result counts as data: a sample with a number (a quantile of nothing is NaN).
fn has_data(result: &[(Value, f64)]) -> bool {
    result.iter().any(|(_, v)| v.is_finite())
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Deletes the namespace's nftables table on drop (the namespace's own drop removes it too).
struct NftTable(String);

impl NftTable {
    /// In `ns`, drops every 4th SYN coming in (SYN retransmits) and every 7th TCP segment
    /// (timeout and fast retransmits). Deterministic, so no connection loses two in a row.
    fn lossy(ns: &Netns) -> NftTable {
        require_tool("nft");
        let table = NftTable(ns.name.clone());
        for command in [
            format!("add table inet {NFT_TABLE}"),
            format!(
                "add chain inet {NFT_TABLE} input {{ type filter hook input priority 0 ; \
                 policy accept ; }}"
            ),
            format!(
                "add rule inet {NFT_TABLE} input tcp dport {NS_PORT} tcp flags & (syn | ack) \
                 == syn numgen inc mod 4 == 0 drop"
            ),
            format!(
                "add rule inet {NFT_TABLE} input tcp dport {NS_PORT} numgen inc mod 7 == 0 drop"
            ),
        ] {
            run_ok("ip", &["netns", "exec", &ns.name, "nft", &command]);
        }
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &self.0,
                "nft",
                &format!("delete table inet {NFT_TABLE}"),
            ],
        );
    }
}

/// Connections accepted and held, never closed, after their clients closed: CLOSE_WAIT.
fn leak_close_wait(n: usize) -> Vec<TcpStream> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    (0..n)
        .map(|_| {
            let client = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            let (held, _) = listener.accept().expect("accept");
            drop(client);
            held
        })
        .collect()
}

/// Traffic threads, stopped (and joined, bounded) on drop.
struct Traffic {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// One thread runs the mix round after round; one runs Nagle write-write-read clients
    /// without pause, so that the stall rate stays well above the alert's 1/s.
    fn start(tw_port: u16, lossy: SocketAddr, slow: SocketAddr, ns: Arc<Netns>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let mix = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            thread::Builder::new()
                .name("e2e-mix".into())
                .spawn(move || {
                    for _ in 0..MAX_ROUNDS {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        mix_round(tw_port, lossy, slow, &ns);
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .expect("spawn the traffic thread")
        };
        let nagle = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("e2e-nagle-loop".into())
                .spawn(move || {
                    for _ in 0..MAX_NAGLE_RUNS {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        support_latency::write_write_read(25, false, "e2e-nagle");
                    }
                })
                .expect("spawn the Nagle thread")
        };
        Traffic {
            stop,
            rounds,
            threads: vec![mix, nagle],
        }
    }

    /// Panics if a traffic thread ended before it was told to: it failed (its own panic
    /// message says why) or ran out of rounds.
    fn check(&self) {
        for t in &self.threads {
            assert!(
                !t.is_finished() || self.stop.load(Ordering::SeqCst),
                "a traffic thread ({:?}) ended early: see its panic above, if any",
                t.thread().name()
            );
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let deadline = Instant::now() + IO_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            assert!(t.is_finished(), "a traffic thread did not stop");
            assert!(t.join().is_ok(), "a traffic thread panicked");
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let deadline = Instant::now() + IO_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One round: churn where the server closes first, TIME_WAIT toward one peer (the client
/// closes first, always to `127.0.0.1:tw_port`), resets, a refused connect, connections
/// through the lossy veth, and connects to `slow`, which never accepts (aborted after a
/// moment so that their SYNs are not resent).
fn mix_round(tw_port: u16, lossy: SocketAddr, slow: SocketAddr, ns: &Netns) {
    let churn = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoThenClose,
        CHURN,
    );
    run_clients(churn.addr, ClientMode::WaitServerClose, CHURN, "e2e-churn");
    churn.join();

    let tw_addr = SocketAddr::from(([127, 0, 0, 1], tw_port));
    let tw = Server::start(tw_addr, ServerMode::EchoWaitClientClose, CHURN);
    run_clients(tw.addr, ClientMode::CloseFirst, CHURN, "e2e-time-wait");
    tw.join();

    let rst = Server::start("127.0.0.1:0".parse().unwrap(), ServerMode::ReadThenReset, 2);
    run_clients(rst.addr, ClientMode::ExpectReset, 2, "e2e-reset");
    rst.join();
    connect_refused(SocketAddr::from(([127, 0, 0, 1], free_port())));

    let lossy_server = Server::start_in(ns, lossy, ServerMode::EchoWaitClientClose, LOSSY);
    run_clients(lossy, ClientMode::CloseFirst, LOSSY, "e2e-lossy");
    lossy_server.join();

    let overflowing = nonblocking_connects(slow, OVERFLOWS);
    thread::sleep(Duration::from_millis(100));
    abort_all(overflowing);
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    require_root();
    for tool in ["prometheus", "ip", "nft"] {
        require_tool(tool);
    }
    // Many TIME_WAIT peers may exist on a shared machine: show them all, so the test's own
    // peer gets its per-peer series. CLOSE_WAIT past 2 s is a leak.
    // The metrics by workload are opt-in: ask for them, so that their panels are checked too.
    let agent = Agent::start(&[
        "--time-wait-top-peers",
        "1000",
        "--close-wait-threshold",
        "2s",
        "--metrics-by",
        "workload",
    ]);
    let prometheus = Prometheus::start(agent.listen);
    let started = Instant::now();
    let instance = agent.listen.to_string();

    // The namespace, then its nftables table: dropped in the reverse order.
    let ns = Arc::new(Netns::create());
    let nft = NftTable::lossy(&ns);
    let lossy = ns.ns_addr(NS_PORT);
    let tw_port = free_port();
    let held = leak_close_wait(LEAKS);
    // A listener with backlog 1 that never accepts.
    let slow = TcpListener::bind("127.0.0.1:0").expect("bind the slow listener");
    set_backlog(&slow, 1);
    let slow_addr = slow.local_addr().expect("local_addr");
    let traffic = Traffic::start(tw_port, lossy, slow_addr, ns.clone());
    let checks_wait = Instant::now();
    let mut missing: BTreeMap<String, String> = BTreeMap::new();
    let mut rounds_seen = 0;
    while checks_wait.elapsed() < DATA_TIMEOUT {
        traffic.check();
        let range_s = started.elapsed().as_secs() + 1;
        missing.clear();
        for check in dashboard_checks(&instance, range_s)
            .into_iter()
            .chain(alert_checks())
            .chain(traffic_checks(&instance, tw_port, slow_addr.port()))
            .filter(|c| c.quiet.is_none())
        {
            let result = prometheus.query(&check.promql);
            if !has_data(&result) {
                missing.insert(check.origin, format!("{} -> {result:?}", check.promql));
            }
        }
        rounds_seen = traffic.rounds.load(Ordering::SeqCst);
        if missing.is_empty() {
            break;
        }
        thread::sleep(Duration::from_secs(2));
    }
    // The dashboard's instance variable lists the agent.
    let values = prometheus.api("label/instance/values?match[]=tracer_build_info");
    assert!(
        values
            .as_array()
            .is_some_and(|v| v.iter().any(|i| i == instance.as_str())),
        "label_values(tracer_build_info, instance) does not list {instance}: {values}"
    );
    assert!(
        missing.is_empty(),
        "after {:?} of traffic ({rounds_seen} rounds), these queries still return no data:\n{}",
        checks_wait.elapsed(),
        missing
            .iter()
            .map(|(origin, what)| format!("{origin}: {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Quiet by design: nothing, for the reason given.
    let range_s = started.elapsed().as_secs() + 1;
    let mut checked = 0;
    for check in dashboard_checks(&instance, range_s)
        .into_iter()
        .chain(alert_checks())
    {
        let result = prometheus.query(&check.promql);
        match check.quiet {
            None => checked += 1,
            Some(why) => assert!(
                result.is_empty(),
                "{} is quiet by design ({why}) but returned {result:?} for {}",
                check.origin,
                check.promql
            ),
        }
    }
    eprintln!(
        "{checked} dashboard queries and alert expressions returned data, and the {} traffic \
         checks passed, after {:?} ({rounds_seen} traffic rounds); {} alert expressions stayed \
         quiet",
        traffic_checks(&instance, tw_port, slow_addr.port()).len(),
        checks_wait.elapsed(),
        alert_checks().iter().filter(|c| c.quiet.is_some()).count()
    );

    // Prometheus's own rule evaluation agrees: the alerts whose expression returns data are
    // pending (their `for` has not passed), and no other alert is pending or firing.
    let expected_pending: BTreeSet<String> = alert_checks()
        .iter()
        .filter(|c| c.quiet.is_none())
        .map(|c| c.origin.split(' ').nth(1).unwrap_or_default().to_owned())
        .collect();
    let waited = Instant::now();
    let active = loop {
        let alerts = prometheus.api("alerts");
        let active: BTreeMap<String, String> = alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["instance"] == instance.as_str())
            .map(|a| {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default();
                (
                    name.to_owned(),
                    a["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let pending: BTreeSet<String> = active.keys().cloned().collect();
        if pending == expected_pending || waited.elapsed() > Duration::from_secs(15) {
            break active;
        }
        thread::sleep(Duration::from_millis(500));
    };
    assert!(
        active.keys().eq(expected_pending.iter()) && active.values().all(|s| s == "pending"),
        "expected exactly {expected_pending:?} pending for {instance}, Prometheus has {active:?}"
    );

    // Prometheus evaluated every rule without error, and the target is up.
    let rules = prometheus.api("rules?type=alert");
    let mut rule_names = BTreeSet::new();
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(
                rule["health"], "ok",
                "rule {} did not evaluate: {}",
                rule["name"], rule["lastError"]
            );
            rule_names.insert(rule["name"].as_str().unwrap_or_default().to_owned());
        }
    }
    let expected: BTreeSet<String> = alert_checks()
        .iter()
        .map(|c| c.origin.split(' ').nth(1).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(rule_names, expected, "Prometheus did not load every alert");
    let targets = prometheus.api("targets?state=active");
    let up: Vec<&Value> = targets["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["labels"]["instance"] == instance.as_str())
        .collect();
    assert!(
        up.len() == 1 && up[0]["health"] == "up",
        "the agent's target is not up: {targets}"
    );

    traffic.finish();
    drop(held);
    drop(slow);
    drop(nft);
    drop(ns);
    drop(prometheus);
    let mut agent = agent;
    agent.stop();
}
