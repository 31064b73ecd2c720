//! The event loop: one task drains the ring buffer in batches into the tracker, the metrics and
//! the command's consumer, refreshes the gauges once a second, and stops on a signal, a
//! deadline or the consumer's word.
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::app::session::Session;
use crate::export::metrics::Metrics;
use crate::kernel::clock::monotonic_ns;
use crate::kernel::decode;
use crate::kernel::tables;
use tracer_core::model::Event;
use tracer_core::observer::Observer;
use tracer_core::tracker::Tracker;

/// How often the ring buffer is drained when the kernel does not wake the agent: the kernel
/// wakes it only once `ProbeConfig::wakeup_bytes` are pending, not per event.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// What the drain timer backs off to, doubling, while drains find nothing: an idle host wakes
/// the agent about 10 times a second instead of 100 (each wake-up also refreshes the gauges),
/// and the first record after a quiet spell waits at most this long.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// The drain timer's next period after a drain that took `taken` records.
fn next_drain_period(period: Duration, taken: usize) -> Duration {
    if taken > 0 {
        DRAIN_EVERY
    } else {
        (period * 2).min(DRAIN_IDLE)
    }
}

/// How often the kernel's lost-event counter and the gauges are refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// What a command does with the events, besides the tracker and metrics every command keeps.
pub trait Consumer {
    fn observer(&mut self) -> &mut dyn Observer;
    /// After each batch of events; `Ok(false)` ends the run.
    fn batch_done(&mut self) -> anyhow::Result<bool> {
        Ok(true)
    }
    /// Once per `REFRESH`, after time-based settling.
    fn refresh(&mut self, _tracker: &mut Tracker, _metrics: &Metrics) {}
}

/// Runs `work` on a single-threaded runtime: the agent's whole event loop is one task.
pub fn block_on<F: std::future::Future>(work: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(work))
}

/// Drains the ring buffer into the tracker, the metrics and `consumer` until SIGINT, SIGTERM,
/// `deadline`, or the consumer asks to stop; then detaches and takes what is still queued.
pub async fn pump(
    session: &mut Session,
    consumer: &mut impl Consumer,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let ring = session
        .ring
        .take()
        .context("the ring buffer was already consumed")?;
    let mut ring = register(ring).context("polling the ring buffer")?;
    let mut logger = match session.logger.take() {
        Some(logger) => Some(register(logger).context("polling the kernel log buffer")?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut refresh = tokio::time::interval(REFRESH);
    let mut drain_period = DRAIN_EVERY;
    let drain_timer = tokio::time::sleep(drain_period);
    tokio::pin!(drain_timer);
    let until = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let metrics = session.metrics.clone();

    let mut outcome = Ok(());
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut session.tracker, &metrics, consumer.observer());
                guard.clear_ready();
                // The kernel woke the agent: records are coming, drain at the full rate again.
                if drain_period > DRAIN_EVERY {
                    drain_period = DRAIN_EVERY;
                    drain_timer.as_mut().reset(tokio::time::Instant::now() + drain_period);
                }
                match consumer.batch_done() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => { outcome = Err(e); break; }
                }
            }
            _ = &mut drain_timer => {
                // A dump that came back is applied after this drain, which takes every event of
                // the dump's time first (see `app::resync`).
                let resynced = session.resync.finished(&mut session.tracker);
                let taken =
                    drain(ring.get_mut(), &mut session.tracker, &metrics, consumer.observer());
                drain_period = next_drain_period(drain_period, taken);
                if resynced.is_some() {
                    drain_period = DRAIN_EVERY;
                }
                drain_timer.as_mut().reset(tokio::time::Instant::now() + drain_period);
                if let Some(snapshot) = resynced {
                    session.resync.apply(&snapshot, &mut session.tracker, &metrics, consumer.observer());
                    // The dump was built on the resync thread, in its own allocator arena:
                    // hand what it held back, or a busy host's dump stays resident.
                    drop(snapshot);
                    // Applying it grew tables for a moment (the seeds it compared): shrunk
                    // now rather than at the next refresh, so the memory goes back at once.
                    session.tracker.shrink();
                    crate::app::memory::give_back();
                }
                match consumer.batch_done() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => { outcome = Err(e); break; }
                }
            }
            guard = readable(&mut logger) => {
                if let Ok(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = refresh.tick() => {
                // What the ring holds first: the births the kernel tables' exits refer to.
                drain(ring.get_mut(), &mut session.tracker, &metrics, consumer.observer());
                read_tables(session, &metrics, consumer.observer());
                crate::app::workloads::refresh(&session.workloads, &session.tracker, &metrics);
                session.tracker.tick(monotonic_ns(), &mut (&*metrics, consumer.observer()));
                let mut skipped = 0;
                if let Some(probes) = &session.probes {
                    let misses = probes.misses();
                    skipped = misses.iter().map(|&(_, n)| n).sum::<u64>();
                    metrics.set_program_misses(&misses);
                }
                match session.counters.totals() {
                    Ok(totals) => metrics.set_kernel_counts(totals),
                    Err(e) => warn!("{e}"),
                }
                match session.counters.rst_no_socket() {
                    Ok(totals) => metrics.cost.set_resets_no_socket(&totals),
                    Err(e) => warn!("{e}"),
                }
                if session.tracker.shrink() {
                    crate::app::memory::give_back();
                }
                let blind = session.softirqs.refresh().map_or(0, |totals| {
                    metrics.set_softirqs_unobserved(totals);
                    totals.iter().sum::<u64>()
                });
                match session.lost.total() {
                    Ok(total) => {
                        metrics.set_events_lost(total);
                        session.loss.update(total);
                        // Runs the kernel skipped lost their events too; softirqs it ran
                        // without the programs may have (`app::resync`).
                        let lost = total.saturating_add(skipped);
                        session.resync.refresh(lost, blind, &mut session.tracker);
                    }
                    Err(e) => warn!("{e}"),
                }
                // The gauges and what this settled (leaks, TIME_WAIT exits) go out with the
                // next drain tick, within `DRAIN_EVERY`.
                consumer.refresh(&mut session.tracker, &metrics);
            }
            _ = &mut until => break,
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
        }
    }

    // Detach first, then take what is still queued so that nothing seen is dropped.
    drop(session.probes.take());
    drain(
        ring.get_mut(),
        &mut session.tracker,
        &metrics,
        consumer.observer(),
    );
    read_tables(session, &metrics, consumer.observer());
    session
        .tracker
        .tick(monotonic_ns(), &mut (&*metrics, consumer.observer()));
    if outcome.is_ok() {
        consumer.batch_done()?;
    }
    outcome
}

/// Registers a map's descriptor with the runtime for readiness.
fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is an aya ring buffer that owns its map descriptor: the descriptor stays
    // open and the same for as long as the AsyncFd owns `inner`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}

async fn readable<T: AsRawFd>(
    fd: &mut Option<AsyncFd<T>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, T>> {
    match fd {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Hands the tracker what the kernel keeps in tables rather than sending: the state changes of
/// sockets still open that it has not been given (the kernel sends a socket's changes when it
/// closes), then the timewait sockets' exits since the last read. Each socket's run goes to
/// the tracker as it is read: no copy of the whole table is held.
fn read_tables(session: &mut Session, metrics: &Metrics, consumer: &mut dyn Observer) {
    let tracker = &mut session.tracker;
    let (mut run, mut given) = (Vec::new(), Vec::new());
    let walked = session.paths.walk(|sock, path| {
        if tables::given_whole(path, tracker.last_state_ns(sock)) {
            return;
        }
        run.clear();
        given.clear();
        // The kernel updates an entry in place, without a lock: a run read while a change is
        // being added can end in a step not written yet, which does not decode. It is read
        // again whole a second later (or comes in its record); nothing is lost.
        // A run whose CLOSE reached no program stays in the table after a resync closed its
        // connection out: it must not bring the connection back.
        if decode::open_path_events(path, &mut run).is_ok()
            && !tables::latest_change_ns(&run).is_some_and(|ns| tracker.is_dead_run(sock, ns))
        {
            tables::promotable(&run, tracker.last_state_ns(sock), &mut given);
        }
        for event in &given {
            metrics.event(event);
            tracker.on_event(event, &mut (metrics, &mut *consumer));
        }
    });
    match walked {
        Ok(()) => tracker.end_table_walk(),
        Err(e) => warn!("{e}"),
    }
    // Every exit before this moment is in the table now (the kernel writes it before the
    // socket's memory can serve the next birth).
    let read_from = monotonic_ns();
    let taken = session.tw_exits.take_exits(|event| {
        metrics.event(event);
        tracker.on_event(event, &mut (metrics, &mut *consumer));
    });
    match taken {
        Ok(malformed) => {
            (0..malformed).for_each(|_| metrics.event_malformed());
            tracker
                .time_wait_mut()
                .exits_read(read_from, &mut (metrics, &mut *consumer));
        }
        Err(e) => warn!("{e}"),
    }
}

/// Takes every queued record: one wake-up, many events, no allocation per event. Returns how
/// many records it took.
fn drain(
    ring: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    metrics: &Metrics,
    consumer: &mut dyn Observer,
) -> usize {
    let mut last_ts = None;
    let mut taken = 0;
    let mut events = Vec::with_capacity(tracer_common::PATH_STEPS);
    while let Some(record) = ring.next() {
        taken += 1;
        metrics.record_read();
        events.clear();
        if let Err(e) = decode::decode_record(&record, &mut events) {
            metrics.event_malformed();
            debug!("undecodable event: {e:?}");
            continue;
        }
        for event in &events {
            // Given already by a table read, or a dead run (see `read_tables`) that the kernel
            // sent as another socket took its address.
            if tables::already_given(event, |sock| tracker.last_state_ns(sock))
                || matches!(*event, Event::StateChange { sock, ts_ns, .. }
                    if tracker.is_dead_run(sock, ts_ns))
            {
                continue;
            }
            metrics.event(event);
            last_ts = Some(event.ts_ns());
            tracker.on_event(event, &mut (metrics, &mut *consumer));
        }
    }
    // Settle by event time, not the clock: events still queued must not be judged missing.
    if let Some(ts) = last_ts {
        tracker.tick(ts, &mut (metrics, &mut *consumer));
    }
    metrics.set_active(tracker.active());
    metrics.set_evictions(tracker.evictions());
    metrics.time_wait.set_sockets(tracker.time_wait().count());
    if let Some(by_workload) = metrics.workloads.get() {
        // With the host gauge, so that the breakdown always adds up to it.
        by_workload.set_time_wait(&tracker.time_wait().by_cgroup().into_iter().collect());
    }
    metrics.close_wait.set_close_wait(tracker.close_wait());
    // A burst of closes frees records while it grows the TIME_WAIT table from fresh pages.
    if tracker.freed_many() {
        let started = std::time::Instant::now();
        crate::app::memory::give_back();
        debug!(
            "closed connections' memory given back in {:?}",
            started.elapsed()
        );
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_timer_backs_off_while_idle_and_comes_back_with_the_first_record() {
        let mut period = DRAIN_EVERY;
        let mut seen = vec![period];
        for _ in 0..6 {
            period = next_drain_period(period, 0);
            seen.push(period);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 100, 100, 100]);
        assert_eq!(next_drain_period(period, 1), DRAIN_EVERY);
    }
}
