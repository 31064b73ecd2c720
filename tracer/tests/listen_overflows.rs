//! Listen-queue overflows against the kernel's own counters. A listener with backlog 1 that
//! never accepts gets a burst of non-blocking connects, on loopback in this namespace and in a
//! namespace the test creates; the connects are then aborted so that no SYN is resent, and at a
//! quiet moment:
//! - `tracer_listen_overflows_total` equals `TcpExtListenOverflows` summed over every network
//!   namespace (read in each, and checked against `nstat`), before and after, so it rose by
//!   exactly the kernel's delta, and that delta covers both namespaces;
//! - each listener's port has its series in `tracer_listen_overflows_by_listener_total`, equal
//!   to the listener's drop counter as `ss -tlnm` prints it (`d<N>`), and
//!   `tracer_listen_queue_length` / `_limit` equal `ss -tln` Recv-Q / Send-Q;
//! - `tracer diagnose` run over such a burst names the port, this process, the backlog and
//!   `net.core.somaxconn`;
//! - with `--listen-overflow-top-ports 1`, two overflowing listeners make two series: the one
//!   that dropped the most and port="other" with the other's drops.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Connects per burst: enough to overflow a backlog of 1 many times over, few enough to be
/// quick.
const BURST: usize = 50;
/// How long the counters may take to settle and the agent to catch up (it reads every 5 s).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two looks while waiting for a quiet moment.
const POLL: Duration = Duration::from_millis(500);

/// The tests of this file burst connects and read host-wide counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `work` on a thread inside the network namespace at `path` (`None`: this one).
/// Sockets it creates stay in that namespace wherever they are used afterwards.
fn in_netns<T: Send>(path: Option<&Path>, work: impl FnOnce() -> T + Send) -> Result<T, String> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(path) = path {
                    let file = std::fs::File::open(path)
                        .map_err(|e| format!("open {}: {e}", path.display()))?;
                    // SAFETY: the fd is an open nsfs file owned by `file` for the whole call;
                    // setns changes only this short-lived thread's network namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(format!(
                            "setns {}: {}",
                            path.display(),
                            std::io::Error::last_os_error()
                        ));
                    }
                }
                Ok(work())
            })
            .join()
            .expect("namespace thread")
    })
}

/// `TcpExtListenOverflows` of the namespace the calling thread is in.
fn listen_overflows_here() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat")
        .map_err(|e| format!("read netstat: {e}"))?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if let Some(i) = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")
        {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no ListenOverflows value in {values:?}"));
        }
    }
    Err("no TcpExt ListenOverflows in /proc/net/netstat".into())
}

/// `nstat -asz TcpExtListenOverflows` in the namespace at `ns` (`None`: this one).
fn nstat_listen_overflows(ns: Option<&PathBuf>) -> u64 {
    let mut args: Vec<String> = Vec::new();
    let program = match ns {
        None => "nstat",
        Some(path) => {
            args.extend([format!("--net={}", path.display()), "nstat".into()]);
            "nsenter"
        }
    };
    args.extend(["-asz", "TcpExtListenOverflows"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(program, &args);
    out.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("TcpExtListenOverflows"))
                .then(|| fields.next()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no TcpExtListenOverflows in `nstat -asz`: {out}"))
}

/// `TcpExtListenOverflows` of every network namespace that can be entered, by inode.
fn kernel_overflows() -> BTreeMap<u64, u64> {
    let mut by_ns = BTreeMap::new();
    for (inode, paths) in namespaces() {
        // A namespace can vanish while listed: try its other ways in, then leave it out.
        for path in paths {
            if let Ok(Ok(value)) = in_netns(Some(&path), listen_overflows_here) {
                by_ns.insert(inode, value);
                break;
            }
        }
    }
    by_ns
}

/// A listener on `127.0.0.1:port` (0: any) with backlog 1, in the namespace at `ns`; nothing
/// ever accepts on it.
fn slow_listener(ns: Option<&Path>, port: u16) -> TcpListener {
    in_netns(ns, || {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind listener");
        set_backlog(&listener, 1);
        listener
    })
    .unwrap()
}

/// `BURST` non-blocking connects to `to` from the namespace at `ns`.
fn burst(ns: Option<&Path>, to: SocketAddr) -> Vec<TcpStream> {
    burst_of(BURST, ns, to)
}

/// `count` non-blocking connects to `to` from the namespace at `ns`.
fn burst_of(count: usize, ns: Option<&Path>, to: SocketAddr) -> Vec<TcpStream> {
    in_netns(ns, || nonblocking_connects(to, count)).unwrap()
}

/// Closes every client with a RST (SO_LINGER 0): no SYN or ACK of theirs is sent again, and
/// the listener's half-open requests for them go away, so the counters stop moving.
fn abort(clients: Vec<TcpStream>) {
    abort_all(clients);
}

/// A listener as `ss -Htlnm` shows it in the namespace at `ns`: (Recv-Q, Send-Q, d<N>).
fn ss_listener(ns: Option<&PathBuf>, port: u16) -> (u64, u64, u64) {
    let filter = format!("sport = :{port}");
    let lines = ss_in(ns, &["-Htlnm", &filter]).unwrap();
    let text = lines.join(" ");
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert!(
        fields.len() >= 5 && fields[0] == "LISTEN",
        "one listener on port {port} expected: {lines:?}"
    );
    let drops = text
        .split_once("skmem:(")
        .and_then(|(_, rest)| rest.split(')').next())
        .and_then(|skmem| {
            skmem
                .split(',')
                .find_map(|item| item.strip_prefix('d')?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no d<N> in `ss -tlnm`: {lines:?}"));
    (
        fields[1].parse().unwrap(),
        fields[2].parse().unwrap(),
        drops,
    )
}

/// Waits for a quiet moment: the kernel's counters the same twice in a row and the agent's
/// host-wide total equal to their sum. Returns the kernel's counters and the agent's total.
fn settled(agent: &Agent) -> (BTreeMap<u64, u64>, f64) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let before = kernel_overflows();
        let scraped = metric_value(&agent.scrape(), "tracer_listen_overflows_total", &[]);
        let after = kernel_overflows();
        let sum: u64 = after.values().sum();
        if before == after && scraped == sum as f64 {
            return (after, scraped);
        }
        assert!(
            Instant::now() < deadline,
            "tracer_listen_overflows_total never matched the kernel's counters within \
             {SETTLE_TIMEOUT:?}: kernel {before:?} then {after:?} (sum {sum}), agent {scraped}"
        );
        thread::sleep(POLL);
    }
}

/// Waits until the agent's series of `port` show what `ss` shows (the agent reads every 5 s);
/// returns the agent's (overflows, queue length, queue limit) and `ss`'s (Recv-Q, Send-Q, d).
fn port_series(
    agent: &Agent,
    ns: Option<&PathBuf>,
    port: u16,
) -> ((f64, f64, f64), (u64, u64, u64)) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let label = port.to_string();
    loop {
        let ss = ss_listener(ns, port);
        let text = agent.scrape();
        let labels = [("port", label.as_str())];
        let ours = (
            metric_value_or_missing(&text, "tracer_listen_overflows_by_listener_total", &labels),
            metric_value_or_missing(&text, "tracer_listen_queue_length", &labels),
            metric_value_or_missing(&text, "tracer_listen_queue_limit", &labels),
        );
        if ours == (ss.2 as f64, ss.0 as f64, ss.1 as f64) {
            return (ours, ss);
        }
        assert!(
            Instant::now() < deadline,
            "port {port}: agent (overflows, queue length, limit) = {ours:?}, ss (Recv-Q, Send-Q, \
             d) = {ss:?}; series of the port:\n{}",
            matching_samples(&text, "tracer_listen_overflows_by_listener_total", &[])
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        thread::sleep(POLL);
    }
}

/// A series' value, or NaN (never equal to anything) while it is missing.
fn metric_value_or_missing(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching_samples(text, name, labels)
        .first()
        .map_or(f64::NAN, |s| s.value)
}

#[test]
fn overflows_match_the_kernel_in_every_namespace() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("ss");
    require_tool("nsenter");
    require_tool("nstat");
    let netns = Netns::create();
    let ns_path = PathBuf::from(netns.path());
    let ns_inode = netns.inode();
    let host_inode = host_netns_inode();

    let here = slow_listener(None, 0);
    let here_addr = here.local_addr().unwrap();
    // Another port than the host listener's: the series are per port, all namespaces together.
    let there_port = free_port();
    assert_ne!(there_port, here_addr.port());
    let there = slow_listener(Some(&ns_path), there_port);
    let there_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, there_port));

    let agent = Agent::start(&[]);
    let (before, agent_before) = settled(&agent);
    assert!(
        before.contains_key(&ns_inode),
        "the test namespace is read: {before:?}"
    );

    let clients_here = burst(None, here_addr);
    let clients_there = burst(Some(&ns_path), there_addr);
    // The accept queues are full (backlog 1 holds 2) as soon as the handshakes are done.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while ss_listener(None, here_addr.port()).0 < 2 || ss_listener(Some(&ns_path), there_port).0 < 2
    {
        assert!(Instant::now() < deadline, "the accept queues never filled");
        thread::sleep(Duration::from_millis(50));
    }
    abort(clients_here);
    abort(clients_there);

    let (after, agent_after) = settled(&agent);
    // The same reading as nstat's, in both namespaces.
    assert_eq!(nstat_listen_overflows(None), after[&host_inode]);
    assert_eq!(nstat_listen_overflows(Some(&ns_path)), after[&ns_inode]);
    let delta = |inode: u64| after[&inode] - before.get(&inode).copied().unwrap_or(0);
    let total_before: u64 = before.values().sum();
    let total_after: u64 = after.values().sum();
    let (delta_here, delta_there) = (delta(host_inode), delta(ns_inode));
    eprintln!(
        "TcpExtListenOverflows summed over {} namespaces: {total_before} -> {total_after} (this \
         namespace +{delta_here}, the test's +{delta_there}); tracer_listen_overflows_total \
         {agent_before} -> {agent_after}",
        after.len()
    );
    assert_eq!(
        agent_after - agent_before,
        (total_after - total_before) as f64,
        "the agent's total rose by exactly the kernel's"
    );
    assert!(delta_here > 0, "no overflow in this namespace");
    assert!(delta_there > 0, "no overflow in the test namespace");
    assert!(
        total_after - total_before >= delta_here + delta_there,
        "the host-wide rise covers both namespaces"
    );

    let (ours, ss) = port_series(&agent, None, here_addr.port());
    eprintln!(
        "port {} here: agent {ours:?}, ss (Recv-Q, Send-Q, d) {ss:?}",
        here_addr.port()
    );
    assert_eq!(ss.1, 1, "backlog 1");
    assert!(ss.2 > 0);
    let (ours, ss) = port_series(&agent, Some(&ns_path), there_port);
    eprintln!("port {there_port} in the test namespace: agent {ours:?}, ss {ss:?}");
    // The test namespace has no other listener: its overflows are all this listener's drops.
    assert_eq!(
        ss.2, delta_there,
        "d<N> of the only listener = the namespace's overflows"
    );

    drop(here);
    drop(there);
    drop(agent);
    drop(netns);
}

/// `tracer diagnose --json` over a burst: its listen-overflow finding.
#[test]
fn diagnose_names_the_port_and_the_process() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    require_tool("ss");
    let listener = slow_listener(None, 0);
    let addr = listener.local_addr().unwrap();

    let mut child = Command::new(AGENT_BIN)
        .args(["diagnose", "--duration", "5s", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {AGENT_BIN} diagnose: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let (watching_tx, watching) = mpsc::channel();
    let stderr = thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&all).contains("watching TCP") {
                        let _ = watching_tx.send(());
                    }
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let started = watching.recv_timeout(Duration::from_secs(60));
    if started.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "diagnose never started watching: {}",
            stderr.join().unwrap()
        );
    }
    let clients = burst(None, addr);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while ss_listener(None, addr.port()).0 < 2 {
        assert!(Instant::now() < deadline, "the accept queue never filled");
        thread::sleep(Duration::from_millis(50));
    }
    abort(clients);
    let status = wait_timeout(&mut child, Duration::from_secs(120));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.is_some_and(|s| s.success()),
        "diagnose failed ({status:?}): {stderr}"
    );
    let (_, backlog, drops) = ss_listener(None, addr.port());
    let report: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("diagnose JSON: {e}: {stdout}"));
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["topic"] == "listen_overflows")
        .unwrap_or_else(|| panic!("no listen_overflows finding: {stdout}"));
    let row = finding["details"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == addr.port())
        .unwrap_or_else(|| panic!("port {} not named: {finding}", addr.port()));
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("diagnose: {row}; ss: backlog {backlog}, d{drops}; somaxconn {somaxconn}");
    assert_eq!(finding["severity"], "problem");
    assert_eq!(row["process"]["pid"], std::process::id());
    assert_eq!(row["process"]["comm"], comm.trim_end());
    assert_eq!(row["backlog"], backlog);
    assert_eq!(row["somaxconn"], somaxconn);
    // The listener opened before the run and dropped nothing before the burst.
    assert_eq!(row["drops"], drops);
    assert!(drops > 0);
    assert!(
        finding["title"]
            .as_str()
            .unwrap()
            .contains(&format!("port {}", addr.port())),
        "{finding}"
    );
    drop(listener);
}

/// With `--listen-overflow-top-ports 1` two overflowing listeners give two series: the one
/// that dropped the most, and port="other" holding the other's drops.
#[test]
fn top_n_ports_plus_other_bound_the_series() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("ss");
    let big = slow_listener(None, 0);
    let big_port = big.local_addr().unwrap().port();
    let small = slow_listener(None, 0);
    let small_port = small.local_addr().unwrap().port();
    let agent = Agent::start(&["--listen-overflow-top-ports", "1"]);
    let other_before = metric_value(
        &agent.scrape(),
        "tracer_listen_overflows_by_listener_total",
        &[("port", "other")],
    );

    // The big one first, until the agent shows it in the top.
    abort(burst(None, big.local_addr().unwrap()));
    let (ours, ss) = port_series(&agent, None, big_port);
    eprintln!("port {big_port}: agent {ours:?}, ss {ss:?}");
    // A smaller burst on the other.
    abort(burst_of(BURST / 5, None, small.local_addr().unwrap()));
    let small_drops = ss_listener(None, small_port).2;
    assert!(small_drops > 0);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let text = agent.scrape();
        let series = matching_samples(&text, "tracer_listen_overflows_by_listener_total", &[]);
        let other = metric_value(
            &text,
            "tracer_listen_overflows_by_listener_total",
            &[("port", "other")],
        );
        let big_drops = ss_listener(None, big_port).2;
        let labels: Vec<String> = series
            .iter()
            .map(|s| format!("{}={}", s.label("port").unwrap_or("?"), s.value))
            .collect();
        if other - other_before >= small_drops as f64 {
            eprintln!(
                "series {labels:?}; ss: port {big_port} d{big_drops}, port {small_port} \
                 d{small_drops}"
            );
            assert_eq!(series.len(), 2, "1 top port + other: {labels:?}");
            assert!(
                labels.contains(&format!("{big_port}={big_drops}")),
                "{labels:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port=\"other\" never took the small listener's d{small_drops}: {labels:?}"
        );
        thread::sleep(POLL);
    }
    drop((big, small, agent));
}
