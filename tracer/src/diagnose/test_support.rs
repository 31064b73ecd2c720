//! What the diagnose unit tests share: a tracker and a `Diagnosis` fed together, the host's
//! settings, and event sequences that several topics use. Generic constructors come from
//! `tracer_core::testkit`.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tracer_core::model::{Event, ResetDirection, SockId, Task, TcpState::*, TimerPhase, Tuple};
use tracer_core::testkit::{MS, NETNS, softirq, state, task, time_wait, tuple};
use tracer_core::tracker::{Tracker, TrackerConfig};

use crate::diagnose::{DiagnoseConfig, Diagnosis, Report, ReportContext};
use crate::kernel::system::TcpSysctls;

pub(super) const CLIENT: SockId = 0x1000;
pub(super) const SERVER: SockId = 0x2000;

/// `10.0.0.<last>`.
pub(super) fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

/// A RST with the kernel's reason code (the testkit's `reset` has none).
pub(super) fn reset(t: Tuple, direction: ResetDirection, reason: Option<u16>) -> Event {
    Event::Reset {
        ts_ns: 1,
        sock: 0x9000,
        netns: NETNS,
        tuple: t,
        state: Close,
        direction,
        reason,
        task: softirq(),
    }
}

/// A Debian host's defaults, but for `tcp_tw_reuse`.
pub(super) fn sysctls() -> TcpSysctls {
    TcpSysctls {
        tcp_tw_reuse: Some(2),
        tcp_max_tw_buckets: Some(262_144),
        ip_local_port_range: Some((32768, 60999)),
    }
}

/// A 30 s run that lost no events.
pub(super) fn context(sysctls: TcpSysctls) -> ReportContext {
    ReportContext {
        duration: Duration::from_secs(30),
        sysctls,
        events_lost: 0,
        softirqs_unobserved: 0,
    }
}

/// A tracker feeding a `Diagnosis`, as `tracer diagnose` runs them.
pub(super) struct Run {
    pub(super) tracker: Tracker,
    pub(super) diagnosis: Diagnosis,
}

impl Run {
    pub(super) fn new(config: DiagnoseConfig) -> Run {
        Run::with_tracker(config, TrackerConfig::default())
    }

    pub(super) fn with_tracker(config: DiagnoseConfig, tracker: TrackerConfig) -> Run {
        let reasons = HashMap::from([
            (1, "no_socket".to_owned()),
            (11, "tcp_abort_on_close".to_owned()),
        ]);
        Run {
            tracker: Tracker::new(tracker),
            diagnosis: Diagnosis::new(config, reasons),
        }
    }

    pub(super) fn feed(&mut self, events: &[Event]) {
        for e in events {
            self.tracker.on_event(e, &mut self.diagnosis);
        }
        self.tracker.flush_closed(&mut self.diagnosis);
    }

    /// The report, with no owner found for leaked CLOSE_WAIT sockets.
    pub(super) fn report(&self, sysctls: TcpSysctls) -> Report {
        self.diagnosis
            .report_with_owners(&self.tracker, &context(sysctls), |_, _| None)
    }
}

/// A client connection from `sport` to 10.0.0.2:80 by `who`, closed by the client. With
/// `tw`, it goes into TIME_WAIT as timewait socket `tw`.
pub(super) fn short_connection(
    at: u64,
    sock: SockId,
    sport: u16,
    who: Task,
    tw: Option<SockId>,
) -> Vec<Event> {
    let t = tuple(ip(1), sport, ip(2), 80);
    let mut events = vec![
        state(at, sock, tuple(ip(1), 0, ip(2), 80), Close, SynSent, who),
        state(at + 1, sock, t, SynSent, Established, softirq()),
        state(at + 2, sock, t, Established, FinWait1, who),
        state(at + 3, sock, t, FinWait1, FinWait2, softirq()),
    ];
    if let Some(tw) = tw {
        events.push(time_wait(at + 4, tw, t, TimeWait, TimerPhase::Start));
    }
    events.push(state(at + 4, sock, t, FinWait2, Close, softirq()));
    events
}

/// `rounds` Nagle + delayed-ACK stalls between a client (pid 5) and a server on this host.
pub(super) fn stalls(rounds: u64) -> Vec<Event> {
    let client_t = tuple(ip(1), 40000, ip(1), 8080);
    let server_t = tuple(ip(1), 8080, ip(1), 40000);
    let mut events = vec![
        state(
            0,
            CLIENT,
            tuple(ip(1), 0, ip(1), 8080),
            Close,
            SynSent,
            task(5, "client"),
        ),
        state(1, CLIENT, client_t, SynSent, Established, task(0, "x")),
        state(1, SERVER, server_t, Listen, SynRecv, task(0, "x")),
        state(2, SERVER, server_t, SynRecv, Established, task(0, "x")),
    ];
    for round in 0..rounds {
        let at = (round + 1) * 100 * MS;
        events.push(Event::NagleHeld {
            ts_ns: at,
            sock: CLIENT,
            netns: NETNS,
            tuple: client_t,
            bytes: 10,
            task: task(5, "client"),
        });
        events.push(Event::DelayedAck {
            ts_ns: at + 40 * MS,
            sock: SERVER,
            netns: NETNS,
            tuple: server_t,
            held_ns: Some(41 * MS),
            pingpong: false,
        });
    }
    events
}
