//! `tracer diagnose`: watch for a while, then print the findings.
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::app::pump::{Consumer, block_on, pump};
use crate::app::session::{Session, SessionConfig};
use crate::app::workloads::Filtered;
use crate::diagnose::{DiagnoseConfig, Diagnosis, ListenOverflows, ReportContext};
use crate::export::filter::Filter;
use crate::export::metrics::Metrics;
use crate::host::{listeners, proc_owners};
use tracer_core::observer::Observer;
use tracer_core::tracker::TrackerConfig;

/// `tracer diagnose`: watch for a while, then report findings.
/// What `tracer diagnose` needs; the command line builds it.
#[derive(Clone, Debug)]
pub struct DiagnoseOptions {
    /// How long to watch.
    pub duration: Duration,
    /// The report as JSON instead of text.
    pub json: bool,
    /// Peers, processes and connections listed per finding.
    pub top: u32,
    pub port_exhaustion_warning: f64,
    pub close_wait_threshold: Duration,
    pub ring_buffer_bytes: u32,
    /// `--filter`: which connections the findings are about.
    pub filter: Filter,
}

pub fn diagnose(args: DiagnoseOptions) -> anyhow::Result<()> {
    let mut session = Session::start(&SessionConfig {
        ring_buffer_bytes: args.ring_buffer_bytes,
        max_connections: TrackerConfig::default().max_connections,
        close_wait_threshold: args.close_wait_threshold,
        resync_every: Some(crate::app::session::RESYNC_EVERY),
    })?;
    let diagnosis = Diagnosis::new(
        DiagnoseConfig {
            top: args.top as usize,
            port_exhaustion_warning: args.port_exhaustion_warning,
            ..DiagnoseConfig::default()
        },
        session.rst_reasons.clone(),
    );
    let mut consumer = DiagnoseConsumer {
        diagnosis: Filtered::new(diagnosis, args.filter.clone(), session.workloads.clone()),
    };
    consumer
        .diagnosis
        .inner
        .set_jiffy_ns(crate::app::run::cost_context(&session).jiffy_ns);
    // The kernel counts listen-queue overflows itself: read its counters at both ends.
    let listeners_before = read_listeners();
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
    if let (Some(before), Some(after)) = (listeners_before, read_listeners()) {
        let mut seen = ListenOverflows::between(&before, &after);
        // Only the listeners the report shows: each lookup walks /proc.
        for listener in seen.listeners.iter_mut().take(args.top as usize) {
            listener.owner = proc_owners::inode_owner(listener.inode);
        }
        consumer.diagnosis.inner.set_listen_overflows(seen);
    }
    let context = ReportContext {
        duration: started.elapsed(),
        sysctls: session.sysctls,
        events_lost: session.events_lost(),
        softirqs_unobserved: session.softirqs_unobserved(),
    };
    // Name the workloads the findings are about: one last walk for the ids not cached yet
    // (those the filter still holds included).
    session.workloads.refresh_now();
    consumer.diagnosis.release(true);
    for id in consumer.diagnosis.inner.workload_ids() {
        let _ = session.workloads.cached(id);
    }
    session.workloads.refresh_now();
    let names = &session.workloads;
    let diagnosis = &mut consumer.diagnosis.inner;
    diagnosis.name_workloads(|id| names.cached(id).map(|c| c.workload.name.clone()));
    let report = diagnosis.report(&session.tracker, &context);
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        println!("{text}");
    } else {
        println!("{report}");
    }
    Ok(())
}

struct DiagnoseConsumer {
    diagnosis: Filtered<Diagnosis>,
}

impl Consumer for DiagnoseConsumer {
    fn observer(&mut self) -> &mut dyn Observer {
        &mut self.diagnosis
    }

    fn refresh(&mut self, _tracker: &mut tracer_core::tracker::Tracker, _metrics: &Metrics) {
        // The tick's walk has run: decide what waited for a name.
        self.diagnosis.release(false);
    }
}

/// Every namespace's listeners, or `None` (with a warning) when they cannot be read.
fn read_listeners() -> Option<Vec<listeners::NamespaceListeners>> {
    listeners::everywhere()
        .inspect_err(|e| log::warn!("listen overflows: cannot read the listeners: {e}"))
        .ok()
}
