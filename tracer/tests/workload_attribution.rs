//! Workload attribution end to end, on real cgroups and real connections: a server runs in a
//! cgroup named as systemd names a service, clients in one named as docker names a container
//! and one named as the kubelet (systemd driver, containerd) names a pod's container. The
//! processes are children of the test moved into their cgroup before they run, and talk over
//! the loopback of a network namespace the test creates (its teardown ends their TIME_WAIT
//! stays). Checked against the cgroups' own inode numbers, `ss` and the agent's host gauges:
//! - both ends of every connection (the accepted side included) name their workload in the
//!   JSON events, with the cgroup id the kernel gives the cgroup's directory;
//! - TIME_WAIT by workload adds up to the host gauge, and each workload's count is what `ss`
//!   lists for its ports;
//! - a pod whose cgroup is removed while its connections close is still named;
//! - TIME_WAIT stays carry the workload of the connection they came from;
//! - with more workloads than N the `workload` label stays within N + 1 series, and
//!   `--filter` narrows the events; bad filter input is a one-line error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::cgroups::TestCgroups;
use common::*;

const DOCKER_ID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const KUBE_ID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const POD_UID: &str = "2f6e8a1c-3b4d-4e5f-9a8b-7c6d5e4f3a2b";

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts `count` connections one after the other, reads each until the peer closes, then
/// closes it. Every wait bounded.
const SERVER: &str = r"
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', port))
s.listen(256)
s.settimeout(60)
print('ready', flush=True)
for _ in range(count):
    c, _ = s.accept()
    c.settimeout(60)
    while c.recv(64):
        pass
    c.close()
";

/// Opens `count` connections, sends a byte on each and prints its local port; closes each at
/// once (`close`, so the client holds the TIME_WAIT), or keeps them all open until its stdin
/// closes or it is killed (`hold`).
const CLIENT: &str = r"
import socket, sys
port, count, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == 'hold'
kept = []
for _ in range(count):
    c = socket.create_connection(('127.0.0.1', port), timeout=30)
    c.sendall(b'x')
    print(c.getsockname()[1], flush=True)
    if hold:
        kept.append(c)
    else:
        c.close()
print('done', flush=True)
if hold:
    sys.stdin.read()
";

/// A python3 program started in a cgroup: `sh` waits on its stdin until the test has written
/// its pid to the cgroup's `cgroup.procs`, then execs the program (inside the test's network
/// namespace), which so runs in the cgroup from its first instruction.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn start(cgroups: &TestCgroups, rel: &str, ns: &Netns, script: &str, args: &[String]) -> Proc {
        require_tool("python3");
        let dir = cgroups.mkdir(rel);
        let mut child = Command::new("sh")
            .args(["-c", "read go && exec \"$@\"", "sh"])
            .args(["ip", "netns", "exec", &ns.name, "python3", "-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, child.id().to_string())
            .unwrap_or_else(|e| panic!("write to {}: {e}", procs.display()));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(b"go\n").expect("start the program");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Proc {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// The next line it prints (the programs' own timeouts bound the wait).
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read program output");
        assert!(n > 0, "the program ended early");
        line.trim().to_owned()
    }

    /// The local ports it prints, up to `done`.
    fn ports(&mut self) -> HashSet<u64> {
        let mut ports = HashSet::new();
        loop {
            let line = self.line();
            if line == "done" {
                return ports;
            }
            ports.insert(
                line.parse()
                    .unwrap_or_else(|_| panic!("not a port: {line}")),
            );
        }
    }

    fn wait_ok(&mut self) {
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, Duration::from_secs(60))
            .expect("the program did not end within 60 s");
        assert!(status.success(), "the program failed: {status}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn docker_rel() -> String {
    format!("docker/{DOCKER_ID}")
}

fn kube_rel() -> String {
    format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{KUBE_ID}.scope",
        POD_UID.replace('-', "_")
    )
}

fn docker_name() -> String {
    format!("docker/{}", &DOCKER_ID[..12])
}

fn pod_name() -> String {
    format!("pod/{POD_UID}")
}

fn closed_in(ns: u64, ports: &HashSet<u64>, local: bool) -> impl Fn(&Value) -> bool + Clone {
    let ports = ports.clone();
    move |e: &Value| {
        let key = if local { "sport" } else { "dport" };
        e["event"] == "connection_closed"
            && e["netns"].as_u64() == Some(ns)
            && e[key].as_u64().is_some_and(|p| ports.contains(&p))
    }
}

/// What every event of a connection of `workload` says about it.
fn assert_names(ev: &Value, cgroup: u64, workload: &str, expected: &[(&str, Value)]) {
    assert_eq!(ev["cgroup"].as_u64(), Some(cgroup), "cgroup id: {ev}");
    assert_eq!(ev_str(ev, "workload"), workload, "{ev}");
    for (field, value) in expected {
        assert_eq!(&ev[*field], value, "{field}: {ev}");
    }
}

fn ino(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}

fn sum(text: &str, name: &str) -> f64 {
    matching_samples(text, name, &[])
        .iter()
        .map(|s| s.value)
        .sum()
}

/// TIME_WAIT sockets in `ns` whose local port is one of `ports`, as `ss` lists them.
fn ss_time_wait(ns: &Netns, ports: &HashSet<u64>) -> usize {
    let path = std::path::PathBuf::from(ns.path());
    ss_in(Some(&path), &["-Htan", "state", "time-wait"])
        .expect("ss in the namespace")
        .iter()
        .filter(|line| {
            line.split_whitespace()
                .nth(2)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u64>().ok())
                .is_some_and(|p| ports.contains(&p))
        })
        .count()
}

#[test]
fn both_ends_name_their_workload_time_wait_adds_up_and_removed_pods_keep_their_name() {
    const DOCKER_CONNS: usize = 20;
    const POD_CONNS: usize = 10;
    let ns = Netns::create();
    let mut cgroups = TestCgroups::create();
    let agent = Agent::start(&["--metrics-by", "workload", "--workload-top", "10"]);
    let service = format!("tracer-wl-{}.service", std::process::id());
    let server_rel = format!("system.slice/{service}");
    let ids = [&server_rel, &docker_rel(), &kube_rel()].map(|rel| ino(&cgroups.mkdir(rel)));
    let [server_id, docker_id, pod_id] = ids;
    let netns = ns.inode();
    let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let total = (DOCKER_CONNS + POD_CONNS).to_string();
    let mut server = Proc::start(
        &cgroups,
        &server_rel,
        &ns,
        SERVER,
        &args(&["18080", &total]),
    );
    assert_eq!(server.line(), "ready");

    // Containers: connect, send, close first (the client keeps the TIME_WAIT).
    let mut docker = Proc::start(
        &cgroups,
        &docker_rel(),
        &ns,
        CLIENT,
        &args(&["18080", &DOCKER_CONNS.to_string(), "close"]),
    );
    let docker_ports = docker.ports();
    docker.wait_ok();
    assert_eq!(docker_ports.len(), DOCKER_CONNS);
    let service_fields = [
        ("workload_kind", Value::from("service")),
        ("unit", Value::from(service.as_str())),
        ("container_id", Value::Null),
        ("pod_uid", Value::Null),
    ];
    let docker_fields = [
        ("workload_kind", Value::from("container")),
        ("container_id", Value::from(DOCKER_ID)),
        ("runtime", Value::from("docker")),
        ("pod_uid", Value::Null),
        ("qos", Value::Null),
    ];
    let pod_fields = [
        ("workload_kind", Value::from("pod")),
        ("pod_uid", Value::from(POD_UID)),
        ("qos", Value::from("burstable")),
        ("container_id", Value::from(KUBE_ID)),
        ("runtime", Value::from("containerd")),
    ];
    for ev in agent.wait_for_events(
        closed_in(netns, &docker_ports, true),
        DOCKER_CONNS,
        EVENT_TIMEOUT,
    ) {
        assert_eq!(ev_str(&ev, "direction"), "active", "{ev}");
        assert_names(&ev, docker_id, &docker_name(), &docker_fields);
    }
    // The accepted side inherits the listener's cgroup: the service's.
    for ev in agent.wait_for_events(
        closed_in(netns, &docker_ports, false),
        DOCKER_CONNS,
        EVENT_TIMEOUT,
    ) {
        assert_eq!(ev_str(&ev, "direction"), "passive", "{ev}");
        assert_names(&ev, server_id, &service, &service_fields);
    }

    // The pod holds its connections open until it is stopped and its cgroup removed.
    let mut pod = Proc::start(
        &cgroups,
        &kube_rel(),
        &ns,
        CLIENT,
        &args(&["18080", &POD_CONNS.to_string(), "hold"]),
    );
    let pod_ports = pod.ports();
    assert_eq!(pod_ports.len(), POD_CONNS);
    // Wait (bounded) until the agent counts them open under the pod's name.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let text = agent.scrape();
        let open = metric_value_or_zero(
            &text,
            "tracer_workload_connections_active",
            &[("workload", &pod_name())],
        );
        if open >= POD_CONNS as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tracer_workload_connections_active{{workload=\"{}\"}} stayed at {open}",
            pod_name()
        );
        thread::sleep(Duration::from_millis(200));
    }
    cgroups.remove(&kube_rel());
    assert!(
        !cgroups.dir.join(kube_rel()).exists(),
        "the pod's cgroup is removed"
    );
    drop(pod);
    for ev in agent.wait_for_events(closed_in(netns, &pod_ports, true), POD_CONNS, EVENT_TIMEOUT) {
        assert_eq!(ev_str(&ev, "direction"), "active", "{ev}");
        assert_names(&ev, pod_id, &pod_name(), &pod_fields);
    }
    for ev in agent.wait_for_events(
        closed_in(netns, &pod_ports, false),
        POD_CONNS,
        EVENT_TIMEOUT,
    ) {
        assert_names(&ev, server_id, &service, &service_fields);
    }
    server.wait_ok();

    // TIME_WAIT by workload: the clients' sockets, as ss lists them, and the sum of the
    // breakdown equals the host gauge in the same scrape (compared until a quiet moment).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let ss_docker = ss_time_wait(&ns, &docker_ports);
        let ss_pod = ss_time_wait(&ns, &pod_ports);
        let text = agent.scrape();
        let host = metric_value(&text, "tracer_time_wait_sockets", &[]);
        let by_workload = sum(&text, "tracer_workload_time_wait_sockets");
        let tw = |name: &str| {
            metric_value_or_zero(
                &text,
                "tracer_workload_time_wait_sockets",
                &[("workload", name)],
            )
        };
        let (docker_tw, pod_tw) = (tw(&docker_name()), tw(&pod_name()));
        let last = format!(
            "host {host}, sum by workload {by_workload}, docker {docker_tw} (ss {ss_docker}), \
             pod {pod_tw} (ss {ss_pod})"
        );
        if host == by_workload
            && docker_tw == ss_docker as f64
            && pod_tw == ss_pod as f64
            && ss_docker == DOCKER_CONNS
            && ss_pod == POD_CONNS
        {
            eprintln!("TIME_WAIT agrees: {last}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TIME_WAIT by workload never agreed: {last}"
        );
        thread::sleep(Duration::from_millis(300));
    }

    // Tearing the namespace down ends the stays: each names the connection's workload.
    let all_ports: HashSet<u64> = docker_ports.union(&pod_ports).copied().collect();
    drop(ns);
    let ended = agent.wait_for_events(
        |e| {
            e["event"] == "time_wait_ended"
                && e["netns"].as_u64() == Some(netns)
                && e["sport"].as_u64().is_some_and(|p| all_ports.contains(&p))
        },
        DOCKER_CONNS + POD_CONNS,
        EVENT_TIMEOUT,
    );
    for ev in &ended {
        let port = ev["sport"].as_u64().unwrap();
        if docker_ports.contains(&port) {
            assert_names(ev, docker_id, &docker_name(), &docker_fields);
        } else {
            assert_names(ev, pod_id, &pod_name(), &pod_fields);
        }
    }
    eprintln!(
        "{} + {} connections named on both ends, {} TIME_WAIT stays named",
        DOCKER_CONNS,
        POD_CONNS,
        ended.len()
    );
}

#[test]
fn workload_label_stays_bounded_and_filter_narrows_events() {
    const TOP: usize = 2;
    const EXTRA: usize = 5;
    const CONNS: usize = 6;
    let ns = Netns::create();
    let cgroups = TestCgroups::create();
    let mut agent = Agent::start(&[
        "--metrics-by",
        "workload",
        "--workload-top",
        &TOP.to_string(),
        "--filter",
        "workload=docker/*",
        "--filter",
        "port=18081",
    ]);
    let netns = ns.inode();
    let service_rel = format!("system.slice/tracer-wl-{}.service", std::process::id());
    let total = ((EXTRA + 1) * CONNS).to_string();
    let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut server = Proc::start(
        &cgroups,
        &service_rel,
        &ns,
        SERVER,
        &args(&["18081", &total]),
    );
    assert_eq!(server.line(), "ready");
    let mut docker = Proc::start(
        &cgroups,
        &docker_rel(),
        &ns,
        CLIENT,
        &args(&["18081", &CONNS.to_string(), "close"]),
    );
    let docker_ports = docker.ports();
    docker.wait_ok();
    let families = [
        "tracer_workload_connections_opened_total",
        "tracer_workload_connections_closed_total",
        "tracer_workload_connections_active",
        "tracer_workload_retransmits_total",
        "tracer_workload_resets_total",
        "tracer_workload_time_wait_sockets",
        "tracer_workload_nagle_stalls_total",
        "tracer_workload_close_wait_leaks_total",
    ];
    let mut seen_labels = HashSet::new();
    let mut check_bounded = |text: &str| {
        for family in families {
            let samples = matching_samples(text, family, &[]);
            assert!(!samples.is_empty(), "{family} is missing from the scrape");
            assert!(
                samples.len() <= TOP + 1,
                "{family} has {} series with --workload-top {TOP}: {:?}",
                samples.len(),
                samples.iter().map(|s| s.labels.clone()).collect::<Vec<_>>()
            );
            for s in samples {
                seen_labels.extend(s.label("workload").map(str::to_owned));
            }
        }
    };
    // More workloads than N: each in its own service cgroup, one after the other, with a
    // scrape between them.
    for i in 0..EXTRA {
        let rel = format!(
            "system.slice/tracer-wl-extra{i}-{}.service",
            std::process::id()
        );
        let mut client = Proc::start(
            &cgroups,
            &rel,
            &ns,
            CLIENT,
            &args(&["18081", &CONNS.to_string(), "close"]),
        );
        client.ports();
        client.wait_ok();
        thread::sleep(Duration::from_millis(1100));
        check_bounded(&agent.scrape());
    }
    server.wait_ok();
    thread::sleep(Duration::from_millis(1100));
    check_bounded(&agent.scrape());
    eprintln!("workload labels seen over the run: {seen_labels:?}");
    assert!(seen_labels.contains("other"), "{seen_labels:?}");

    // Only the container's connections to port 18081 are written: the server's ends and the
    // other services' clients are filtered out, and so is everything else on the host.
    let docker_events =
        agent.wait_for_events(closed_in(netns, &docker_ports, true), CONNS, EVENT_TIMEOUT);
    assert_eq!(docker_events.len(), CONNS);
    agent.stop();
    let all = agent.events(|e| e["event"].is_string());
    for ev in &all {
        assert!(
            ev_str(ev, "workload").starts_with("docker/")
                && (ev["sport"] == 18081 || ev["dport"] == 18081),
            "the filter let through: {ev}"
        );
    }
    eprintln!(
        "--filter let {} events through, all of the container",
        all.len()
    );
}

#[test]
fn bad_filter_is_a_one_line_error() {
    require_root();
    for bad in [
        "nginx",
        "colour=red",
        "port=http",
        "addr=10.0.0.0/33",
        "workload=[",
    ] {
        let out = Command::new(AGENT_BIN)
            .args(["run", "--filter", bad])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run tracer");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(c) if c != 0),
            "--filter {bad}: {:?}",
            out.status
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "--filter {bad}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Accepts `count` connections and never closes them (a CLOSE_WAIT leak once the clients
/// close), until its stdin closes or it is killed.
const LEAKING_SERVER: &str = r"
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', port))
s.listen(256)
s.settimeout(60)
print('ready', flush=True)
kept = [s.accept()[0] for _ in range(count)]
print('done', flush=True)
sys.stdin.read()
";

/// `tracer diagnose --duration 8s --json` with `extra` arguments, once it says it is watching.
fn start_diagnose(extra: &[&str]) -> Child {
    let mut diagnose = Command::new(AGENT_BIN)
        .args([
            "diagnose",
            "--duration",
            "8s",
            "--json",
            "--top",
            "50",
            "--close-wait-threshold",
            "1s",
            // The pod's few TIME_WAIT sockets toward one port make a finding of their own
            // (about 3e-4 of the port range); otherwise it would take the 1 000 sockets host-wide
            // of a notice, which other tests leave behind or not.
            "--port-exhaustion-warning",
            "0.0001",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tracer diagnose");
    let mut stderr = BufReader::new(diagnose.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    while !line.contains("watching") {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read diagnose stderr");
        assert!(n > 0, "tracer diagnose ended before watching");
    }
    diagnose
}

/// The report of a `start_diagnose` run.
fn diagnose_report(mut diagnose: Child) -> Value {
    let status = wait_timeout(&mut diagnose, Duration::from_secs(60))
        .expect("tracer diagnose did not end within 60 s");
    let mut out = String::new();
    std::io::Read::read_to_string(diagnose.stdout.as_mut().expect("piped stdout"), &mut out)
        .expect("read the report");
    assert!(status.success(), "tracer diagnose failed: {status}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("the report is not JSON ({e}): {out}"))
}

fn finding(report: &Value, topic: &str) -> Value {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["topic"] == topic)
        .unwrap_or_else(|| panic!("no {topic} finding in {report}"))
        .clone()
}

/// The workloads a finding names, with their counts.
fn workloads_of(finding: &Value) -> Vec<(String, u64)> {
    finding["details"]["workloads"]
        .as_array()
        .unwrap_or_else(|| panic!("no workloads in {finding}"))
        .iter()
        .map(|w| {
            (
                w["workload"].as_str().expect("a name").to_owned(),
                w["count"].as_u64().expect("a count"),
            )
        })
        .collect()
}

/// `tracer diagnose` names the workloads of its findings: the service whose server leaks
/// CLOSE_WAIT sockets, and the pod whose client connections end in TIME_WAIT; with
/// `--filter workload=...` its findings are about that service only.
#[test]
fn diagnose_names_the_workload_of_each_finding() {
    const LEAKS: usize = 5;
    const POD_CONNS: usize = 8;
    let ns = Netns::create();
    let cgroups = TestCgroups::create();
    let service = format!("tracer-wl-leak-{}.service", std::process::id());
    let service_rel = format!("system.slice/{service}");
    let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let diagnose = start_diagnose(&[]);
    let filtered = start_diagnose(&["--filter", "workload=tracer-wl-leak-*"]);
    let mut leaker = Proc::start(
        &cgroups,
        &service_rel,
        &ns,
        LEAKING_SERVER,
        &args(&["18082", &LEAKS.to_string()]),
    );
    assert_eq!(leaker.line(), "ready");
    let mut server = Proc::start(
        &cgroups,
        "system.slice/tracer-wl-echo.service",
        &ns,
        SERVER,
        &args(&["18083", &POD_CONNS.to_string()]),
    );
    assert_eq!(server.line(), "ready");
    let mut docker = Proc::start(
        &cgroups,
        &docker_rel(),
        &ns,
        CLIENT,
        &args(&["18082", &LEAKS.to_string(), "close"]),
    );
    docker.ports();
    docker.wait_ok();
    assert_eq!(leaker.line(), "done");
    let mut pod = Proc::start(
        &cgroups,
        &kube_rel(),
        &ns,
        CLIENT,
        &args(&["18083", &POD_CONNS.to_string(), "close"]),
    );
    pod.ports();
    pod.wait_ok();
    server.wait_ok();
    let report = diagnose_report(diagnose);
    let count_of = |finding: &Value, name: &str| -> u64 {
        workloads_of(finding)
            .into_iter()
            .find(|(w, _)| w == name)
            .unwrap_or_else(|| panic!("{name} not among the workloads of {finding}"))
            .1
    };
    let leaks = finding(&report, "close_wait");
    assert_eq!(count_of(&leaks, &service), LEAKS as u64, "{leaks}");
    let time_wait = finding(&report, "time_wait");
    assert_eq!(
        count_of(&time_wait, &pod_name()),
        POD_CONNS as u64,
        "{time_wait}"
    );
    eprintln!(
        "diagnose: close_wait workloads {:?}, time_wait workloads {:?}",
        workloads_of(&leaks),
        workloads_of(&time_wait)
    );
    // Filtered to the leaking service: its leaks, and nothing of the others.
    let report = diagnose_report(filtered);
    let leaks = finding(&report, "close_wait");
    assert_eq!(
        workloads_of(&leaks),
        [(service.clone(), LEAKS as u64)],
        "{leaks}"
    );
    assert_eq!(leaks["details"]["leaks"], LEAKS, "{leaks}");
    for f in report["findings"].as_array().expect("findings") {
        if let Some(rows) = f["details"]["workloads"].as_array() {
            for row in rows {
                assert_eq!(
                    row["workload"],
                    service.as_str(),
                    "the filter let through: {f}"
                );
            }
        }
    }
    eprintln!(
        "diagnose --filter: {} findings, close_wait workloads {:?}",
        report["findings"].as_array().map_or(0, Vec::len),
        workloads_of(&leaks)
    );
    drop(leaker);
}
