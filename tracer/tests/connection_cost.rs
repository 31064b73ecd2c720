//! What a connection cost, against the kernel's own view of the same socket: a client reads
//! `TCP_INFO` just before it aborts (so nothing changes in between) and the agent's
//! `connection_closed` event must carry the same RTTs, bytes, window and rwnd-limited time; a
//! receiver that stops reading makes its sender window-limited (in the event and the metric);
//! an abort and a refused connect show their reset reasons.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_cost;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_cost::{diagnose_during, finding};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(1);

/// The socket's `TCP_INFO`, as the application sees it.
fn tcp_info(stream: &TcpStream) -> libc::tcp_info {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).unwrap();
    // SAFETY: the fd is a live socket owned by `stream`; `info` is writable for `len` bytes
    // and `len` is passed by pointer as the call expects.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast::<libc::c_void>(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}

/// Waits (bounded) until everything the client wrote is acknowledged.
fn wait_all_acked(stream: &TcpStream) -> libc::tcp_info {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = tcp_info(stream);
        if info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0 {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "data still unacknowledged: unacked {} notsent {} snd_wnd {}",
            info.tcpi_unacked,
            info.tcpi_notsent_bytes,
            info.tcpi_snd_wnd
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn is_from(local: SocketAddr) -> impl Fn(&Value) -> bool + Clone {
    move |e: &Value| {
        e["event"] == "connection_closed"
            && e["sport"].as_u64() == Some(u64::from(local.port()))
            && e["saddr"].as_str() == Some(&local.ip().to_string())
    }
}

/// The event's field as a number, failing when it is missing or null.
fn num(ev: &Value, key: &str) -> u64 {
    ev[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or null in {ev}"))
}

/// Compares what the event says with what `TCP_INFO` said just before the abort.
fn assert_matches_tcp_info(ev: &Value, info: &libc::tcp_info) {
    assert_eq!(num(ev, "srtt_us"), u64::from(info.tcpi_rtt), "{ev}");
    assert_eq!(num(ev, "rttvar_us"), u64::from(info.tcpi_rttvar), "{ev}");
    assert_eq!(num(ev, "min_rtt_us"), u64::from(info.tcpi_min_rtt), "{ev}");
    assert_eq!(num(ev, "seq_bytes_acked"), info.tcpi_bytes_acked, "{ev}");
    assert_eq!(
        num(ev, "seq_bytes_received"),
        info.tcpi_bytes_received,
        "{ev}"
    );
    assert_eq!(num(ev, "cwnd"), u64::from(info.tcpi_snd_cwnd), "{ev}");
    assert_eq!(
        num(ev, "kernel_retransmits"),
        u64::from(info.tcpi_total_retrans),
        "{ev}"
    );
    assert_eq!(num(ev, "segs_in"), u64::from(info.tcpi_segs_in), "{ev}");
    // The abort's RST is sent after the CLOSE the cost is read at; only a delayed ACK that
    // fired between TCP_INFO and the abort can add one segment.
    let out = num(ev, "segs_out");
    let info_out = u64::from(info.tcpi_segs_out);
    assert!(
        out == info_out || out == info_out + 1,
        "segs_out {out} vs {info_out}: {ev}"
    );
    // The kernel gives this in µs computed from jiffies with its HZ: equal only if the agent
    // measured the same HZ.
    assert_eq!(num(ev, "rwnd_limited_us"), info.tcpi_rwnd_limited, "{ev}");
    assert!(num(ev, "max_cwnd") >= num(ev, "cwnd"), "{ev}");
    assert_eq!(ev["cost_known"], true, "{ev}");
}

/// Round trips of `size` bytes each way, then `TCP_INFO` and an abort (`SO_LINGER 0`): the
/// event's cost equals what the application read.
#[test]
fn cost_at_close_equals_what_tcp_info_said_just_before() {
    require_root();
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const ROUNDS: usize = 20;
    const SIZE: usize = 30_000;
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; SIZE];
        for _ in 0..ROUNDS {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
        // Wait for the client's RST.
        let _ = s.read(&mut buf);
    });
    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let local = client.local_addr().unwrap();
    let mut buf = vec![7u8; SIZE];
    for _ in 0..ROUNDS {
        client.write_all(&buf).unwrap();
        client.read_exact(&mut buf).unwrap();
    }
    let info = wait_all_acked(&client);
    set_linger_zero(&client).unwrap();
    drop(client);
    server.join().unwrap();

    let ev = agent.wait_for_exactly(is_from(local), 1, EVENT_TIMEOUT, SETTLE);
    let ev = &ev[0];
    eprintln!(
        "TCP_INFO rtt {} rttvar {} min_rtt {} acked {} received {} segs {}/{} cwnd {}; event {ev}",
        info.tcpi_rtt,
        info.tcpi_rttvar,
        info.tcpi_min_rtt,
        info.tcpi_bytes_acked,
        info.tcpi_bytes_received,
        info.tcpi_segs_out,
        info.tcpi_segs_in,
        info.tcpi_snd_cwnd
    );
    assert_matches_tcp_info(ev, &info);
    let payload = (ROUNDS * SIZE) as u64;
    // An abort sends no FIN: the payload is the acknowledged sequence space minus the SYN.
    assert_eq!(num(ev, "bytes_sent"), payload, "{ev}");
    assert_eq!(num(ev, "seq_bytes_acked"), payload + 1, "{ev}");
    assert_eq!(num(ev, "bytes_received"), payload, "{ev}");
    assert_eq!(ev_str(ev, "close"), "aborted", "{ev}");
    assert!(num(ev, "srtt_us") > 0 && num(ev, "min_rtt_us") > 0, "{ev}");
    assert!(num(ev, "min_rtt_us") <= num(ev, "srtt_us") * 8, "{ev}");
    agent.stop();
}

/// A sender whose receiver stops reading (for 1.5 s, with a receive buffer far below what is
/// sent): its local address and its `TCP_INFO` once everything is acknowledged, just before
/// it aborts.
fn stalled_sender() -> (SocketAddr, libc::tcp_info) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Accepted sockets inherit it: a window far below what the sender has to send, yet
    // several loopback MSS (64 KiB) wide, so that window updates flow once reading resumes.
    set_rcvbuf(listener.as_raw_fd(), 256 << 10);
    let addr = listener.local_addr().unwrap();
    const TOTAL: usize = 4 << 20;
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Not reading for a while: the client's writes fill the window and stall.
        thread::sleep(Duration::from_millis(1500));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < TOTAL {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("server read: {e}"),
            }
        }
        let _ = s.read(&mut buf);
        got
    });
    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let local = client.local_addr().unwrap();
    let chunk = vec![1u8; 64 << 10];
    for _ in 0..TOTAL / chunk.len() {
        client.write_all(&chunk).unwrap();
    }
    let info = wait_all_acked(&client);
    set_linger_zero(&client).unwrap();
    drop(client);
    assert_eq!(server.join().unwrap(), TOTAL);
    assert!(
        info.tcpi_rwnd_limited > 0,
        "the kernel saw no rwnd-limited time: the test did not stall the sender"
    );
    (local, info)
}

/// A receiver that stops reading: the sender's event shows the rwnd-limited time `TCP_INFO`
/// shows, and the metrics count it.
#[test]
fn a_receiver_that_stops_reading_makes_its_sender_window_limited() {
    require_root();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();
    let (local, info) = stalled_sender();

    let ev = agent.wait_for_exactly(is_from(local), 1, EVENT_TIMEOUT, SETTLE);
    let ev = &ev[0];
    eprintln!(
        "TCP_INFO rwnd_limited {} us; event {ev}",
        info.tcpi_rwnd_limited
    );
    assert_matches_tcp_info(ev, &info);
    let held_us = num(ev, "rwnd_limited_us");
    assert!(held_us <= num(ev, "duration_us"), "{ev}");

    let after = agent.scrape();
    let conns = metric_value(&after, "tracer_connections_rwnd_limited_total", &[])
        - metric_value(&before, "tracer_connections_rwnd_limited_total", &[]);
    let seconds = metric_value(&after, "tracer_connection_rwnd_limited_seconds_total", &[])
        - metric_value(&before, "tracer_connection_rwnd_limited_seconds_total", &[]);
    // Other connections on this host may add to both; this one must be in them.
    assert!(conns >= 1.0, "rwnd-limited connections +{conns}");
    assert!(
        seconds + 1e-9 >= held_us as f64 / 1e6,
        "rwnd-limited seconds +{seconds}, the connection alone {held_us} us"
    );
    agent.stop();
}

/// `tracer diagnose` names the stalled connection, its sender and the time it waited.
#[test]
fn diagnose_names_the_connection_a_slow_reader_stalled() {
    require_root();
    let ((local, info), report) = diagnose_during(12, stalled_sender);
    let f = finding(&report, "zero_window");
    let rows = f["details"]["connections_by_time"]["top"]
        .as_array()
        .expect("connections");
    let row = rows
        .iter()
        .find(|r| r["local"] == local.to_string())
        .unwrap_or_else(|| panic!("{local} not among {f:#}"));
    eprintln!(
        "TCP_INFO rwnd_limited {} us; finding row {row}",
        info.tcpi_rwnd_limited
    );
    assert_eq!(
        row["held_ms"].as_f64(),
        Some(info.tcpi_rwnd_limited as f64 / 1000.0),
        "{row}"
    );
    assert_eq!(row["sender"]["pid"], u64::from(std::process::id()), "{row}");
}

fn set_rcvbuf(fd: std::os::fd::RawFd, bytes: libc::c_int) {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
    // SAFETY: live socket fd; the value points to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_ref(&bytes).cast::<libc::c_void>(),
            len,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// An `SO_LINGER 0` close sends a RST the kernel gives a reason for (`tcp_disconnect`:
/// `SK_RST_REASON_TCP_STATE`), a close with unread data another (`TCP_ABORT_ON_CLOSE`); the
/// peers see the RST. A refused connect is answered by a RST of no socket, which names no
/// connection: the client's event says it received one.
#[test]
fn aborts_and_refusals_show_their_reset_reasons() {
    require_root();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    // 1. The client aborts with SO_LINGER 0.
    let linger = TcpStream::connect(addr).unwrap();
    let linger_local = linger.local_addr().unwrap();
    let (mut peer1, _) = listener.accept().unwrap();
    set_linger_zero(&linger).unwrap();
    drop(linger);
    peer1
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let e = peer1.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    drop(peer1);

    // 2. The server closes with data it never read.
    let mut unread = TcpStream::connect(addr).unwrap();
    let (server2, server2_peer) = listener.accept().unwrap();
    let server2_local = server2.local_addr().unwrap();
    unread.write_all(b"never read").unwrap();
    // Bounded wait until the data sits in the server's receive queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probe = [0u8; 16];
    server2.set_nonblocking(true).unwrap();
    while server2.peek(&mut probe).map_or(true, |n| n < 10) {
        assert!(Instant::now() < deadline, "data never arrived");
        thread::sleep(Duration::from_millis(10));
    }
    drop(server2);
    unread
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let e = unread.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    drop(unread);

    // 3. Nobody listens.
    let closed_port = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    match TcpStream::connect(closed_port) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("expected a refusal, got {other:?}"),
    }

    let ev = &agent.wait_for_exactly(is_from(linger_local), 1, EVENT_TIMEOUT, SETTLE)[0];
    assert_eq!(ev_str(ev, "close"), "aborted", "{ev}");
    assert_eq!(ev_str(ev, "reset_sent_reason"), "tcp_state", "{ev}");
    assert_eq!(ev["reset_received"], false, "{ev}");
    let server2_event = move |e: &Value| {
        is_from(server2_local)(e) && e["dport"].as_u64() == Some(u64::from(server2_peer.port()))
    };
    let ev = &agent.wait_for_exactly(server2_event, 1, EVENT_TIMEOUT, SETTLE)[0];
    assert_eq!(
        ev_str(ev, "reset_sent_reason"),
        "tcp_abort_on_close",
        "{ev}"
    );
    // The peers: each received a RST.
    let peers = agent.events(|e| {
        e["event"] == "connection_closed"
            && e["daddr"] == "127.0.0.1"
            && (e["dport"].as_u64() == Some(u64::from(linger_local.port()))
                || e["sport"].as_u64() == Some(u64::from(server2_peer.port())))
    });
    assert_eq!(peers.len(), 2, "{peers:?}");
    for p in &peers {
        assert_eq!(p["reset_received"], true, "{p}");
        assert_eq!(p["reset_sent_reason"], Value::Null, "{p}");
    }
    let refused = agent.wait_for_events(
        |e| {
            e["event"] == "connection_closed"
                && e["dport"].as_u64() == Some(u64::from(closed_port.port()))
                && e["close"] == "refused"
        },
        1,
        EVENT_TIMEOUT,
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["reset_received"], true, "{}", refused[0]);
    assert_eq!(refused[0]["reset_sent_reason"], Value::Null);

    let after = agent.scrape();
    for reason in ["tcp_state", "tcp_abort_on_close"] {
        let d = metric_value(&after, "tracer_resets_sent_total", &[("reason", reason)])
            - metric_value(&before, "tracer_resets_sent_total", &[("reason", reason)]);
        assert!(d >= 1.0, "tracer_resets_sent_total{{reason={reason}}} +{d}");
    }
    // The refusal's RST answered no socket: counted by its reason, once the agent has read the
    // kernel's counters (each refresh, once a second).
    let no_socket = |page: &str| {
        metric_value_or_zero(
            page,
            "tracer_resets_sent_no_socket_total",
            &[("reason", "no_socket")],
        )
    };
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let grew = loop {
        let d = no_socket(&agent.scrape()) - no_socket(&before);
        if d >= 1.0 || Instant::now() >= deadline {
            break d;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        grew >= 1.0,
        "tracer_resets_sent_no_socket_total{{reason=no_socket}} +{grew}"
    );
    agent.stop();
}
