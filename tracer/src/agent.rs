//! Watching the kernel: set-up in an order that fails before anything is attached where it
//! can, then one task that drains the ring buffer in batches into the tracker and its
//! observers. `tracer run` and `tracer diagnose` are two consumers of the same session.
use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{DiagnoseArgs, RunArgs};
use crate::diagnose::{DiagnoseConfig, Diagnosis, ReportContext};
use crate::events;
use crate::kernel::{self, KernelBtf, TcpSysctls};
use crate::metrics::{self, Metrics};
use crate::probes::{KernelLogger, LostCounter, ProbeConfig, Probes};
use crate::seed;
use crate::sinks::{EventSink, WallClock, monotonic_ns};
use tracer_core::model::TcpState;
use tracer_core::observer::Observer;
use tracer_core::record::PeerKey;
use tracer_core::tracker::{Tracker, TrackerConfig};

/// How often the ring buffer is drained when the kernel does not wake the agent: the kernel
/// wakes it only once `ProbeConfig::wakeup_bytes` are pending, not per event.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often the kernel's lost-event counter and the gauges are refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// Sysctls are re-read every this many refreshes.
const SYSCTL_EVERY: u64 = 10;
/// After lost events, the TIME_WAIT count is re-read from sock_diag at most this often.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// The same port-exhaustion warning is repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What every command that watches the kernel needs, set up in order.
pub struct SessionConfig {
    pub ring_buffer_bytes: u32,
    pub max_connections: usize,
    pub close_wait_threshold: Duration,
}

/// Attached programs, their maps, and the tracker seeded with what already existed.
pub struct Session {
    /// Held until the end; dropping it detaches the programs.
    probes: Option<Probes>,
    ring: Option<RingBuf<MapData>>,
    lost: LostCounter,
    logger: Option<KernelLogger>,
    pub tracker: Tracker,
    pub sysctls: TcpSysctls,
    pub rst_reasons: HashMap<u16, String>,
    pub metrics: Arc<Metrics>,
    /// Lost-event total when the TIME_WAIT count was last re-read, and when.
    lost_at_resync: u64,
    resynced: Option<Instant>,
}

impl Session {
    pub fn start(config: &SessionConfig) -> anyhow::Result<Session> {
        kernel::require_root()?;
        match kernel::ensure_tracefs() {
            Ok(true) => info!("mounted tracefs at {}", kernel::TRACEFS),
            Ok(false) => {}
            Err(e) => warn!("{e} (continuing: the tp_btf programs do not need it)"),
        }
        let btf = KernelBtf::load()?;
        let offsets = btf.offsets()?;
        debug!("kernel offsets from BTF: {offsets:?}");
        let symbols = kernel::symbols()?;
        debug!("kernel symbols: {symbols:x?}");

        let metrics = Arc::new(Metrics::new().context("creating metrics")?);
        let mut probes = Probes::attach(
            &btf,
            &offsets,
            &symbols,
            &ProbeConfig {
                ring_buffer_bytes: config.ring_buffer_bytes,
            },
        )?;
        info!("attached to {}", probes.attached().join(", "));
        let ring = probes.take_events()?;
        let lost = probes.take_lost_counter()?;
        let logger = probes.logger();

        // Seed after attaching: a connection opened in between shows up in both the dump and
        // the events, and the tracker merges the two by 4-tuple; the other order would lose it.
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: config.max_connections,
            close_wait_threshold_ns: u64::try_from(config.close_wait_threshold.as_nanos())
                .unwrap_or(u64::MAX),
            ..TrackerConfig::default()
        });
        let sysctls = TcpSysctls::read();
        if let Some(range) = sysctls.ip_local_port_range {
            tracker.time_wait_mut().set_ephemeral_ports(range);
        }
        metrics.time_wait.set_settings(&sysctls);
        seed_existing(&mut tracker)?;
        metrics.set_active(tracker.active());
        Ok(Session {
            probes: Some(probes),
            ring: Some(ring),
            lost,
            logger,
            tracker,
            sysctls,
            rst_reasons: btf.rst_reasons(),
            metrics,
            lost_at_resync: 0,
            resynced: None,
        })
    }

    /// Events the kernel dropped because the ring buffer was full, so far.
    pub fn events_lost(&self) -> u64 {
        self.lost.total().unwrap_or(0)
    }
}

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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    kernel::require_root()?;
    // Bind before attaching: a port in use must fail with nothing left behind.
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot serve metrics on {}", args.listen))?;
    listener
        .set_nonblocking(true)
        .context("setting the metrics socket non-blocking")?;
    let mut session = Session::start(&SessionConfig {
        ring_buffer_bytes: args.ring_buffer_bytes,
        max_connections: args.max_connections as usize,
        close_wait_threshold: args.close_wait_threshold,
    })?;
    let clock = WallClock::new().context("reading the clocks")?;
    let mut consumer = RunConsumer {
        sink: EventSink::new(
            args.events,
            BufWriter::with_capacity(64 << 10, io::stdout()),
            clock,
        ),
        time_wait_top_peers: args.time_wait_top_peers as usize,
        port_exhaustion_warning: args.port_exhaustion_warning,
        port_warnings: HashMap::new(),
        refreshes: 0,
        port_range_size: session.sysctls.port_range_size().unwrap_or(0),
    };
    let result = block_on(async {
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the metrics socket")?;
        let server = tokio::spawn(metrics::serve(
            listener,
            session.metrics.clone(),
            async move {
                let _ = stop_rx.changed().await;
            },
        ));
        consumer.sink.header();
        info!("ready: tracing TCP connections");
        let outcome = pump(&mut session, &mut consumer, None).await;
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(2), server).await {
            Ok(Ok(Err(e))) => warn!("metrics server: {e}"),
            Ok(Err(e)) => warn!("metrics server task: {e}"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
        outcome
    })?;
    info!("detached; stopped");
    result
}

/// Connections and TIME_WAIT sockets that exist already, in this and every other network
/// namespace that can be entered. Only this namespace is required; others are best effort.
fn seed_existing(tracker: &mut Tracker) -> anyhow::Result<()> {
    let dumps = dump_namespaces()?;
    let (mut connections, mut time_wait) = (0, 0);
    for (netns, sockets) in &dumps {
        let seeds = seed::seeds(sockets, *netns);
        connections += seeds.len();
        tracker.seed(seeds, monotonic_ns());
        let waiting: Vec<_> = sockets
            .iter()
            .filter(|s| s.timewait)
            .map(|s| (*netns, s.tuple))
            .collect();
        time_wait += waiting.len();
        // Listening ports first, so that TIME_WAIT sockets of servers on ephemeral-range
        // ports are attributed to the server role.
        for listener in sockets.iter().filter(|s| s.state == TcpState::Listen) {
            tracker
                .time_wait_mut()
                .listener(*netns, listener.tuple.sport, true);
        }
        tracker.time_wait_mut().seed(waiting);
    }
    info!(
        "seeded {connections} connections and {time_wait} TIME_WAIT sockets open before start, in {} network namespaces",
        dumps.len()
    );
    Ok(())
}

/// The TCP sockets of this network namespace (required) and of every other one that can be
/// entered (best effort), by namespace inode.
fn dump_namespaces() -> anyhow::Result<Vec<(u32, Vec<seed::SocketEntry>)>> {
    let own = seed::current_netns_inode().context("reading this network namespace")?;
    let sockets = seed::dump_tcp().context("listing existing TCP sockets (sock_diag)")?;
    let mut dumps = vec![(own, sockets)];
    for namespace in seed::other_namespaces(own) {
        match seed::dump_tcp_in(&namespace) {
            Ok(sockets) => dumps.push((namespace.inode, sockets)),
            Err(e) => warn!(
                "cannot list sockets of network namespace {}: {e}",
                namespace.inode
            ),
        }
    }
    Ok(dumps)
}

/// After lost events the TIME_WAIT count may be off: start it over from sock_diag.
fn resync_time_wait(tracker: &mut Tracker) {
    match dump_namespaces() {
        Ok(dumps) => {
            let waiting = dumps.iter().flat_map(|(netns, sockets)| {
                sockets
                    .iter()
                    .filter(|s| s.timewait)
                    .map(move |s| (*netns, s.tuple))
            });
            tracker.time_wait_mut().resync(waiting);
            warn!(
                "kernel events were lost: TIME_WAIT count re-read from sock_diag ({} sockets)",
                tracker.time_wait().count()
            );
        }
        Err(e) => warn!("kernel events were lost and re-reading TIME_WAIT failed: {e:#}"),
    }
}

/// `tracer diagnose`: watch for a while, then report findings.
pub fn diagnose(args: DiagnoseArgs) -> anyhow::Result<()> {
    let mut session = Session::start(&SessionConfig {
        ring_buffer_bytes: args.ring_buffer_bytes,
        max_connections: TrackerConfig::default().max_connections,
        close_wait_threshold: args.close_wait_threshold,
    })?;
    let mut consumer = DiagnoseConsumer {
        diagnosis: Diagnosis::new(
            DiagnoseConfig {
                top: args.top as usize,
                port_exhaustion_warning: args.port_exhaustion_warning,
                ..DiagnoseConfig::default()
            },
            session.rst_reasons.clone(),
        ),
    };
    eprintln!(
        "tracer: watching TCP for {:.0} s (SIGINT to stop early)...",
        args.duration.as_secs_f64()
    );
    let started = Instant::now();
    block_on(pump(
        &mut session,
        &mut consumer,
        Some(started + args.duration),
    ))??;
    let context = ReportContext {
        duration: started.elapsed(),
        sysctls: session.sysctls,
        events_lost: session.events_lost(),
    };
    let report = consumer.diagnosis.report(&session.tracker, &context);
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        println!("{text}");
    } else {
        println!("{report}");
    }
    Ok(())
}

struct DiagnoseConsumer {
    diagnosis: Diagnosis,
}

impl Consumer for DiagnoseConsumer {
    fn observer(&mut self) -> &mut dyn Observer {
        &mut self.diagnosis
    }
}

/// `tracer run`: events to stdout, TIME_WAIT gauges and warnings.
struct RunConsumer<W: Write> {
    sink: EventSink<W>,
    time_wait_top_peers: usize,
    port_exhaustion_warning: f64,
    /// When each peer was last warned about, to warn at most once per `WARN_EVERY`.
    port_warnings: HashMap<PeerKey, Instant>,
    refreshes: u64,
    /// Size of `ip_local_port_range`, re-read with the other sysctls.
    port_range_size: u32,
}

impl<W: Write> Consumer for RunConsumer<W> {
    fn observer(&mut self) -> &mut dyn Observer {
        &mut self.sink
    }

    fn batch_done(&mut self) -> anyhow::Result<bool> {
        match self.sink.flush() {
            Ok(()) => Ok(true),
            // A closed stdout (`tracer run | head`) ends the run quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                info!("stdout closed: stopping");
                Ok(false)
            }
            Err(e) => Err(e).context("writing events to stdout"),
        }
    }

    fn refresh(&mut self, tracker: &mut Tracker, metrics: &Metrics) {
        self.refreshes += 1;
        if self.refreshes.is_multiple_of(SYSCTL_EVERY) {
            let sysctls = TcpSysctls::read();
            metrics.time_wait.set_settings(&sysctls);
            if let Some(range) = sysctls.ip_local_port_range {
                tracker.time_wait_mut().set_ephemeral_ports(range);
            }
            self.port_range_size = sysctls.port_range_size().unwrap_or(0);
        }
        let pressure = metrics.time_wait.update(
            tracker.time_wait(),
            self.time_wait_top_peers,
            self.port_range_size,
        );
        for peer in pressure {
            if peer.ratio < self.port_exhaustion_warning {
                continue;
            }
            let now = Instant::now();
            let due = self
                .port_warnings
                .get(&peer.peer)
                .is_none_or(|last| now.duration_since(*last) >= WARN_EVERY);
            if due {
                self.port_warnings.insert(peer.peer, now);
                warn!(
                    "ephemeral port exhaustion risk: {} sockets in TIME_WAIT toward {}:{} hold {:.0}% of ip_local_port_range; reuse connections (pooling, keep-alive), enable net.ipv4.tcp_tw_reuse, or widen the port range",
                    peer.sockets,
                    peer.peer.peer,
                    peer.peer.port,
                    peer.ratio * 100.0
                );
            }
        }
        // Keep the warning memory bounded to peers still under pressure recently.
        self.port_warnings
            .retain(|_, last| last.elapsed() < WARN_EVERY * 2);
    }
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
    let mut drain_timer = tokio::time::interval(DRAIN_EVERY);
    drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                match consumer.batch_done() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => { outcome = Err(e); break; }
                }
            }
            _ = drain_timer.tick() => {
                drain(ring.get_mut(), &mut session.tracker, &metrics, consumer.observer());
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
                session.tracker.tick(monotonic_ns(), &mut (&*metrics, consumer.observer()));
                match session.lost.total() {
                    Ok(total) => {
                        metrics.set_events_lost(total);
                        if total > session.lost_at_resync
                            && session.resynced.is_none_or(|at| at.elapsed() >= RESYNC_EVERY)
                        {
                            resync_time_wait(&mut session.tracker);
                            session.lost_at_resync = total;
                            session.resynced = Some(Instant::now());
                        }
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

/// Takes every queued record: one wake-up, many events, no allocation per event.
fn drain(
    ring: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    metrics: &Metrics,
    consumer: &mut dyn Observer,
) {
    let mut last_ts = None;
    while let Some(record) = ring.next() {
        match events::parse(&record).and_then(|raw| events::decode(&raw)) {
            Ok(event) => {
                metrics.event(&event);
                last_ts = Some(event.ts_ns());
                tracker.on_event(&event, &mut (metrics, &mut *consumer));
            }
            Err(e) => {
                metrics.event_malformed();
                debug!("undecodable event: {e:?}");
            }
        }
    }
    // Settle by event time, not the clock: events still queued must not be judged missing.
    if let Some(ts) = last_ts {
        tracker.tick(ts, &mut (metrics, &mut *consumer));
    }
    metrics.set_active(tracker.active());
    metrics.set_evictions(tracker.evictions());
    metrics.time_wait.set_sockets(tracker.time_wait().count());
    metrics.latency.set_close_wait(tracker.close_wait());
}
