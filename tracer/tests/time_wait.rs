//! Exact TIME_WAIT accounting, compared with the kernel's own view (`ss` in every network
//! namespace): the live gauge, entries, early exits under their reason (a namespace teardown
//! kills, a SYN taking over the 4-tuple reuses), sockets already in TIME_WAIT when the agent
//! starts, the per-peer breakdown with its port-exhaustion ratio and warning, and the sysctls.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

mod support_time_wait;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_time_wait::*;

/// Which end of a connection closes first.
#[derive(Clone, Copy, Debug)]
enum First {
    Server,
    Client,
}

/// A server on 127.0.0.1 that handles connections one after the other, each as its `plan`
/// entry says (echo the request, then close first or wait for the client to close), and
/// listens until the last one is done.
struct PlanServer {
    addr: SocketAddr,
    handle: thread::JoinHandle<Result<(), String>>,
}

impl PlanServer {
    fn start(plan: Vec<First>) -> PlanServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let handle = thread::Builder::new()
            .name("tw-plan-server".into())
            .spawn(move || -> Result<(), String> {
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                for (i, first) in plan.into_iter().enumerate() {
                    let deadline = Instant::now() + IO_TIMEOUT;
                    let mut stream = loop {
                        match listener.accept() {
                            Ok((s, _)) => break s,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if Instant::now() >= deadline {
                                    return Err(format!("connection {i} never came"));
                                }
                                thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => return Err(format!("accept: {e}")),
                        }
                    };
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .map_err(|e| e.to_string())?;
                    let mut buf = vec![0u8; REQUEST.len()];
                    stream
                        .read_exact(&mut buf)
                        .map_err(|e| format!("server read {i}: {e}"))?;
                    stream
                        .write_all(&buf)
                        .map_err(|e| format!("server write {i}: {e}"))?;
                    if let First::Client = first {
                        let mut rest = [0u8; 64];
                        match stream.read(&mut rest) {
                            Ok(0) => {}
                            Ok(n) => return Err(format!("client {i} sent {n} more bytes")),
                            Err(e) => return Err(format!("server wait for close {i}: {e}")),
                        }
                    }
                    drop(stream);
                }
                drop(listener);
                Ok(())
            })
            .expect("spawn server");
        PlanServer { addr, handle }
    }

    fn join(self) {
        let deadline = Instant::now() + IO_TIMEOUT + Duration::from_secs(10);
        while !self.handle.is_finished() {
            assert!(Instant::now() < deadline, "the test server did not finish");
            thread::sleep(Duration::from_millis(10));
        }
        match self.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("test server on {}: {e}", self.addr),
            Err(_) => panic!("test server on {} panicked", self.addr),
        }
    }
}

/// Connections whose server end (inside `ns`) closes first, so that `ns` holds their
/// TIME_WAIT; returns the server address and the clients' addresses once the kernel lists
/// them all in TIME_WAIT inside `ns`.
fn time_wait_in_namespace(ns: &Netns, n: usize) -> (SocketAddr, Vec<SocketAddr>) {
    let server = Server::start_in(
        ns,
        SocketAddr::new(ns.ns_ip.into(), 0),
        ServerMode::EchoThenClose,
        n,
    );
    let addr = server.addr;
    let (locals, _) = run_clients(addr, ClientMode::WaitServerClose, n, "tracer-tw-client");
    server.join();
    wait_kernel_time_wait(Some(ns), addr, &locals, true);
    (addr, locals)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The client end of a connection it closed first waits in TIME_WAIT, the server end does not:
/// the events say so, the entries are counted, and the live gauge is the kernel's count.
#[test]
fn client_closing_first_enters_time_wait_and_the_gauge_equals_ss() {
    require_tools();
    const N: usize = 200;
    let mut agent = start_agent(&[]);
    let before = agent.scrape();

    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        N,
    );
    let addr = server.addr;
    let (locals, _) = run_clients(addr, ClientMode::CloseFirst, N, "tracer-tw-client");
    server.join();
    wait_kernel_time_wait(None, addr, &locals, false);

    let clients = agent.wait_for_exactly(is_client_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(sports(&clients), ports_of(&locals));
    for ev in &clients {
        assert_eq!(ev_str(ev, "direction"), "active", "{ev}");
        assert_eq!(
            ev["time_wait"], true,
            "the client closed first: its socket went into TIME_WAIT: {ev}"
        );
    }
    let servers = agent.wait_for_exactly(is_server_of(addr), N, EVENT_TIMEOUT, SETTLE);
    assert_eq!(dports(&servers), ports_of(&locals));
    for ev in &servers {
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(
            ev["time_wait"], false,
            "the server closed last (LAST_ACK): no TIME_WAIT: {ev}"
        );
    }

    wait_delta(&agent, &before, ENTERED, &[], N as f64, EVENT_TIMEOUT);
    let (snap, _) = assert_gauge_matches_ss(&agent, "after 200 client-closed connections");
    assert!(
        total(&snap) >= N,
        "the kernel lists {} TIME_WAIT sockets, the test made {N}",
        total(&snap)
    );
    agent.stop();
}

/// Deleting a network namespace purges its TIME_WAIT sockets: each exit is counted as killed
/// and reported with its 4-tuple, and the gauge comes back to the kernel's count.
#[test]
fn namespace_teardown_kills_its_time_wait_sockets() {
    require_tools();
    const N: usize = 20;
    let ns = Netns::create();
    let inode = ns.inode();
    let mut agent = start_agent(&[]);

    let (addr, locals) = time_wait_in_namespace(&ns, N);
    assert_gauge_matches_ss(&agent, "with the namespace's sockets in TIME_WAIT");
    let before = agent.scrape();

    drop(ns);
    let ended = agent.wait_for_exactly(ended_at(inode, addr), N, EXIT_TIMEOUT, SETTLE);
    assert_eq!(dports(&ended), ports_of(&locals));
    let pid = u64::from(std::process::id());
    for ev in &ended {
        assert_eq!(ev_str(ev, "exit"), "killed", "{ev}");
        assert_eq!(ev["seeded"], false, "{ev}");
        assert_eq!(ev_str(ev, "family"), "ipv4", "{ev}");
        assert_eq!(ev_str(ev, "daddr"), addr_ip_of(&locals), "{ev}");
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
        assert_eq!(ev_u64(ev, "pid"), pid, "{ev}");
        ev_u64(ev, "time_wait_us");
    }
    wait_delta(
        &agent,
        &before,
        EXITED,
        &[("reason", "killed")],
        N as f64,
        EXIT_TIMEOUT,
    );
    assert_gauge_matches_ss(&agent, "after the namespace was deleted");
    agent.stop();
}

/// A first connection to `server` whose server end closes first and waits in TIME_WAIT;
/// returns the client's address. The client binds a port outside ip_local_port_range: no
/// connect() elsewhere on the host can take it before the test reconnects from it.
fn server_time_wait(server: &PlanServer) -> SocketAddr {
    let (low, _) = port_range();
    let base = low.saturating_sub(12_000).max(1024);
    let span = low.saturating_sub(base).max(1);
    let seed = std::process::id() % u32::from(span);
    for i in 0..200u32 {
        let offset = u16::try_from((seed + i * 97) % u32::from(span)).expect("port offset");
        let local = SocketAddr::from(([127, 0, 0, 1], base + offset));
        match connect_from(local, server.addr) {
            Ok(stream) => {
                close_after_fin(stream).unwrap();
                wait_kernel_time_wait(None, server.addr, &[local], true);
                return local;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("first connection to {}: {e}", server.addr),
        }
    }
    panic!("no free client port in {base}..{low} after 200 tries");
}

/// Segments the kernel retransmitted on `stream` (`tcpi_total_retrans`, SYNs included).
fn total_retrans(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is a plain C struct of integers, for which all zero bytes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).expect("len");
    // SAFETY: the fd is a live socket owned by `stream`; `info` is writable for `len` bytes and
    // `len` is a valid, writable socklen_t; both outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    assert!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// Reconnects from `first` while the server's end of the previous connection on that 4-tuple
/// is in TIME_WAIT. The kernel hands the 4-tuple over to the new connection when the SYN is
/// newer than what the TIME_WAIT socket saw (higher sequence number, newer timestamp); it
/// would otherwise answer with an ACK, the client would reset, and its SYN would go again a
/// second later. The kernel retransmitting nothing shows the SYN was taken at once.
fn reconnect_over_time_wait(first: SocketAddr, server: SocketAddr) -> TcpStream {
    let stream = connect_from(first, server).unwrap_or_else(|e| {
        panic!("reconnecting from {first} over the server's TIME_WAIT socket: {e}")
    });
    assert_eq!(
        total_retrans(&stream),
        0,
        "the SYN from {first} was not taken over by the TIME_WAIT socket at once"
    );
    stream
}

/// The ends of the server's stays in TIME_WAIT toward `first`: waits (bounded) for `count`
/// of them; on failure shows everything the agent said about the 4-tuple.
fn wait_ended(agent: &Agent, server: SocketAddr, first: SocketAddr, count: usize) -> Vec<Value> {
    let is_ended =
        |e: &Value| ended_at(host_netns_inode(), server)(e) && e["dport"] == first.port();
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let ended = agent.events(is_ended);
        if ended.len() >= count {
            for ev in &ended {
                assert_eq!(ev_str(ev, "daddr"), "127.0.0.1", "{ev}");
                assert_eq!(ev["seeded"], false, "{ev}");
            }
            return ended;
        }
        if Instant::now() >= deadline {
            let (s, c) = (server.port(), first.port());
            let about: Vec<String> = agent
                .events(|e| {
                    (e["sport"] == s && e["dport"] == c) || (e["sport"] == c && e["dport"] == s)
                })
                .iter()
                .map(Value::to_string)
                .collect();
            let text = agent.scrape();
            panic!(
                "expected {count} time_wait_ended for {server} <-> {first} within \
                 {EXIT_TIMEOUT:?}, got {}; tracer_events_lost_total {}, {EXITED} {:?}; every \
                 event about the 4-tuple:\n{}",
                ended.len(),
                metric_value(&text, LOST, &[]),
                ["expired", "reused", "killed"].map(|r| metric_value(
                    &text,
                    EXITED,
                    &[("reason", r)]
                )),
                about.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A SYN from the same client port takes over the server's TIME_WAIT 4-tuple: the exit is
/// counted as reused and reported with that 4-tuple. The new connection stays open until the
/// agent reported the exit.
#[test]
fn syn_taking_over_a_time_wait_4_tuple_is_reused() {
    require_tools();
    let mut agent = start_agent(&[]);
    let server = PlanServer::start(vec![First::Server, First::Client]);
    let addr = server.addr;
    let first = server_time_wait(&server);
    let before = agent.scrape();

    let stream = reconnect_over_time_wait(first, addr);
    let ev = wait_ended(&agent, addr, first, 1).remove(0);
    let after = agent.scrape();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    drop(stream);
    server.join();

    assert_eq!(ev_str(&ev, "direction"), "passive", "{ev}");
    assert_eq!(
        ev_str(&ev, "exit"),
        "reused",
        "the SYN from {first} took over the TIME_WAIT socket {addr} <-> {first}; host-wide \
         counters meanwhile: reused +{}, killed +{}, events lost +{}: {ev}",
        delta(&before, &after, EXITED, &[("reason", "reused")]),
        delta(&before, &after, EXITED, &[("reason", "killed")]),
        delta(&before, &after, LOST, &[]),
    );
    wait_delta(
        &agent,
        &before,
        EXITED,
        &[("reason", "reused")],
        1.0,
        EXIT_TIMEOUT,
    );
    agent.stop();
}

/// A client that always connects from the same port to a server that closes first: each
/// connection takes over the TIME_WAIT socket the previous one left, and each stay in
/// TIME_WAIT is its own, ended as reused by the next connection.
#[test]
fn each_stay_on_a_reused_4_tuple_is_reported() {
    require_tools();
    let mut agent = start_agent(&[]);
    let server = PlanServer::start(vec![First::Server, First::Server, First::Client]);
    let addr = server.addr;
    let first = server_time_wait(&server);

    // The second connection is short: the server closes it first at once, so its end is in
    // TIME_WAIT again on the same 4-tuple.
    close_after_fin(reconnect_over_time_wait(first, addr)).unwrap();
    wait_kernel_time_wait(None, addr, &[first], true);
    // The third one takes that over too, and stays open until the agent reported both.
    let third = reconnect_over_time_wait(first, addr);

    let ended = wait_ended(&agent, addr, first, 2);
    let _ = third.shutdown(std::net::Shutdown::Write);
    drop(third);
    server.join();
    let all = ended
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for ev in &ended {
        assert_eq!(
            ev_str(ev, "exit"),
            "reused",
            "each stay was ended by the next connection's SYN:\n{all}"
        );
        assert_eq!(ev_str(ev, "direction"), "passive", "{ev}");
    }
    assert_eq!(ended.len(), 2, "two stays in TIME_WAIT:\n{all}");
    // The server ends of the first two connections went on into TIME_WAIT (ss listed each).
    let server_ends = agent.wait_for_events(
        |e| is_server_of(addr)(e) && e["dport"] == first.port(),
        2,
        EVENT_TIMEOUT,
    );
    // In order: the first two are the connections the server closed first; the third one
    // (closed by the client, so no TIME_WAIT here) may already be there too.
    for ev in server_ends.iter().take(2) {
        assert_eq!(ev["time_wait"], true, "{ev}");
    }
    agent.stop();
}

/// Sockets already in TIME_WAIT when the agent starts are counted at once and, when they
/// leave, reported as seeded.
#[test]
fn time_wait_sockets_present_at_start_are_seeded() {
    require_tools();
    const N: usize = 100;
    let ns = Netns::create();
    let inode = ns.inode();
    let mut first = start_agent(&[]);
    let before = first.scrape();
    let (addr, locals) = time_wait_in_namespace(&ns, N);
    wait_delta(&first, &before, ENTERED, &[], N as f64, EVENT_TIMEOUT);
    first.stop();

    let mut agent = start_agent(&[]);
    assert_gauge_matches_ss(&agent, "right after start");
    let before = agent.scrape();

    drop(ns);
    let ended = agent.wait_for_exactly(ended_at(inode, addr), N, EXIT_TIMEOUT, SETTLE);
    assert_eq!(dports(&ended), ports_of(&locals));
    for ev in &ended {
        assert_eq!(
            ev["seeded"], true,
            "in TIME_WAIT before the agent started: {ev}"
        );
        assert_eq!(ev_str(ev, "exit"), "killed", "{ev}");
    }
    wait_delta(
        &agent,
        &before,
        EXITED,
        &[("reason", "killed")],
        N as f64,
        EXIT_TIMEOUT,
    );
    assert_gauge_matches_ss(&agent, "after the namespace was deleted");
    agent.stop();
}

/// Many client-closed connections toward one server port: that peer shows in the per-peer
/// breakdown with the kernel's count, its port-exhaustion ratio is that count over the
/// ephemeral range, and the warning is logged. With the default N the breakdown stays within
/// N series plus "other".
#[test]
fn a_busy_peer_shows_in_the_breakdown_and_raises_the_port_exhaustion_ratio() {
    require_tools();
    // Other tests on this host may leave bigger TIME_WAIT groups than this one: the agent that
    // checks the values shows (up to) 1000 groups; a second one keeps the default top 5.
    const TOP: usize = 1000;
    const DEFAULT_TOP: usize = 5;
    let n = enough_to_rank(TOP, 100);
    let range = port_range();
    let range_size = f64::from(range.1 - range.0) + 1.0;
    let top = TOP.to_string();
    let mut agent = start_agent(&[
        "--port-exhaustion-warning",
        "0.001",
        "--time-wait-top-peers",
        &top,
    ]);
    let mut default_agent = start_agent(&[]);

    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        n,
    );
    let addr = server.addr;
    let (locals, _) = run_clients(addr, ClientMode::CloseFirst, n, "tracer-tw-client");
    server.join();
    wait_kernel_time_wait(None, addr, &locals, false);

    let port = addr.port().to_string();
    let labels = [("peer", "127.0.0.1"), ("port", port.as_str())];
    let filter = format!("( dst 127.0.0.1 and dport = :{port} )");
    let (held, text) = agrees_with_kernel(
        &agent,
        &format!("{BY_PEER}{labels:?}"),
        || ss_time_wait(None, &[filter.as_str()]).map(|s| s.len()),
        |a, b| a == b,
        |c| *c as f64,
        |c| format!("{c} sockets toward {addr}"),
        |text| series_value(text, BY_PEER, &labels),
    );
    assert!(
        held >= n,
        "ss lists {held} toward {addr}, the test made {n}"
    );

    let ports = sample(&text, EPHEMERAL, &[]);
    assert_eq!(ports, range_size, "{EPHEMERAL}");
    let ratio = sample(&text, RATIO, &labels);
    let want = held as f64 / ports;
    assert!(
        (ratio - want).abs() < 1e-9,
        "{RATIO}{labels:?} is {ratio}, expected {held} / {ports} = {want}"
    );

    let series = matching_samples(&text, BY_PEER, &[]);
    assert!(
        series.len() <= TOP + 1,
        "{} series of {BY_PEER} for top {TOP} + other:\n{text}",
        series.len()
    );
    assert_eq!(
        matching_samples(&text, BY_PEER, &[("peer", "other"), ("port", "")]).len(),
        1,
        "the rest under peer=\"other\":\n{text}"
    );
    assert!(matching_samples(&text, RATIO, &[]).len() <= TOP, "{text}");

    let warning = format!("toward 127.0.0.1:{port}");
    wait_until("the port-exhaustion warning", EVENT_TIMEOUT, || {
        let stderr = agent.stderr_text();
        if stderr
            .lines()
            .any(|l| l.contains("ephemeral port exhaustion risk") && l.contains(&warning))
        {
            Ok(())
        } else {
            Err(format!("stderr:\n{stderr}"))
        }
    });
    agent.stop();

    // The default breakdown: at most 5 peers and "other", whatever else holds TIME_WAIT.
    let text = wait_until("the default agent's breakdown", EVENT_TIMEOUT, || {
        let text = default_agent.scrape();
        let other = matching_samples(&text, BY_PEER, &[("peer", "other"), ("port", "")]);
        if other.len() == 1 {
            Ok(text)
        } else {
            Err(format!("no {BY_PEER}{{peer=\"other\"}} yet:\n{text}"))
        }
    });
    let series = matching_samples(&text, BY_PEER, &[]);
    assert!(
        !series.is_empty() && series.len() <= DEFAULT_TOP + 1,
        "{} series of {BY_PEER} for the default top {DEFAULT_TOP} + other:\n{text}",
        series.len()
    );
    assert!(
        matching_samples(&text, RATIO, &[]).len() <= DEFAULT_TOP,
        "{RATIO} for more than the top {DEFAULT_TOP}:\n{text}"
    );
    default_agent.stop();
}

/// IPv6 sockets in TIME_WAIT are counted like IPv4 ones.
#[test]
fn ipv6_time_wait_is_counted() {
    require_tools();
    // A few connections: enough to rank among the 1000 groups the agent shows, whatever
    // earlier tests left in TIME_WAIT (5 on a quiet host).
    let n = enough_to_rank(1000, 5);
    let mut agent = start_agent(&["--time-wait-top-peers", "1000"]);
    let server = Server::start(
        "[::1]:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        n,
    );
    let addr = server.addr;
    let (locals, _) = run_clients(addr, ClientMode::CloseFirst, n, "tracer-tw-client6");
    server.join();
    wait_kernel_time_wait(None, addr, &locals, false);

    let clients = agent.wait_for_exactly(is_client_of(addr), n, EVENT_TIMEOUT, SETTLE);
    for ev in &clients {
        assert_eq!(ev_str(ev, "family"), "ipv6", "{ev}");
        assert_eq!(ev["time_wait"], true, "{ev}");
    }
    assert_gauge_matches_ss(&agent, "with IPv6 sockets in TIME_WAIT");

    let port = addr.port().to_string();
    let labels = [("peer", "::1"), ("port", port.as_str())];
    let filter = format!("( dst [::1] and dport = :{port} )");
    let (held, _) = agrees_with_kernel(
        &agent,
        &format!("{BY_PEER}{labels:?}"),
        || ss_time_wait(None, &[filter.as_str()]).map(|s| s.len()),
        |a, b| a == b,
        |c| *c as f64,
        |c| format!("{c} sockets toward {addr}"),
        |text| series_value(text, BY_PEER, &labels),
    );
    assert_eq!(held, n, "ss lists {held} toward {addr}");
    agent.stop();
}

/// The sysctls that govern TIME_WAIT are exposed with the kernel's values.
#[test]
fn settings_are_the_kernels() {
    require_root();
    let reuse = sysctl("tcp_tw_reuse");
    let buckets = sysctl("tcp_max_tw_buckets");
    let (low, high) = port_range();
    let range = format!("{low}-{high}");
    let mut agent = start_agent(&[]);
    let text = agent.scrape();
    let info = matching_samples(&text, SETTINGS, &[]);
    assert_eq!(info.len(), 1, "{text}");
    let mut labels = info[0].labels.clone();
    labels.sort();
    let mut want = vec![
        ("ip_local_port_range".to_string(), range),
        ("tcp_max_tw_buckets".to_string(), buckets.clone()),
        ("tcp_tw_reuse".to_string(), reuse),
    ];
    want.sort();
    assert_eq!(labels, want, "{SETTINGS}");
    assert_eq!(info[0].value, 1.0, "{SETTINGS}");
    assert_eq!(
        sample(&text, EPHEMERAL, &[]),
        f64::from(high - low) + 1.0,
        "{EPHEMERAL}"
    );
    assert_eq!(
        sample(&text, MAX_BUCKETS, &[]),
        buckets.parse::<f64>().unwrap(),
        "{MAX_BUCKETS}"
    );
    agent.stop();
}
