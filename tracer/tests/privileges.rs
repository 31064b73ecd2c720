//! Least privilege: once attached and seeded, the running agent holds only the capabilities the
//! README documents (in every thread, effective, permitted and bounding alike, nothing ambient
//! or inheritable, `no_new_privs` set), and still does everything after the drop: connections
//! are reported, scrapes answer, the TIME_WAIT gauge matches `ss` in every namespace after the
//! start-up re-check (which enters other namespaces), and the owner of a socket leaked by
//! another user's process is found.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_time_wait;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use support_time_wait::{assert_gauge_matches_ss, total};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21): the README's list.
const KEPT_MASK: u64 = (1 << 2) | (1 << 19) | (1 << 21);

/// Nobody's uid: the owner of the leaking server, a user other than the agent's.
const OTHER_UID: u32 = 65534;

/// Accepts connections and keeps them without reading or closing (a CLOSE_WAIT leak once the
/// client closes); prints its port, then each accepted peer port. Exits by itself after two
/// minutes if the test could not kill it.
const LEAKY_SERVER: &str = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(8)
s.settimeout(0.2)
print("ready", s.getsockname()[1], flush=True)
held = []
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        c, peer = s.accept()
    except socket.timeout:
        continue
    held.append(c)
    print("accepted", peer[1], flush=True)
"#;

/// A thread's id, its `Cap*` lines (name, bits) and its `NoNewPrivs` value.
type ThreadCapabilities = (String, Vec<(String, u64)>, String);

/// The capability lines of `/proc/PID/task/TID/status` for every thread of `pid`.
fn thread_capabilities(pid: u32) -> Vec<ThreadCapabilities> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the agent's threads");
    let mut threads = Vec::new();
    for task in tasks {
        let task = task.expect("thread entry");
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a short-lived thread that ended meanwhile
        };
        let caps = status
            .lines()
            .filter_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.starts_with("Cap").then(|| {
                    (
                        key.to_string(),
                        u64::from_str_radix(value.trim(), 16).unwrap(),
                    )
                })
            })
            .collect();
        let no_new_privs = status
            .lines()
            .find_map(|line| line.strip_prefix("NoNewPrivs:"))
            .expect("NoNewPrivs line")
            .trim()
            .to_string();
        threads.push((
            task.file_name().to_string_lossy().into_owned(),
            caps,
            no_new_privs,
        ));
    }
    threads
}

#[test]
fn keeps_only_the_documented_capabilities_and_still_works() {
    require_root();
    require_tool("python3");
    support_time_wait::require_tools();
    // Another namespace to enter, and TIME_WAIT sockets the start-up dump sees: the re-check two
    // seconds after start (after the drop) then enters every namespace again.
    let ns = Netns::create();
    let before = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        5,
    );
    run_clients(before.addr, ClientMode::CloseFirst, 5, "tracer-client");
    before.join();

    let mut agent = Agent::start(&["--close-wait-threshold", "1s"]);
    let pid = agent.pid();
    for (tid, caps, no_new_privs) in thread_capabilities(pid) {
        for (set, value) in &caps {
            let expected = match set.as_str() {
                "CapEff" | "CapPrm" | "CapBnd" => KEPT_MASK,
                "CapInh" | "CapAmb" => 0,
                other => panic!("unexpected status line {other}"),
            };
            assert_eq!(
                *value, expected,
                "thread {tid}: {set} is {value:#x}, expected {expected:#x}: {caps:x?}"
            );
        }
        assert_eq!(caps.len(), 5, "thread {tid}: {caps:?}");
        assert_eq!(no_new_privs, "1", "thread {tid}");
    }
    let log = agent.stderr_text();
    assert!(log.contains("dropped"), "no log line for the drop:\n{log}");

    // Work after the drop: a connection reported, a scrape.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        3,
    );
    let addr = server.addr;
    run_clients(addr, ClientMode::CloseFirst, 3, "tracer-client");
    server.join();
    agent.wait_for_events(is_client_of(addr), 3, EVENT_TIMEOUT);
    agent.scrape();

    // TIME_WAIT in the other namespace too, seen by events; then past the start-up re-check.
    let inside = Server::start_in(&ns, ns.ns_addr(0), ServerMode::EchoThenClose, 2);
    run_clients(inside.addr, ClientMode::WaitServerClose, 2, "tracer-client");
    inside.join();
    thread::sleep(Duration::from_secs(3));
    let (kernel, _) = assert_gauge_matches_ss(&agent, "after dropping capabilities");
    assert!(
        total(&kernel) >= 7,
        "the kernel lists fewer TIME_WAIT sockets than made: {kernel:?}"
    );
    assert_no_complaints(&agent);

    // The owner of a socket leaked by another user's process: /proc/PID/fd of that user.
    let mut leaky = Command::new("python3")
        .args(["-u", "-c", LEAKY_SERVER])
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 as nobody");
    let (tx, lines) = mpsc::channel();
    let stdout = leaky.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .take(100)
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("ready line");
    let port: u16 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the server: {ready:?}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let client = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    let local = client.local_addr().unwrap();
    let accepted = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("accepted");
    assert_eq!(accepted, format!("accepted {}", local.port()));
    drop(client);
    let leaks = agent.wait_for_events(
        |e| e["event"] == "close_wait_leak" && e["sport"] == port && e["dport"] == local.port(),
        1,
        EVENT_TIMEOUT,
    );
    let _ = leaky.kill();
    let _ = leaky.wait();
    assert_eq!(
        ev_u64(&leaks[0], "pid"),
        u64::from(leaky.id()),
        "the owner of nobody's leaked socket: {}",
        leaks[0]
    );

    assert_no_complaints(&agent);
    agent.stop();
}

/// Nothing the agent tried after the drop was refused (the start-up re-check enters every
/// namespace and logs each it cannot).
fn assert_no_complaints(agent: &Agent) {
    let log = agent.stderr_text();
    for complaint in ["cannot list sockets", "failed", "not permitted"] {
        assert!(!log.contains(complaint), "{complaint:?} in the log:\n{log}");
    }
}
