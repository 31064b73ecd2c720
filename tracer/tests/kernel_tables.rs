//! The kernel keeps each socket's run of state changes in its slot of a direct-mapped table
//! (`PATH_SLOTS`), or in a hash table (`PATHS`) when another socket holds that slot. With
//! thousands of sockets open at once both are used, and every connection is still reported
//! once, whole, whichever side closes first and from whichever thread.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Connections held open at once: 2 x PAIRS sockets against 16 384 slots, so that some collide
/// (about 44 pairs of sockets are expected to; none colliding has a probability near e^-44).
const PAIRS: usize = 600;

/// How long to wait, once the events expected are in, for any extra one.
const SETTLE: Duration = Duration::from_secs(1);

const COLLISIONS: &str = "tracer_kernel_path_slot_collisions_total";

/// Closes `sockets` from two threads at once, each pausing briefly every `BATCH` closes: on
/// loopback each close's segments are handled by softirqs, and a burst past what one softirq
/// run takes is finished later on top of whatever task runs then, which on some kernels runs
/// it without BPF programs (README, "Lost events").
fn close_from_two_threads(sockets: Vec<TcpStream>) {
    const BATCH: usize = 20;
    let close = |sockets: Vec<TcpStream>| {
        let mut sockets = sockets.into_iter();
        loop {
            let batch: Vec<TcpStream> = sockets.by_ref().take(BATCH).collect();
            if batch.is_empty() {
                return;
            }
            drop(batch);
            thread::sleep(Duration::from_millis(1));
        }
    };
    let mut first = sockets;
    let second = first.split_off(first.len() / 2);
    let other = thread::spawn(move || close(second));
    close(first);
    other.join().expect("closing thread");
}

fn local_ports(events: &[Value]) -> HashSet<u64> {
    events.iter().map(|e| ev_u64(e, "sport")).collect()
}

#[test]
fn thousands_of_sockets_open_at_once_are_each_reported_once_from_either_table() {
    require_root();
    let mut agent = Agent::start(&[]);
    let before = agent.scrape();

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().unwrap();
    let (mut clients, mut accepted) = (Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        clients.push(TcpStream::connect(server).expect("connect"));
        accepted.push(listener.accept().expect("accept").0);
    }
    // Held past the agent's table reads (once a second): every connection is handed over open
    // first, and its closing record must add only what came after.
    thread::sleep(Duration::from_millis(1500));

    // Even-numbered pairs: the client closes first; odd-numbered: the server.
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (i, (client, server_side)) in clients.drain(..).zip(accepted.drain(..)).enumerate() {
        if i % 2 == 0 {
            first.push(client);
            second.push(server_side);
        } else {
            first.push(server_side);
            second.push(client);
        }
    }
    close_from_two_threads(first);
    // The other side closes once the FINs are in, so that no close crosses a FIN.
    thread::sleep(Duration::from_millis(300));
    close_from_two_threads(second);

    let clients = agent.wait_for_exactly(is_client_of(server), PAIRS, EVENT_TIMEOUT, SETTLE);
    let servers = agent.wait_for_exactly(is_server_of(server), PAIRS, EVENT_TIMEOUT, SETTLE);
    assert_eq!(
        local_ports(&clients).len(),
        PAIRS,
        "one event per client port"
    );
    let server_ports: HashSet<u64> = servers.iter().map(|e| ev_u64(e, "dport")).collect();
    assert_eq!(
        server_ports,
        local_ports(&clients),
        "one server event per client port"
    );

    let first_closer = |local_close: bool, active: bool| {
        match (active, local_close) {
            (true, true) => ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            (true, false) => ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            (false, true) => ["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            (false, false) => ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
        }
        .map(String::from)
        .to_vec()
    };
    let (mut local, mut remote) = (0, 0);
    for (ev, active) in clients
        .iter()
        .map(|e| (e, true))
        .chain(servers.iter().map(|e| (e, false)))
    {
        assert_eq!(ev["complete"], true, "{ev}");
        let closed_here = match ev_str(ev, "close") {
            "local" => true,
            "remote" => false,
            other => panic!("close {other:?}: {ev}"),
        };
        if closed_here {
            local += 1;
        } else {
            remote += 1;
        }
        assert_eq!(ev_states(ev), first_closer(closed_here, active), "{ev}");
    }
    assert_eq!(
        (local, remote),
        (PAIRS, PAIRS),
        "each connection closed first by one side"
    );

    let after = agent.scrape();
    let collisions = metric_value(&after, COLLISIONS, &[]) - metric_value(&before, COLLISIONS, &[]);
    assert!(
        collisions > 0.0,
        "{} sockets open at once in 16 384 slots should have collided ({COLLISIONS} rose by \
         {collisions}): the hash-table path went untested",
        2 * PAIRS
    );
    let full = "tracer_kernel_table_full_total";
    assert_eq!(
        metric_value(&after, full, &[("table", "paths")]),
        metric_value(&before, full, &[("table", "paths")]),
        "no state change should have been sent on its own"
    );
    agent.stop();
}
