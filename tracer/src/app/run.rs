//! `tracer run`: the metrics endpoint, per-connection events on stdout, and the TIME_WAIT
//! gauges and port-exhaustion warnings, until SIGINT or SIGTERM.
use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use log::{info, warn};

use crate::app::listen::ListenWorker;
use crate::app::pump::{Consumer, block_on, pump};
use crate::app::session::{Session, SessionConfig};
use crate::export::events::{CostContext, EventFormat, EventSink};
use crate::export::filter::Filter;
use crate::export::metrics::{self, Metrics};
use crate::host::owner_lookups::{self, OwnerLookups};
use crate::host::{hz, proc_owners};
use crate::kernel::clock::WallClock;
use crate::kernel::system::{self, TcpSysctls};
use tracer_core::observer::Observer;
use tracer_core::record::PeerKey;
use tracer_core::tracker::Tracker;

/// Sysctls are re-read every this many refreshes.
const SYSCTL_EVERY: u64 = 10;

/// The same port-exhaustion warning is repeated at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What `tracer run` needs; the command line builds it.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Where to serve `/metrics`.
    pub listen: std::net::SocketAddr,
    pub events: EventFormat,
    pub ring_buffer_bytes: u32,
    pub max_connections: u32,
    pub time_wait_top_peers: u32,
    /// Listening ports with their own listen-overflow series; the rest under port="other".
    pub listen_overflow_top_ports: u32,
    pub port_exhaustion_warning: f64,
    pub close_wait_threshold: Duration,
    /// `--resync-every`: the audit's period (`None`: off).
    pub resync_every: Option<Duration>,
    /// With `--metrics-by workload`: the workloads with their own series.
    pub workload_top: Option<u32>,
    /// `--filter`: which connections the events are about.
    pub filter: Filter,
}

pub fn run(args: RunConfig) -> anyhow::Result<()> {
    // Fail on missing capabilities before binding; the session logs what the others cost.
    system::require_capabilities()?;
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
        resync_every: args.resync_every,
    })?;
    // Attached and seeded: give up what is not needed any more, before any thread starts.
    crate::app::privileges::drop_unneeded()?;
    let clock = WallClock::new().context("reading the clocks")?;
    let cost = cost_context(&session);
    session.metrics.cost.configure(cost.clone());
    if let Some(top) = args.workload_top {
        session
            .metrics
            .enable_workloads(top as usize)
            .context("creating the metrics by workload")?;
    }
    let listen_worker = ListenWorker::start(
        session.metrics.clone(),
        args.listen_overflow_top_ports as usize,
    )
    .context("starting the listen overflow worker")?;
    let mut consumer = RunConsumer {
        sink: EventSink::new(
            args.events,
            BufWriter::with_capacity(64 << 10, io::stdout()),
            clock,
        )
        .with_cost_context(cost)
        .with_owner_lookups(
            OwnerLookups::start(
                proc_owners::socket_owner,
                owner_lookups::QUEUE,
                owner_lookups::PER_SECOND,
            )
            .context("starting the owner lookup worker")?,
        )
        .with_workloads(Some(session.workloads.clone()), args.filter.clone()),
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
    drop(listen_worker);
    // Leaks still waiting for their owner: a little time for them, then out.
    consumer.sink.finish_lookups(Duration::from_secs(2));
    if let Err(e) = consumer.sink.flush()
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        warn!("writing events to stdout: {e}");
    }
    info!("detached; stopped");
    result
}

/// The jiffy length (HZ measured now, about 200 ms) and the RST reason names, for the cost
/// fields. Without HZ the jiffy-based times stay unknown; the rest works.
pub(crate) fn cost_context(session: &Session) -> CostContext {
    let jiffy_ns = match hz::measure() {
        Ok(hz) => {
            info!("kernel HZ {}", hz.0);
            Some(hz.jiffy_ns())
        }
        Err(e) => {
            warn!("kernel HZ unknown ({e}): rwnd-limited times are not reported");
            None
        }
    };
    CostContext {
        jiffy_ns,
        rst_reasons: std::sync::Arc::new(session.rst_reasons.clone()),
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
