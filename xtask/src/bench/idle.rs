//! The memory phase: the agent's RSS while many idle loopback connections are held open.
//!
//! One process may hold only RLIMIT_NOFILE descriptors and raising the hard limit needs
//! CAP_SYS_RESOURCE, which root in a container may lack. So the connections are opened and
//! accepted by helper processes (this same binary, `bench --idle-server` / `--idle-client`),
//! each within its own limit, and spread over several listening ports so that no destination
//! needs more than half of the ephemeral port range.
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::configs::{Env, Tracer};
use super::report::Json;
use super::sys;

#[derive(Debug, Clone, Default)]
pub struct IdleResult {
    pub wanted: u64,
    pub connected: u64,
    pub failed: u64,
    pub helper_pairs: usize,
    pub listeners: usize,
    pub open_seconds: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_with_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    /// Kernel memory of the agent's BPF maps, with the connections open.
    pub map_kib: Option<u64>,
    pub tracked_before: Option<f64>,
    pub tracked_with: Option<f64>,
    pub tracked_after: Option<f64>,
    pub lost: Option<f64>,
    pub notes: Vec<String>,
}

impl IdleResult {
    /// Agent memory per tracked socket, bytes.
    pub fn bytes_per_socket(&self) -> Option<f64> {
        let grown = self.rss_with_kib? as f64 - self.rss_before_kib? as f64;
        let sockets = self.tracked_with? - self.tracked_before?;
        (sockets > 0.0).then(|| grown * 1024.0 / sockets)
    }

    pub fn json(&self) -> Json {
        let kib = |v: Option<u64>| Json::opt(v.map(|v| v as f64));
        Json::obj([
            ("connections_wanted", Json::num(self.wanted as f64)),
            ("connections_open", Json::num(self.connected as f64)),
            ("connect_failures", Json::num(self.failed as f64)),
            ("helper_process_pairs", Json::num(self.helper_pairs as f64)),
            ("listening_ports", Json::num(self.listeners as f64)),
            ("seconds_to_open", Json::num(self.open_seconds)),
            ("agent_rss_kib_before", kib(self.rss_before_kib)),
            ("agent_rss_kib_with_connections", kib(self.rss_with_kib)),
            ("agent_rss_kib_after_close", kib(self.rss_after_kib)),
            ("agent_peak_rss_kib", kib(self.hwm_kib)),
            ("agent_bpf_map_memory_kib", kib(self.map_kib)),
            ("tracked_connections_before", Json::opt(self.tracked_before)),
            ("tracked_connections_with", Json::opt(self.tracked_with)),
            (
                "tracked_connections_after_close",
                Json::opt(self.tracked_after),
            ),
            (
                "agent_bytes_per_tracked_socket",
                Json::opt(self.bytes_per_socket()),
            ),
            ("events_lost", Json::opt(self.lost)),
            (
                "notes",
                Json::Arr(self.notes.iter().map(|n| Json::str(n.as_str())).collect()),
            ),
        ])
    }
}

struct Helper {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn spawn(args: &[String]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let mut child = Command::new(exe)
            .arg("bench")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a connection helper")?;
        let stdout = BufReader::new(child.stdout.take().context("helper stdout")?);
        Ok(Self { child, stdout })
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("a connection helper exited early");
        }
        Ok(line.trim().to_owned())
    }

    /// Closing its stdin tells the helper to exit, which closes all it holds.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = sys::stop_child(&mut self.child, sys::SIGTERM, Duration::from_secs(30));
    }
}

pub fn run(env: &Env, wanted: u32) -> Result<IdleResult> {
    let mut result = IdleResult {
        wanted: u64::from(wanted),
        ..IdleResult::default()
    };
    // Each connection is two descriptors (client and server end) somewhere.
    let needed = 2 * u64::from(wanted) + 512;
    let soft = sys::raise_nofile(needed)?;
    let per_process = if soft >= needed {
        u64::from(wanted)
    } else {
        let (_, hard) = sys::nofile_limit()?;
        result.notes.push(format!(
            "RLIMIT_NOFILE cannot be raised past {hard} here (no CAP_SYS_RESOURCE): connections are spread over helper processes"
        ));
        soft.saturating_sub(256).max(1000)
    };
    let pairs = u64::from(wanted).div_ceil(per_process).max(1) as usize;
    let per_listener = u64::from(sys::ephemeral_ports() / 2).max(1000);
    result.helper_pairs = pairs;

    let tracer = Tracer::start(env, None)?;
    let pid = tracer.pid();
    let before = tracer.snapshot();
    result.rss_before_kib = sys::status_kib(pid, "VmRSS");
    result.tracked_before = before.active;

    let started = Instant::now();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let outcome = (|| -> Result<()> {
        for k in 0..pairs {
            let count = u64::from(wanted) / pairs as u64
                + u64::from((k as u64) < u64::from(wanted) % pairs as u64);
            let listeners = count.div_ceil(per_listener).max(1);
            result.listeners += listeners as usize;
            let mut server = Helper::spawn(&["--idle-server".into(), listeners.to_string()])?;
            let line = server.line()?;
            servers.push(server);
            let targets: Vec<String> = line
                .strip_prefix("ports ")
                .context("unexpected helper output")?
                .split_whitespace()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            clients.push(Helper::spawn(&[
                "--idle-client".into(),
                count.to_string(),
                "--idle-targets".into(),
                targets.join(","),
            ])?);
        }
        for client in &mut clients {
            let line = client.line()?;
            let mut parts = line
                .strip_prefix("connected ")
                .context("unexpected helper output")?
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            result.connected += parts.next().unwrap_or(0);
            result.failed += parts.next().unwrap_or(0);
        }
        Ok(())
    })();
    result.open_seconds = started.elapsed().as_secs_f64();

    if outcome.is_ok() {
        // Both ends of each connection are sockets the agent tracks.
        let target = result.tracked_before.unwrap_or(0.0) + 2.0 * result.connected as f64 * 0.99;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && tracer.snapshot().active.unwrap_or(0.0) < target {
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(Duration::from_secs(1));
        result.tracked_with = tracer.snapshot().active;
        result.rss_with_kib = sys::status_kib(pid, "VmRSS");
        result.map_kib = super::bpf::map_memory_kib(pid);
    }
    // Servers first: the server side then holds the TIME_WAIT sockets, not the ephemeral ports.
    for server in servers {
        server.finish();
    }
    for client in clients {
        client.finish();
    }
    outcome?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let floor = result.tracked_before.unwrap_or(0.0) + 100.0;
    while Instant::now() < deadline && tracer.snapshot().active.unwrap_or(0.0) > floor {
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(1300));
    let after = tracer.snapshot();
    result.tracked_after = after.active;
    result.rss_after_kib = sys::status_kib(pid, "VmRSS");
    result.hwm_kib = sys::status_kib(pid, "VmHWM");
    result.lost = after.lost.zip(before.lost).map(|(a, b)| a - b);
    tracer.stop()?;
    if result.connected < result.wanted {
        result.notes.push(format!(
            "only {} of {} connections could be opened ({} connect failures)",
            result.connected, result.wanted, result.failed
        ));
    }
    Ok(result)
}

/// Parses `--idle-targets`.
pub fn parse_target(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    Ok(addr)
}
