//! A session: set-up in an order that fails before anything is attached where it can (capabilities,
//! tracefs, BTF offsets, symbols, then the programs), and the tracker seeded with what already
//! existed, in every network namespace that can be entered.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};

use crate::app::resync::Resync;
use crate::export::metrics::Metrics;
use crate::host::{namespaces, seeds, sock_diag};
use crate::kernel::btf::KernelBtf;
use crate::kernel::clock::monotonic_ns;
use crate::kernel::programs::{HookPlan, KernelLogger, LostCounter, ProbeConfig, Probes};
use crate::kernel::softirqs::SoftirqWatch;
use crate::kernel::system::{self, TcpSysctls};
use crate::kernel::tables::{KernelCounters, PathTable, TimeWaitExits};
use tracer_core::model::TcpState;
use tracer_core::tracker::{Tracker, TrackerConfig};

/// What every command that watches the kernel needs, set up in order.
pub struct SessionConfig {
    pub ring_buffer_bytes: u32,
    pub max_connections: usize,
    pub close_wait_threshold: Duration,
    /// The resync audit's period (`None`: resync only after lost events).
    pub resync_every: Option<Duration>,
}

/// The resync audit's period unless the command line says otherwise.
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// Attached programs, their maps, and the tracker seeded with what already existed.
pub struct Session {
    /// Held until the end; dropping it detaches the programs.
    pub(super) probes: Option<Probes>,
    pub(super) ring: Option<RingBuf<MapData>>,
    pub(super) lost: LostCounter,
    /// Sockets in CLOSE_WAIT, read on each refresh.
    pub(super) paths: PathTable,
    pub(super) tw_exits: TimeWaitExits,
    pub(super) counters: KernelCounters,
    /// Softirq runs made without the programs (`kernel::softirqs`).
    pub(super) softirqs: SoftirqWatch,
    pub(super) logger: Option<KernelLogger>,
    pub tracker: Tracker,
    pub sysctls: TcpSysctls,
    pub rst_reasons: HashMap<u16, String>,
    pub metrics: Arc<Metrics>,
    /// Re-reads the kernel's sockets off the event path after lost events (and once soon after
    /// start-up), to heal the tables.
    pub(super) resync: Resync,
    /// When loss starts and stops, for the log.
    pub(super) loss: LossLog,
    /// Cgroup ids to workload names (see `app::workloads`).
    pub workloads: crate::host::workloads::WorkloadNames,
}

impl Session {
    pub fn start(config: &SessionConfig) -> anyhow::Result<Session> {
        for lacking in system::require_capabilities()? {
            warn!("{lacking}");
        }
        match system::ensure_tracefs() {
            Ok(true) => info!("mounted tracefs at {}", system::TRACEFS),
            Ok(false) => {}
            Err(e) => warn!("{e} (continuing: the tp_btf programs do not need it)"),
        }
        // Everything needed from our parse of the kernel's BTF, then free it before aya parses
        // its own: the two would otherwise add up to the start-up peak.
        let btf = KernelBtf::load()?;
        let plan = HookPlan::for_kernel(&btf)?;
        let offsets = plan.compat().offsets;
        let rst_reasons = btf.rst_reasons();
        drop(btf);
        for degraded in plan.compat().degraded() {
            warn!("{degraded}");
        }
        debug!("kernel offsets from BTF: {offsets:?}");
        let mut symbols = system::symbols()?;
        plan.compat().mask_symbols(&mut symbols);
        debug!("kernel symbols: {symbols:x?}");

        let metrics = Arc::new(Metrics::new().context("creating metrics")?);
        for feature in &plan.compat().features {
            metrics.features.set(feature.name, feature.enabled());
        }
        let mut probes = Probes::attach(
            &plan,
            &offsets,
            &symbols,
            &ProbeConfig {
                ring_buffer_bytes: config.ring_buffer_bytes,
            },
        )?;
        info!("attached to {}", probes.attached().join(", "));
        let ring = probes.take_events()?;
        let lost = probes.take_lost_counter()?;
        let paths = PathTable::take(&mut probes)?;
        let tw_exits = TimeWaitExits::take(&mut probes)?;
        let counters = KernelCounters::take(&mut probes)?;
        let mut softirqs = SoftirqWatch::take(&mut probes)?;
        // The baseline, before the seeding dump: loss from here on counts.
        softirqs.refresh();
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
        // The BTF parses are gone: hand their memory back so that the start-up peak does not
        // stay as the idle footprint.
        crate::app::memory::give_back();
        metrics.set_active(tracker.active());
        Ok(Session {
            probes: Some(probes),
            ring: Some(ring),
            lost,
            paths,
            tw_exits,
            counters,
            softirqs,
            logger,
            tracker,
            sysctls,
            rst_reasons,
            metrics,
            resync: Resync::start(config.resync_every),
            loss: LossLog::default(),
            workloads: crate::host::workloads::WorkloadNames::start(),
        })
    }

    /// Events the kernel dropped because the ring buffer was full, so far.
    pub fn events_lost(&self) -> u64 {
        self.lost.total().unwrap_or(0)
    }

    /// Softirq runs the kernel made without the programs so far (`kernel::softirqs`).
    pub fn softirqs_unobserved(&self) -> u64 {
        self.softirqs.total()
    }
}

/// Connections and TIME_WAIT sockets that exist already, in this and every other network
/// namespace that can be entered. Only this namespace is required; others are best effort.
/// Each socket goes to the tracker as it is read: a busy host's socket table is never copied.
fn seed_existing(tracker: &mut Tracker) -> anyhow::Result<()> {
    let own = namespaces::current_netns_inode().context("reading this network namespace")?;
    let now_ns = monotonic_ns();
    let (mut connections, mut time_wait, mut read) = (0, 0, 1);
    let mut lister =
        sock_diag::Lister::open().context("listing existing TCP sockets (sock_diag)")?;
    seed_namespace(
        tracker,
        &mut lister,
        own,
        now_ns,
        &mut connections,
        &mut time_wait,
    )
    .context("listing existing TCP sockets (sock_diag)")?;
    for namespace in namespaces::other_namespaces(own) {
        let seeded = namespaces::lister_in(&namespace).and_then(|mut lister| {
            seed_namespace(
                tracker,
                &mut lister,
                namespace.inode,
                now_ns,
                &mut connections,
                &mut time_wait,
            )
        });
        match seeded {
            Ok(()) => read += 1,
            Err(e) => warn!(
                "cannot list sockets of network namespace {}: {e}",
                namespace.inode
            ),
        }
    }
    info!(
        "seeded {connections} connections and {time_wait} TIME_WAIT sockets open before start, in {read} network namespaces"
    );
    Ok(())
}

/// One namespace's sockets into the tracker. Listening ports come first, so that TIME_WAIT
/// sockets of servers on ephemeral-range ports are attributed to the server role.
fn seed_namespace(
    tracker: &mut Tracker,
    lister: &mut sock_diag::Lister,
    netns: u32,
    now_ns: u64,
    connections: &mut usize,
    time_wait: &mut usize,
) -> Result<(), sock_diag::HostError> {
    seeds::walk(lister, netns, |socket, seed| {
        if socket.state == TcpState::Listen {
            tracker
                .time_wait_mut()
                .listener(netns, socket.tuple.sport, true);
        } else if socket.timewait {
            *time_wait += 1;
            tracker
                .time_wait_mut()
                .seed(std::iter::once((netns, socket.tuple)));
        }
        if let Some(seed) = seed {
            *connections += 1;
            tracker.seed(std::iter::once(seed), now_ns);
        }
    })
}

/// Says when kernel events start and stop being lost, once each, rather than per refresh.
#[derive(Debug, Default)]
pub struct LossLog {
    /// The lost-event total at the last refresh.
    seen: u64,
    /// The total when the current episode started, while events are being lost.
    episode_from: Option<u64>,
}

/// What [`LossLog::update`] logged.
#[derive(Debug, PartialEq, Eq)]
pub enum LossChange {
    Started { lost: u64 },
    Stopped { in_episode: u64 },
}

impl LossLog {
    pub fn update(&mut self, total: u64) -> Option<LossChange> {
        let growing = total > self.seen;
        let change = match (growing, self.episode_from) {
            (true, None) => {
                warn!(
                    "kernel events are being lost: the ring buffer is full ({total} lost so \
                     far); counts heal from sock_diag where they can, raise --ring-buffer-bytes"
                );
                self.episode_from = Some(self.seen);
                Some(LossChange::Started { lost: total })
            }
            (false, Some(from)) => {
                let in_episode = total.saturating_sub(from);
                info!(
                    "kernel events are no longer lost ({in_episode} lost in that episode, {total} in all)"
                );
                self.episode_from = None;
                Some(LossChange::Stopped { in_episode })
            }
            _ => None,
        };
        self.seen = total;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_logged_when_it_starts_and_when_it_stops() {
        let mut log = LossLog::default();
        assert_eq!(log.update(0), None);
        assert_eq!(log.update(5), Some(LossChange::Started { lost: 5 }));
        assert_eq!(log.update(9), None, "still the same episode");
        assert_eq!(log.update(9), Some(LossChange::Stopped { in_episode: 9 }));
        assert_eq!(log.update(9), None);
        assert_eq!(log.update(12), Some(LossChange::Started { lost: 12 }));
        assert_eq!(log.update(12), Some(LossChange::Stopped { in_episode: 3 }));
    }
}
