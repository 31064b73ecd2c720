//! TIME_WAIT as the connection tracker sees it: the closing connection is attached to the
//! timewait socket that replaces it, and says who holds the port.
use std::net::{IpAddr, Ipv4Addr};

use tracer_core::model::{Direction, TcpState::*, TimerPhase};
use tracer_core::testkit::{
    NETNS, SEC, active_close_first, passive_closed_by_peer, replay, softirq, state, task,
    time_wait, tuple,
};
use tracer_core::tracker::{Tracker, TrackerConfig};

const TW: u64 = 0xaa00;

fn remote(sport: u16, dport: u16) -> tracer_core::model::Tuple {
    tuple(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        sport,
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        dport,
    )
}

/// The connection that closes right after its timewait socket starts is marked, and the
/// TIME_WAIT record names its owner when it ends, with the substate it left in.
#[test]
fn closing_connection_is_attached_to_its_timewait_socket() {
    let tp = remote(40000, 80);
    let events = active_close_first(0, 0x10, TW, tp, FinWait2, task(42, "curl"));
    let (mut tracker, mut rec) = replay(&events);
    assert!(rec.closed[0].time_wait);
    assert_eq!(tracker.time_wait().count(), 1);
    for phase in [TimerPhase::Cancel, TimerPhase::Expire] {
        tracker.on_event(&time_wait(61 * SEC, TW, tp, TimeWait, phase), &mut rec);
    }
    let ended = &rec.time_wait_exited[0];
    assert_eq!(ended.direction, Some(Direction::Active));
    assert_eq!(ended.owner.map(|o| o.pid), Some(42));
    assert_eq!(ended.substate, TimeWait);
    assert_eq!(tracker.time_wait().count(), 0);
}

/// A server whose listener closed before its last connection did: the local port is in the
/// ephemeral range and no longer listening, yet the accepted connection says "server".
#[test]
fn the_connections_direction_decides_the_role() {
    let tp = remote(40000, 50000);
    let mut tracker = Tracker::new(TrackerConfig::default());
    let mut rec = tracer_core::testkit::Recorder::default();
    for e in [
        state(0, 0x20, tp, Listen, SynRecv, softirq()),
        state(1, 0x20, tp, SynRecv, Established, softirq()),
        state(2, 0x20, tp, Established, FinWait1, task(7, "server")),
        state(3, 0x20, tp, FinWait1, FinWait2, softirq()),
        time_wait(4, TW, tp, FinWait2, TimerPhase::Start),
    ] {
        tracker.on_event(&e, &mut rec);
    }
    let guessed = tracker.time_wait().top_peers(1)[0].0;
    assert_eq!(
        (guessed.port, guessed.client),
        (50000, true),
        "a guess from the port"
    );
    tracker.on_event(&state(4, 0x20, tp, FinWait2, Close, softirq()), &mut rec);
    let peers = tracker.time_wait().top_peers(5);
    assert_eq!(peers.len(), 1);
    assert_eq!(
        (peers[0].0.port, peers[0].0.client, peers[0].1),
        (40000, false, 1)
    );
}

#[test]
fn connection_closed_without_time_wait_is_not_marked() {
    let events = passive_closed_by_peer(0, 0x20, remote(8080, 40000), task(7, "server"));
    let (tracker, rec) = replay(&events);
    assert_eq!(rec.closed.len(), 1);
    assert!(!rec.closed[0].time_wait);
    assert_eq!(rec.closed[0].direction, Direction::Passive);
    assert_eq!(tracker.time_wait().count(), 0);
    assert_eq!(rec.closed[0].netns, NETNS);
}

/// A TIME_WAIT stay carries the cgroup of the connection it came from (the kernel names it in
/// the run before the final CLOSE), and the table's counts by cgroup add up to its count, the
/// sockets of connections not seen (or with no cgroup) under 0.
#[test]
fn time_wait_stays_carry_the_cgroup_of_their_connection() {
    use tracer_core::model::Event;
    let (a, b) = (remote(40001, 80), remote(40002, 80));
    let mut events = Vec::new();
    for (sock, tw, t, cgroup) in [(0x10, TW, a, 386), (0x20, TW + 1, b, 0)] {
        let mut run = active_close_first(0, sock, tw, t, FinWait2, task(42, "curl"));
        let close = run.pop().expect("the final CLOSE");
        run.push(Event::SocketInfo {
            ts_ns: close.ts_ns(),
            sock,
            cgroup,
            cost: None,
        });
        run.push(close);
        events.extend(run);
    }
    // A third timewait socket whose connection the tracker never saw.
    let c = remote(40003, 80);
    events.push(time_wait(SEC, TW + 2, c, TimeWait, TimerPhase::Start));
    let (mut tracker, mut rec) = replay(&events);
    assert_eq!(rec.closed[0].cgroup, 386);
    let by_cgroup = tracker.time_wait().by_cgroup();
    assert_eq!(by_cgroup.get(&386), Some(&1));
    assert_eq!(by_cgroup.get(&0), Some(&2));
    assert_eq!(
        by_cgroup.values().sum::<usize>(),
        tracker.time_wait().count()
    );
    for phase in [TimerPhase::Cancel, TimerPhase::Expire] {
        tracker.on_event(&time_wait(61 * SEC, TW, a, TimeWait, phase), &mut rec);
    }
    assert_eq!(rec.time_wait_exited[0].cgroup, 386);
    let by_cgroup = tracker.time_wait().by_cgroup();
    assert_eq!(by_cgroup.get(&386), None);
    assert_eq!(by_cgroup.values().sum::<usize>(), 2);
}
