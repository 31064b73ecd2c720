//! `tracer diagnose`: a run watches the host for a while and prints findings. Driven with real
//! workloads on loopback and compared with the kernel's view: many client-closed connections to
//! one server port are a TIME_WAIT finding naming that peer and the share of the ephemeral port
//! range it holds (as `ss` and the sysctl give it); a write-write-read client with Nagle on is a
//! Nagle + delayed-ACK finding naming the writer; a short run with no traffic of ours exits 0
//! with a well-formed report; a bad duration is refused with one line.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_latency;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_latency::*;

/// Attaching and seeding (the host may hold tens of thousands of TIME_WAIT sockets) before the
/// run starts watching.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// After the watch ends: detaching and writing the report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

const TOPICS: [&str; 9] = [
    "time_wait",
    "nagle_delayed_ack",
    "delayed_ack",
    "retransmissions",
    "close_wait",
    "resets",
    "listen_overflows",
    "slow_peers",
    "zero_window",
];

/// A `tracer diagnose` run in progress.
struct Diagnose {
    child: Option<std::process::Child>,
    duration: Duration,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
    watching: mpsc::Receiver<()>,
}

/// What a finished run printed.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Diagnose {
    /// Starts `tracer diagnose --duration <duration> <args>`.
    fn start(duration: &str, args: &[&str]) -> Diagnose {
        require_root();
        let mut child = Command::new(AGENT_BIN)
            .args(["diagnose", "--duration", duration])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {AGENT_BIN} diagnose: {e}"));
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, watching) = mpsc::channel();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        // stderr: tell when the run says it is watching, keep everything.
        let stderr = thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            let mut told = false;
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        all.extend_from_slice(&buf[..n]);
                        if !told && String::from_utf8_lossy(&all).contains("watching TCP") {
                            told = true;
                            let _ = tx.send(());
                        }
                    }
                }
            }
            String::from_utf8_lossy(&all).into_owned()
        });
        Diagnose {
            child: Some(child),
            duration: cli_duration(duration),
            stdout: Some(stdout),
            stderr: Some(stderr),
            watching,
        }
    }

    /// Waits until the run has attached and watches; panics (with its output) otherwise.
    fn wait_watching(&mut self) {
        if self.watching.recv_timeout(ATTACH_TIMEOUT).is_err() {
            let done = self.finish();
            panic!(
                "tracer diagnose did not start watching within {ATTACH_TIMEOUT:?} ({}): \
                 stdout {:?} stderr {:?}",
                done.status, done.stdout, done.stderr
            );
        }
    }

    /// Waits (bounded) for the run to end and collects its output.
    fn finish(&mut self) -> Finished {
        let mut child = self.child.take().expect("finished once");
        let status = wait_timeout(&mut child, self.duration + ATTACH_TIMEOUT + REPORT_TIMEOUT);
        let status = status.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tracer diagnose did not end");
        });
        Finished {
            status,
            stdout: self.stdout.take().unwrap().join().expect("stdout reader"),
            stderr: self.stderr.take().unwrap().join().expect("stderr reader"),
        }
    }
}

impl Drop for Diagnose {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn cli_duration(text: &str) -> Duration {
    let secs: u64 = text
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .expect("durations in whole seconds here");
    Duration::from_secs(secs)
}

/// Runs diagnose for `duration` while `workload` runs (once the run watches); returns the
/// workload's result and the run's output, which must have exited 0.
fn diagnose_during<T>(
    duration: &str,
    args: &[&str],
    workload: impl FnOnce() -> T,
) -> (T, Finished) {
    let mut run = Diagnose::start(duration, args);
    run.wait_watching();
    let started = Instant::now();
    let result = workload();
    let took = started.elapsed();
    let done = run.finish();
    assert!(
        took < cli_duration(duration),
        "the workload ({took:?}) outlasted the run ({duration}): what it did at the end was not \
         watched"
    );
    assert!(
        done.status.success(),
        "tracer diagnose {duration} {args:?} failed ({}): stdout {:?} stderr {:?}",
        done.status,
        done.stdout,
        done.stderr
    );
    (result, done)
}

/// Parses the JSON report and checks its shape: every finding has the documented fields and a
/// known topic.
fn parse_report(stdout: &str) -> Value {
    let report: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("the --json report is not JSON ({e}): {stdout}"));
    assert!(report.is_object(), "{report}");
    let findings = report["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings array: {report}"));
    for f in findings {
        let topic = f["topic"].as_str().unwrap_or_else(|| panic!("{f}"));
        assert!(TOPICS.contains(&topic), "unknown topic {topic}: {f}");
        assert!(
            matches!(f["severity"].as_str(), Some("problem" | "notice")),
            "{f}"
        );
        for key in ["title", "measured", "why", "action"] {
            let text = f[key].as_str().unwrap_or_else(|| panic!("no {key}: {f}"));
            assert!(!text.trim().is_empty(), "empty {key}: {f}");
        }
        assert!(f["details"].is_object(), "{f}");
    }
    assert!(report["duration_seconds"].as_f64().is_some(), "{report}");
    report
}

fn finding<'a>(report: &'a Value, topic: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["topic"] == topic)
        .unwrap_or_else(|| panic!("no {topic} finding in {report:#}"))
}

/// TIME_WAIT sockets of this namespace whose peer is `server`, as `ss` lists them.
fn ss_time_wait_to(server: SocketAddr) -> usize {
    require_tool("ss");
    let dst = format!("dst {server}");
    let mut args = vec!["-Htan", "state", "time-wait"];
    args.extend(dst.split(' '));
    run_ok("ss", &args).lines().count()
}

fn ephemeral_ports() -> u64 {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read ip_local_port_range");
    let bounds: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().expect("port"))
        .collect();
    assert_eq!(bounds.len(), 2, "{text:?}");
    bounds[1] - bounds[0] + 1
}

#[test]
fn many_client_closed_connections_to_one_port_are_a_time_wait_finding() {
    require_root();
    const N: usize = 400;
    const WARN: f64 = 0.005;
    let range = ephemeral_ports();
    assert!(
        N as f64 / range as f64 >= 2.0 * WARN,
        "{N} connections are not enough for a {WARN} warning with {range} ephemeral ports"
    );
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let (_, done) = diagnose_during(
        "8s",
        &[
            "--json",
            "--port-exhaustion-warning",
            "0.005",
            "--top",
            "100",
        ],
        || {
            let clients = run_clients(addr, ClientMode::CloseFirst, N, "tw-client");
            server.join();
            clients
        },
    );
    let kernel = ss_time_wait_to(addr);
    let report = parse_report(&done.stdout);
    let tw = finding(&report, "time_wait");
    eprintln!("kernel: {kernel} TIME_WAIT sockets to {addr}; finding: {tw:#}");
    assert_eq!(
        tw["severity"], "problem",
        "{N} of {range} ports held for one peer is past the {WARN} warning: {tw:#}"
    );
    let row = tw["details"]["top_peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no top_peers: {tw:#}"))
        .iter()
        .find(|p| p["peer"] == "127.0.0.1" && p["port"] == addr.port())
        .unwrap_or_else(|| panic!("the peer {addr} is not among the top peers: {tw:#}"));
    assert_eq!(row["role"], "client", "this host closed first: {row}");
    let sockets = row["sockets"].as_u64().unwrap_or_else(|| panic!("{row}"));
    // The run reports the table at its end; the kernel was asked just after. Nothing expires
    // in between (TIME_WAIT lasts 60 s); a handful may be taken over by a new connection
    // (tcp_tw_reuse) from other activity.
    assert!(
        sockets as usize >= N - 5 && sockets as usize <= N,
        "{sockets} TIME_WAIT sockets reported toward {addr}, {N} connections closed first"
    );
    assert!(
        kernel.abs_diff(sockets as usize) <= 5,
        "the report says {sockets} TIME_WAIT sockets toward {addr}, ss lists {kernel}"
    );
    let ratio = row["port_exhaustion_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("no ratio: {row}"));
    let expected = sockets as f64 / range as f64;
    assert!(
        (ratio - expected).abs() < 1e-9,
        "ratio {ratio}, expected {sockets}/{range} = {expected}: {row}"
    );
    assert!(ratio >= WARN, "{row}");
    assert_eq!(
        tw["details"]["sysctls"]["ephemeral_ports"].as_u64(),
        Some(range),
        "{tw:#}"
    );
    let advice = tw["action"].as_str().unwrap();
    assert!(
        advice.contains("tcp_tw_reuse") && advice.to_lowercase().contains("pool"),
        "the advice names tcp_tw_reuse and pooling: {advice}"
    );

    // The same in text.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let (_, done) = diagnose_during(
        "8s",
        &["--port-exhaustion-warning", "0.005", "--top", "100"],
        || {
            run_clients(addr, ClientMode::CloseFirst, N, "tw-client");
            server.join();
        },
    );
    let text = done.stdout;
    eprintln!("{text}");
    assert!(
        text.starts_with("TCP diagnosis over"),
        "the text report starts with its summary: {text}"
    );
    assert!(text.contains("[PROBLEM]"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains(&format!("to {addr} ")))
        .unwrap_or_else(|| panic!("the text report does not name {addr}:\n{text}"));
    assert!(
        line.contains("client") && line.contains('%'),
        "the line about {addr} gives the role and the share of ports: {line}"
    );
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("tcp_tw_reuse") && flat.to_lowercase().contains("pool"),
        "the text report advises tcp_tw_reuse and pooling:\n{text}"
    );
}

#[test]
fn nagle_client_is_a_nagle_finding_naming_the_writer() {
    require_root();
    const ROUNDS: usize = 20;
    let (run, done) = diagnose_during("8s", &["--json", "--top", "100"], || {
        write_write_read(ROUNDS, false, "wwr-nagle")
    });
    let report = parse_report(&done.stdout);
    let nagle = finding(&report, "nagle_delayed_ack");
    eprintln!("rounds [{}] ms; finding: {nagle:#}", run.rounds_ms());
    assert_eq!(nagle["severity"], "problem", "{nagle:#}");
    let pid = u64::from(std::process::id());
    let writer = nagle["details"]["writers"]["top"]
        .as_array()
        .unwrap_or_else(|| panic!("no writers: {nagle:#}"))
        .iter()
        .find(|w| w["process"]["pid"] == pid && w["process"]["comm"] == run.comm.as_str())
        .unwrap_or_else(|| {
            panic!(
                "the writer pid {pid} ({}) is not named: {nagle:#}",
                run.comm
            )
        });
    let stalls = writer["stalls"].as_u64().unwrap();
    assert!(
        (15..=ROUNDS as u64).contains(&stalls),
        "{stalls} stalls for {ROUNDS} rounds: {writer}"
    );
    let lost_ms = writer["lost_ms"].as_f64().unwrap();
    let per_stall = lost_ms / stalls as f64;
    assert!(
        (20.0..=250.0).contains(&per_stall),
        "{per_stall:.1} ms lost per stall, expected a delayed-ACK timeout: {writer}"
    );
    let conn = nagle["details"]["connections"]["top"]
        .as_array()
        .unwrap_or_else(|| panic!("no connections: {nagle:#}"))
        .iter()
        .find(|c| c["local"] == run.client.to_string().as_str())
        .unwrap_or_else(|| {
            panic!(
                "the connection from {} is not listed: {nagle:#}",
                run.client
            )
        });
    assert_eq!(conn["remote"], run.server.to_string().as_str(), "{conn}");
    assert_eq!(conn["writer"]["pid"], pid, "{conn}");
    assert_eq!(conn["stalls"].as_u64(), Some(stalls), "{conn}");
    assert!(
        nagle["action"].as_str().unwrap().contains("TCP_NODELAY"),
        "{nagle:#}"
    );
    // Stalls explain the delayed ACKs: no separate delayed-ACK notice.
    let topics: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["topic"].as_str())
        .collect();
    assert!(!topics.contains(&"delayed_ack"), "{topics:?}");
}

#[test]
fn quiet_short_run_exits_0_with_a_well_formed_report() {
    require_root();
    let mut run = Diagnose::start("2s", &["--json"]);
    let done = run.finish();
    assert!(
        done.status.success(),
        "tracer diagnose --duration 2s --json failed ({}): {:?} {:?}",
        done.status,
        done.stdout,
        done.stderr
    );
    let report = parse_report(&done.stdout);
    let secs = report["duration_seconds"].as_f64().unwrap();
    assert!(
        (1.9..10.0).contains(&secs),
        "watched {secs} s for --duration 2s"
    );
    for key in [
        "connections_opened",
        "connections_closed",
        "events_lost",
        "softirqs_unobserved",
        "time_wait_sockets",
        "close_wait_sockets",
    ] {
        assert!(report[key].as_u64().is_some(), "no {key}: {report}");
    }

    let mut run = Diagnose::start("2s", &[]);
    let done = run.finish();
    assert!(
        done.status.success(),
        "tracer diagnose --duration 2s failed ({}): {:?} {:?}",
        done.status,
        done.stdout,
        done.stderr
    );
    let text = done.stdout.trim_end();
    let first = text.lines().next().unwrap_or_default();
    if first.starts_with("No TCP problems seen") {
        // Nothing wrong is said briefly: one line, then only the warnings that make its numbers
        // lower bounds (lost events, softirqs the kernel ran without the programs).
        let rest: Vec<&str> = text.lines().skip(1).collect();
        assert!(
            rest.iter()
                .all(|l| l.starts_with("warning: ") || l.starts_with("         ")),
            "{text}"
        );
    } else {
        assert!(
            first.starts_with("TCP diagnosis over"),
            "unexpected first line of the text report: {text}"
        );
        assert!(
            text.contains("[PROBLEM]") || text.contains("[NOTICE]"),
            "{text}"
        );
    }
}

#[test]
fn bad_duration_is_refused_with_one_line() {
    require_root();
    let out = Command::new(AGENT_BIN)
        .args(["diagnose", "--duration", "soon"])
        .stdin(Stdio::null())
        .output()
        .expect("run tracer diagnose");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted --duration soon: {out:?}");
    assert_eq!(out.status.code(), Some(2), "a usage error: {out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    assert!(
        stderr.contains("soon") && stderr.starts_with("tracer: error:"),
        "{stderr:?}"
    );
}
