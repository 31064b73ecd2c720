//! `tracer run`: set-up in an order that fails before anything is attached where it can, then
//! one task that drains the ring buffer in batches into the tracker and its observers.
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;
use crate::conntrack::{Tracker, TrackerConfig};
use crate::events;
use crate::kernel::{self, KernelBtf};
use crate::metrics::{self, Metrics};
use crate::probes::{KernelLogger, LostCounter, ProbeConfig, Probes};
use crate::seed;
use crate::sinks::{EventSink, WallClock};

/// How often the kernel's lost-event counter and the gauges are refreshed.
const REFRESH: Duration = Duration::from_secs(1);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    kernel::require_root()?;
    // Bind before attaching: a port in use must fail with nothing left behind.
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot serve metrics on {}", args.listen))?;
    listener
        .set_nonblocking(true)
        .context("setting the metrics socket non-blocking")?;

    match kernel::ensure_tracefs() {
        Ok(true) => info!("mounted tracefs at {}", kernel::TRACEFS),
        Ok(false) => {}
        Err(e) => warn!("{e} (continuing: the tp_btf programs do not need it)"),
    }
    let btf = KernelBtf::load()?;
    let offsets = btf.offsets()?;
    debug!("kernel offsets from BTF: {offsets:?}");

    let metrics = Arc::new(Metrics::new().context("creating metrics")?);
    let mut probes = Probes::attach(
        &btf,
        &offsets,
        &ProbeConfig {
            ring_buffer_bytes: args.ring_buffer_bytes,
        },
    )?;
    info!("attached to {}", probes.attached().join(", "));
    let ring = probes.take_events()?;
    let lost = probes.take_lost_counter()?;
    let logger = probes.logger();

    // Seed after attaching: a connection opened in between shows up in both the dump and the
    // events, and the tracker merges the two by 4-tuple; the other order would lose it.
    let mut tracker = Tracker::new(TrackerConfig {
        max_connections: args.max_connections as usize,
    });
    let netns = seed::current_netns_inode().context("reading this network namespace")?;
    let sockets = seed::dump_tcp().context("listing existing TCP sockets (sock_diag)")?;
    let seeds = seed::seeds(&sockets, netns);
    info!("seeded {} connections open before start", seeds.len());
    tracker.seed(seeds);
    metrics.set_active(tracker.active());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let clock = WallClock::new().context("reading the clocks")?;
    let sink = EventSink::new(
        args.events,
        BufWriter::with_capacity(64 << 10, io::stdout()),
        clock,
    );
    let result = runtime.block_on(event_loop(Loop {
        ring,
        lost,
        logger,
        tracker,
        metrics,
        sink,
        listener,
        probes: Some(probes),
    }));
    info!("detached; stopped");
    result
}

struct Loop<W: Write> {
    ring: RingBuf<MapData>,
    lost: LostCounter,
    logger: Option<KernelLogger>,
    tracker: Tracker,
    metrics: Arc<Metrics>,
    sink: EventSink<W>,
    listener: std::net::TcpListener,
    /// Held until shutdown; dropping it detaches the programs.
    probes: Option<Probes>,
}

async fn event_loop<W: Write>(mut state: Loop<W>) -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::from_std(state.listener.try_clone()?)
        .context("registering the metrics socket")?;
    let server = tokio::spawn(metrics::serve(
        listener,
        state.metrics.clone(),
        async move {
            let _ = stop_rx.changed().await;
        },
    ));

    let mut ring = register(state.ring).context("polling the ring buffer")?;
    let mut logger = match state.logger.take() {
        Some(logger) => Some(register(logger).context("polling the kernel log buffer")?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut refresh = tokio::time::interval(REFRESH);
    state.sink.header();
    info!("ready: tracing TCP connections");

    let mut outcome = Ok(());
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut state.tracker, &state.metrics, &mut state.sink);
                guard.clear_ready();
                if let Err(e) = state.sink.flush() {
                    outcome = stdout_closed(e);
                    break;
                }
            }
            guard = readable(&mut logger) => {
                if let Ok(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
            _ = refresh.tick() => {
                match state.lost.total() {
                    Ok(total) => state.metrics.set_events_lost(total),
                    Err(e) => warn!("{e}"),
                }
                state.metrics.set_active(state.tracker.active());
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
        }
    }

    // Detach first, then take what is still queued so that nothing seen is dropped.
    drop(state.probes.take());
    drain(
        ring.get_mut(),
        &mut state.tracker,
        &state.metrics,
        &mut state.sink,
    );
    if outcome.is_ok()
        && let Err(e) = state.sink.flush()
    {
        outcome = stdout_closed(e);
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => warn!("metrics server: {e}"),
        Ok(Err(e)) => warn!("metrics server task: {e}"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    outcome
}

/// A closed stdout (`tracer run | head`) ends the run quietly; other write errors are errors.
fn stdout_closed(e: io::Error) -> anyhow::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        info!("stdout closed: stopping");
        Ok(())
    } else {
        Err(e).context("writing events to stdout")
    }
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

/// Takes every queued record: one wake-up, many events, no allocation per event.
fn drain<W: Write>(
    ring: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    metrics: &Metrics,
    sink: &mut EventSink<W>,
) {
    while let Some(record) = ring.next() {
        match events::parse(&record).and_then(|raw| events::decode(&raw)) {
            Ok(event) => {
                metrics.event(&event);
                tracker.on_event(&event, &mut (metrics, &mut *sink));
            }
            Err(e) => {
                metrics.event_malformed();
                debug!("undecodable event: {e:?}");
            }
        }
    }
    metrics.set_active(tracker.active());
    metrics.set_evictions(tracker.evictions());
}
