//! `/metrics` under load: 20 concurrent scrapers while loopback connections churn and two
//! clients hold connections badly (one connects and sends nothing, one sends a header that never
//! ends). Every scrape answers 200, the churn is counted, and the agent cuts both bad clients off
//! (the endless head after its size limit, the silent one after the head timeout).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

const SCRAPERS: usize = 20;
const SCRAPES_EACH: usize = 10;
const CHURN_THREADS: usize = 2;
const CHURN_EACH: usize = 500;
/// What the endless-head client writes at most: more than socket buffers on loopback hold, so
/// that it can only get through if the agent reads it all.
const ENDLESS_MAX: usize = 64 << 20;

/// Reads until the peer closes (or resets); what came. Bounded by the read timeout.
fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("waiting for the agent to close a stalled connection: {e}"),
        }
    }
}

/// Connects and sends nothing; returns what the agent sent before closing.
fn silent_client(addr: SocketAddr) -> thread::JoinHandle<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    thread::spawn(move || until_closed(&mut stream))
}

/// Sends a request head whose header never ends; returns how much went out and what came back.
fn endless_head_client(addr: SocketAddr) -> thread::JoinHandle<(usize, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    thread::spawn(move || {
        let mut sent = stream
            .write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
            .unwrap();
        let chunk = [b'a'; 16 << 10];
        while sent < ENDLESS_MAX {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        (sent, until_closed(&mut stream))
    })
}

#[test]
fn concurrent_scrapes_all_answer_while_events_flow_and_stalled_clients_wait() {
    require_root();
    let agent = Agent::start(&[]);
    let before = agent.scrape();
    let addr = agent.listen;

    let silent = silent_client(addr);
    let endless = endless_head_client(addr);

    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        CHURN_THREADS * CHURN_EACH,
    );
    let target = server.addr;
    let churn: Vec<_> = (0..CHURN_THREADS)
        .map(|i| {
            thread::spawn(move || {
                run_clients(
                    target,
                    ClientMode::CloseFirst,
                    CHURN_EACH,
                    &format!("churn-{i}"),
                )
            })
        })
        .collect();
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            thread::spawn(move || {
                (0..SCRAPES_EACH)
                    .map(
                        |_| match http_get(addr, "/metrics", Duration::from_secs(30)) {
                            Ok(r) if r.status == 200 && r.body.contains("tracer_events_total") => {
                                Ok(())
                            }
                            Ok(r) => Err(format!("status {}: {}", r.status, r.body)),
                            Err(e) => Err(e.to_string()),
                        },
                    )
                    .collect::<Vec<_>>()
            })
        })
        .collect();

    let mut failures = Vec::new();
    let mut answered = 0;
    for scraper in scrapers {
        for result in scraper.join().expect("scraper thread") {
            match result {
                Ok(()) => answered += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    for c in churn {
        c.join().expect("churn thread");
    }
    server.join();
    assert!(
        failures.is_empty(),
        "{} scrapes failed: {failures:?}",
        failures.len()
    );
    assert_eq!(answered, SCRAPERS * SCRAPES_EACH);

    // Events flowed meanwhile: every churned connection is counted.
    let n = (CHURN_THREADS * CHURN_EACH) as f64;
    let opened = "tracer_connections_opened_total";
    let mut after = agent.scrape();
    for _ in 0..100 {
        let grown = metric_value(&after, opened, &[("direction", "active")])
            - metric_value(&before, opened, &[("direction", "active")]);
        if grown >= n {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        after = agent.scrape();
    }
    let grown = metric_value(&after, opened, &[("direction", "active")])
        - metric_value(&before, opened, &[("direction", "active")]);
    assert!(grown >= n, "{grown} active opens counted, {n} made");

    // The bad clients were cut off: the endless head refused (431) well before its end, the
    // silent client closed after the head timeout without an answer but perhaps a 408.
    let (sent, answer) = endless.join().expect("endless client");
    assert!(
        sent < ENDLESS_MAX,
        "the agent read all {sent} bytes of an endless header"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    let silent_answer = silent.join().expect("silent client");
    let silent_answer = String::from_utf8_lossy(&silent_answer);
    assert!(
        silent_answer.is_empty() || silent_answer.starts_with("HTTP/1.1 408"),
        "{silent_answer}"
    );
    agent.scrape();
}
