//! Harness for the agent's integration tests: runs the real `tracer` binary as root, makes TCP
//! traffic on loopback or towards network namespaces the test created, and reads what the agent
//! reports (JSON events on stdout, Prometheus metrics over HTTP).
//!
//! Tests that cannot run (not root, a tool missing) fail loudly: nothing here skips.
//! Every wait is bounded in time, every loop in count.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

pub mod cgroups;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_tracer");

/// How long the agent may take to load its programs, seed and start serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an event may take to come out of the agent after the connection closed.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent may take to exit after SIGTERM / SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for any single socket operation of the traffic helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Preconditions
// ---------------------------------------------------------------------------------------------

/// Fails the test when not running as root: the agent loads eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests must run as root (euid is {euid}): the agent loads eBPF programs and the \
         tests create network namespaces; run e.g. `sudo -E cargo test -p tracer --test '*' -- \
         --test-threads=1`"
    );
}

/// Fails the test when `name` is not an executable file on PATH.
pub fn require_tool(name: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.is_file() && m.mode() & 0o111 != 0)
            .unwrap_or(false)
    });
    assert!(
        found,
        "required tool `{name}` was not found on PATH; install it (these tests never skip)"
    );
}

/// Runs a command to completion and returns its output; panics if it cannot be started.
pub fn run_cmd(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program} {}`: {e}", args.join(" ")))
}

/// Runs a command and panics with its stderr when it fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run_cmd(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Inode of this process's network namespace: what the agent reports as `netns` for it.
pub fn host_netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .expect("stat /proc/self/ns/net")
        .ino()
}

/// The calling thread's `comm`, as the kernel reports it for tasks of this thread.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .expect("read /proc/thread-self/comm")
        .trim_end_matches('\n')
        .to_string()
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `child` until it exits or `timeout` passes; `None` on timeout (the child still runs).
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to the process `pid` (one we spawned).
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill has no memory-safety preconditions; `pid` is a child we spawned and have
    // not reaped yet, so it cannot name an unrelated process.
    let rc = unsafe { libc::kill(pid, signal) };
    assert!(
        rc == 0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Default)]
struct Collected {
    state: Mutex<Lines>,
    changed: Condvar,
}

impl Collected {
    fn push(&self, line: String) {
        self.state.lock().unwrap().lines.push(line);
        self.changed.notify_all();
    }

    fn finish(&self) {
        self.state.lock().unwrap().eof = true;
        self.changed.notify_all();
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }
}

fn collect_lines(stream: impl Read + Send + 'static, into: Arc<Collected>) -> JoinHandle<()> {
    thread::Builder::new()
        .name("agent-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        into.push(line.trim_end_matches(['\n', '\r']).to_string());
                    }
                }
            }
            into.finish();
        })
        .expect("spawn output reader")
}

/// A running `tracer run` with `--events json`, serving metrics on a private 127.0.0.1 port.
pub struct Agent {
    child: Option<Child>,
    pub listen: SocketAddr,
    stdout: Arc<Collected>,
    stderr: Arc<Collected>,
    readers: Vec<JoinHandle<()>>,
    /// [`kernel_hid_events`] once ready and as last scraped before a stop: a failing test
    /// says how many runs the kernel made meanwhile that hid events from every program (see
    /// [`BLIND_MARKER`]).
    hidden_at_start: Option<f64>,
    hidden_at_stop: Option<f64>,
}

/// The runs a scrape counts in which the kernel hid events from the agent's programs: softirq
/// runs made without any BPF program (`tracer_softirqs_unobserved_total`) plus program runs
/// it skipped because the program was already running on that CPU
/// (`tracer_kernel_program_misses_total`, absent until the agent's first refresh, when it can
/// only be 0). `None` when the scrape has no softirq series.
pub fn kernel_hid_events(text: &str) -> Option<f64> {
    let unobserved = summed(text, "tracer_softirqs_unobserved_total")?;
    Some(unobserved + summed(text, "tracer_kernel_program_misses_total").unwrap_or(0.0))
}

/// The samples of `name` in a scrape, summed over their labels; `None` when there are none.
fn summed(text: &str, name: &str) -> Option<f64> {
    let found = matching_samples(text, name, &[]);
    (!found.is_empty()).then(|| found.iter().map(|s| s.value).sum())
}

/// What a failing test prints, with the count of runs in which the kernel hid events from the
/// programs while its agent ran ([`kernel_hid_events`]). `cargo xtask test` reruns a failed
/// test only when its output holds this line with a count above zero.
pub const BLIND_MARKER: &str =
    "tracer-test: kernel runs that hid events from BPF during this test:";

impl Agent {
    /// Starts the agent with `--listen 127.0.0.1:<free port> --events json` plus `args`, and
    /// waits until `GET /metrics` answers 200 (it serves only once attached and seeded).
    pub fn start(args: &[&str]) -> Agent {
        require_root();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let listen_arg = listen.to_string();
        let mut cmd = Command::new(AGENT_BIN);
        cmd.arg("run")
            .args(["--listen", &listen_arg, "--events", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {AGENT_BIN}: {e}"));
        let stdout = Arc::new(Collected::default());
        let stderr = Arc::new(Collected::default());
        let readers = vec![
            collect_lines(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect_lines(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        let mut agent = Agent {
            child: Some(child),
            listen,
            stdout,
            stderr,
            readers,
            hidden_at_start: None,
            hidden_at_stop: None,
        };
        agent.wait_ready();
        agent.hidden_at_start = agent.hidden();
        agent
    }

    /// The agent's count of runs in which the kernel hid events from its programs
    /// ([`kernel_hid_events`]); `None` when it cannot be scraped.
    fn hidden(&self) -> Option<f64> {
        let resp = http_get(self.listen, "/metrics", Duration::from_secs(10)).ok()?;
        kernel_hid_events(&resp.body)
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let mut last_error = String::from("no attempt yet");
        while started.elapsed() < READY_TIMEOUT {
            let child = self.child.as_mut().expect("agent child");
            if let Some(status) = child.try_wait().expect("try_wait agent") {
                self.child = None;
                self.join_readers();
                panic!("the agent exited ({status}) before serving /metrics (its stderr follows)");
            }
            match http_get(self.listen, "/metrics", Duration::from_secs(2)) {
                Ok(resp) if resp.status == 200 => return,
                Ok(resp) => last_error = format!("status {}", resp.status),
                Err(e) => last_error = e.to_string(),
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the agent did not serve GET /metrics with 200 on {} within {READY_TIMEOUT:?} (last \
             attempt: {last_error}; its stderr follows)",
            self.listen,
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent is running").id()
    }

    /// Everything the agent wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.snapshot().join("\n")
    }

    /// Every line the agent wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// The events parsed so far that satisfy `pred` (lines that are not JSON are ignored here;
    /// the event format test checks them).
    pub fn events(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        parse_events(&self.stdout.snapshot())
            .into_iter()
            .filter(|e| pred(e))
            .collect()
    }

    /// Waits until at least `count` events satisfy `pred` and returns them all; panics after
    /// `timeout` listing what was seen.
    pub fn wait_for_events(
        &self,
        pred: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        // Lines are parsed outside the lock, each once: the reader thread needs the lock for
        // every line the agent writes, and a long parse under it would block the agent's stdout.
        let mut matching: Vec<Value> = Vec::new();
        let mut parsed = 0;
        loop {
            let (new, eof) = {
                let guard = self.stdout.state.lock().unwrap();
                (guard.lines[parsed..].to_vec(), guard.eof)
            };
            parsed += new.len();
            matching.extend(parse_events(&new).into_iter().filter(|e| pred(e)));
            if matching.len() >= count {
                return matching;
            }
            let now = Instant::now();
            if now >= deadline || eof {
                let all = self.stdout.snapshot();
                let tail: Vec<&String> = all.iter().rev().take(60).rev().collect();
                panic!(
                    "expected {count} matching events within {timeout:?}, got {} (agent \
                     stdout {}):\n--- matching ---\n{}\n--- last {} of {} stdout lines ---\n{}",
                    matching.len(),
                    if eof { "closed" } else { "open" },
                    matching
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    tail.len(),
                    all.len(),
                    tail.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            let guard = self.stdout.state.lock().unwrap();
            if guard.lines.len() == parsed && !guard.eof {
                let wait = (deadline - now).min(Duration::from_millis(200));
                drop(self.stdout.changed.wait_timeout(guard, wait).unwrap());
            }
        }
    }

    /// Waits for `count` events satisfying `pred`, then checks for `settle` that no more come.
    pub fn wait_for_exactly(
        &self,
        pred: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<Value> {
        self.wait_for_events(&pred, count, timeout);
        thread::sleep(settle);
        let all = self.events(&pred);
        assert_eq!(
            all.len(),
            count,
            "expected exactly {count} matching events, got {}:\n{}",
            all.len(),
            all.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        all
    }

    /// `GET /metrics`: panics unless it answers 200.
    pub fn scrape(&self) -> String {
        let resp = http_get(self.listen, "/metrics", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("GET /metrics on {}: {e}", self.listen));
        assert_eq!(
            resp.status, 200,
            "GET /metrics answered {}: {}",
            resp.status, resp.body
        );
        resp.body
    }

    /// Sends SIGTERM and asserts the agent exits with status 0 within [`STOP_TIMEOUT`]; returns
    /// how long it took. All its output is collected afterwards.
    pub fn stop(&mut self) -> Duration {
        self.stop_with(libc::SIGTERM)
    }

    /// Like [`Agent::stop`] with another signal (SIGINT).
    pub fn stop_with(&mut self, signal: libc::c_int) -> Duration {
        self.hidden_at_stop = self.hidden();
        let mut child = self.child.take().expect("agent is running");
        let started = Instant::now();
        send_signal(child.id(), signal);
        let status = wait_timeout(&mut child, STOP_TIMEOUT);
        let took = started.elapsed();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            self.join_readers();
            panic!("the agent did not exit within {STOP_TIMEOUT:?} of signal {signal}");
        };
        self.join_readers();
        assert!(
            status.code() == Some(0),
            "the agent exited with {status} (signal {:?}) after signal {signal}, expected exit \
             code 0",
            status.signal(),
        );
        took
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            if self.child.is_some() {
                // The agent compares the kernel's softirq counts with its programs' once a
                // second: let it see the last of this test's.
                thread::sleep(Duration::from_millis(1500));
                let page = http_get(self.listen, "/metrics", Duration::from_secs(10)).ok();
                let page = page.map(|resp| resp.body).unwrap_or_default();
                self.hidden_at_stop = kernel_hid_events(&page).or(self.hidden_at_stop);
                // The agent's own loss counters, so that a failure says whether the kernel
                // dropped or skipped anything (a mismatch with none is the agent's).
                eprintln!(
                    "tracer-test: since the agent started, events lost: {:?}, program runs the \
                     kernel skipped: {:?}",
                    summed(&page, "tracer_events_lost_total"),
                    summed(&page, "tracer_kernel_program_misses_total"),
                );
            }
            if let (Some(start), Some(end)) = (self.hidden_at_start, self.hidden_at_stop) {
                eprintln!("{BLIND_MARKER} {}", end - start);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = libc::pid_t::try_from(child.id()).map(|pid| {
                // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) }
            });
            if wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.join_readers();
        }
        if thread::panicking() {
            eprintln!("--- agent stderr ---\n{}", self.stderr_text());
        }
    }
}

/// Parses the lines that are JSON objects.
pub fn parse_events(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Event accessors
// ---------------------------------------------------------------------------------------------

pub fn ev_str<'a>(ev: &'a Value, key: &str) -> &'a str {
    ev.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("event field `{key}` is not a string: {ev}"))
}

pub fn ev_u64(ev: &Value, key: &str) -> u64 {
    ev.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("event field `{key}` is not an unsigned integer: {ev}"))
}

/// The state names of `states`, in order.
pub fn ev_states(ev: &Value) -> Vec<String> {
    ev.get("states")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("event field `states` is not an array: {ev}"))
        .iter()
        .map(|s| {
            s.get("state")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("a state has no `state` string: {ev}"))
                .to_string()
        })
        .collect()
}

/// The `sport` of each event, as a set.
pub fn sports(events: &[Value]) -> HashSet<u16> {
    events
        .iter()
        .map(|e| u16::try_from(ev_u64(e, "sport")).expect("sport fits u16"))
        .collect()
}

/// The `dport` of each event, as a set.
pub fn dports(events: &[Value]) -> HashSet<u16> {
    events
        .iter()
        .map(|e| u16::try_from(ev_u64(e, "dport")).expect("dport fits u16"))
        .collect()
}

/// Matches the client side (active) of connections to `server`.
pub fn is_client_of(server: SocketAddr) -> impl Fn(&Value) -> bool + Clone {
    let ip = server.ip().to_string();
    let port = server.port();
    move |e| e["event"] == "connection_closed" && e["daddr"] == ip.as_str() && e["dport"] == port
}

/// Matches the server side (accepted sockets) of connections to `server`.
pub fn is_server_of(server: SocketAddr) -> impl Fn(&Value) -> bool + Clone {
    let ip = server.ip().to_string();
    let port = server.port();
    move |e| e["event"] == "connection_closed" && e["saddr"] == ip.as_str() && e["sport"] == port
}

// ---------------------------------------------------------------------------------------------
// HTTP and Prometheus text: the implementation the bench uses too
// ---------------------------------------------------------------------------------------------

pub use tracer_scrape::{Exposition, Response as HttpResponse, Sample};

/// `GET path` on `addr` (loopback only); any status is returned, for the caller to check.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<HttpResponse> {
    tracer_scrape::get(addr, path, timeout)
}

/// Parses a scrape; panics when it is not a valid exposition.
pub fn exposition(text: &str) -> Exposition {
    Exposition::parse(text).unwrap_or_else(|e| panic!("unparsable metrics ({e}):\n{text}"))
}

/// Parses the samples of a Prometheus text exposition (comments skipped).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    exposition(text).into_samples()
}

/// Sum of the samples named `name` whose labels include all of `labels`; panics when there is
/// none, so that a renamed or missing metric fails the test instead of reading as 0.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition(text)
        .sum(name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{text}"))
}

/// Like [`metric_value`], but 0 when no sample matches. Only for series whose absence does
/// mean zero: label sets the agent creates on their first increment, or removes when they fall
/// to zero. Each caller says which.
pub fn metric_value_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition(text).sum(name, labels).unwrap_or(0.0)
}

/// The samples named `name` whose labels include all of `labels`.
pub fn matching_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
    exposition(text)
        .matching(name, labels)
        .into_iter()
        .cloned()
        .collect()
}

/// The `# TYPE` of metric family `name`, if exposed.
pub fn metric_type(text: &str, name: &str) -> Option<String> {
    exposition(text).family_type(name).map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

pub const REQUEST: &[u8] = b"ping from the tracer tests\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    /// Reads the request, echoes it, waits for the client to close first (reads to EOF), then
    /// closes.
    EchoWaitClientClose,
    /// Reads the request, echoes it, and closes first.
    EchoThenClose,
    /// Reads the request, then closes with `SO_LINGER {on, 0}`: the kernel sends a RST and no
    /// FIN.
    ReadThenReset,
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct ServerReport {
    /// Remote addresses of the accepted connections.
    pub peers: Vec<SocketAddr>,
    /// `comm` of the threads that handled (and closed) the accepted sockets.
    pub comms: Vec<String>,
}

/// A TCP server thread accepting exactly `expected` connections.
pub struct Server {
    pub addr: SocketAddr,
    handle: Option<JoinHandle<Result<ServerReport, String>>>,
}

impl Server {
    /// Listens on `bind` (port 0 for a free one) in this network namespace.
    pub fn start(bind: SocketAddr, mode: ServerMode, expected: usize) -> Server {
        Server::spawn(None, bind, mode, expected)
    }

    /// Listens on `bind` inside the network namespace `ns`.
    pub fn start_in(ns: &Netns, bind: SocketAddr, mode: ServerMode, expected: usize) -> Server {
        Server::spawn(Some(ns.path()), bind, mode, expected)
    }

    fn spawn(netns: Option<String>, bind: SocketAddr, mode: ServerMode, expected: usize) -> Server {
        let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
        let handle = thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                if let Some(path) = netns
                    && let Err(e) = enter_netns(&path)
                {
                    let _ = tx.send(Err(e.clone()));
                    return Err(e);
                }
                let listener = match TcpListener::bind(bind) {
                    Ok(l) => l,
                    Err(e) => {
                        let e = format!("bind {bind}: {e}");
                        let _ = tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let _ = tx.send(Ok(addr));
                serve(listener, mode, expected)
            })
            .expect("spawn server thread");
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server thread did not report its address")
            .unwrap_or_else(|e| panic!("server failed to start: {e}"));
        Server {
            addr,
            handle: Some(handle),
        }
    }

    /// Waits (bounded) for the server to have handled all its connections.
    pub fn join(mut self) -> ServerReport {
        let handle = self.handle.take().expect("joined once");
        let deadline = Instant::now() + IO_TIMEOUT + Duration::from_secs(10);
        while !handle.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the test server on {} did not finish",
                self.addr
            );
            thread::sleep(Duration::from_millis(10));
        }
        match handle.join() {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => panic!("test server on {}: {e}", self.addr),
            Err(_) => panic!("test server thread on {} panicked", self.addr),
        }
    }
}

fn serve(listener: TcpListener, mode: ServerMode, expected: usize) -> Result<ServerReport, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut handlers = Vec::with_capacity(expected);
    let mut report = ServerReport::default();
    while handlers.len() < expected {
        match listener.accept() {
            Ok((stream, peer)) => {
                report.peers.push(peer);
                let handler = thread::Builder::new()
                    .name("test-srv-conn".into())
                    .spawn(move || handle_conn(stream, mode))
                    .map_err(|e| e.to_string())?;
                handlers.push(handler);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "accepted {} of {expected} connections within {IO_TIMEOUT:?}",
                        handlers.len()
                    ));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    // Keep listening until the connections end, as a real server does: the agent infers the
    // direction of connections it seeds from whether their local port listens.
    let mut errors = Vec::new();
    for handler in handlers {
        match handler.join() {
            Ok(Ok(comm)) => report.comms.push(comm),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("connection handler panicked".into()),
        }
    }
    drop(listener);
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(errors.join("; "))
    }
}

fn handle_conn(mut stream: TcpStream, mode: ServerMode) -> Result<String, String> {
    let comm = thread_comm();
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; REQUEST.len()];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("server read request: {e}"))?;
    match mode {
        ServerMode::EchoWaitClientClose => {
            stream
                .write_all(&buf)
                .map_err(|e| format!("server write: {e}"))?;
            read_to_eof(&mut stream).map_err(|e| format!("server wait for client close: {e}"))?;
            drop(stream);
        }
        ServerMode::EchoThenClose => {
            stream
                .write_all(&buf)
                .map_err(|e| format!("server write: {e}"))?;
            drop(stream);
        }
        ServerMode::ReadThenReset => {
            set_linger_zero(&stream).map_err(|e| format!("SO_LINGER: {e}"))?;
            drop(stream);
        }
    }
    Ok(comm)
}

/// Reads until EOF (bounded by the socket's read timeout and a byte budget).
fn read_to_eof(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut total = 0usize;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        total += n;
        if total > 1 << 20 {
            return Err(std::io::Error::other("peer sent more than 1 MiB"));
        }
    }
}

/// `SO_LINGER {l_onoff: 1, l_linger: 0}`: closing the socket then sends a RST.
pub fn set_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("socklen");
    // SAFETY: the fd is a live socket owned by `stream`; the option value points to a properly
    // initialised `linger` that outlives the call, and `len` is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast::<libc::c_void>(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMode {
    /// Sends, reads the echo, closes first.
    CloseFirst,
    /// Sends, reads the echo, waits for the server's FIN, then closes.
    WaitServerClose,
    /// Sends, then expects its read to fail with ECONNRESET.
    ExpectReset,
}

/// Opens one connection to `server` and runs `mode`; returns the client's local address.
pub fn client(server: SocketAddr, mode: ClientMode) -> Result<SocketAddr, String> {
    let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(10))
        .map_err(|e| format!("connect {server}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("client write: {e}"))?;
    match mode {
        ClientMode::CloseFirst | ClientMode::WaitServerClose => {
            let mut buf = vec![0u8; REQUEST.len()];
            stream
                .read_exact(&mut buf)
                .map_err(|e| format!("client read echo: {e}"))?;
            if buf != REQUEST {
                return Err("the echo differs from the request".into());
            }
            if mode == ClientMode::WaitServerClose {
                read_to_eof(&mut stream).map_err(|e| format!("client wait for FIN: {e}"))?;
            }
        }
        ClientMode::ExpectReset => {
            let mut buf = [0u8; 64];
            match stream.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Ok(n) => return Err(format!("expected ECONNRESET, read returned Ok({n})")),
                Err(e) => return Err(format!("expected ECONNRESET, read failed with {e}")),
            }
        }
    }
    drop(stream);
    Ok(local)
}

/// Runs `n` clients one after the other in a thread named `thread_name`; returns their local
/// addresses and the `comm` of that thread.
pub fn run_clients(
    server: SocketAddr,
    mode: ClientMode,
    n: usize,
    thread_name: &str,
) -> (Vec<SocketAddr>, String) {
    let handle = thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            let comm = thread_comm();
            let locals = (0..n)
                .map(|_| client(server, mode))
                .collect::<Result<Vec<_>, String>>()?;
            Ok::<_, String>((locals, comm))
        })
        .expect("spawn client thread");
    match handle.join() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("client to {server}: {e}"),
        Err(_) => panic!("client thread panicked"),
    }
}

/// Opens a connection that must be refused; panics otherwise.
pub fn connect_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("connect {addr}: expected ECONNREFUSED, got {e}"),
        Ok(s) => panic!(
            "connect {addr} unexpectedly succeeded (local {:?})",
            s.local_addr()
        ),
    }
}

/// Sets the backlog of a listening socket (listen() again on a listening socket does that).
pub fn set_backlog(listener: &TcpListener, backlog: i32) {
    // SAFETY: listen() on a socket `listener` owns; no memory is passed.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), backlog) };
    assert_eq!(
        rc,
        0,
        "listen({backlog}): {}",
        std::io::Error::last_os_error()
    );
}

/// `count` non-blocking connects to the IPv4 address `to`, from the calling thread's network
/// namespace: the handshakes go on without waiting for them (against a listener that never
/// accepts, the accept queue overflows).
pub fn nonblocking_connects(to: SocketAddr, count: usize) -> Vec<TcpStream> {
    let SocketAddr::V4(v4) = to else {
        panic!("nonblocking_connects: IPv4 only, not {to}")
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("len");
    (0..count)
        .map(|_| {
            // SAFETY: socket() takes no pointers; the returned fd is checked, then owned.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: `addr` is a valid sockaddr_in that outlives the call, `len` its size.
            let rc = unsafe {
                libc::connect(
                    stream.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                    len,
                )
            };
            let err = std::io::Error::last_os_error();
            assert!(
                rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
                "connect {to}: {err}"
            );
            stream
        })
        .collect()
}

/// Closes every stream with a RST (SO_LINGER 0): nothing of theirs is sent again.
pub fn abort_all(streams: Vec<TcpStream>) {
    for stream in streams {
        set_linger_zero(&stream).expect("SO_LINGER 0");
    }
}

/// Connections opened and held: used for the seeding test.
pub struct HeldClients {
    pub streams: Vec<TcpStream>,
}

impl HeldClients {
    /// Opens `n` connections to `server`, each doing one request/echo, and keeps them open.
    pub fn open(server: SocketAddr, n: usize) -> HeldClients {
        let streams = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connect {server}: {e}"));
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                s.write_all(REQUEST).expect("client write");
                let mut buf = vec![0u8; REQUEST.len()];
                s.read_exact(&mut buf).expect("client read echo");
                s
            })
            .collect();
        HeldClients { streams }
    }

    pub fn local_ports(&self) -> HashSet<u16> {
        self.streams
            .iter()
            .map(|s| s.local_addr().expect("local_addr").port())
            .collect()
    }

    /// Closes them all (client first: each sends a FIN).
    pub fn close(self) {
        for s in self.streams {
            let _ = s.shutdown(Shutdown::Write);
            drop(s);
        }
    }
}

/// Established TCP sockets as `ss -Htan` lists them: (local, peer) address strings.
pub fn ss_established() -> Vec<(String, String)> {
    require_tool("ss");
    run_ok("ss", &["-Htan"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[0] == "ESTAB").then(|| (f[3].to_string(), f[4].to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Moves the calling thread into the network namespace bound at `path`.
fn enter_netns(path: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: the fd is an open nsfs file owned by `file` for the whole call; setns only
    // changes the calling thread's network namespace (a thread of our own that binds its
    // sockets there) and does not touch memory.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setns {path}: {}", std::io::Error::last_os_error()))
    }
}

/// A network namespace with a veth pair to the host: host side `10.231.<n>.1/24`, namespace
/// side `10.231.<n>.2/24`. Dropping it deletes the namespace, which deletes the veth pair.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    pub fn create() -> Netns {
        require_root();
        require_tool("ip");
        remove_stale_namespaces();
        let pid = std::process::id();
        let k = NETNS_COUNTER.fetch_add(1, Ordering::SeqCst);
        let used = run_ok("ip", &["-o", "-4", "addr", "show"]);
        // Pick a /24 that no interface uses yet.
        let n = (0..250u32)
            .map(|i| (pid + k * 7 + i) % 250 + 1)
            .find(|n| !used.contains(&format!("10.231.{n}.")))
            .expect("no free 10.231.x.0/24 subnet");
        let name = format!("tracer-test-{pid}-{k}");
        let host_if = format!("trt{}h{k}", pid % 100_000);
        let ns_if = format!("trt{}n{k}", pid % 100_000);
        let octet = u8::try_from(n).expect("subnet octet");
        run_ok("ip", &["netns", "add", &name]);
        // From here on Drop cleans up, even if the rest panics.
        let ns = Netns {
            name,
            host_if,
            ns_if,
            host_ip: Ipv4Addr::new(10, 231, octet, 1),
            ns_ip: Ipv4Addr::new(10, 231, octet, 2),
        };
        ns.configure();
        ns
    }

    fn configure(&self) {
        let host_cidr = format!("{}/24", self.host_ip);
        let ns_cidr = format!("{}/24", self.ns_ip);
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &self.ns_if,
                "netns",
                &self.name,
            ],
        );
        run_ok("ip", &["addr", "add", &host_cidr, "dev", &self.host_if]);
        run_ok("ip", &["link", "set", &self.host_if, "up"]);
        let ns = self.name.as_str();
        run_ok(
            "ip",
            &["-n", ns, "addr", "add", &ns_cidr, "dev", &self.ns_if],
        );
        run_ok("ip", &["-n", ns, "link", "set", &self.ns_if, "up"]);
        run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
        // Wait (bounded) for the carrier on both ends so the first SYN is not lost.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let host = run_ok("ip", &["-o", "link", "show", "dev", &self.host_if]);
            let inside = run_ok("ip", &["-n", ns, "-o", "link", "show", "dev", &self.ns_if]);
            if host.contains("LOWER_UP") && inside.contains("LOWER_UP") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "veth {} / {} did not come up: {host} {inside}",
                self.host_if,
                self.ns_if
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The namespace's bind mount, usable with setns.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// The namespace's inode: what the agent reports as `netns` for its sockets.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path()))
            .ino()
    }

    pub fn ns_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ns_ip), port)
    }

    /// An address on the namespace's link (`10.231.<n>.3`) that nobody answers: the host
    /// resolves it to a MAC address no interface has, so the namespace's end of the veth
    /// discards every frame sent to it. A connect to it sees only its own SYNs, retransmitted.
    pub fn silent_addr(&self, port: u16) -> SocketAddr {
        let [a, b, c, _] = self.ns_ip.octets();
        let ip = Ipv4Addr::new(a, b, c, 3);
        run_ok(
            "ip",
            &[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                "02:00:00:00:00:01",
                "dev",
                &self.host_if,
                "nud",
                "permanent",
            ],
        );
        SocketAddr::new(IpAddr::V4(ip), port)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_cmd("ip", &["netns", "del", &self.name]);
        // Normally gone with the namespace; covers a half-configured pair.
        let _ = run_cmd("ip", &["link", "del", &self.host_if]);
    }
}

/// Deletes `tracer-test-<pid>-<n>` namespaces left behind by test processes that are gone.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten().take(1000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tracer-test-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_cmd("ip", &["netns", "del", &name]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel's view across network namespaces
// ---------------------------------------------------------------------------------------------

/// Every network namespace that can be entered, with the paths that lead into it: those named
/// by `ip netns add`, and those of every process and thread.
pub fn namespaces() -> BTreeMap<u64, Vec<PathBuf>> {
    let mut found: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            let paths = found.entry(meta.ino()).or_default();
            // A few ways in are enough in case one disappears while listing.
            if paths.len() < 4 {
                paths.push(path);
            }
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten().take(10_000) {
                consider(entry.path());
            }
        }
    }
    let procs = std::fs::read_dir("/proc").expect("read /proc");
    for entry in procs.flatten().take(1_000_000) {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        consider(entry.path().join("ns/net"));
        // Threads can be elsewhere (the test servers enter namespaces per thread).
        if let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) {
            for task in tasks.flatten().take(100_000) {
                consider(task.path().join("ns/net"));
            }
        }
    }
    found
}

/// `ss ARGS` in the namespace at `path` (`None`: this one): its output lines, or an error when
/// it cannot be listed (for example the namespace went away meanwhile).
pub fn ss_in(path: Option<&PathBuf>, ss_args: &[&str]) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = Vec::new();
    let program = match path {
        None => "ss",
        Some(p) => {
            args.push(format!("--net={}", p.display()));
            args.push("ss".into());
            "nsenter"
        }
    };
    args.extend(ss_args.iter().map(|s| (*s).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cmd(program, &args);
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `ss -Htan state STATE` (plus `filter`) in the namespace at `path` (`None`: this one), as
/// (local, peer) pairs; an error when it cannot be listed.
pub fn ss_state_in(
    path: Option<&PathBuf>,
    state: &str,
    filter: &[&str],
) -> Result<BTreeSet<(String, String)>, String> {
    let mut args = vec!["-Htan", "state", state];
    args.extend_from_slice(filter);
    let mut sockets = BTreeSet::new();
    for line in ss_in(path, &args)? {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() >= 4,
            "unexpected `ss -Htan state {state}` line: {line:?}"
        );
        sockets.insert((f[2].to_string(), f[3].to_string()));
    }
    Ok(sockets)
}
