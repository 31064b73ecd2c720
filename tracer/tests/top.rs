//! `tracer top` in a real terminal (tmux): the screen shows the loopback traffic made here
//! (connection rates, TIME_WAIT by peer with the port-exhaustion ratio, a reset finding in
//! `tracer diagnose`'s words), a key re-sorts the peers, `q` quits with exit code 0 and the
//! terminal is given back (alternate screen left, no raw mode). Bad input fails in one line.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Connections closed first by the client toward the busier and the quieter server.
const BUSY: usize = 30;
const QUIET: usize = 10;
/// Connections answered by a RST.
const RESET: usize = 2;

/// A tmux server of this test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
    /// The socket's file, removed on drop (the server leaves it behind).
    socket_path: Option<String>,
}

impl Tmux {
    /// A detached 160x150 session running `sh` (tall: other tests' TIME_WAIT peers may be listed
    /// too).
    fn start() -> Tmux {
        require_tool("tmux");
        // A socket per session: the previous test's server may still be shutting down.
        static SESSIONS: AtomicUsize = AtomicUsize::new(0);
        let mut tmux = Tmux {
            socket_path: None,
            socket: format!(
                "tracer-top-test-{}-{}",
                std::process::id(),
                SESSIONS.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "150",
            "sh",
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        let path = tmux.run(&["display-message", "-p", "#{socket_path}"]);
        tmux.socket_path =
            Some(String::from_utf8_lossy(&path.stdout).trim().to_owned()).filter(|p| !p.is_empty());
        tmux.wait_for("the shell", Duration::from_secs(10), |s| {
            !s.trim().is_empty()
        });
        // A prompt that the typed line itself does not contain.
        tmux.type_line("PS1=\"top-$((6*7))$ \"");
        tmux.wait_for("the prompt", Duration::from_secs(10), prompt_shown);
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "top", "-l", text])
                .status
                .success()
        );
        assert!(
            self.run(&["send-keys", "-t", "top", "Enter"])
                .status
                .success()
        );
    }

    fn key(&self, key: &str) {
        assert!(self.run(&["send-keys", "-t", "top", key]).status.success());
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        assert!(out.status.success(), "tmux capture-pane: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alternate_on(&self) -> bool {
        let out = self.run(&["display-message", "-p", "-t", "top", "#{alternate_on}"]);
        assert!(out.status.success(), "tmux display-message: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Polls the screen until `done` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The cells of the peers table row for `port`, with its position on the screen.
fn peer_row(screen: &str, port: u16) -> Option<(usize, Vec<String>)> {
    screen.lines().enumerate().find_map(|(i, line)| {
        let cells: Vec<String> = line
            .replace('│', " ")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (cells.len() == 5 && cells[0] == "127.0.0.1" && cells[1] == port.to_string())
            .then_some((i, cells))
    })
}

/// Every peer row on the screen, in screen order, as (address, port).
fn peer_rows(screen: &str) -> Vec<(std::net::IpAddr, u16)> {
    screen
        .lines()
        .filter_map(|line| {
            let cleaned = line.replace('│', " ");
            let cells: Vec<&str> = cleaned.split_whitespace().collect();
            if cells.len() != 5 {
                return None;
            }
            Some((cells[0].parse().ok()?, cells[1].parse().ok()?))
        })
        .collect()
}

/// The number after `label` on the screen (`opened 12.0`, `TIME_WAIT 40`).
fn number_after(screen: &str, label: &str) -> Option<f64> {
    let at = screen.find(label)? + label.len();
    screen[at..].split_whitespace().next()?.parse().ok()
}

/// The terminal is as it was before `tracer top`: main screen, the shell's prompt, cooked mode
/// with echo.
fn assert_restored(tmux: &Tmux, after: &str) {
    assert!(
        !tmux.alternate_on(),
        "{after}: the alternate screen was left"
    );
    tmux.wait_for("the prompt again", Duration::from_secs(5), prompt_shown);
    tmux.type_line("echo raw=$(stty -a | grep -c -w -e -icanon -e -echo)x");
    tmux.wait_for("the terminal modes", Duration::from_secs(5), |s| {
        s.contains("raw=0x")
    });
}

/// The shell's prompt is the last line shown.
fn prompt_shown(screen: &str) -> bool {
    screen
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_end() == "top-42$")
}

/// The shell printed top's exit status (the typed command line starts with the prompt).
fn exited(screen: &str) -> bool {
    screen.lines().any(|l| l.starts_with("top-exit="))
}

fn ephemeral_ports() -> u32 {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let range: Vec<u32> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    range[1] - range[0] + 1
}

/// The busy and the quiet server's ports: the busy one the higher, so that sorting by peer
/// reverses the order by sockets.
fn two_ports() -> (u16, u16) {
    for _ in 0..20 {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a.max(b), a.min(b));
        }
    }
    panic!("no two distinct free ports");
}

/// The loopback traffic: bounded counts, every client closing first (TIME_WAIT on its side)
/// except the ones answered by a RST.
fn traffic(busy: u16, quiet: u16) {
    let at = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
    let busy_server = Server::start(at(busy), ServerMode::EchoWaitClientClose, BUSY);
    let quiet_server = Server::start(at(quiet), ServerMode::EchoWaitClientClose, QUIET);
    let reset_server = Server::start(at(0), ServerMode::ReadThenReset, RESET);
    run_clients(busy_server.addr, ClientMode::CloseFirst, BUSY, "top-busy");
    run_clients(
        quiet_server.addr,
        ClientMode::CloseFirst,
        QUIET,
        "top-quiet",
    );
    run_clients(
        reset_server.addr,
        ClientMode::ExpectReset,
        RESET,
        "top-reset",
    );
    busy_server.join();
    quiet_server.join();
    reset_server.join();
}

#[test]
fn top_shows_the_traffic_sorts_and_quits_cleanly() {
    require_root();
    let tmux = Tmux::start();
    tmux.type_line(&format!("{AGENT_BIN} top --interval 1s; echo top-exit=$?"));
    let screen = tmux.wait_for("the first frame", READY_TIMEOUT, |s| {
        s.contains("tracer top - every 1 s")
    });
    assert!(screen.contains("sort: sockets"), "{screen}");
    assert!(tmux.alternate_on(), "top draws on the alternate screen");

    let (busy, quiet) = two_ports();
    let load = thread::spawn(move || traffic(busy, quiet));
    // Every frame while the traffic runs and a few seconds after: its opened rate.
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut settled: Option<Instant> = None;
    let screen = loop {
        let screen = tmux.screen();
        if let Some(line) = screen.lines().find(|l| l.contains("connections/s:")) {
            let rate = number_after(line, "opened").expect("an opened rate");
            rates.insert(line.to_owned(), rate);
        }
        let shown = |port, n: usize| {
            peer_row(&screen, port).is_some_and(|(_, cells)| cells[3] == n.to_string())
        };
        if load.is_finished() && shown(busy, BUSY) && shown(quiet, QUIET) {
            let since = *settled.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(3) {
                break screen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the peers never showed {BUSY} and {QUIET} TIME_WAIT sockets; the screen:\n{screen}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    load.join().expect("traffic");

    // Both sides of every connection open on this host: two opens per connection.
    let made = 2 * (BUSY + QUIET + RESET);
    let total = number_after(&screen, "since start:").expect("the opened total");
    assert!(
        total >= made as f64,
        "opened since start {total} < {made}:\n{screen}"
    );
    let summed: f64 = rates.values().sum();
    assert!(
        summed >= 0.9 * made as f64,
        "opened/s over the frames sums to {summed}, not about {made} (frames: {rates:?})"
    );
    let time_wait = number_after(&screen, "TIME_WAIT").expect("the TIME_WAIT count");
    assert!(time_wait >= (BUSY + QUIET) as f64, "{screen}");

    let ports = ephemeral_ports();
    let (busy_at, busy_row) = peer_row(&screen, busy).unwrap();
    let (quiet_at, quiet_row) = peer_row(&screen, quiet).unwrap();
    let ratio = |n: usize| format!("{:.2}%", n as f64 / f64::from(ports) * 100.0);
    assert_eq!(
        busy_row,
        ["127.0.0.1", &busy.to_string(), "client", "30", &ratio(BUSY)]
    );
    assert_eq!(
        quiet_row,
        [
            "127.0.0.1",
            &quiet.to_string(),
            "client",
            "10",
            &ratio(QUIET)
        ]
    );
    assert!(busy_at < quiet_at, "most sockets first:\n{screen}");
    assert!(screen.contains("SOCKETS*"), "{screen}");

    // The reset finding, in `tracer diagnose`'s words.
    assert!(
        screen.contains("[NOTICE]") || screen.contains("[PROBLEM]"),
        "{screen}"
    );
    assert!(screen.contains("sent by this host"), "{screen}");
    assert!(
        screen.contains("measured:") && screen.contains("do:"),
        "{screen}"
    );

    // `s` cycles the sort: ratio, then peer (the quieter server's lower port first).
    tmux.key("s");
    let screen = tmux.wait_for("the ratio sort", Duration::from_secs(5), |s| {
        s.contains("sort: ratio") && s.contains("PORTS USED*")
    });
    let (busy_at, _) = peer_row(&screen, busy).unwrap();
    let (quiet_at, _) = peer_row(&screen, quiet).unwrap();
    assert!(busy_at < quiet_at, "highest ratio first:\n{screen}");
    tmux.key("s");
    // A capture can catch the terminal between two frames while other tests' TIME_WAIT rows
    // expire: wait for a whole frame (a torn one repeats a row or breaks the order).
    let in_order = |s: &str| peer_rows(s).windows(2).all(|w| w[0] <= w[1]);
    let screen = tmux.wait_for("the peer sort", Duration::from_secs(5), |s| {
        s.contains("sort: peer") && s.contains("PEER*") && in_order(s)
    });
    // Earlier tests' TIME_WAIT groups may fill the screen before ours in this order: check the
    // order of what is shown, and ours where both are.
    let shown = peer_rows(&screen);
    assert!(shown.len() >= 2, "peer rows on the screen:\n{screen}");
    assert!(
        shown.windows(2).all(|w| w[0] <= w[1]),
        "rows by peer, then port:\n{screen}"
    );
    if let (Some((busy_at, _)), Some((quiet_at, _))) =
        (peer_row(&screen, busy), peer_row(&screen, quiet))
    {
        assert!(quiet_at < busy_at, "by port, lower first:\n{screen}");
    }

    // `q` quits with exit code 0, and the terminal is as it was.
    tmux.key("q");
    let screen = tmux.wait_for("the exit", STOP_TIMEOUT, exited);
    assert!(screen.lines().any(|l| l == "top-exit=0"), "{screen}");
    assert!(!screen.contains("panicked"), "{screen}");
    assert_restored(&tmux, "q");
}

/// `key` (a tmux key name) ends `tracer top` with exit code 0 and the terminal restored.
fn quits_on(key: &str) {
    require_root();
    let tmux = Tmux::start();
    tmux.type_line(&format!("{AGENT_BIN} top --interval 2s; echo top-exit=$?"));
    tmux.wait_for("the first frame", READY_TIMEOUT, |s| {
        s.contains("tracer top - every 2 s")
    });
    tmux.key(key);
    let screen = tmux.wait_for("the exit", STOP_TIMEOUT, exited);
    assert!(screen.lines().any(|l| l == "top-exit=0"), "{key}: {screen}");
    assert_restored(&tmux, key);
}

#[test]
fn escape_also_quits() {
    quits_on("Escape");
}

#[test]
fn ctrl_c_also_quits() {
    quits_on("C-c");
}

#[test]
fn sigterm_also_quits_cleanly() {
    require_root();
    let tmux = Tmux::start();
    let pid_file = std::env::temp_dir().join(format!("tracer-top-test-{}.pid", std::process::id()));
    let _ = std::fs::remove_file(&pid_file);
    tmux.type_line(&format!(
        "sh -c 'echo $$ > {}; exec {AGENT_BIN} top'; echo top-exit=$?",
        pid_file.display()
    ));
    tmux.wait_for("the first frame", READY_TIMEOUT, |s| {
        s.contains("tracer top - every 1 s")
    });
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the pid file")
        .trim()
        .parse()
        .expect("a pid");
    std::fs::remove_file(&pid_file).expect("remove the pid file");
    send_signal(pid, libc::SIGTERM);
    let screen = tmux.wait_for("the exit", STOP_TIMEOUT, exited);
    assert!(screen.lines().any(|l| l == "top-exit=0"), "{screen}");
    assert_restored(&tmux, "SIGTERM");
}

fn one_line_error(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(AGENT_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run tracer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("tracer: error: "), "{stderr:?}");
    assert!(out.stdout.is_empty(), "nothing drawn: {:?}", out.stdout);
    (out.status.code(), stderr)
}

#[test]
fn bad_input_is_one_line_and_a_non_zero_exit() {
    require_root();
    for bad in ["0s", "1.5s", "soon"] {
        let (code, stderr) = one_line_error(&["top", "--interval", bad]);
        assert_eq!(code, Some(2), "--interval {bad}: {stderr}");
        assert!(stderr.contains("--interval"), "{stderr}");
    }
    let (code, stderr) = one_line_error(&["top"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("needs a terminal"), "{stderr}");
}
