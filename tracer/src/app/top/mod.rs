//! `tracer top`: a live terminal view of TCP on this host, redrawn every `--interval`.
//!
//! Data source: `tracer top` attaches its own session, as `tracer diagnose` does, rather than
//! reading a running agent's `/metrics`. Its findings then come from a live [`Diagnosis`]
//! observing the tracker, worded exactly as `tracer diagnose` words them, and the TIME_WAIT
//! peers come straight from the tracker's table (the `PEERS_READ` with the most sockets, not an
//! agent's `--time-wait-top-peers`).
//! Rates are differences of consecutive snapshots of the session's own [`Metrics`] (the numbers
//! an agent would serve on `/metrics`). It needs root, like every command that attaches; with an
//! agent already running, both trace side by side.
//!
//! The event loop is the agent's (`pump`): keys are read after each batch of events (at least
//! every 10 ms under traffic, every 100 ms on a quiet host), and the gauges and the tracker
//! are read at its once-a-second refresh, so `--interval` is a whole number of seconds.
//!
//! `model` is pure (the rows and the text, from snapshots; unit-tested without a terminal);
//! `terminal` is the thin part that owns the screen.
pub mod model;
mod terminal;

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::bail;
use tracer_core::model::{Owner, Tuple};
use tracer_core::observer::Observer;
use tracer_core::tracker::{Tracker, TrackerConfig};

use crate::app::pump::{Consumer, block_on, pump};
use crate::app::session::{Session, SessionConfig};
use crate::diagnose::{DiagnoseConfig, Diagnosis, ReportContext};
use crate::export::metrics::Metrics;
use crate::kernel::system::TcpSysctls;
use model::{Counters, Sample, SortKey, View};
use terminal::TerminalGuard;

/// TIME_WAIT peers read per refresh (the most sockets first); the screen shows what fits.
const PEERS_READ: usize = 100;

/// Owners of leaked CLOSE_WAIT sockets kept between redraws: each is looked up in /proc once,
/// not once per interval. Past this many the cache starts over.
const OWNERS_KEPT: usize = 4096;

/// What `tracer top` needs; the command line builds it.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// How often the screen is redrawn: whole seconds, at least one.
    pub interval: Duration,
    pub port_exhaustion_warning: f64,
    pub close_wait_threshold: Duration,
    pub ring_buffer_bytes: u32,
}

pub fn top(options: TopOptions) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!("tracer top needs a terminal (use `tracer diagnose` for a report)");
    }
    if options.interval < Duration::from_secs(1) || options.interval.subsec_nanos() != 0 {
        bail!("--interval must be a whole number of seconds, at least 1s");
    }
    let mut session = Session::start(&SessionConfig {
        ring_buffer_bytes: options.ring_buffer_bytes,
        max_connections: TrackerConfig::default().max_connections,
        close_wait_threshold: options.close_wait_threshold,
        resync_every: Some(crate::app::session::RESYNC_EVERY),
    })?;
    let diagnosis = Diagnosis::new(
        DiagnoseConfig {
            port_exhaustion_warning: options.port_exhaustion_warning,
            ..DiagnoseConfig::default()
        },
        session.rst_reasons.clone(),
    );
    let screen = TerminalGuard::enter()?;
    let mut consumer = TopConsumer {
        diagnosis,
        screen,
        owners: HashMap::new(),
        sysctls: session.sysctls,
        started: Instant::now(),
        interval_ticks: options.interval.as_secs().max(1),
        ticks: 0,
        before: (Duration::ZERO, Counters::default()),
        last: None,
        sort: SortKey::default(),
        view: model::waiting(options.interval),
        interval: options.interval,
        dirty: true,
        done: false,
    };
    let outcome = block_on(pump(&mut session, &mut consumer, None));
    // The terminal is given back before any error is printed.
    drop(consumer);
    outcome?
}

struct TopConsumer {
    diagnosis: Diagnosis,
    screen: TerminalGuard,
    owners: HashMap<(u32, Tuple), Option<Owner>>,
    sysctls: TcpSysctls,
    started: Instant,
    interval: Duration,
    /// Refreshes (one a second) per redraw, and refreshes so far.
    interval_ticks: u64,
    ticks: u64,
    /// Time and counters of the previous sample: rates are taken from there.
    before: (Duration, Counters),
    last: Option<Sample>,
    sort: SortKey,
    view: View,
    dirty: bool,
    /// Asked to quit: nothing more is drawn.
    done: bool,
}

impl TopConsumer {
    fn sample(&mut self, tracker: &Tracker, metrics: &Metrics) -> Sample {
        let counters = Counters::read(metrics);
        let at = self.started.elapsed();
        let context = ReportContext {
            duration: at,
            sysctls: self.sysctls,
            events_lost: counters.events_lost,
            softirqs_unobserved: counters.softirqs_unobserved,
        };
        if self.owners.len() > OWNERS_KEPT {
            self.owners.clear();
        }
        let owners = &mut self.owners;
        let report = self
            .diagnosis
            .report_with_owners(tracker, &context, |netns, tuple| {
                *owners
                    .entry((netns, *tuple))
                    .or_insert_with(|| crate::host::proc_owners::socket_owner(netns, tuple))
            });
        Sample {
            at,
            counters,
            active: tracker.active(),
            time_wait: tracker.time_wait().count(),
            close_wait: tracker.close_wait(),
            peers: tracker.time_wait().top_peers(PEERS_READ),
            port_range: self.sysctls.port_range_size(),
            report,
        }
    }

    fn rebuild(&mut self) {
        if let Some(sample) = &self.last {
            let (at, counters) = &self.before;
            self.view = model::view((*at, counters), sample, self.sort, self.interval);
            self.dirty = true;
        }
    }
}

impl Consumer for TopConsumer {
    fn observer(&mut self) -> &mut dyn Observer {
        &mut self.diagnosis
    }

    fn batch_done(&mut self) -> anyhow::Result<bool> {
        if self.done {
            return Ok(false);
        }
        let input = terminal::read_input()?;
        if input.quit {
            self.done = true;
            return Ok(false);
        }
        if input.next_sort {
            self.sort = self.sort.next();
            self.rebuild();
        }
        if self.dirty || input.redraw {
            self.screen.draw(&self.view)?;
            self.dirty = false;
        }
        Ok(true)
    }

    fn refresh(&mut self, tracker: &mut Tracker, metrics: &Metrics) {
        self.ticks += 1;
        // The first refresh comes at once; then one sample per interval.
        if self.ticks > 1 && !(self.ticks - 1).is_multiple_of(self.interval_ticks) {
            return;
        }
        let sample = self.sample(tracker, metrics);
        // Rates are taken from the previous sample; the first one has none (all zero).
        self.before = match self.last.take() {
            Some(previous) => (previous.at, previous.counters),
            None => (sample.at, sample.counters),
        };
        self.last = Some(sample);
        self.rebuild();
    }
}
