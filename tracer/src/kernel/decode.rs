//! Decoding ring buffer records into typed events. Pure; the reading loop lives in `agent`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracer_common::{
    AF_INET, AF_INET6, EVENT_DELAYED_ACK, EVENT_NAGLE_HELD, EVENT_PATH, EVENT_RESET_RECEIVED,
    EVENT_RESET_SENT, EVENT_RETRANSMIT, EVENT_STATE, EVENT_SYNACK_RETRANSMIT, EVENT_TW_CANCEL,
    EVENT_TW_EXPIRE, EVENT_TW_START, PATH_STEPS, RST_REASON_UNKNOWN, RawEvent, RawPath,
};
use tracer_common::{ConnCost, RawPathOpen, RawTwBirth};

use tracer_core::model::{
    Comm, ConnectionCost, Event, ResetDirection, RetransmitKind, Task, TcpState, TimerPhase, Tuple,
};

/// Why a record could not be decoded (each is counted, never silently dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than a `RawEvent`: a layout mismatch between the agent and its programs.
    Truncated,
    UnknownKind(u8),
    UnknownFamily(u16),
    UnknownState(u8),
}

/// Reads a `RawEvent` out of a ring buffer record.
pub fn parse(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() < size_of::<RawEvent>() {
        return Err(DecodeError::Truncated);
    }
    // SAFETY: the length was checked above, RawEvent is Pod (any bit pattern is valid), and
    // read_unaligned makes no alignment assumption about the record.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) })
}

/// Decodes one ring buffer record into the events it carries, appended to `out`: one for most
/// kinds, a socket's run of state changes for a path record, a TIME_WAIT exit and its expiry
/// for a timer detached at its deadline.
pub fn decode_record(bytes: &[u8], out: &mut Vec<Event>) -> Result<(), DecodeError> {
    let raw = parse(bytes)?;
    match raw.kind {
        EVENT_PATH => {
            let path = if bytes.len() >= size_of::<RawPath>() {
                // SAFETY: the length was checked, RawPath is Pod (any bit pattern is valid), and
                // read_unaligned makes no alignment assumption about the record.
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawPath>()) }
            } else if bytes.len() >= size_of::<RawPathOpen>() {
                // SAFETY: as above, for the leading part a run that does not close is sent as.
                let open =
                    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawPathOpen>()) };
                return open_path_events(&open, out);
            } else {
                return Err(DecodeError::Truncated);
            };
            path_events(&path.run, Some((&path.cost, &path.tw)), out)
        }
        EVENT_TW_CANCEL => exit_events(&raw, out),
        _ => {
            out.push(decode(&raw)?);
            Ok(())
        }
    }
}

/// A timewait socket's exit (a record's, or one read from the kernel's table): one detached at
/// its deadline is an exit and an expiry.
pub fn exit_events(raw: &RawEvent, out: &mut Vec<Event>) -> Result<(), DecodeError> {
    out.push(decode(raw)?);
    if raw.aux == 1 {
        out.push(decode(&RawEvent {
            kind: EVENT_TW_EXPIRE,
            ..*raw
        })?);
    }
    Ok(())
}

/// The state changes of a run that does not close (a record's or one read from the kernel's
/// table), in the order they happened, then the socket's cgroup.
pub fn open_path_events(open: &RawPathOpen, out: &mut Vec<Event>) -> Result<(), DecodeError> {
    path_events(open, None, out)
}

/// The state changes of a path record, in the order they happened. The owner rides only on
/// the transitions made in its own system call, as in single records. `closed`: what a run
/// that ends in CLOSE carries besides (`RawPath`).
fn path_events(
    run: &RawPathOpen,
    closed: Option<(&ConnCost, &RawTwBirth)>,
    out: &mut Vec<Event>,
) -> Result<(), DecodeError> {
    let head = &run.head;
    let len = usize::from(run.len).min(PATH_STEPS);
    let info = Event::SocketInfo {
        ts_ns: head.ts_ns,
        sock: head.skaddr,
        cgroup: run.cgroup,
        cost: closed
            .map(|(cost, _)| cost)
            .filter(|cost| cost.valid != 0)
            .map(decode_cost),
    };
    // The info goes in while the tracker still holds the connection: before a final CLOSE,
    // after the run otherwise (its first steps may be what opens the record).
    let closes = len > 0 && run.new[len - 1] == TCP_CLOSE;
    for (at, (ts_ns, old, new)) in run.steps().enumerate() {
        if closes && at == len - 1 {
            out.push(info);
            // The timewait socket that replaces it was born just before this CLOSE, with the
            // closing socket's addressing.
            if let Some((_, tw)) = closed.filter(|(_, tw)| tw.tw != 0) {
                out.push(decode(&RawEvent {
                    ts_ns: tw.ts_ns,
                    skaddr: tw.tw,
                    kind: EVENT_TW_START,
                    oldstate: 0,
                    newstate: tw.substate,
                    pid: 0,
                    tid: 0,
                    comm: [0; 16],
                    aux: 0,
                    ..*head
                })?);
            }
        }
        // Each step decodes as the single record it would have been: the head's addressing,
        // and the owner only on the transitions made in its own system call.
        let owner = run.has_task != 0 && tracer_common::owner_transition(old, new);
        out.push(decode(&RawEvent {
            ts_ns,
            kind: EVENT_STATE,
            oldstate: old,
            newstate: new,
            pid: if owner { head.pid } else { 0 },
            tid: if owner { head.tid } else { 0 },
            comm: if owner { head.comm } else { [0; 16] },
            ..*head
        })?);
    }
    if !closes {
        out.push(info);
    }
    Ok(())
}

/// The kernel's `TCP_CLOSE`.
const TCP_CLOSE: u8 = 7;

fn decode_cost(raw: &ConnCost) -> ConnectionCost {
    ConnectionCost {
        bytes_sent: raw.bytes_acked,
        bytes_received: raw.bytes_received,
        segs_in: raw.segs_in,
        segs_out: raw.segs_out,
        total_retrans: raw.total_retrans,
        // The kernel keeps srtt << 3 and mdev << 2, in µs.
        srtt_ns: u64::from(raw.srtt_us_x8 >> 3) * 1_000,
        rttvar_ns: u64::from(raw.mdev_us_x4 >> 2) * 1_000,
        min_rtt_ns: match raw.rtt_min_us {
            // `~0U`: no sample yet.
            u32::MAX => 0,
            us => u64::from(us) * 1_000,
        },
        cwnd: raw.snd_cwnd,
        max_cwnd: raw.max_cwnd,
        rwnd_limited_jiffies: raw.rwnd_limited_jiffies,
        ca_states: (raw.ca_states & 0x1f) as u8,
    }
}

pub fn decode(raw: &RawEvent) -> Result<Event, DecodeError> {
    let tuple = tuple(raw)?;
    let state = |value: u8| TcpState::from_kernel(value).ok_or(DecodeError::UnknownState(value));
    let task = Task {
        pid: raw.pid,
        tid: raw.tid,
        comm: Comm(raw.comm),
    };
    match raw.kind {
        EVENT_STATE => Ok(Event::StateChange {
            ts_ns: raw.ts_ns,
            sock: raw.skaddr,
            netns: raw.netns,
            tuple,
            old: state(raw.oldstate)?,
            new: state(raw.newstate)?,
            task,
        }),
        EVENT_RETRANSMIT => {
            let current = state(raw.newstate)?;
            Ok(Event::Retransmit {
                ts_ns: raw.ts_ns,
                sock: raw.skaddr,
                netns: raw.netns,
                tuple,
                state: current,
                kind: RetransmitKind::classify(current, raw.ca_state),
                segs: u32::from(raw.segs),
            })
        }
        EVENT_SYNACK_RETRANSMIT => Ok(Event::Retransmit {
            ts_ns: raw.ts_ns,
            sock: raw.skaddr,
            netns: raw.netns,
            tuple,
            state: state(raw.newstate).unwrap_or(TcpState::NewSynRecv),
            kind: RetransmitKind::SynAck,
            segs: u32::from(raw.segs),
        }),
        EVENT_RESET_RECEIVED | EVENT_RESET_SENT => Ok(Event::Reset {
            ts_ns: raw.ts_ns,
            sock: raw.skaddr,
            netns: raw.netns,
            tuple,
            state: state(raw.newstate)?,
            direction: if raw.kind == EVENT_RESET_SENT {
                ResetDirection::Sent
            } else {
                ResetDirection::Received
            },
            reason: (raw.kind == EVENT_RESET_SENT && raw.segs != RST_REASON_UNKNOWN)
                .then_some(raw.segs),
            task,
        }),
        EVENT_TW_START | EVENT_TW_CANCEL | EVENT_TW_EXPIRE => Ok(Event::TimeWait {
            ts_ns: raw.ts_ns,
            tw: raw.skaddr,
            netns: raw.netns,
            tuple,
            substate: state(raw.newstate)?,
            timer: match raw.kind {
                EVENT_TW_START if raw.aux == 1 => TimerPhase::Rearm,
                EVENT_TW_START => TimerPhase::Start,
                EVENT_TW_CANCEL => TimerPhase::Cancel,
                _ => TimerPhase::Expire,
            },
        }),
        EVENT_DELAYED_ACK => Ok(Event::DelayedAck {
            ts_ns: raw.ts_ns,
            sock: raw.skaddr,
            netns: raw.netns,
            tuple,
            held_ns: (raw.aux > 0).then_some(raw.aux),
            pingpong: raw.ca_state != 0,
        }),
        EVENT_NAGLE_HELD => Ok(Event::NagleHeld {
            ts_ns: raw.ts_ns,
            sock: raw.skaddr,
            netns: raw.netns,
            tuple,
            bytes: raw.aux,
            task,
        }),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn tuple(raw: &RawEvent) -> Result<Tuple, DecodeError> {
    let (src, dst) = match raw.family {
        AF_INET => (ipv4(&raw.saddr), ipv4(&raw.daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(raw.saddr)),
            IpAddr::V6(Ipv6Addr::from(raw.daddr)),
        ),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    Ok(Tuple {
        src,
        sport: raw.sport,
        dst,
        dport: raw.dport,
    })
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the kernel program writes it: connect() from 127.0.0.1:40000 to :8080.
    fn connect_fixture() -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<RawEvent>()];
        bytes[0..8].copy_from_slice(&1_000_000u64.to_ne_bytes()); // ts_ns
        bytes[8..16].copy_from_slice(&0xffff_8880_1234_5600u64.to_ne_bytes()); // skaddr
        bytes[16..20].copy_from_slice(&[127, 0, 0, 1]); // saddr
        bytes[32..36].copy_from_slice(&[127, 0, 0, 1]); // daddr
        bytes[48..52].copy_from_slice(b"curl"); // comm
        bytes[64..68].copy_from_slice(&4242u32.to_ne_bytes()); // pid
        bytes[68..72].copy_from_slice(&4243u32.to_ne_bytes()); // tid
        bytes[72..76].copy_from_slice(&4_026_531_840u32.to_ne_bytes()); // netns
        bytes[76..78].copy_from_slice(&40000u16.to_ne_bytes()); // sport
        bytes[78..80].copy_from_slice(&8080u16.to_ne_bytes()); // dport
        bytes[80..82].copy_from_slice(&AF_INET.to_ne_bytes()); // family
        bytes[84] = EVENT_STATE;
        bytes[85] = 7; // CLOSE
        bytes[86] = 2; // SYN_SENT
        bytes
    }

    #[test]
    fn state_change_record_decodes_field_by_field() {
        let raw = parse(&connect_fixture()).expect("parse");
        let event = decode(&raw).expect("decode");
        let Event::StateChange {
            ts_ns,
            sock,
            netns,
            tuple,
            old,
            new,
            task,
        } = event
        else {
            panic!("not a state change: {event:?}");
        };
        assert_eq!(ts_ns, 1_000_000);
        assert_eq!(sock, 0xffff_8880_1234_5600);
        assert_eq!(netns, 4_026_531_840);
        assert_eq!(tuple.src, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!((tuple.sport, tuple.dport), (40000, 8080));
        assert_eq!((old, new), (TcpState::Close, TcpState::SynSent));
        assert_eq!((task.pid, task.tid), (4242, 4243));
        assert_eq!(task.comm.as_str(), "curl");
    }

    #[test]
    fn retransmit_record_carries_segments_and_kind() {
        let mut bytes = connect_fixture();
        bytes[82..84].copy_from_slice(&12u16.to_ne_bytes()); // segs
        bytes[84] = EVENT_RETRANSMIT;
        bytes[86] = 1; // ESTABLISHED
        bytes[87] = 3; // icsk_ca_state Recovery
        let event = decode(&parse(&bytes).expect("parse")).expect("decode");
        assert!(matches!(
            event,
            Event::Retransmit {
                segs: 12,
                kind: RetransmitKind::Fast,
                state: TcpState::Established,
                ..
            }
        ));
    }

    #[test]
    fn timewait_timer_records_decode_with_their_substate() {
        let mut raw = parse(&connect_fixture()).expect("parse");
        raw.kind = EVENT_TW_CANCEL;
        raw.newstate = 6; // TIME_WAIT
        let event = decode(&raw).expect("decode");
        assert!(matches!(
            event,
            Event::TimeWait {
                tw: 0xffff_8880_1234_5600,
                substate: TcpState::TimeWait,
                timer: TimerPhase::Cancel,
                ..
            }
        ));
    }

    #[test]
    fn delayed_ack_record_carries_hold_time_and_pingpong() {
        let mut bytes = connect_fixture();
        bytes[84] = tracer_common::EVENT_DELAYED_ACK;
        bytes[86] = 1; // ESTABLISHED
        bytes[87] = 1; // pingpong
        bytes[88..96].copy_from_slice(&40_000_000u64.to_ne_bytes()); // aux: held 40 ms
        let event = decode(&parse(&bytes).expect("parse")).expect("decode");
        assert!(matches!(
            event,
            Event::DelayedAck {
                held_ns: Some(40_000_000),
                pingpong: true,
                ..
            }
        ));
    }

    #[test]
    fn reset_sent_reason_is_unknown_on_kernels_without_one() {
        let mut raw = parse(&connect_fixture()).expect("parse");
        raw.kind = EVENT_RESET_SENT;
        raw.newstate = 1; // ESTABLISHED
        for (segs, reason) in [(RST_REASON_UNKNOWN, None), (2, Some(2))] {
            raw.segs = segs;
            let event = decode(&raw).expect("decode");
            let Event::Reset { reason: got, .. } = event else {
                panic!("not a reset: {event:?}");
            };
            assert_eq!(got, reason);
        }
    }

    #[test]
    fn ipv6_addresses_decode() {
        let mut raw = parse(&connect_fixture()).expect("parse");
        raw.family = AF_INET6;
        raw.saddr = Ipv6Addr::LOCALHOST.octets();
        raw.daddr = "2001:db8::1".parse::<Ipv6Addr>().expect("addr").octets();
        let Event::StateChange { tuple, .. } = decode(&raw).expect("decode") else {
            panic!("not a state change");
        };
        assert_eq!(tuple.src, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(tuple.dst.to_string(), "2001:db8::1");
    }

    /// A path record as the kernel sends it at ESTABLISHED: connect() by curl, then the
    /// handshake.
    fn path_fixture() -> Vec<u8> {
        let mut path = RawPath::default();
        let run = &mut path.run;
        run.head = parse(&connect_fixture()).expect("parse");
        run.head.kind = EVENT_PATH;
        (run.len, run.has_task, run.cgroup) = (2, 1, 386);
        run.at_ns[..2].copy_from_slice(&[1_000, 51_000]);
        run.old[..2].copy_from_slice(&[7, 2]);
        run.new[..2].copy_from_slice(&[2, 1]);
        // What an earlier run left past `len` is not read.
        (run.at_ns[2], run.old[2], run.new[2]) = (99, 1, 77);
        // SAFETY: RawPath is repr(C) plain data with no padding; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&path).cast::<u8>(), size_of::<RawPath>())
        };
        bytes.to_vec()
    }

    #[test]
    fn a_path_record_replays_its_state_changes_in_order_with_the_owner_on_connect_only() {
        let mut events = Vec::new();
        decode_record(&path_fixture(), &mut events).expect("decode");
        assert!(
            matches!(
                events.last(),
                Some(Event::SocketInfo {
                    cgroup: 386,
                    cost: None,
                    ..
                })
            ),
            "a run that does not close ends with the socket's cgroup: {events:?}"
        );
        events.pop();
        let steps: Vec<_> = events
            .iter()
            .map(|e| match e {
                Event::StateChange {
                    ts_ns,
                    old,
                    new,
                    task,
                    tuple,
                    ..
                } => (*ts_ns, *old, *new, task.pid, tuple.sport),
                other => panic!("not a state change: {other:?}"),
            })
            .collect();
        assert_eq!(
            steps,
            [
                (1_000, TcpState::Close, TcpState::SynSent, 4242, 40000),
                (51_000, TcpState::SynSent, TcpState::Established, 0, 40000),
            ]
        );
    }

    #[test]
    fn a_closing_run_carries_the_cost_before_its_close() {
        let mut path = RawPath::default();
        path.run.head = parse(&connect_fixture()).expect("parse");
        path.run.head.kind = EVENT_PATH;
        (path.run.len, path.run.cgroup) = (3, 386);
        path.run.old[..3].copy_from_slice(&[1, 4, 5]);
        path.run.new[..3].copy_from_slice(&[4, 5, 7]);
        path.tw = RawTwBirth {
            ts_ns: 7_000,
            tw: 0xffff_8880_0000_7700,
            substate: 6,
            ..RawTwBirth::default()
        };
        path.cost = ConnCost {
            bytes_acked: 1_000_000,
            bytes_received: 5,
            srtt_us_x8: 8 * 250,
            mdev_us_x4: 4 * 30,
            rtt_min_us: 40,
            snd_cwnd: 10,
            max_cwnd: 80,
            ca_states: 1 << 3 | 1,
            valid: 1,
            ..ConnCost::default()
        };
        // SAFETY: RawPath is repr(C) plain data with no padding; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&path).cast::<u8>(), size_of::<RawPath>())
        };
        let mut events = Vec::new();
        decode_record(bytes, &mut events).expect("decode");
        assert_eq!(events.len(), 5);
        let Event::TimeWait {
            ts_ns: 7_000,
            tw: 0xffff_8880_0000_7700,
            timer: TimerPhase::Start,
            substate: TcpState::TimeWait,
            tuple,
            netns,
        } = events[3]
        else {
            panic!("the timewait socket's birth comes just before the CLOSE: {events:?}");
        };
        // With the closing socket's addressing.
        let head = parse(&connect_fixture()).expect("parse");
        assert_eq!((tuple.sport, tuple.dport), (head.sport, head.dport));
        assert_eq!(netns, head.netns);
        let Event::SocketInfo {
            cost: Some(cost), ..
        } = events[2]
        else {
            panic!("the cost comes before the CLOSE: {events:?}");
        };
        assert_eq!(cost.bytes_sent, 1_000_000);
        assert_eq!(
            (cost.srtt_ns, cost.rttvar_ns, cost.min_rtt_ns),
            (250_000, 30_000, 40_000)
        );
        assert_eq!((cost.cwnd, cost.max_cwnd, cost.ca_states), (10, 80, 0b1001));
        assert!(matches!(
            events[4],
            Event::StateChange {
                new: TcpState::Close,
                ..
            }
        ));
    }

    #[test]
    fn a_short_or_garbled_path_record_is_an_error() {
        let mut events = Vec::new();
        let bytes = path_fixture();
        assert_eq!(
            decode_record(&bytes[..size_of::<RawEvent>() + 8], &mut events),
            Err(DecodeError::Truncated)
        );
        // The leading part alone is what a run that does not close is sent as.
        events.clear();
        decode_record(&bytes[..size_of::<RawPathOpen>()], &mut events).expect("short run");
        assert_eq!(
            events.len(),
            3,
            "two steps and the socket's info: {events:?}"
        );
        let mut bad = bytes.clone();
        bad[std::mem::offset_of!(RawPathOpen, new)] = 77; // the first step's new state
        assert_eq!(
            decode_record(&bad, &mut events),
            Err(DecodeError::UnknownState(77))
        );
    }

    #[test]
    fn a_time_wait_timer_detached_at_its_deadline_is_an_exit_and_an_expiry() {
        let mut raw = parse(&connect_fixture()).expect("parse");
        raw.kind = EVENT_TW_CANCEL;
        raw.newstate = 6;
        raw.aux = 1;
        // SAFETY: RawEvent is repr(C) plain data with no padding; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&raw).cast::<u8>(), size_of::<RawEvent>())
        };
        let mut events = Vec::new();
        decode_record(bytes, &mut events).expect("decode");
        let phases: Vec<_> = events
            .iter()
            .map(|e| match e {
                Event::TimeWait { timer, .. } => *timer,
                other => panic!("not a timer event: {other:?}"),
            })
            .collect();
        assert_eq!(phases, [TimerPhase::Cancel, TimerPhase::Expire]);
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert_eq!(parse(&[0u8; 10]), Err(DecodeError::Truncated));
        let mut raw = parse(&connect_fixture()).expect("parse");
        raw.kind = 99;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownKind(99)));
        raw.kind = EVENT_STATE;
        raw.newstate = 0;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownState(0)));
        raw.family = 1;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownFamily(1)));
    }
}
