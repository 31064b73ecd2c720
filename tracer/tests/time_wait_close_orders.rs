//! The TIME_WAIT gauge is exact whatever the close order, timing and threading: every timewait
//! socket is counted, in both substates, and compared with the kernel's two views summed over
//! network namespaces (`ss`, and `/proc/net/sockstat`'s `tw`) and with the test's own count of
//! the connections it made.
//!
//! The first test is the common case issue 4's gauge got wrong: a threaded server that closes
//! as soon as it reads EOF, the clients closing first. Most of those timewait sockets are born
//! in FIN_WAIT2 and move to TIME_WAIT when the server's FIN arrives, with no timer event.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_time_wait;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_time_wait::*;

/// Peers shown in the breakdown: enough for the test's group to be listed on a busy host.
const TOP_PEERS: &str = "200";
/// How long the orphaned FIN_WAIT2 sockets of the half-close test live (TCP_LINGER2).
const LINGER2_SECS: i32 = 20;

/// What each connection's server end does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerEnd {
    /// Reads until EOF, then closes: the client closed first.
    CloseOnEof,
    /// Reads the request, echoes it and closes first.
    CloseFirst,
    /// Reads until EOF and keeps the socket open until the test ends: the peer's FIN never
    /// comes.
    HoldAfterEof,
}

/// A server with one thread per connection, serving `expected` connections at most, each as
/// `end` says. Bounded in count and time.
struct ThreadedServer {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<Vec<thread::JoinHandle<()>>>>,
    expected: usize,
}

impl ThreadedServer {
    fn start(bind: &str, end: ServerEnd, expected: usize) -> ThreadedServer {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, h, st) = (served.clone(), failures.clone(), held.clone(), stop.clone());
        let acceptor = thread::Builder::new()
            .name("tw-accept".into())
            .spawn(move || {
                let deadline = Instant::now() + IO_TIMEOUT;
                let mut handlers = Vec::new();
                while handlers.len() < expected && Instant::now() < deadline {
                    if st.load(Ordering::Relaxed) {
                        break;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (s, f, h) = (s.clone(), f.clone(), h.clone());
                            handlers.push(thread::spawn(move || {
                                if let Err(e) = serve(stream, end, &h) {
                                    f.lock().unwrap().push(e);
                                }
                                s.fetch_add(1, Ordering::SeqCst);
                            }));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => {
                            f.lock().unwrap().push(format!("accept: {e}"));
                            break;
                        }
                    }
                }
                handlers
            })
            .expect("spawn acceptor");
        ThreadedServer {
            addr,
            served,
            failures,
            held,
            stop,
            acceptor: Some(acceptor),
            expected,
        }
    }

    /// Waits (bounded) until every connection was served; panics on any server-side error.
    fn wait_served(&mut self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.served.load(Ordering::SeqCst) < self.expected {
            assert!(
                Instant::now() < deadline,
                "the server on {} served {} of {} connections; errors: {:?}",
                self.addr,
                self.served.load(Ordering::SeqCst),
                self.expected,
                self.failures.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(10));
        }
        if let Some(acceptor) = self.acceptor.take() {
            for handler in acceptor.join().expect("acceptor") {
                handler.join().expect("handler");
            }
        }
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "server {}: {failures:?}", self.addr);
    }

    /// The connections held open (HoldAfterEof), for the test to close when it is done.
    fn release(&self) -> usize {
        let mut held = self.held.lock().unwrap();
        let n = held.len();
        held.clear();
        n
    }
}

impl Drop for ThreadedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut stream: TcpStream,
    end: ServerEnd,
    held: &Mutex<Vec<TcpStream>>,
) -> Result<(), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    match end {
        ServerEnd::CloseOnEof | ServerEnd::HoldAfterEof => {
            let mut all = Vec::new();
            stream
                .read_to_end(&mut all)
                .map_err(|e| format!("server read to EOF: {e}"))?;
            if end == ServerEnd::HoldAfterEof {
                held.lock().unwrap().push(stream);
            }
        }
        ServerEnd::CloseFirst => {
            let mut buf = vec![0u8; REQUEST.len()];
            stream
                .read_exact(&mut buf)
                .map_err(|e| format!("server read: {e}"))?;
            stream
                .write_all(&buf)
                .map_err(|e| format!("server write: {e}"))?;
        }
    }
    Ok(())
}

/// `n` connections to `server` over `threads` threads, each `client(i)`; returns the client
/// ends' addresses. Bounded: every connection has its own I/O timeouts.
fn run_threads(
    n: usize,
    threads: usize,
    client: impl Fn(usize) -> Result<SocketAddr, String> + Send + Sync + 'static,
) -> Vec<SocketAddr> {
    let client = Arc::new(client);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let client = client.clone();
            thread::Builder::new()
                .name(format!("tw-client-{t}"))
                .spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| client(i))
                        .collect::<Result<Vec<_>, String>>()
                })
                .expect("spawn client")
        })
        .collect();
    let mut locals = Vec::new();
    for handle in handles {
        locals.extend(
            handle
                .join()
                .expect("client thread")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    assert_eq!(locals.len(), n);
    locals
}

fn connect(server: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&server, Duration::from_secs(10))
        .map_err(|e| format!("connect {server}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Sends a few bytes and closes first, with the timing varied by `i`: at once, after a short
/// pause, or after a half-close.
fn write_and_close_first(server: SocketAddr, i: usize) -> Result<SocketAddr, String> {
    let mut stream = connect(server)?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("client write: {e}"))?;
    match i % 4 {
        1 => thread::sleep(Duration::from_micros(200)),
        2 => stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?,
        _ => {}
    }
    drop(stream);
    Ok(local)
}

/// Sends the request, reads the echo, waits for the server's FIN, then closes.
fn wait_for_the_server_to_close(server: SocketAddr) -> Result<SocketAddr, String> {
    let mut stream = connect(server)?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("client write: {e}"))?;
    let mut buf = vec![0u8; REQUEST.len()];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("client read echo: {e}"))?;
    match stream.read(&mut buf) {
        Ok(0) => Ok(local),
        Ok(n) => Err(format!("{n} more bytes instead of the server's FIN")),
        Err(e) => Err(format!("client wait for FIN: {e}")),
    }
}

/// The timewait sockets `ss` lists in this namespace on connections with `server`, whose end is
/// `server`'s own when `server_end`, else the peer's.
fn our_time_wait(server: SocketAddr, server_end: bool) -> HashSet<(SocketAddr, SocketAddr)> {
    tw_sockets(None)
        .into_iter()
        .filter(|(l, p)| {
            if server_end {
                *l == server
            } else {
                *p == server
            }
        })
        .collect()
}

/// Waits (bounded) until `ss` lists exactly the timewait sockets `want` on connections with
/// `server`.
fn wait_kernel_lists(
    server: SocketAddr,
    server_end: bool,
    want: &HashSet<(SocketAddr, SocketAddr)>,
) {
    wait_until(
        "the kernel lists every timewait socket",
        KERNEL_TIMEOUT,
        || {
            let have = our_time_wait(server, server_end);
            if have == *want {
                Ok(())
            } else {
                Err(format!(
                    "ss lists {} of the {} expected (and {} others) on connections with {server}",
                    have.intersection(want).count(),
                    want.len(),
                    have.difference(want).count()
                ))
            }
        },
    );
}

/// The breakdown shows exactly `n` timewait sockets for the group (`peer`, `port`), once the
/// agent refreshed it.
fn wait_group_is(agent: &Agent, peer: &str, port: u16, n: usize) {
    let port = port.to_string();
    wait_until(
        &format!("{BY_PEER}{{peer={peer}, port={port}}} is {n}"),
        Duration::from_secs(10),
        || {
            let text = agent.scrape();
            let v = series_value(&text, BY_PEER, &[("peer", peer), ("port", port.as_str())]);
            if v == n as f64 {
                Ok(())
            } else {
                let groups: Vec<String> = matching_samples(&text, BY_PEER, &[])
                    .iter()
                    .map(|s| format!("{:?} {}", s.labels, s.value))
                    .collect();
                Err(format!("it is {v}; all groups: {groups:?}"))
            }
        },
    );
}

/// The gauge against both of the kernel's views, summed over namespaces.
fn assert_gauge_matches_kernel(agent: &Agent, when: &str) {
    assert_gauge_matches_ss(agent, when);
    assert_gauge_matches_sockstat(agent, when);
}

fn client_closes_first_against_a_close_on_eof_server(bind: &str, n: usize) {
    require_tools();
    exact_unless_kernel_blind(|attempt| client_closes_first_once(attempt, bind, n));
}

fn client_closes_first_once(attempt: &mut Attempt, bind: &str, n: usize) {
    let agent = attempt.start_agent(&["--time-wait-top-peers", TOP_PEERS]);
    let before = agent.scrape();
    let mut server = ThreadedServer::start(bind, ServerEnd::CloseOnEof, n);
    let addr = server.addr;
    let locals = run_threads(n, 4, move |i| write_and_close_first(addr, i));
    server.wait_served();
    let want: HashSet<_> = locals.iter().map(|l| (*l, addr)).collect();
    wait_kernel_lists(addr, false, &want);

    let clients = agent.wait_for_exactly(is_client_of(addr), n, EVENT_TIMEOUT, SETTLE);
    let not_marked: Vec<&Value> = clients.iter().filter(|e| e["time_wait"] != true).collect();
    assert!(
        not_marked.is_empty(),
        "{} of {n} client ends closed first but are not marked time_wait: {not_marked:?}",
        not_marked.len()
    );
    wait_group_is(agent, &addr.ip().to_string(), addr.port(), n);
    wait_delta(agent, &before, ENTERED, &[], n as f64, EVENT_TIMEOUT);
    assert_gauge_matches_kernel(agent, &format!("after {n} client-first closes on {bind}"));
}

/// 400 IPv4 connections: the agent counts all 400 (the kernel lists 400), not only those born
/// in the TIME_WAIT substate.
#[test]
fn client_closing_first_against_a_server_that_closes_on_eof_is_counted_exactly_ipv4() {
    client_closes_first_against_a_close_on_eof_server("127.0.0.1:0", 400);
}

#[test]
fn client_closing_first_against_a_server_that_closes_on_eof_is_counted_exactly_ipv6() {
    client_closes_first_against_a_close_on_eof_server("[::1]:0", 300);
}

/// The server closes first: its ends hold TIME_WAIT, grouped under its own port.
#[test]
fn server_closing_first_is_counted_exactly() {
    require_tools();
    exact_unless_kernel_blind(server_closing_first_once);
}

fn server_closing_first_once(attempt: &mut Attempt) {
    const N: usize = 300;
    let agent = attempt.start_agent(&["--time-wait-top-peers", TOP_PEERS]);
    let mut server = ThreadedServer::start("127.0.0.1:0", ServerEnd::CloseFirst, N);
    let addr = server.addr;
    let locals = run_threads(N, 3, move |_| wait_for_the_server_to_close(addr));
    server.wait_served();
    let want: HashSet<_> = locals.iter().map(|l| (addr, *l)).collect();
    wait_kernel_lists(addr, true, &want);

    let ends = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert!(ends.iter().all(|e| e["time_wait"] == true), "{ends:?}");
    wait_group_is(agent, "127.0.0.1", addr.port(), N);
    assert_gauge_matches_kernel(agent, "after 300 server-first closes");
}

/// Sets TCP_LINGER2: how long this socket may wait in FIN_WAIT2 once closed.
/// Waits (bounded by `timeout`) for the `time_wait_ended` events of the clients at `locals`
/// toward `server` (on 127.0.0.1): exactly those ports, each `expired`. Returns the events.
fn wait_expired(
    agent: &Agent,
    server: SocketAddr,
    locals: &[SocketAddr],
    timeout: Duration,
) -> Vec<Value> {
    let ended = agent.wait_for_events(
        |e| {
            e["event"] == "time_wait_ended"
                && e["daddr"] == "127.0.0.1"
                && e["dport"] == server.port()
        },
        locals.len(),
        timeout,
    );
    assert_eq!(ended.len(), locals.len());
    assert_eq!(
        sports(&ended),
        locals.iter().map(SocketAddr::port).collect()
    );
    for ev in &ended {
        assert_eq!(ev_str(ev, "exit"), "expired", "{ev}");
    }
    ended
}

/// Sends a request to `server` and closes with TCP_LINGER2 `linger2_secs`: against a server
/// that never closes, an orphaned FIN_WAIT2 timewait socket that lives that long.
fn orphan_in_fin_wait2(server: SocketAddr, linger2_secs: i32) -> Result<SocketAddr, String> {
    let mut stream = connect(server)?;
    set_linger2(&stream, linger2_secs);
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream.write_all(REQUEST).map_err(|e| e.to_string())?;
    Ok(local)
}

fn set_linger2(stream: &TcpStream, secs: i32) {
    let fd = stream.as_fd().try_clone_to_owned().expect("dup");
    set_int_opt(&fd, libc::IPPROTO_TCP, libc::TCP_LINGER2, secs);
}

/// A peer that reads our FIN but never sends its own: each closed socket waits as a timewait
/// socket in the FIN_WAIT2 substate (`ss` shows FIN-WAIT-2 with a timewait timer), holding its
/// port; it is counted while it waits, and reported as it leaves.
#[test]
fn half_close_without_the_peers_fin_counts_until_the_fin_wait2_timeout() {
    require_tools();
    exact_unless_kernel_blind(half_close_once);
}

fn half_close_once(attempt: &mut Attempt) {
    const N: usize = 40;
    let agent = attempt.start_agent(&["--time-wait-top-peers", TOP_PEERS]);
    let before = agent.scrape();
    let mut server = ThreadedServer::start("127.0.0.1:0", ServerEnd::HoldAfterEof, N);
    let addr = server.addr;
    let closed_at = Instant::now();
    let locals = run_threads(N, 2, move |_| orphan_in_fin_wait2(addr, LINGER2_SECS));
    server.wait_served();
    let want: HashSet<_> = locals.iter().map(|l| (*l, addr)).collect();
    wait_kernel_lists(addr, false, &want);
    let in_time_wait = ss_state_in(None, "time-wait", &[])
        .unwrap()
        .into_iter()
        .filter(|(_, p)| *p == addr.to_string())
        .count();
    assert_eq!(
        in_time_wait, 0,
        "the peer never sent its FIN: none is in TIME_WAIT proper"
    );

    wait_group_is(agent, "127.0.0.1", addr.port(), N);
    assert_gauge_matches_kernel(agent, "with 40 orphaned FIN_WAIT2 sockets");

    // They leave when TCP_LINGER2 runs out, still in FIN_WAIT2.
    let timeout = Duration::from_secs(LINGER2_SECS as u64) + EXIT_TIMEOUT;
    let ended = wait_expired(
        agent,
        addr,
        &locals,
        timeout.saturating_sub(closed_at.elapsed()),
    );
    for ev in &ended {
        assert_eq!(ev_str(ev, "substate"), "FIN_WAIT2", "{ev}");
        let waited = ev_u64(ev, "time_wait_us");
        assert!(
            waited >= (LINGER2_SECS as u64 - 1) * 1_000_000,
            "left after {waited} us, TCP_LINGER2 is {LINGER2_SECS} s: {ev}"
        );
    }
    let after = agent.scrape();
    let fin_wait2 = delta(&before, &after, FIN_WAIT2_EXITS, &[]);
    assert!(
        fin_wait2 >= N as f64,
        "{FIN_WAIT2_EXITS} grew by {fin_wait2}"
    );
    assert_gauge_matches_kernel(agent, "after the FIN_WAIT2 timeout");
    assert_eq!(server.release(), N);
}

/// Heavy churn in three threads at once: clients closing first (ephemeral ports), and clients
/// reconnecting from a small pool of fixed ports to a server that closes first, so that each
/// new SYN takes over the server's TIME_WAIT socket on that 4-tuple. Each takeover is reported
/// as `reused`, exactly as many as the test made, and the gauge stays the kernel's.
#[test]
fn churn_with_reuse_keeps_the_gauge_exact() {
    require_tools();
    exact_unless_kernel_blind(churn_with_reuse_once);
}

fn churn_with_reuse_once(attempt: &mut Attempt) {
    const POOL: usize = 10;
    const PER_POOL_PORT: usize = 25;
    const POOLED: usize = 2 * POOL * PER_POOL_PORT;
    const FREE: usize = 500;
    let agent = attempt.start_agent(&["--time-wait-top-peers", TOP_PEERS]);
    let before = agent.scrape();
    let mut closes_first = ThreadedServer::start("127.0.0.1:0", ServerEnd::CloseFirst, POOLED);
    let mut on_eof = ThreadedServer::start("127.0.0.1:0", ServerEnd::CloseOnEof, FREE);
    let (a, b) = (closes_first.addr, on_eof.addr);

    // Ports below ip_local_port_range: no connect() elsewhere takes them meanwhile.
    let (low, _) = port_range();
    let base = low.saturating_sub(20_000).max(1024) + (std::process::id() % 5_000) as u16;
    let pool: Vec<SocketAddr> = (0..2 * POOL)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i as u16)))
        .collect();
    let pooled = {
        let pool = pool.clone();
        thread::spawn(move || {
            run_threads(POOLED, 2, move |i| {
                let local = pool[i % pool.len()];
                close_after_fin(connect_from_when_free(local, a)?)?;
                Ok(local)
            })
        })
    };
    let free = run_threads(FREE, 1, move |i| write_and_close_first(b, i));
    let pooled = pooled.join().expect("pooled clients");
    closes_first.wait_served();
    on_eof.wait_served();
    assert_eq!(pooled.len(), POOLED);

    let want_a: HashSet<_> = pool.iter().map(|l| (a, *l)).collect();
    wait_kernel_lists(a, true, &want_a);
    let want_b: HashSet<_> = free.iter().map(|l| (*l, b)).collect();
    wait_kernel_lists(b, false, &want_b);

    // Every connection from a pooled port but the first took over a TIME_WAIT socket.
    let reused = POOLED - pool.len();
    let at_a = |e: &Value| {
        e["event"] == "time_wait_ended" && e["saddr"] == "127.0.0.1" && e["sport"] == a.port()
    };
    let ended = agent.wait_for_exactly(at_a, reused, EXIT_TIMEOUT, SETTLE + SETTLE);
    let not_reused: Vec<&Value> = ended.iter().filter(|e| e["exit"] != "reused").collect();
    assert!(not_reused.is_empty(), "{not_reused:?}");
    let after = agent.scrape();
    let d = delta(&before, &after, EXITED, &[("reason", "reused")]);
    assert!(
        d >= reused as f64,
        "{EXITED}{{reason=reused}} grew by {d}, the test reused {reused}"
    );

    wait_group_is(agent, "127.0.0.1", a.port(), pool.len());
    wait_group_is(agent, "127.0.0.1", b.port(), FREE);
    assert_gauge_matches_kernel(agent, "after churn with reuse");
}

/// `connect_from`, waiting (bounded) while the previous connection from `local` is still
/// closing on this side (LAST_ACK holds the 4-tuple for a moment).
fn connect_from_when_free(local: SocketAddr, server: SocketAddr) -> Result<TcpStream, String> {
    let mut last = String::new();
    for _ in 0..200 {
        match connect_from(local, server) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = e.to_string();
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("{local} stayed busy: {last}"))
}

/// Timewait sockets that were there before the agent started leave while new ones are born.
/// The kernel hands a freed timewait socket's memory to the next one at once, and the agent
/// reads exits once a second, after those births: each old socket must still be found (by its
/// 4-tuple, its address unknown until its exit), reported as expired, and the gauge must stay
/// the kernel's. A CI run found this when earlier tests' sockets expired during this file.
///
/// The gauge is compared after the agent's next audit: on this test's kernels, a softirq run
/// now and then goes without the agent's programs (every one of them, with no skipped run
/// counted) while ftrace sees its events, and here the new sockets are born in the softirq of
/// the server's delayed-ACK timer. The audit (a sock_diag dump) puts such losses right.
#[test]
fn sockets_from_before_start_leave_while_new_ones_take_their_memory() {
    require_tools();
    exact_unless_kernel_blind(sockets_from_before_start_once);
}

fn sockets_from_before_start_once(attempt: &mut Attempt) {
    const OLD: usize = 150;
    const NEW: usize = 240;
    const THREADS: usize = 3;
    const OLD_LINGER2_SECS: i32 = 6;
    // The new sockets must outlive the two audits waited for below (up to about 22 s after the
    // old ones expire, 11 s apart once the agent's refresh ticks are added) and the group's
    // check after them: with 20 s, a CI run whose agent started late saw them begin to expire
    // before the check. The kernel keeps a FIN_WAIT2 timewait socket this long up to 60 s.
    const NEW_LINGER2_SECS: i32 = 50;
    let mut old_server = ThreadedServer::start("127.0.0.1:0", ServerEnd::HoldAfterEof, OLD);
    let old_addr = old_server.addr;
    let old_locals = run_threads(OLD, THREADS, move |_| {
        orphan_in_fin_wait2(old_addr, OLD_LINGER2_SECS)
    });
    let old_expiry = Instant::now() + Duration::from_secs(OLD_LINGER2_SECS as u64);
    old_server.wait_served();
    let want: HashSet<_> = old_locals.iter().map(|l| (*l, old_addr)).collect();
    wait_kernel_lists(old_addr, false, &want);

    let agent = attempt.start_agent(&["--time-wait-top-peers", TOP_PEERS]);
    assert!(
        Instant::now() + Duration::from_secs(2) < old_expiry,
        "the agent took too long to start: the sockets from before its start would leave \
         before it could see them"
    );
    wait_group_is(agent, "127.0.0.1", old_addr.port(), OLD);

    // New timewait sockets born all through the old ones' expiry, from a second before it to
    // two seconds after (bounded: NEW connections).
    let mut new_server = ThreadedServer::start("127.0.0.1:0", ServerEnd::HoldAfterEof, NEW);
    let new_addr = new_server.addr;
    thread::sleep(old_expiry.saturating_duration_since(Instant::now() + Duration::from_secs(1)));
    let pause = Duration::from_millis(3_000 * THREADS as u64 / NEW as u64);
    let new_locals = run_threads(NEW, THREADS, move |_| {
        thread::sleep(pause);
        orphan_in_fin_wait2(new_addr, NEW_LINGER2_SECS)
    });
    new_server.wait_served();

    wait_expired(
        agent,
        old_addr,
        &old_locals,
        old_expiry.saturating_duration_since(Instant::now()) + EXIT_TIMEOUT,
    );
    let want: HashSet<_> = new_locals.iter().map(|l| (*l, new_addr)).collect();
    wait_kernel_lists(new_addr, false, &want);
    // Two audits: the first may have dumped before the last of the traffic.
    wait_for_audits(agent, &agent.scrape(), 2);
    wait_group_is(agent, "127.0.0.1", new_addr.port(), NEW);
    assert_gauge_matches_kernel(agent, "after the sockets from before the start left");
    assert_eq!(old_server.release(), OLD);
    assert_eq!(new_server.release(), NEW);
}
