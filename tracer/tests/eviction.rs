//! `--max-connections` bounds the connection table: past it connections are evicted and
//! counted, and the agent keeps reporting new connections.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MAX: usize = 4;
const HELD: usize = 10;

#[test]
fn connections_past_the_table_bound_are_evicted_and_counted() {
    require_root();
    let max = MAX.to_string();
    let mut agent = Agent::start(&["--max-connections", &max]);
    let before = agent.scrape();
    let evicted = "tracer_connections_evicted_total";

    // 2 x HELD sockets open while the table holds at most MAX: every opening past MAX evicts.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        HELD,
    );
    let held = HeldClients::open(server.addr, HELD);
    let expected = (2 * HELD - MAX) as f64;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let now = agent.scrape();
        let delta = metric_value(&now, evicted, &[]) - metric_value(&before, evicted, &[]);
        if delta >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{evicted} increased by {delta}, expected at least {expected}\n{now}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    held.close();
    server.join();

    // Still tracing: a new connection is reported from open to close.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        1,
    );
    let addr = server.addr;
    run_clients(addr, ClientMode::CloseFirst, 1, "tracer-client");
    server.join();
    let events = agent.wait_for_events(is_client_of(addr), 1, EVENT_TIMEOUT);
    let ev = &events[0];
    assert_eq!(ev_str(ev, "close"), "local", "{ev}");
    assert_eq!(ev["complete"], true, "{ev}");
    assert_eq!(
        ev_states(ev),
        ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
        "{ev}"
    );
    agent.stop();
}
