//! SIGTERM and SIGINT stop the agent cleanly: exit code 0 within a few seconds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::time::Duration;

use common::*;

const QUICK: Duration = Duration::from_secs(5);

fn stops_on(signal: libc::c_int) {
    require_root();
    let mut agent = Agent::start(&[]);
    // Some work in flight: a connection reported and a scrape.
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        1,
    );
    let addr = server.addr;
    run_clients(addr, ClientMode::CloseFirst, 1, "tracer-client");
    server.join();
    agent.wait_for_events(is_client_of(addr), 1, EVENT_TIMEOUT);
    agent.scrape();

    let took = agent.stop_with(signal);
    assert!(
        took <= QUICK,
        "the agent took {took:?} to stop on signal {signal}"
    );
    let stderr = agent.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigterm_stops_with_exit_code_zero() {
    stops_on(libc::SIGTERM);
}

#[test]
fn sigint_stops_with_exit_code_zero() {
    stops_on(libc::SIGINT);
}
