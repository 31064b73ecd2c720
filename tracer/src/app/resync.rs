//! Resyncs off the event path. After lost kernel events the tables drift from the kernel's (a
//! lost CLOSE keeps a connection forever, a lost TIME_WAIT exit keeps a timewait socket); a
//! sock_diag dump of every namespace puts them right, but takes milliseconds to seconds on a
//! busy host. A dump follows counted loss: a full ring buffer, runs the kernel skipped, and,
//! spaced more, softirq runs it made without any BPF program (`kernel::softirqs`); a loss no
//! counter shows stays possible, so a dump also comes every `every` (the audit).
//! The dump runs on one worker thread, one at a time and at most once per `MIN_SPACING`; the
//! event loop only asks for it and, later, applies what came back with `Tracker::finish_resync`, whose epoch journal keeps the merge free of races with the events
//! drained meanwhile (see `tracer_core::tracker` resync). The drain goes on while the dump runs.
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::export::metrics::Metrics;
use crate::host::sock_diag::{HostError, Lister};
use crate::host::{namespaces, seeds, sock_diag};
use crate::kernel::clock::monotonic_ns;
use tracer_core::model::TcpState;
use tracer_core::observer::Observer;
use tracer_core::tracker::{Known, Snapshot, Tracker};

/// Dumps start at most this often, whatever asks for them.
pub const MIN_SPACING: Duration = Duration::from_secs(10);

/// Softirq runs made without the programs (`kernel::softirqs`) ask for a dump at most this
/// often: a kernel that makes them every few seconds may have had no TCP event in any, and each
/// dump of a busy host costs CPU and, while it is merged, memory.
pub const BLIND_SPACING: Duration = Duration::from_secs(30);

/// The first dump after start-up, once the events queued during start-up are in: the start-up
/// dump may list sockets already on their way out whose exit no event will show (their timer
/// was detached just before the attach).
pub const AFTER_START: Duration = Duration::from_secs(2);

/// When to resync, and the worker that does it.
pub struct Resync {
    worker: Option<Worker>,
    /// The worker is started at the first refresh, not at start-up: a thread keeps the
    /// capabilities it was born with, and the agent drops the ones it no longer needs between
    /// the two (`app::privileges`).
    started: bool,
    /// The lost-event total when the last dump was asked for: more since means another is due.
    lost_at_request: u64,
    /// The same for softirq runs made without the programs.
    blind_at_request: u64,
    requested: Option<Instant>,
    /// The first dump, `AFTER_START` after start-up; `None` once asked for.
    first: Option<Instant>,
    /// The last dump failed or could not add what it lacked: another is due.
    retry: bool,
    /// Dumps are failing: said once, not every try.
    failing: bool,
    /// The audit's period: a dump this long after the last, lost events or not (`None`: only
    /// after a loss).
    every: Option<Duration>,
}

impl Resync {
    /// The schedule (`every`: the audit's period); the worker starts at the first refresh.
    /// Without a thread there are no resyncs (said once), not a failure.
    pub fn start(every: Option<Duration>) -> Resync {
        Resync {
            worker: None,
            started: false,
            lost_at_request: 0,
            blind_at_request: 0,
            requested: None,
            first: Some(Instant::now() + AFTER_START),
            retry: false,
            failing: false,
            every,
        }
    }

    /// Whether a dump is due at `now`, with the kernel's lost-event total and its total of
    /// softirq runs made without the programs: the first one after start-up, the audit's, a
    /// retry, one after events lost since the last was asked for (so that one always follows
    /// the last loss), or one after such softirq runs, `BLIND_SPACING` after the last; never
    /// sooner than `MIN_SPACING` after the last.
    fn due(&self, now: Instant, lost_total: u64, blind_total: u64) -> bool {
        let first = self.first.is_some_and(|at| now >= at);
        let since = self.requested.map(|at| now.duration_since(at));
        let audit = self
            .every
            .is_some_and(|every| since.is_some_and(|since| since >= every));
        let blind =
            blind_total > self.blind_at_request && since.is_none_or(|since| since >= BLIND_SPACING);
        let wanted = first || audit || self.retry || blind || lost_total > self.lost_at_request;
        wanted && since.is_none_or(|since| since >= MIN_SPACING)
    }

    /// On each refresh, with the kernel's lost-event total (ring buffer full, program runs
    /// skipped) and its total of softirq runs made without the programs: asks for a dump when
    /// one is due and none is under way. The tracker's journal starts now, before the dump can.
    pub fn refresh(&mut self, lost_total: u64, blind_total: u64, tracker: &mut Tracker) {
        if !self.started {
            self.started = true;
            self.worker = match Worker::start() {
                Ok(worker) => Some(worker),
                Err(e) => {
                    warn!(
                        "cannot start the resync thread ({e}): counts will not heal after lost \
                         events"
                    );
                    None
                }
            };
        }
        let now = Instant::now();
        let due = self.due(now, lost_total, blind_total);
        let Some(worker) = &mut self.worker else {
            return;
        };
        if worker.busy || !due {
            return;
        }
        // The journal starts before the worker can read the dump's start time.
        tracker.begin_resync();
        if !worker.request(tracker.known_keys()) {
            tracker.abandon_resync();
        } else {
            log::debug!(
                "resync: dump asked for (lost events {lost_total}, softirq runs without the \
                 programs {blind_total})"
            );
            self.lost_at_request = lost_total;
            self.blind_at_request = blind_total;
            self.requested = Some(now);
            self.retry = false;
            // The first dump is still to come only if its time has not.
            self.first = self.first.filter(|&at| now < at);
        }
    }

    /// Before a drain: the dump that finished, if any. Apply it with [`Resync::apply`] after
    /// that drain, so that every event of the dump's time is in.
    pub fn finished(&mut self, tracker: &mut Tracker) -> Option<Snapshot> {
        let worker = self.worker.as_mut()?;
        match worker.take() {
            None => None,
            Some(Ok(snapshot)) => {
                if std::mem::take(&mut self.failing) {
                    info!("resync: re-reading the kernel's sockets works again");
                }
                Some(snapshot)
            }
            Some(Err(e)) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(
                        "resync: re-reading the kernel's sockets failed: {e} (trying again every \
                         {} s while events are lost)",
                        MIN_SPACING.as_secs()
                    );
                }
                tracker.abandon_resync();
                self.retry = true;
                None
            }
        }
    }

    /// Brings the tracker in line with `snapshot` and says what changed.
    pub fn apply(
        &mut self,
        snapshot: &Snapshot,
        tracker: &mut Tracker,
        metrics: &Metrics,
        consumer: &mut dyn Observer,
    ) {
        let outcome = tracker.finish_resync(snapshot, &mut (metrics, consumer));
        metrics.resynced(outcome.reconciled());
        metrics
            .time_wait
            .reconciled(outcome.time_wait_dropped, outcome.time_wait_added);
        if !outcome.complete {
            self.retry = true;
        }
        let changed = outcome.reconciled()
            + outcome.added
            + outcome.time_wait_dropped
            + outcome.time_wait_added;
        let took_ms = monotonic_ns().saturating_sub(snapshot.started_ns) / 1_000_000;
        log::debug!(
            "resync: dump of {} connections and {} timewait sockets applied after {took_ms} ms",
            snapshot.connections.len(),
            snapshot.time_wait.len()
        );
        if changed > 0 {
            info!(
                "resync from sock_diag ({took_ms} ms from the dump's start to its use): {} \
                 connections closed out (their close was lost), {} taken up (their open was \
                 lost), TIME_WAIT {} dropped and {} added{}",
                outcome.reconciled(),
                outcome.added,
                outcome.time_wait_dropped,
                outcome.time_wait_added,
                if outcome.complete {
                    ""
                } else {
                    " (too many events during the dump to add safely: again soon)"
                }
            );
        }
        metrics.set_active(tracker.active());
        metrics.time_wait.set_sockets(tracker.time_wait().count());
        metrics.close_wait.set_close_wait(tracker.close_wait());
    }
}

/// The thread that takes the dumps.
struct Worker {
    /// Each request carries the keys of the connections the tracker knows now: the dump keeps
    /// seeds only for the others, and sizes its tables once by their number.
    requests: SyncSender<Known>,
    results: Receiver<Result<Snapshot, String>>,
    busy: bool,
}

impl Worker {
    fn start() -> std::io::Result<Worker> {
        // One request at a time: the event loop asks only when the last one came back.
        let (requests, inbox) = mpsc::sync_channel::<Known>(1);
        let (outbox, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("tracer-resync".into())
            .spawn(move || {
                let mut last: Option<Instant> = None;
                // Ends when the event loop drops its sender.
                while let Ok(known) = inbox.recv() {
                    // The event loop spaces its requests already; this keeps the bound even if
                    // it did not.
                    if let Some(at) = last {
                        std::thread::sleep(MIN_SPACING.saturating_sub(at.elapsed()));
                    }
                    last = Some(Instant::now());
                    let snapshot = snapshot(&known);
                    drop(known);
                    if outbox.send(snapshot).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Worker {
            requests,
            results,
            busy: false,
        })
    }

    fn request(&mut self, known: Known) -> bool {
        match self.requests.try_send(known) {
            Ok(()) => {
                self.busy = true;
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    fn take(&mut self) -> Option<Result<Snapshot, String>> {
        match self.results.try_recv() {
            Ok(result) => {
                self.busy = false;
                Some(result)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.busy = false;
                Some(Err("the resync thread ended".to_string()))
            }
        }
    }
}

/// One dump of this namespace (required) and every other one that can be entered (best
/// effort; those that cannot are named in `unread`), as the tracker compares it; `started_ns`
/// is read before the first socket is. `known`: the connections the tracker knew when it asked,
/// which need no seed (and whose number is a guess of how many the dump lists).
fn snapshot(known: &Known) -> Result<Snapshot, String> {
    let own = namespaces::current_netns_inode().map_err(|e| e.to_string())?;
    let mut snapshot = Snapshot {
        started_ns: monotonic_ns(),
        ..Snapshot::default()
    };
    // Sized once, with some room: growing by doubling would hold the old and the new table
    // at once, and both are as large as the host's socket table.
    let expected = known
        .connections
        .len()
        .saturating_add(known.connections.len() / 8);
    snapshot
        .connections
        .reserve(expected.min(sock_diag::MAX_ENTRIES));
    let mut lister = Lister::open().map_err(|e| e.to_string())?;
    add(&mut snapshot, own, &mut lister, known).map_err(|e| e.to_string())?;
    for namespace in namespaces::other_namespaces(own) {
        let read = namespaces::lister_in(&namespace)
            .and_then(|mut lister| add(&mut snapshot, namespace.inode, &mut lister, known));
        // Not entered (no CAP_SYS_ADMIN) or gone meanwhile: its entries wait for a dump that
        // reads it, or, once it is gone, for the next one, which no longer finds it.
        if let Err(e) = read {
            log::debug!("resync: namespace {}: {e}", namespace.inode);
            snapshot.unread.insert(namespace.inode);
        }
    }
    Ok(snapshot)
}

/// One namespace's sockets into `snapshot`, as they are read; seeds only for connections not
/// `known` (a busy host's dump would otherwise hold one for each of its connections).
fn add(
    snapshot: &mut Snapshot,
    netns: u32,
    lister: &mut Lister,
    known: &Known,
) -> Result<(), HostError> {
    seeds::walk(lister, netns, |socket, seed| {
        if socket.timewait {
            let key = (netns, socket.tuple);
            snapshot
                .time_wait
                .insert(key, known.time_wait.contains(&key));
        } else if !matches!(socket.state, TcpState::Listen | TcpState::NewSynRecv) {
            snapshot.connections.insert(&(netns, socket.tuple));
        }
        if let Some(seed) = seed
            && !known.connections.contains(&(seed.netns, seed.tuple))
        {
            snapshot.seeds.push(seed);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_follows_loss_at_most_every_min_spacing() {
        let mut resync = Resync::start(None);
        let now = Instant::now();
        resync.first = None;
        assert!(resync.due(now, 5, 0), "the first loss");
        resync.lost_at_request = 5;
        resync.requested = now.checked_sub(MIN_SPACING);
        assert!(!resync.due(now, 5, 0), "nothing lost since");
        assert!(resync.due(now, 9, 0), "lost again, spaced");
        resync.requested = now.checked_sub(MIN_SPACING / 2);
        assert!(!resync.due(now, 9, 0), "lost again, too soon");
        resync.requested = now.checked_sub(MIN_SPACING);
        resync.retry = true;
        assert!(resync.due(now, 5, 0), "a retry");
        resync.requested = now.checked_sub(MIN_SPACING / 2);
        assert!(!resync.due(now, 5, 0), "a retry is spaced too");
        resync.retry = false;
        resync.requested = None;
        resync.first = Some(now);
        assert!(resync.due(now, 5, 0), "the first dump after start-up");
    }

    #[test]
    fn the_audit_asks_for_a_dump_every_period_without_any_loss() {
        let mut resync = Resync::start(Some(Duration::from_secs(30)));
        let now = Instant::now();
        resync.first = None;
        resync.requested = now.checked_sub(Duration::from_secs(31));
        assert!(resync.due(now, 0, 0));
        resync.requested = now.checked_sub(Duration::from_secs(20));
        assert!(!resync.due(now, 0, 0), "not yet");
        assert!(resync.due(now, 1, 0), "a loss since");
        resync.every = None;
        resync.requested = now.checked_sub(Duration::from_secs(3600));
        assert!(!resync.due(now, 0, 0), "no audit");
    }

    #[test]
    fn softirq_runs_without_the_programs_ask_for_a_dump_at_most_every_blind_spacing() {
        let mut resync = Resync::start(None);
        let now = Instant::now();
        resync.first = None;
        resync.requested = now.checked_sub(MIN_SPACING);
        assert!(!resync.due(now, 0, 3), "runs since, too soon for them");
        assert!(resync.due(now, 1, 3), "an event lost since is due sooner");
        resync.requested = now.checked_sub(BLIND_SPACING);
        assert!(resync.due(now, 0, 3), "runs since, spaced");
        resync.blind_at_request = 3;
        assert!(!resync.due(now, 0, 3), "none since");
        resync.requested = None;
        assert!(resync.due(now, 0, 4), "the first dump asked for");
    }
}
