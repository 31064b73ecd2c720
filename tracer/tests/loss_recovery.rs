//! Recovery from lost kernel events: with the smallest ring buffer and a burst of loopback
//! churn while the agent is held stopped, events are lost (connection closes, opens and
//! TIME_WAIT starts among them); within one resync interval after the burst, the gauges must
//! again equal what `ss` lists in every network namespace.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_loss;

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use support_loss::*;

/// The agent resyncs at most every 10 s after the last loss (`app::resync::MIN_SPACING`), asks
/// on its once-a-second refresh, and the dump itself takes a moment on a busy host: the gauges
/// must agree within that, with a margin for a shared, loaded test machine.
const RESYNC_INTERVAL: Duration = Duration::from_secs(12);
const MARGIN: Duration = Duration::from_secs(30);

#[test]
fn gauges_return_to_what_ss_shows_after_lost_events() {
    require_root();
    require_tool("ss");
    require_tool("nsenter");
    let mut agent = Agent::start(&["--ring-buffer-bytes", TINY_RING]);
    let server = ChurnServer::start();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = [
        server.addr.to_string(),
        held.local_addr().unwrap().to_string(),
    ];

    // Connections the agent sees open; their close will come while the ring buffer is full.
    let doomed = pairs(&held, 32);
    thread::sleep(Duration::from_millis(500));

    let burst = thread::spawn({
        let addr = server.addr;
        move || churn(addr, 4_000, End::Close)
    });
    thread::sleep(Duration::from_millis(100));
    // Held stopped, the agent drains nothing: the 64 KiB ring fills within milliseconds of
    // churn and every later event is lost, whatever the machine's speed.
    send_signal(agent.pid(), libc::SIGSTOP);
    thread::sleep(Duration::from_millis(400));
    // While events are lost: the doomed connections close (client first: TIME_WAIT on its
    // side), new ones open and stay (their handshake is lost), and some are left in CLOSE_WAIT
    // (the server end closes, the client end does not).
    drop(doomed);
    let stay = pairs(&held, 32);
    let close_wait: Vec<_> = pairs(&held, 8)
        .into_iter()
        .map(|(client, server)| {
            drop(server);
            client
        })
        .collect();
    thread::sleep(Duration::from_millis(400));
    send_signal(agent.pid(), libc::SIGCONT);
    let made = burst.join().expect("burst");
    server.stop();
    let burst_end = Instant::now();

    let lost = metric_value(&agent.scrape(), "tracer_events_lost_total", &[]);
    assert!(
        lost > 0.0,
        "no event was lost with a {TINY_RING}-byte ring buffer, {made} connections and the agent \
         stopped for 800 ms: the burst was too small to test recovery"
    );

    let deadline = burst_end + RESYNC_INTERVAL + MARGIN;
    let mut last = String::new();
    let mut attempts = 0;
    let (kernel, text) = loop {
        attempts += 1;
        let a = kernel_sockets();
        let text = agent.scrape();
        let b = kernel_sockets();
        if let (Ok(a), Ok(b)) = (a, b) {
            let (want, got) = (counts(&a), gauges(&text));
            if quiet(&a, &b, agent.listen) {
                // The scrape's own connection (both ends) is open while the page renders and
                // is counted when its handshake was drained just before: 0 to 2 more.
                if got.time_wait == want.time_wait
                    && got.close_wait == want.close_wait
                    && (want.active..=want.active + 2).contains(&got.active)
                {
                    break (want, text);
                }
                last = format!("agent {got:?}, kernel {want:?}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "the gauges did not return to the kernel's counts within {:?} of the burst \
             ({attempts} attempts, last quiet comparison: {last}; {lost} events lost; the agent's \
             log follows)\n{}",
            RESYNC_INTERVAL + MARGIN,
            agent.stderr_text()
        );
        thread::sleep(Duration::from_millis(300));
    };
    let reconciled = metric_value(&text, "tracer_connections_reconciled_total", &[]);
    let lost = metric_value(&text, "tracer_events_lost_total", &[]);
    eprintln!(
        "{made} churned connections, {lost} events lost, {reconciled} connections reconciled; \
         agreement after {:?} ({attempts} attempts): kernel {kernel:?}",
        burst_end.elapsed()
    );
    assert!(
        reconciled > 0.0,
        "the gauges agree but no connection was closed out: the doomed connections' closes \
         were not lost, the test did not exercise recovery ({lost} lost)"
    );
    drop((stay, close_wait));
    agent.stop();

    // Tens of thousands of TIME_WAIT sockets toward these two ports would outlive the test by
    // a minute, and a later test whose server gets one of those ports would find sockets it did
    // not make: wait (bounded: they expire after 60 s) until they are gone.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = kernel_sockets()
            .map(|all| {
                all.iter()
                    .filter(|s| s.timewait && ours.contains(&s.peer))
                    .count()
            })
            .unwrap_or(usize::MAX);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} TIME_WAIT sockets toward {ours:?} still listed 90 s after the test"
        );
        thread::sleep(Duration::from_secs(1));
    }
}
