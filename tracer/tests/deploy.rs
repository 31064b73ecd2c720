//! The systemd unit under `deploy/systemd/`: `systemd-analyze verify` accepts it, it has the
//! hardening it promises, and the capability set it grants is proven on the real agent, run
//! through `setpriv` with exactly that set (as a non-root user with ambient capabilities, the
//! unit's way, and as root with a bounded set, the Kubernetes way): it attaches, serves
//! `/metrics`, and finds the owner of a CLOSE_WAIT leak in a network namespace this test
//! created, which takes every capability of the set. Without any one of them the agent either
//! refuses to start, naming it, or can no longer name that owner.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const UNIT: &str = "deploy/systemd/tracer.service";
/// Where the unit expects the binary (`cargo xtask install`'s default).
const INSTALLED_BIN: &str = "/usr/local/bin/tracer";
/// How long a leak may take to be reported: past the 1 s threshold, checked once a second,
/// plus the owner lookup.
const LEAK_TIMEOUT: Duration = Duration::from_secs(15);

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read_repo_file(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The unit file
// ---------------------------------------------------------------------------------------------

/// The values of `key=` in the unit's `[Service]` section, in order.
fn service_values(key: &str) -> Vec<String> {
    let text = read_repo_file(UNIT);
    let mut section = String::new();
    let mut values = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.push(v.trim().to_owned());
        }
    }
    values
}

/// The one value of `key=`; panics when it is missing or repeated.
fn service_value(key: &str) -> String {
    let values = service_values(key);
    assert_eq!(
        values.len(),
        1,
        "{UNIT}: expected one {key}=, found {values:?}"
    );
    values.into_iter().next().unwrap()
}

/// The capabilities the unit grants (`AmbientCapabilities=`), e.g. `CAP_BPF`.
fn documented_capabilities() -> BTreeSet<String> {
    let caps: BTreeSet<String> = service_value("AmbientCapabilities")
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!caps.is_empty(), "{UNIT} grants no capability");
    caps
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    require_tool("systemd-analyze");
    // verify checks that ExecStart's binary exists: point it at the one built here.
    let unit = read_repo_file(UNIT);
    assert!(
        unit.contains(&format!("ExecStart={INSTALLED_BIN} run")),
        "{UNIT} should run {INSTALLED_BIN}"
    );
    let dir = TempDir::new("unit");
    let copy = dir.0.join("tracer.service");
    std::fs::write(&copy, unit.replace(INSTALLED_BIN, AGENT_BIN)).expect("write unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .current_dir(&dir.0)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install the Debian package `systemd`")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {UNIT} ({}):\n{stderr}",
        out.status
    );
}

#[test]
fn unit_is_hardened() {
    for (key, wanted) in [
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("DynamicUser", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectProc", "default"),
        ("RestrictNamespaces", "net"),
    ] {
        assert_eq!(service_value(key), wanted, "{UNIT}: {key}=");
    }
    let memory = service_value("MemoryMax");
    assert!(
        memory.ends_with('M') && memory.trim_end_matches('M').parse::<u32>().is_ok(),
        "{UNIT}: MemoryMax={memory} should be a size in MiB"
    );
    let bounding: BTreeSet<String> = service_value("CapabilityBoundingSet")
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        bounding,
        documented_capabilities(),
        "{UNIT}: the bounding set should be exactly the ambient set"
    );
    // The system calls and socket families the agent uses beyond a plain service's: bpf(2),
    // setns(2) into network namespaces, netlink for sock_diag.
    let filter = service_value("SystemCallFilter");
    for call in ["@system-service", "bpf", "setns"] {
        assert!(
            filter.split_ascii_whitespace().any(|c| c == call),
            "{UNIT}: SystemCallFilter={filter} lacks {call}"
        );
    }
    let families = service_value("RestrictAddressFamilies");
    for family in ["AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(
            families.contains(family),
            "{UNIT}: {families} lacks {family}"
        );
    }
    // ProtectKernelLogs drops CAP_SYSLOG (kallsyms addresses); ProtectProc=invisible hides
    // the processes whose namespaces and descriptors the agent reads.
    assert!(service_values("ProtectKernelLogs").is_empty(), "{UNIT}");
    assert!(
        service_values("User").is_empty(),
        "{UNIT}: DynamicUser, no fixed user"
    );
}

// ---------------------------------------------------------------------------------------------
// The agent under setpriv
// ---------------------------------------------------------------------------------------------

/// A directory removed when dropped, even when the test panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("tracer-deploy-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A world-readable copy of the agent: the build directory may not be reachable for an
/// unprivileged user (under /root, say).
fn agent_copy(dir: &TempDir) -> String {
    let copy = dir.0.join("tracer");
    std::fs::copy(AGENT_BIN, &copy).expect("copy the agent binary");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the copy executable");
    copy.to_str().expect("temp path is UTF-8").to_owned()
}

/// Who the agent runs as.
#[derive(Clone, Copy, Debug)]
enum Identity {
    /// uid/gid 65534 with the set as ambient capabilities: what the unit's DynamicUser gets.
    NonRoot,
    /// uid 0 with the set as bounding set: what a container gets from `capabilities.add`.
    BoundedRoot,
}

/// `setpriv` arguments giving exactly `caps` (names like `CAP_BPF`).
fn setpriv_args(identity: Identity, caps: &BTreeSet<String>) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|cap| {
            let name = cap
                .strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{cap}: capability names start with CAP_"));
            format!(",+{}", name.to_ascii_lowercase())
        })
        .collect();
    let mut args = match identity {
        Identity::NonRoot => vec![
            "--reuid=65534".to_owned(),
            "--regid=65534".to_owned(),
            "--clear-groups".to_owned(),
            format!("--inh-caps=-all{list}"),
            format!("--ambient-caps=-all{list}"),
        ],
        Identity::BoundedRoot => vec!["--inh-caps=-all".to_owned()],
    };
    args.push(format!("--bounding-set=-all{list}"));
    args
}

/// Lines a child writes on one stream, collected by a thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(self, stream: impl Read + Send + 'static) -> JoinHandle<()> {
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().take(1_000_000) {
                let Ok(line) = line else { break };
                self.0.lock().unwrap().push(line);
            }
        })
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    fn events(&self) -> Vec<Value> {
        parse_events(&self.0.lock().unwrap())
    }
}

/// `tracer run` under `setpriv`, with JSON events and a 1 s CLOSE_WAIT threshold.
struct CappedAgent {
    child: Child,
    listen: SocketAddr,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
    /// `kernel_hid_events` once ready: a failing test says how it grew (`BLIND_MARKER`), as
    /// the common harness's agents do.
    hidden_at_start: Option<f64>,
}

impl CappedAgent {
    fn spawn(binary: &str, identity: Identity, caps: &BTreeSet<String>) -> CappedAgent {
        CappedAgent::spawn_with(binary, identity, caps, &[])
    }

    /// `spawn` with more `run` options.
    fn spawn_with(
        binary: &str,
        identity: Identity,
        caps: &BTreeSet<String>,
        options: &[&str],
    ) -> CappedAgent {
        require_root();
        require_tool("setpriv");
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut child = Command::new("setpriv")
            .args(setpriv_args(identity, caps))
            .arg(binary)
            .args(["run", "--listen", &listen.to_string(), "--events", "json"])
            .args(["--close-wait-threshold", "1s", "--log-level", "info"])
            .args(options)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run setpriv ({e}): it comes with util-linux"));
        let (stdout, stderr) = (Lines::default(), Lines::default());
        let readers = vec![
            stdout
                .clone()
                .collect(child.stdout.take().expect("piped stdout")),
            stderr
                .clone()
                .collect(child.stderr.take().expect("piped stderr")),
        ];
        CappedAgent {
            child,
            listen,
            stdout,
            stderr,
            readers,
            hidden_at_start: None,
        }
    }

    /// Waits until the agent serves `/metrics`; `Err` with its stderr if it exits first.
    fn ready(&mut self) -> Result<String, String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.join();
                return Err(format!("exited ({status}): {}", self.stderr.text()));
            }
            if let Ok(resp) = http_get(self.listen, "/metrics", Duration::from_secs(2))
                && resp.status == 200
            {
                self.hidden_at_start = kernel_hid_events(&resp.body);
                return Ok(resp.body);
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the agent did not serve /metrics within {READY_TIMEOUT:?}:\n{}",
            self.stderr.text()
        );
    }

    /// Waits for the agent to exit on its own; its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the agent should have exited:\n{}", self.stderr.text()));
        self.join();
        status.code()
    }

    fn scrape(&self) -> String {
        let resp = http_get(self.listen, "/metrics", Duration::from_secs(10)).expect("scrape");
        assert_eq!(resp.status, 200, "{}", resp.body);
        resp.body
    }

    /// The `close_wait_leak` event for the connection whose server side is `server_side`.
    fn wait_for_leak(&self, server_side: SocketAddr) -> Value {
        let deadline = Instant::now() + LEAK_TIMEOUT;
        loop {
            let leak = self.stdout.events().into_iter().find(|e| {
                e["event"] == "close_wait_leak" && e["sport"] == u64::from(server_side.port())
            });
            if let Some(leak) = leak {
                return leak;
            }
            assert!(
                Instant::now() < deadline,
                "no close_wait_leak for {server_side} within {LEAK_TIMEOUT:?}; stderr:\n{}",
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) -> String {
        send_signal(self.child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut self.child, STOP_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "the agent did not stop cleanly ({status:?}):\n{}",
            self.stderr.text()
        );
        self.join();
        self.stderr.text()
    }

    fn join(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        let running = self.child.try_wait().ok().flatten().is_none();
        if running && thread::panicking() {
            // The agent compares the kernel's softirq counts with its programs' once a second.
            thread::sleep(Duration::from_millis(1500));
            let now = http_get(self.listen, "/metrics", Duration::from_secs(10))
                .ok()
                .and_then(|resp| kernel_hid_events(&resp.body));
            if let (Some(start), Some(end)) = (self.hidden_at_start, now) {
                eprintln!("{BLIND_MARKER} {}", end - start);
            }
        }
        if running {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A connection inside `ns` whose server side this process accepted and keeps after the client
/// closed: a CLOSE_WAIT leak owned by this (root, fully capable) process, in a namespace the
/// agent must enter to find the socket's inode. Passive transitions run in softirq, so the
/// kernel events cannot name the owner: the agent looks it up in `/proc`.
fn leak_in(ns: &Netns) -> (TcpStream, SocketAddr) {
    let path = ns.path();
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: the descriptor is open for the whole call; setns only moves this short-lived
        // thread into the network namespace and touches no memory.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind in the namespace");
        let client =
            TcpStream::connect(listener.local_addr().unwrap()).expect("connect in the namespace");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        let local = server.local_addr().unwrap();
        (server, local)
    })
    .join()
    .expect("namespace thread")
}

/// The agent runs with exactly the set: attached, serving, and the leak's owner found.
fn agent_works_with(identity: Identity) {
    let caps = documented_capabilities();
    let dir = TempDir::new("caps");
    let binary = agent_copy(&dir);
    let mut agent = CappedAgent::spawn(&binary, identity, &caps);
    let body = agent
        .ready()
        .unwrap_or_else(|e| panic!("{identity:?} with {caps:?}: the agent {e}"));
    assert_eq!(metric_value(&body, "tracer_build_info", &[]), 1.0);
    let ns = Netns::create();
    let (_held, server_side) = leak_in(&ns);
    let leak = agent.wait_for_leak(server_side);
    assert_eq!(leak["netns"], ns.inode(), "{leak}");
    assert_eq!(
        leak["pid"],
        std::process::id(),
        "{identity:?} with {caps:?}: the leak's owner should be found in /proc: {leak}"
    );
    let body = agent.scrape();
    assert!(metric_value(&body, "tracer_close_wait_leaks_total", &[]) >= 1.0);
    assert!(metric_value(&body, "tracer_events_total", &[]) > 0.0);
    let stderr = agent.stop();
    assert!(
        !stderr.contains(" no CAP_") && stderr.contains("attached to"),
        "{identity:?} with {caps:?}: no warning about capabilities expected:\n{stderr}"
    );
}

/// Without CAP_SYS_ADMIN the agent cannot enter other network namespaces to dump their
/// sockets, so a resync knows nothing of them: it must leave their connections alone rather
/// than close them out as if their close had been lost.
#[test]
fn a_resync_without_cap_sys_admin_keeps_other_namespaces_connections() {
    let mut caps = documented_capabilities();
    caps.remove("CAP_SYS_ADMIN");
    let dir = TempDir::new("resync");
    let binary = agent_copy(&dir);
    let ns = Netns::create();
    let mut agent = CappedAgent::spawn_with(
        &binary,
        Identity::NonRoot,
        &caps,
        &["--resync-every", "10s"],
    );
    agent
        .ready()
        .unwrap_or_else(|e| panic!("without CAP_SYS_ADMIN the agent should still run; it {e}"));
    let (_held, server_side) = leak_in(&ns);
    // The first dump comes 2 s after start-up, perhaps before the connection was traced; the
    // audit's, 10 s after it, surely after.
    let resyncs = |agent: &CappedAgent| metric_value(&agent.scrape(), "tracer_resyncs_total", &[]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while resyncs(&agent) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "no second resync within 40 s:\n{}",
            agent.stderr.text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let leak = agent.wait_for_leak(server_side);
    assert_eq!(leak["netns"], ns.inode(), "{leak}");
    let closed: Vec<Value> = agent
        .stdout
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "connection_closed"
                && e["netns"] == ns.inode()
                && (e["sport"] == u64::from(server_side.port())
                    || e["dport"] == u64::from(server_side.port()))
        })
        .collect();
    // The client side closed for real (its FIN); the server side, still in CLOSE_WAIT, must
    // not have been closed out.
    assert!(
        closed
            .iter()
            .all(|e| e["sport"] != u64::from(server_side.port())),
        "a resync closed out the server side still in CLOSE_WAIT: {closed:?}\n{}",
        agent.stderr.text()
    );
    let body = agent.scrape();
    assert!(
        metric_value(&body, "tracer_close_wait_sockets", &[]) >= 1.0,
        "the CLOSE_WAIT socket should still be counted"
    );
    agent.stop();
}

#[test]
fn documented_capabilities_run_the_agent_as_a_non_root_user() {
    agent_works_with(Identity::NonRoot);
}

#[test]
fn documented_capabilities_run_the_agent_as_root_with_a_bounded_set() {
    agent_works_with(Identity::BoundedRoot);
}

/// Each capability of the set is needed: without CAP_SYSLOG the agent refuses to start and
/// names it, and so it does without CAP_BPF or CAP_PERFMON once CAP_SYS_ADMIN (which the kernel
/// accepts in their place) is gone too; without any other one it runs but cannot name the
/// owner of a leak in another namespace (CAP_SYS_ADMIN: setns; CAP_SYS_PTRACE and
/// CAP_DAC_READ_SEARCH: another user's `/proc/PID/fd`).
#[test]
fn each_documented_capability_is_needed() {
    const REFUSED: [&str; 3] = ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG"];
    let all = documented_capabilities();
    for cap in REFUSED {
        assert!(all.contains(cap), "{UNIT} lacks {cap}");
    }
    let dir = TempDir::new("fewer");
    let binary = agent_copy(&dir);
    let ns = Netns::create();
    for cap in &all {
        let mut fewer = all.clone();
        fewer.remove(cap);
        if cap != "CAP_SYSLOG" && REFUSED.contains(&cap.as_str()) {
            fewer.remove("CAP_SYS_ADMIN");
        }
        let mut agent = CappedAgent::spawn(&binary, Identity::NonRoot, &fewer);
        if REFUSED.contains(&cap.as_str()) {
            let code = agent.exit_code();
            let stderr = agent.stderr.text();
            assert!(
                code.is_some_and(|c| c != 0) && stderr.lines().count() == 1,
                "without {cap} the agent should refuse in one line ({code:?}):\n{stderr}"
            );
            assert!(stderr.contains(&format!("missing {cap}")), "{stderr}");
            continue;
        }
        agent
            .ready()
            .unwrap_or_else(|e| panic!("without {cap} the agent should still run; it {e}"));
        let (_held, server_side) = leak_in(&ns);
        let leak = agent.wait_for_leak(server_side);
        assert!(
            leak["pid"].is_null(),
            "without {cap} the owner should stay unknown, so {cap} is not needed: {leak}"
        );
        let stderr = agent.stop();
        assert!(
            stderr.contains(&format!("no {cap}")),
            "the agent should warn about {cap}:\n{stderr}"
        );
    }
}
