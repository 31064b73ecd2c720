//! Per-connection events on an output stream: one line per finished connection, as JSON or as
//! aligned text in the spirit of BCC's `tcplife`.
//!
//! The sink is meant to sit on a `BufWriter`: it writes each line with one `write_all` and the
//! event loop calls [`EventSink::flush`] after each batch. A write error (EPIPE when the reader
//! went away, as with `| head`) never panics: the first one is kept, later lines are dropped,
//! and `flush` / `take_error` hand it to the event loop so that it can stop cleanly.
mod cost;

use std::borrow::Cow;

use std::fmt;

use std::io::{self, Write};

use std::net::IpAddr;

use serde::Serialize;

use serde::ser::{SerializeSeq, SerializeStruct, Serializer};

use crate::export::filter::Filter;
use crate::host::cgroups::Cgroup;
use crate::host::owner_lookups::OwnerLookups;
use crate::host::workloads::WorkloadNames;
use crate::kernel::clock::{Rfc3339, TimeOfDay, WallClock};
use tracer_core::model::Owner;

use tracer_core::model::{CloseCause, Tuple};

use tracer_core::observer::Observer;

use tracer_core::record::CloseWaitLeak;

use tracer_core::record::TimeWaitRecord;

use tracer_core::record::{Connection, StateStamp};

pub use crate::export::cost::CostContext;
mod workload;
use workload::{Held, SinkWorkloads, WorkloadFields};

/// How per-connection events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventFormat {
    /// One JSON object per line.
    Json,
    /// Aligned columns with a header line, like `tcplife`.
    Text,
    /// No per-connection output.
    None,
}

/// Writes finished connections to `W`, one line each, in the chosen format.
pub struct EventSink<W: Write> {
    format: EventFormat,
    out: W,
    clock: WallClock,
    /// The line being built, reused across events.
    line: Vec<u8>,
    /// Scratch space for padding a text column, reused across events.
    cell: String,
    error: Option<io::Error>,
    /// Where CLOSE_WAIT leaks of unknown owner wait for their `/proc` lookup, off the event
    /// path; without it they are written with an unknown owner.
    owners: Option<OwnerLookups>,
    /// Units and names for the cost fields.
    cost: CostContext,
    /// Workload names, `--filter`, and the records waiting for a name.
    workloads: SinkWorkloads,
}

// Text columns: widths of TIME, PID, COMM, LADDR:LPORT, RADDR:RPORT, DIR, CLOSE, RETX, MS.
const W_TIME: usize = 12;
const W_PID: usize = 7;
const W_COMM: usize = 15;
const W_WORKLOAD: usize = 24;
const W_ADDR: usize = 21;
const W_DIR: usize = 7;
const W_CLOSE: usize = 14;
const W_RETX: usize = 5;
const W_MS: usize = 11;
// TX_KB, RX_KB, RTT_MS.
const W_KB: usize = 8;
const W_RTT: usize = 9;

impl<W: Write> EventSink<W> {
    pub fn new(format: EventFormat, out: W, clock: WallClock) -> EventSink<W> {
        EventSink {
            format,
            out,
            clock,
            line: Vec::with_capacity(512),
            cell: String::with_capacity(64),
            error: None,
            owners: None,
            cost: CostContext::default(),
            workloads: SinkWorkloads::default(),
        }
    }

    /// Names each record's workload from `names` (records of a cgroup not named yet wait for
    /// the next walk) and writes only the records `filter` lets through.
    pub fn with_workloads(mut self, names: Option<WorkloadNames>, filter: Filter) -> EventSink<W> {
        self.workloads.names = names;
        self.workloads.filter = filter;
        self
    }

    /// Holds the record `make` builds (a copy) when its cgroup `id` is not named yet or
    /// records before it wait; otherwise returns `false`: the caller writes it now.
    fn held(&mut self, id: u64, make: impl FnOnce() -> Held) -> bool {
        if self.format == EventFormat::None {
            return true;
        }
        if !self.workloads.must_hold(id) {
            return false;
        }
        if let Some(oldest) = self.workloads.hold(make()) {
            self.dispatch(oldest);
        }
        true
    }

    fn dispatch(&mut self, record: Held) {
        match record {
            Held::Closed(conn) => self.write_connection(&conn),
            Held::NagleReport(conn) => self.write_nagle(&conn),
            Held::Leak(leak) => self.leak_owner_then_write(&leak),
            Held::TimeWait(record) => self.write_time_wait(&record),
        }
    }

    /// Writes the held records now due (all of them with `all`).
    fn release(&mut self, all: bool) {
        for record in self.workloads.due(all) {
            self.dispatch(record);
        }
    }

    /// The jiffy length and RST reason names the cost fields are written with.
    pub fn with_cost_context(mut self, cost: CostContext) -> EventSink<W> {
        self.cost = cost;
        self
    }

    /// Looks up the owners of CLOSE_WAIT leaks the kernel events could not name on `owners`'
    /// worker; each such leak is written once its lookup finishes (at the next flush).
    pub fn with_owner_lookups(mut self, owners: OwnerLookups) -> EventSink<W> {
        self.owners = Some(owners);
        self
    }

    /// At shutdown: writes the leaks whose owner lookup finishes within `timeout`.
    pub fn finish_lookups(&mut self, timeout: std::time::Duration) {
        if let Some(names) = &self.workloads.names {
            names.refresh_now();
        }
        self.release(true);
        self.write_looked_up(|owners| owners.finish(timeout));
    }

    /// Writes the leaks `take` hands back from the lookup worker.
    fn write_looked_up(&mut self, take: impl FnOnce(&mut OwnerLookups) -> Vec<CloseWaitLeak>) {
        let done = self.owners.as_mut().map(take).unwrap_or_default();
        for leak in &done {
            self.write_close_wait_leak(leak);
        }
    }

    pub fn format(&self) -> EventFormat {
        self.format
    }

    /// Writes the column header of the text format; nothing for the other formats. Call it once,
    /// before the first event.
    pub fn header(&mut self) {
        if self.format != EventFormat::Text {
            return;
        }
        self.line.clear();
        // Writing to a Vec cannot fail.
        let _ = writeln!(
            self.line,
            "{:<W_TIME$} {:<W_PID$} {:<W_COMM$} {:<W_WORKLOAD$} {:<W_ADDR$} {:<W_ADDR$} {:<W_DIR$} \
             {:<W_CLOSE$} {:>W_RETX$} {:>W_KB$} {:>W_KB$} {:>W_RTT$} {:>W_MS$} STATES",
            "TIME(UTC)",
            "PID",
            "COMM",
            "WORKLOAD",
            "LADDR:LPORT",
            "RADDR:RPORT",
            "DIR",
            "CLOSE",
            "RETX",
            "TX_KB",
            "RX_KB",
            "RTT_MS",
            "MS",
        );
        self.emit();
    }

    /// Flushes the output. Returns the first write error seen since the last call, if any,
    /// before trying to flush.
    pub fn flush(&mut self) -> io::Result<()> {
        self.release(false);
        self.write_looked_up(OwnerLookups::finished);
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        self.out.flush()
    }

    /// The first write error seen since the last call; once one is seen, lines are dropped.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// Writes one finished connection.
    pub fn write_connection(&mut self, conn: &Connection) {
        if self.error.is_some() {
            return;
        }
        let cgroup = self.workloads.cgroup(conn.cgroup);
        if !self.workloads.passes(&conn.tuple, cgroup.as_deref()) {
            return;
        }
        match self.format {
            EventFormat::None => {}
            EventFormat::Json => {
                // An Arc count, not a copy of the names.
                let cost = self.cost.clone();
                let record = JsonRecord {
                    conn,
                    clock: self.clock,
                    cost: &cost,
                    cgroup: cgroup.as_deref(),
                };
                self.write_json(&record);
            }
            EventFormat::Text => {
                self.line.clear();
                self.text_line(conn, cgroup.as_deref());
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        if self.error.is_some() {
            return;
        }
        if let Err(err) = self.out.write_all(&self.line) {
            self.error = Some(err);
        }
    }

    fn text_line(&mut self, conn: &Connection, cgroup: Option<&Cgroup>) {
        use fmt::Write as _;
        let line = &mut self.line;
        let cell = &mut self.cell;
        // Writing to a Vec or a String cannot fail.
        let _ = write!(
            line,
            "{:<W_TIME$} ",
            TimeOfDay(self.clock.unix_ns(close_ns(conn)))
        );
        cell.clear();
        match conn.owner {
            Some(owner) => {
                let _ = write!(cell, "{}", owner.pid);
            }
            None => cell.push('-'),
        }
        let _ = write!(line, "{cell:<W_PID$} ");
        cell.clear();
        match conn.owner {
            // Control characters would break the line structure.
            Some(owner) => cell.extend(
                owner.comm.as_str().chars().map(
                    |c| {
                        if c.is_control() || c == ' ' { '?' } else { c }
                    },
                ),
            ),
            None => cell.push('-'),
        }
        let _ = write!(line, "{cell:<W_COMM$} ");
        cell.clear();
        match cgroup {
            Some(c) => cell.extend(
                c.workload
                    .name
                    .chars()
                    .map(|c| if c.is_control() || c == ' ' { '?' } else { c }),
            ),
            None => cell.push('-'),
        }
        let _ = write!(line, "{cell:<W_WORKLOAD$} ");
        for (addr, port) in [
            (conn.tuple.src, conn.tuple.sport),
            (conn.tuple.dst, conn.tuple.dport),
        ] {
            cell.clear();
            let _ = match addr {
                IpAddr::V4(v4) => write!(cell, "{v4}:{port}"),
                IpAddr::V6(v6) => write!(cell, "[{v6}]:{port}"),
            };
            let _ = write!(line, "{cell:<W_ADDR$} ");
        }
        cell.clear();
        match conn.duration_ns() {
            Some(ns) => {
                let _ = write!(cell, "{}.{:03}", ns / 1_000_000, ns / 1_000 % 1_000);
            }
            None => cell.push('-'),
        }
        let [tx_kb, rx_kb, rtt_ms] = cost::text_columns(conn);
        let _ = write!(
            line,
            "{:<W_DIR$} {:<W_CLOSE$} {:>W_RETX$} {tx_kb:>W_KB$} {rx_kb:>W_KB$} {rtt_ms:>W_RTT$} \
             {cell:>W_MS$} ",
            conn.direction.as_str(),
            close_str(conn),
            conn.retransmits,
        );
        for (i, stamp) in conn.states.iter().enumerate() {
            if i > 0 {
                line.push(b'>');
            }
            line.extend_from_slice(stamp.state.as_str().as_bytes());
        }
        if conn.states.is_empty() {
            line.push(b'-');
        }
        line.push(b'\n');
    }
}

impl<W: Write> Observer for EventSink<W> {
    fn closed(&mut self, conn: &Connection) {
        if !self.held(conn.cgroup, || Held::Closed(Box::new(conn.clone()))) {
            self.write_connection(conn);
        }
    }

    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        if self.format == EventFormat::Json
            && !self.held(record.cgroup, || Held::TimeWait(Box::new(record.clone())))
        {
            self.write_time_wait(record);
        }
    }

    fn nagle_stall_report(&mut self, conn: &Connection) {
        if self.format == EventFormat::Json
            && !self.held(conn.cgroup, || Held::NagleReport(Box::new(conn.clone())))
        {
            self.write_nagle(conn);
        }
    }

    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        if !self.held(leak.cgroup, || Held::Leak(*leak)) {
            self.leak_owner_then_write(leak);
        }
    }
}

impl<W: Write> EventSink<W> {
    fn write_nagle(&mut self, conn: &Connection) {
        let cgroup = self.workloads.cgroup(conn.cgroup);
        if self.format != EventFormat::Json
            || !self.workloads.passes(&conn.tuple, cgroup.as_deref())
        {
            return;
        }
        let writer = conn.acks.writer;
        let line = NagleStallLine {
            ts: self.clock.rfc3339(conn.acks.reported_ns.unwrap_or(0)),
            event: "nagle_delack_stall",
            address: Addressing::of(&conn.tuple, conn.netns),
            process: Process(writer.as_ref()),
            workload: WorkloadFields {
                id: conn.cgroup,
                cgroup: cgroup.as_deref(),
            },
            stalls: conn.acks.nagle_stalls,
            lost_us: micros(conn.acks.nagle_lost_ns),
            held_writes: conn.acks.nagle_held_writes,
            fix: NAGLE_FIX,
        };
        self.write_json(&line);
    }

    fn leak_owner_then_write(&mut self, leak: &CloseWaitLeak) {
        if self.format == EventFormat::None {
            return;
        }
        // The kernel events cannot name the owner of a passively closed socket: ask /proc, on
        // the lookup worker; the leak is written when the answer comes.
        if leak.owner.is_none()
            && let Some(owners) = self.owners.as_mut()
            && owners.request(*leak)
        {
            return;
        }
        self.write_close_wait_leak(leak);
    }

    fn write_close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        let cgroup = self.workloads.cgroup(leak.cgroup);
        if !self.workloads.passes(&leak.tuple, cgroup.as_deref()) {
            return;
        }
        let owner = leak.owner;
        if self.format == EventFormat::Text {
            self.line.clear();
            let mut owner = owner.map_or_else(
                || "unknown process".to_owned(),
                |o| format!("pid {} ({})", o.pid, o.comm.as_str()),
            );
            if let Some(c) = &cgroup {
                owner.push_str(&format!(" in {}", c.workload.name.escape_debug()));
            }
            self.line.extend_from_slice(
                format!(
                    "# CLOSE_WAIT leak: {}:{} -> {}:{} held by {owner} for {} s: the peer closed and the application never called close()\n",
                    leak.tuple.src,
                    leak.tuple.sport,
                    leak.tuple.dst,
                    leak.tuple.dport,
                    leak.detected_ns.saturating_sub(leak.since_ns) / 1_000_000_000
                )
                .as_bytes(),
            );
            self.emit();
            return;
        }
        let line = CloseWaitLine {
            ts: self.clock.rfc3339(leak.detected_ns),
            event: "close_wait_leak",
            address: Addressing::of(&leak.tuple, leak.netns),
            direction: leak.direction.as_str(),
            process: Process(owner.as_ref()),
            workload: WorkloadFields {
                id: leak.cgroup,
                cgroup: cgroup.as_deref(),
            },
            close_wait_us: micros(leak.detected_ns.saturating_sub(leak.since_ns)),
            seeded: leak.seeded,
            fix: CLOSE_WAIT_FIX,
        };
        self.write_json(&line);
    }
}

/// What to do about a Nagle + delayed-ACK stall.
pub const NAGLE_FIX: &str = "set TCP_NODELAY on the sender, or write each request in one call (writev / buffering), or set TCP_QUICKACK on the receiver";

/// What to do about a CLOSE_WAIT leak.
pub const CLOSE_WAIT_FIX: &str = "the application does not close sockets after the peer closes: make sure every code path (errors and EOF included) closes the socket";

/// The fields every event starts with: the 4-tuple (local side first) and its namespace.
struct Addressing<'a> {
    tuple: &'a Tuple,
    netns: u32,
}

impl<'a> Addressing<'a> {
    fn of(tuple: &'a Tuple, netns: u32) -> Addressing<'a> {
        Addressing { tuple, netns }
    }

    /// Writes the fields into an object being serialized.
    fn write<S: SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        s.serialize_field("family", self.tuple.family().as_str())?;
        s.serialize_field("saddr", &self.tuple.src)?;
        s.serialize_field("sport", &self.tuple.sport)?;
        s.serialize_field("daddr", &self.tuple.dst)?;
        s.serialize_field("dport", &self.tuple.dport)?;
        s.serialize_field("netns", &self.netns)
    }
}

/// For `#[serde(flatten)]` in derived event structs.
impl Serialize for Addressing<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Addressing", 6)?;
        self.write(&mut s)?;
        s.end()
    }
}

/// `pid` and `comm` of a socket's process, both `null` when unknown.
struct Process<'a>(Option<&'a Owner>);

impl Process<'_> {
    fn write<S: SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        s.serialize_field("pid", &self.0.map(|o| o.pid))?;
        let comm: Option<Cow<'_, str>> = self.0.map(|o| o.comm.as_str());
        s.serialize_field("comm", &comm)
    }
}

impl Serialize for Process<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Process", 2)?;
        self.write(&mut s)?;
        s.end()
    }
}

#[derive(Serialize)]
struct NagleStallLine<'a> {
    ts: Rfc3339,
    event: &'static str,
    #[serde(flatten)]
    address: Addressing<'a>,
    #[serde(flatten)]
    process: Process<'a>,
    #[serde(flatten)]
    workload: WorkloadFields<'a>,
    stalls: u32,
    lost_us: u64,
    held_writes: u32,
    fix: &'static str,
}

#[derive(Serialize)]
struct CloseWaitLine<'a> {
    ts: Rfc3339,
    event: &'static str,
    #[serde(flatten)]
    address: Addressing<'a>,
    direction: &'static str,
    #[serde(flatten)]
    process: Process<'a>,
    #[serde(flatten)]
    workload: WorkloadFields<'a>,
    close_wait_us: u64,
    seeded: bool,
    fix: &'static str,
}

impl<W: Write> EventSink<W> {
    /// Writes the end of a socket's TIME_WAIT (JSON only: the text format shows connections).
    pub fn write_time_wait(&mut self, record: &TimeWaitRecord) {
        if self.error.is_some() || self.format != EventFormat::Json {
            return;
        }
        let cgroup = self.workloads.cgroup(record.cgroup);
        if !self.workloads.passes(&record.tuple, cgroup.as_deref()) {
            return;
        }
        let json = JsonTimeWait {
            record,
            clock: self.clock,
            cgroup: cgroup.as_deref(),
        };
        self.write_json(&json);
    }

    /// One JSON object as one line.
    fn write_json(&mut self, value: &impl Serialize) {
        if self.error.is_some() {
            return;
        }
        self.line.clear();
        if let Err(err) = serde_json::to_writer(&mut self.line, value) {
            self.error = Some(io::Error::other(err));
            return;
        }
        self.line.push(b'\n');
        self.emit();
    }
}

/// The end of a TIME_WAIT stay as one JSON object.
struct JsonTimeWait<'a> {
    record: &'a TimeWaitRecord,
    clock: WallClock,
    cgroup: Option<&'a Cgroup>,
}

impl Serialize for JsonTimeWait<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut s = serializer.serialize_struct("TimeWaitEnded", 15)?;
        s.serialize_field("ts", &self.clock.rfc3339(r.exited_ns))?;
        s.serialize_field("event", "time_wait_ended")?;
        Addressing::of(&r.tuple, r.netns).write(&mut s)?;
        s.serialize_field("direction", &r.direction.map(|d| d.as_str()))?;
        Process(r.owner.as_ref()).write(&mut s)?;
        workload::write_fields(&mut s, r.cgroup, self.cgroup)?;
        s.serialize_field("time_wait_us", &r.duration_ns().map(micros))?;
        s.serialize_field("exit", r.exit.as_str())?;
        s.serialize_field("substate", r.substate.as_str())?;
        s.serialize_field("seeded", &r.entered_ns.is_none())?;
        s.end()
    }
}

/// When the connection closed; the last state seen for a record finished without a close time.
fn close_ns(conn: &Connection) -> u64 {
    conn.closed_ns
        .or_else(|| conn.states.last().map(|s| s.ts_ns))
        .unwrap_or(0)
}

fn close_str(conn: &Connection) -> &'static str {
    conn.close.unwrap_or(CloseCause::Unknown).as_str()
}

fn micros(ns: u64) -> u64 {
    ns / 1_000
}

/// A connection as one JSON object; serialized straight into the line buffer.
struct JsonRecord<'a> {
    conn: &'a Connection,
    clock: WallClock,
    cost: &'a CostContext,
    cgroup: Option<&'a Cgroup>,
}

impl Serialize for JsonRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let conn = self.conn;
        let mut s = serializer.serialize_struct("ConnectionClosed", 25 + cost::FIELDS)?;
        s.serialize_field("ts", &self.clock.rfc3339(close_ns(conn)))?;
        s.serialize_field("event", "connection_closed")?;
        Addressing::of(&conn.tuple, conn.netns).write(&mut s)?;
        s.serialize_field("direction", conn.direction.as_str())?;
        Process(conn.owner.as_ref()).write(&mut s)?;
        workload::write_fields(&mut s, conn.cgroup, self.cgroup)?;
        s.serialize_field("states", &JsonStates(&conn.states))?;
        s.serialize_field("duration_us", &conn.duration_ns().map(micros))?;
        s.serialize_field("handshake_us", &conn.handshake_ns().map(micros))?;
        s.serialize_field("retransmits", &conn.retransmits)?;
        s.serialize_field("resets_sent", &conn.resets_sent)?;
        s.serialize_field("resets_received", &conn.resets_received)?;
        s.serialize_field("close", close_str(conn))?;
        s.serialize_field("seeded", &conn.seeded)?;
        s.serialize_field("complete", &conn.complete)?;
        s.serialize_field("time_wait", &conn.time_wait)?;
        s.serialize_field("delayed_acks", &conn.acks.delayed_acks)?;
        s.serialize_field("delayed_ack_us", &micros(conn.acks.delayed_ack_ns))?;
        s.serialize_field("nagle_stalls", &conn.acks.nagle_stalls)?;
        s.serialize_field("nagle_lost_us", &micros(conn.acks.nagle_lost_ns))?;
        cost::write(conn, self.cost, &mut s)?;
        s.end()
    }
}

/// The state path, each stamp relative to the first.
struct JsonStates<'a>(&'a [StateStamp]);

impl Serialize for JsonStates<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let first = self.0.first().map_or(0, |s| s.ts_ns);
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for stamp in self.0 {
            seq.serialize_element(&JsonStamp {
                state: stamp.state.as_str(),
                t_us: micros(stamp.ts_ns.saturating_sub(first)),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct JsonStamp {
    state: &'static str,
    t_us: u64,
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use serde_json::{Value, json};

    use super::*;
    use tracer_core::model::{Comm, Event, ResetDirection, Task, TcpState, Tuple};
    use tracer_core::tracker::{Tracker, TrackerConfig};

    const NETNS: u32 = 4026531840;
    /// 2026-11-23T12:00:00Z.
    const WALL: i64 = 1_795_435_200 * 1_000_000_000;
    /// A monotonic time (the machine's uptime, say).
    const T0: u64 = 5_000_000_000_000;

    /// A clock on which monotonic T0 is 2026-11-23T12:00:00Z.
    fn clock() -> WallClock {
        WallClock::with_offset(WALL - T0 as i64)
    }

    fn v4_tuple(sport: u16) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport,
            dst: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 8080,
        }
    }

    fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: Comm::from(comm),
        }
    }

    fn change(ts_ns: u64, tuple: Tuple, old: TcpState, new: TcpState, task: Task) -> Event {
        Event::StateChange {
            ts_ns,
            sock: 0xffff_8880_0000_1000,
            netns: NETNS,
            tuple,
            old,
            new,
            task,
        }
    }

    /// Collects closed connections.
    #[derive(Default)]
    struct Closed(Vec<Connection>);

    impl Observer for Closed {
        fn closed(&mut self, conn: &Connection) {
            self.0.push(conn.clone());
        }
    }

    fn run(events: &[Event]) -> Connection {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut closed = Closed::default();
        for event in events {
            tracker.on_event(event, &mut closed);
        }
        tracker.flush_closed(&mut closed);
        assert_eq!(closed.0.len(), 1, "{:?}", closed.0);
        closed.0.remove(0)
    }

    /// `curl` connecting to 127.0.0.1:8080: a 52 µs handshake and a local close, 1234 µs in all
    /// (closed at 12:00:00.123456 and some nanoseconds).
    fn curl() -> Connection {
        use TcpState::*;
        let curl = task(123, "curl");
        let irq = task(0, "swapper/0");
        let open = T0 + 123_456_789 - 1_234_999;
        let t = v4_tuple(40000);
        run(&[
            change(open, v4_tuple(0), Close, SynSent, curl),
            change(open + 52_400, t, SynSent, Established, irq),
            change(open + 1_000_000, t, Established, FinWait1, curl),
            change(open + 1_100_000, t, FinWait1, FinWait2, irq),
            change(open + 1_234_999, t, FinWait2, Close, irq),
        ])
    }

    fn json_line(conn: &Connection) -> String {
        let mut sink = EventSink::new(EventFormat::Json, Vec::new(), clock());
        sink.closed(conn);
        sink.flush().unwrap();
        String::from_utf8(sink.into_inner()).unwrap()
    }

    fn text_lines(conn: &Connection) -> String {
        let mut sink = EventSink::new(EventFormat::Text, Vec::new(), clock());
        sink.header();
        sink.closed(conn);
        sink.flush().unwrap();
        String::from_utf8(sink.into_inner()).unwrap()
    }

    #[test]
    fn json_line_has_exactly_the_documented_fields() {
        let line = json_line(&curl());
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        let value: Value = serde_json::from_str(&line).unwrap();
        let mut expected = json!({
                "ts": "2026-11-23T12:00:00.123456Z",
                "event": "connection_closed",
                "family": "ipv4",
                "saddr": "127.0.0.1",
                "sport": 40000,
                "daddr": "127.0.0.1",
                "dport": 8080,
                "netns": 4026531840u32,
                "direction": "active",
                "pid": 123,
                "comm": "curl",
                "cgroup": null,
                "workload": null,
                "workload_kind": null,
                "unit": null,
                "uid": null,
                "container_id": null,
                "runtime": null,
                "pod_uid": null,
                "qos": null,
                "states": [
                    {"state": "SYN_SENT", "t_us": 0},
                    {"state": "ESTABLISHED", "t_us": 52},
                    {"state": "FIN_WAIT1", "t_us": 1000},
                    {"state": "FIN_WAIT2", "t_us": 1100},
                    {"state": "CLOSE", "t_us": 1234},
                ],
                "duration_us": 1234,
                "handshake_us": 52,
                "retransmits": 0,
                "resets_sent": 0,
                "resets_received": 0,
                "close": "local",
                "seeded": false,
                "complete": true,
                "time_wait": false,
                "delayed_acks": 0,
                "delayed_ack_us": 0,
                "nagle_stalls": 0,
                "nagle_lost_us": 0,
        });
        // No cost from the kernel: every cost key is there, null.
        expected.as_object_mut().unwrap().extend(
            json!({
                "bytes_sent": null,
                "bytes_received": null,
                "seq_bytes_acked": null,
                "seq_bytes_received": null,
                "segs_out": null,
                "segs_in": null,
                "retransmits_by_kind": {"syn": 0, "fast": 0, "timeout": 0, "other": 0, "synack": 0},
                "kernel_retransmits": null,
                "srtt_us": null,
                "rttvar_us": null,
                "min_rtt_us": null,
                "cwnd": null,
                "max_cwnd": null,
                "congestion_states": null,
                "rwnd_limited_us": null,
                "reset_sent_reason": null,
                "reset_received": false,
                "cost_known": false,
            })
            .as_object()
            .unwrap()
            .clone(),
        );
        assert_eq!(value, expected);
        // Keys in the documented order.
        let keys = [
            "ts",
            "event",
            "family",
            "saddr",
            "sport",
            "daddr",
            "dport",
            "netns",
            "direction",
            "pid",
            "comm",
            "cgroup",
            "workload",
            "workload_kind",
            "unit",
            "uid",
            "container_id",
            "runtime",
            "pod_uid",
            "qos",
            "states",
            "duration_us",
            "handshake_us",
            "retransmits",
            "resets_sent",
            "resets_received",
            "close",
            "seeded",
            "complete",
            "time_wait",
            "delayed_acks",
            "delayed_ack_us",
            "nagle_stalls",
            "nagle_lost_us",
            "bytes_sent",
            "bytes_received",
            "seq_bytes_acked",
            "seq_bytes_received",
            "segs_out",
            "segs_in",
            "retransmits_by_kind",
            "kernel_retransmits",
            "srtt_us",
            "rttvar_us",
            "min_rtt_us",
            "cwnd",
            "max_cwnd",
            "congestion_states",
            "rwnd_limited_us",
            "reset_sent_reason",
            "reset_received",
            "cost_known",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| line.find(&format!("\"{key}\":")).unwrap())
            .collect();
        assert!(positions.is_sorted(), "{line}");
        assert_eq!(value.as_object().unwrap().len(), keys.len());
    }

    /// A connection open before the agent started, seen only when it is reset: no owner, no
    /// open time, over IPv6.
    #[test]
    fn json_null_owner_unknown_durations_and_ipv6() {
        use TcpState::*;
        let tuple = Tuple {
            src: IpAddr::V6(Ipv6Addr::LOCALHOST),
            sport: 443,
            dst: IpAddr::V6("2001:db8::7".parse().unwrap()),
            dport: 51000,
        };
        let conn = run(&[
            Event::Reset {
                ts_ns: T0 - 1_000,
                sock: 0xffff_8880_0000_1000,
                netns: NETNS,
                tuple,
                state: Established,
                direction: ResetDirection::Received,
                reason: None,
                task: task(0, "swapper/1"),
            },
            Event::Retransmit {
                ts_ns: T0 - 500,
                sock: 0xffff_8880_0000_1000,
                netns: NETNS,
                tuple,
                state: Established,
                kind: tracer_core::model::RetransmitKind::Timeout,
                segs: 2,
            },
            change(T0, tuple, Established, Close, task(0, "swapper/1")),
        ]);
        let value: Value = serde_json::from_str(&json_line(&conn)).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 34 + cost::FIELDS);
        assert_eq!(value["time_wait"], false);
        assert_eq!(value["ts"], "2026-11-23T12:00:00.000000Z");
        assert_eq!(value["family"], "ipv6");
        assert_eq!(value["saddr"], "::1");
        assert_eq!(value["sport"], 443);
        assert_eq!(value["daddr"], "2001:db8::7");
        assert_eq!(value["dport"], 51000);
        assert_eq!(value["direction"], "unknown");
        assert_eq!(value["pid"], Value::Null);
        assert_eq!(value["comm"], Value::Null);
        assert_eq!(value["duration_us"], Value::Null);
        assert_eq!(value["handshake_us"], Value::Null);
        assert_eq!(value["retransmits"], 2);
        assert_eq!(value["resets_received"], 1);
        assert_eq!(value["close"], "reset_received");
        assert_eq!(value["complete"], false);
        assert_eq!(
            value["states"],
            json!([{"state": "ESTABLISHED", "t_us": 0}, {"state": "CLOSE", "t_us": 1}])
        );
    }

    #[test]
    fn json_escapes_the_command_name() {
        use TcpState::*;
        let conn = run(&[
            change(T0, v4_tuple(0), Close, SynSent, task(9, "a\"b\\c\nd")),
            change(T0 + 10, v4_tuple(40000), SynSent, Close, task(0, "x")),
        ]);
        let line = json_line(&conn);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["comm"], "a\"b\\c\nd");
        assert_eq!(value["close"], "failed");
        assert_eq!(value["handshake_us"], Value::Null);
        assert_eq!(value["duration_us"], 0);
    }

    #[test]
    fn text_header_and_line() {
        let out = text_lines(&curl());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "TIME(UTC)",
                "PID",
                "COMM",
                "WORKLOAD",
                "LADDR:LPORT",
                "RADDR:RPORT",
                "DIR",
                "CLOSE",
                "RETX",
                "TX_KB",
                "RX_KB",
                "RTT_MS",
                "MS",
                "STATES"
            ]
        );
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "12:00:00.123",
                "123",
                "curl",
                "-",
                "127.0.0.1:40000",
                "127.0.0.1:8080",
                "active",
                "local",
                "0",
                "-",
                "-",
                "-",
                "1.234",
                "SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE",
            ]
        );
        // Columns line up: each field starts where its heading does (numbers end where theirs
        // end).
        for (i, heading) in [
            "PID",
            "COMM",
            "WORKLOAD",
            "LADDR:LPORT",
            "RADDR:RPORT",
            "DIR",
            "CLOSE",
            "STATES",
        ]
        .iter()
        .enumerate()
        {
            let col = lines[0].find(heading).unwrap();
            let field = [1, 2, 3, 4, 5, 6, 7, 13][i];
            assert_eq!(
                lines[1][col..].split_whitespace().next(),
                Some(fields[field])
            );
            assert_eq!(&lines[1][col - 1..col], " ");
        }
        for (heading, field) in [
            ("RETX", 8),
            ("TX_KB", 9),
            ("RX_KB", 10),
            ("RTT_MS", 11),
            ("MS", 12),
        ] {
            let end = lines[0].rfind(heading).unwrap() + heading.len();
            assert!(lines[1][..end].ends_with(fields[field]), "{heading}");
        }
    }

    #[test]
    fn text_ipv6_in_brackets_and_unknowns_as_dashes() {
        use TcpState::*;
        let tuple = Tuple {
            src: IpAddr::V6(Ipv6Addr::LOCALHOST),
            sport: 443,
            dst: IpAddr::V6(Ipv6Addr::LOCALHOST),
            dport: 51000,
        };
        let conn = run(&[change(T0, tuple, Established, Close, task(0, "swapper/1"))]);
        let out = text_lines(&conn);
        let fields: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "12:00:00.000",
                "-",
                "-",
                "-",
                "[::1]:443",
                "[::1]:51000",
                "unknown",
                "aborted",
                "0",
                "-",
                "-",
                "-",
                "-",
                "ESTABLISHED>CLOSE",
            ]
        );
    }

    #[test]
    fn text_comm_with_spaces_stays_one_column() {
        use TcpState::*;
        let conn = run(&[
            change(T0, v4_tuple(0), Close, SynSent, task(7, "my app\n")),
            change(
                T0 + 2_500_000_000,
                v4_tuple(1),
                SynSent,
                Close,
                task(0, "x"),
            ),
        ]);
        let out = text_lines(&conn);
        assert_eq!(out.lines().count(), 2, "{out}");
        let fields: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(fields[2], "my?app?");
        assert_eq!(fields[12], "2500.000");
    }

    /// `curl()` with what the kernel said it cost, and a RST it sent with reason 3.
    #[test]
    fn json_and_text_show_the_cost() {
        use TcpState::*;
        let curl = task(123, "curl");
        let t = v4_tuple(40000);
        let conn = run(&[
            change(T0, v4_tuple(0), Close, SynSent, curl),
            change(T0 + 50_000, t, SynSent, Established, curl),
            change(T0 + 1_000_000, t, Established, FinWait1, curl),
            change(T0 + 1_100_000, t, FinWait1, FinWait2, curl),
            Event::SocketInfo {
                ts_ns: T0 + 1_200_000,
                sock: 0xffff_8880_0000_1000,
                cgroup: 0,
                cost: Some(tracer_core::model::ConnectionCost {
                    bytes_sent: 204_802,
                    bytes_received: 501,
                    segs_in: 40,
                    segs_out: 160,
                    total_retrans: 3,
                    srtt_ns: 1_250_000,
                    rttvar_ns: 300_000,
                    min_rtt_ns: 900_000,
                    cwnd: 20,
                    max_cwnd: 64,
                    rwnd_limited_jiffies: 25,
                    ca_states: 0b11001,
                }),
            },
            change(T0 + 1_300_000, t, FinWait2, Close, curl),
        ]);
        let mut sink =
            EventSink::new(EventFormat::Json, Vec::new(), clock()).with_cost_context(CostContext {
                jiffy_ns: Some(4_000_000),
                rst_reasons: std::sync::Arc::new(
                    [(3, "tcp_state".to_owned())].into_iter().collect(),
                ),
            });
        let mut reset = conn.clone();
        reset.resets_sent = 1;
        reset.reset_sent_reason = Some(3);
        sink.closed(&reset);
        let value: Value = serde_json::from_slice(sink.get_ref()).unwrap();
        assert_eq!(value["bytes_sent"], 204_800, "SYN and FIN taken out");
        assert_eq!(
            value["bytes_received"],
            Value::Null,
            "the peer's FIN unknown"
        );
        assert_eq!(value["seq_bytes_acked"], 204_802);
        assert_eq!(value["seq_bytes_received"], 501);
        assert_eq!(
            (value["segs_out"].clone(), value["segs_in"].clone()),
            (json!(160), json!(40))
        );
        assert_eq!(value["kernel_retransmits"], 3);
        assert_eq!(value["srtt_us"], 1250);
        assert_eq!(value["rttvar_us"], 300);
        assert_eq!(value["min_rtt_us"], 900);
        assert_eq!(
            (value["cwnd"].clone(), value["max_cwnd"].clone()),
            (json!(20), json!(64))
        );
        assert_eq!(
            value["congestion_states"],
            json!(["open", "recovery", "loss"])
        );
        assert_eq!(value["rwnd_limited_us"], 100_000, "25 jiffies of 4 ms");
        assert_eq!(value["reset_sent_reason"], "tcp_state");
        assert_eq!(value["cost_known"], true);

        let out = text_lines(&conn);
        let fields: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(&fields[9..12], ["200", "0", "1.250"], "{out}");
    }

    #[test]
    fn none_writes_nothing() {
        let mut sink = EventSink::new(EventFormat::None, Vec::new(), clock());
        sink.header();
        sink.closed(&curl());
        sink.flush().unwrap();
        assert!(sink.into_inner().is_empty());
    }

    /// A writer that fails like a closed pipe after `budget` bytes.
    struct Pipe {
        written: Vec<u8>,
        budget: usize,
        writes_after_error: usize,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.written.len() >= self.budget {
                self.writes_after_error += 1;
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let n = buf.len().min(self.budget - self.written.len());
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_errors_are_kept_not_panicked_on() {
        let conn = curl();
        let pipe = Pipe {
            written: Vec::new(),
            budget: 10,
            writes_after_error: 0,
        };
        let mut sink = EventSink::new(EventFormat::Json, pipe, clock());
        sink.closed(&conn);
        sink.closed(&conn);
        sink.closed(&conn);
        let err = sink.flush().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        // After the first error nothing more is attempted.
        assert_eq!(sink.get_ref().writes_after_error, 1);
        assert_eq!(sink.get_ref().written.len(), 10);
        assert!(sink.take_error().is_none());

        let mut sink = EventSink::new(
            EventFormat::Text,
            Pipe {
                written: Vec::new(),
                budget: 0,
                writes_after_error: 0,
            },
            clock(),
        );
        sink.header();
        assert_eq!(
            sink.take_error().map(|e| e.kind()),
            Some(io::ErrorKind::BrokenPipe)
        );
    }

    #[test]
    fn buffered_output_is_written_on_flush() {
        let mut sink = EventSink::new(EventFormat::Json, io::BufWriter::new(Vec::new()), clock());
        sink.closed(&curl());
        sink.closed(&curl());
        assert!(sink.get_ref().get_ref().is_empty());
        sink.flush().unwrap();
        let out = String::from_utf8(sink.get_ref().get_ref().clone()).unwrap();
        assert_eq!(out.lines().count(), 2);
        for line in out.lines() {
            serde_json::from_str::<Value>(line).unwrap();
        }
    }
}
