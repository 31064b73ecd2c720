//! Command line: argument parsing, logging set-up, and one-line errors with a non-zero exit.
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::diagnose::{DiagnoseOptions, diagnose};
use crate::app::run::{RunConfig, run};
use crate::app::top::{TopOptions, top};
use crate::export::events::EventFormat;
use crate::export::filter::Filter;

/// Default metrics port (Prometheus exporters conventionally take one in the 9xxx range).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9645";

#[derive(Debug, Parser)]
#[command(name = "tracer", version, about = "eBPF TCP connection tracer", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the kernel and trace every TCP connection until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Watch for a while, then print what is wrong with TCP on this host and what to do.
    Diagnose(DiagnoseArgs),
    /// A live terminal view of TCP on this host, redrawn every interval; q quits.
    ///
    /// Connections opened and closed per second, retransmissions, resets, delayed ACKs and
    /// Nagle stalls per second, TIME_WAIT by peer with the port-exhaustion ratio (s cycles the
    /// sort), CLOSE_WAIT, and the findings so far in `tracer diagnose`'s words.
    Top(TopArgs),
}

#[derive(Debug, Args, Clone)]
pub struct TopArgs {
    /// How often the screen is redrawn: whole seconds, 1s to 1h.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_interval)]
    pub interval: std::time::Duration,

    /// TIME_WAIT sockets toward one peer holding this share of the ephemeral port range is a
    /// problem.
    #[arg(long, default_value_t = 0.5, value_name = "RATIO", value_parser = parse_ratio)]
    pub port_exhaustion_warning: f64,

    /// A connection in CLOSE_WAIT for longer than this is reported as a leak.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub close_wait_threshold: std::time::Duration,

    /// Size of the kernel-to-agent ring buffer: a power of two, at least 64 KiB.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,
}

impl TopArgs {
    pub fn options(&self) -> TopOptions {
        TopOptions {
            interval: self.interval,
            port_exhaustion_warning: self.port_exhaustion_warning,
            close_wait_threshold: self.close_wait_threshold,
            ring_buffer_bytes: self.ring_buffer_bytes,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct DiagnoseArgs {
    /// How long to watch (e.g. 10s, 2m); SIGINT ends it early and still reports.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: std::time::Duration,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Peers, processes and connections listed per finding.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub top: u32,

    /// TIME_WAIT sockets toward one peer holding this share of the ephemeral port range is a
    /// problem.
    #[arg(long, default_value_t = 0.5, value_name = "RATIO", value_parser = parse_ratio)]
    pub port_exhaustion_warning: f64,

    /// A connection in CLOSE_WAIT for longer than this is reported as a leak.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub close_wait_threshold: std::time::Duration,

    /// Size of the kernel-to-agent ring buffer: a power of two, at least 64 KiB.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,

    /// Diagnostics on stderr: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    pub log_level: log::LevelFilter,

    /// Only findings about these connections: `workload=GLOB`, `port=N`, `addr=IP[/PREFIX]`
    /// (as `tracer run --filter`).
    #[arg(long, value_name = "EXPR", value_parser = parse_filter)]
    pub filter: Vec<Filter>,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Address to serve Prometheus metrics on, at /metrics.
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Per-connection events on stdout: one JSON object per line, a human line, or nothing.
    #[arg(long, value_enum, default_value = "text")]
    pub events: EventsFlag,

    /// Size of the kernel-to-agent ring buffer: a power of two, at least 64 KiB.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,

    /// Live connections tracked at most; past it the least recently active is evicted (counted).
    #[arg(long, default_value_t = 262_144, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Peers shown in the TIME_WAIT breakdown (`tracer_time_wait_sockets_by_peer`); the rest
    /// are summed under peer="other".
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub time_wait_top_peers: u32,

    /// Listening ports with their own listen-overflow series
    /// (`tracer_listen_overflows_by_listener_total`, `tracer_listen_queue_length`, `_limit`),
    /// those dropping the most; the rest are summed under port="other".
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub listen_overflow_top_ports: u32,

    /// Warn when TIME_WAIT sockets toward one peer hold this share of the ephemeral port range.
    #[arg(long, default_value_t = 0.5, value_name = "RATIO", value_parser = parse_ratio)]
    pub port_exhaustion_warning: f64,

    /// A connection in CLOSE_WAIT for longer than this is reported as a leak (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub close_wait_threshold: std::time::Duration,

    /// Diagnostics on stderr: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: log::LevelFilter,

    /// How often the tables are checked against a sock_diag dump of every namespace even when
    /// no loss was counted (the kernel can skip its programs unseen), at least 10s; `off`:
    /// only after counted losses.
    #[arg(long, default_value = "60s", value_name = "DURATION|off", value_parser = parse_resync_every)]
    pub resync_every: std::time::Duration,

    /// Opt-in metric breakdowns: `workload` adds the `tracer_workload_*` metrics (connections,
    /// retransmits, resets, TIME_WAIT, Nagle stalls, CLOSE_WAIT leaks by systemd unit,
    /// container or pod).
    #[arg(long, value_enum, value_name = "BREAKDOWN")]
    pub metrics_by: Vec<MetricsBy>,

    /// Workloads with their own series in the metrics by workload; the rest are summed under
    /// workload="other".
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub workload_top: u32,

    /// Only events about these connections: `workload=GLOB`, `port=N`, `addr=IP[/PREFIX]`,
    /// alternatives with `,`; several flags (or terms joined with ` and `) must all match.
    #[arg(long, value_name = "EXPR", value_parser = parse_filter)]
    pub filter: Vec<Filter>,
}

/// `--metrics-by`: an opt-in breakdown of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsBy {
    /// By the workload (systemd unit, container, pod) of each socket's cgroup.
    Workload,
}

fn parse_filter(text: &str) -> Result<Filter, String> {
    Filter::parse(&[text]).map_err(|e| e.to_string())
}

/// `--events`: how per-connection events are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsFlag {
    /// One JSON object per line.
    Json,
    /// Aligned columns with a header line, like `tcplife`.
    Text,
    /// No per-connection output.
    None,
}

impl RunArgs {
    pub fn config(&self) -> RunConfig {
        RunConfig {
            listen: self.listen,
            events: match self.events {
                EventsFlag::Json => EventFormat::Json,
                EventsFlag::Text => EventFormat::Text,
                EventsFlag::None => EventFormat::None,
            },
            ring_buffer_bytes: self.ring_buffer_bytes,
            max_connections: self.max_connections,
            time_wait_top_peers: self.time_wait_top_peers,
            listen_overflow_top_ports: self.listen_overflow_top_ports,
            port_exhaustion_warning: self.port_exhaustion_warning,
            close_wait_threshold: self.close_wait_threshold,
            resync_every: (!self.resync_every.is_zero()).then_some(self.resync_every),
            workload_top: self
                .metrics_by
                .contains(&MetricsBy::Workload)
                .then_some(self.workload_top),
            filter: Filter::all(self.filter.clone()),
        }
    }
}

impl DiagnoseArgs {
    pub fn options(&self) -> DiagnoseOptions {
        DiagnoseOptions {
            duration: self.duration,
            json: self.json,
            top: self.top,
            port_exhaustion_warning: self.port_exhaustion_warning,
            close_wait_threshold: self.close_wait_threshold,
            ring_buffer_bytes: self.ring_buffer_bytes,
            filter: Filter::all(self.filter.clone()),
        }
    }
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count"))?;
    if bytes < (64 << 10) || !bytes.is_power_of_two() {
        return Err(format!(
            "{bytes} must be a power of two of at least 65536 bytes"
        ));
    }
    Ok(bytes)
}

/// `250ms`, `30s`, `5m`, `1h`, `2m30s` (jiff's friendly format), or plain seconds; at most a
/// year.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 500ms, 30s, 5m or 1h");
    let seconds = match text.parse::<f64>() {
        Ok(plain) => plain,
        Err(_) => text
            .parse::<jiff::SignedDuration>()
            .map_err(|_| bad())?
            .as_secs_f64(),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 366.0 * 86400.0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// `--resync-every`: a duration of at least 10 s (resyncs are spaced that much anyway), or
/// `off` (zero).
fn parse_resync_every(text: &str) -> Result<std::time::Duration, String> {
    if text == "off" {
        return Ok(std::time::Duration::ZERO);
    }
    let every = parse_duration(text)?;
    if every < std::time::Duration::from_secs(10) {
        return Err(format!("{text:?} is shorter than 10s (or say `off`)"));
    }
    Ok(every)
}

/// `tracer top --interval`: whole seconds (the gauges refresh once a second), at most an hour.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let interval = parse_duration(text)?;
    if interval.subsec_nanos() != 0 || interval.as_secs() > 3600 {
        return Err(format!(
            "{text:?} is not a whole number of seconds between 1s and 1h"
        ));
    }
    Ok(interval)
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if ratio > 0.0 && ratio <= 1.0 => Ok(ratio),
        _ => Err(format!(
            "{text:?} is not a ratio between 0 (excluded) and 1"
        )),
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return report_usage(err),
    };
    let result = match cli.command {
        Command::Run(args) => {
            init_logging(args.log_level);
            run(args.config())
        }
        Command::Diagnose(args) => {
            init_logging(args.log_level);
            diagnose(args.options())
        }
        Command::Top(args) => {
            // Log lines would be drawn over the screen: what matters (lost events) is on it.
            init_logging(log::LevelFilter::Off);
            top(args.options())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the outermost context and its causes, no backtrace.
            eprintln!("tracer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout in full; usage errors get their first line only.
fn report_usage(err: clap::Error) -> ExitCode {
    if !err.use_stderr() {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "tracer: error: a command is required: `run`, `diagnose` or `top` (see `tracer --help`)"
        );
        return ExitCode::from(2);
    }
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("tracer: error: {first} (see `tracer --help`)");
    ExitCode::from(2)
}

fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tracer").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_are_the_documented_ones() {
        let Command::Run(args) = parse(&["run"]).expect("parse").command else {
            panic!("not run");
        };
        assert_eq!(args.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(args.events, EventsFlag::Text);
        assert_eq!(args.ring_buffer_bytes, 4 << 20);
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["run", "--listen", "not-an-address"]).is_err());
        assert!(parse(&["run", "--events", "xml"]).is_err());
        assert!(parse(&["run", "--ring-buffer-bytes", "100000"]).is_err());
        assert!(parse(&["run", "--max-connections", "0"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
        assert!(parse(&["run", "--port-exhaustion-warning", "1.5"]).is_err());
        assert!(parse(&["run", "--time-wait-top-peers", "0"]).is_err());
        assert!(parse(&["run", "--listen-overflow-top-ports", "0"]).is_err());
        assert!(parse(&["run", "--close-wait-threshold", "soon"]).is_err());
        assert!(parse(&["run", "--close-wait-threshold", "0s"]).is_err());
    }

    #[test]
    fn diagnose_defaults_and_bad_values() {
        let Command::Diagnose(args) = parse(&["diagnose"]).expect("parse").command else {
            panic!("not diagnose");
        };
        assert_eq!(args.duration, std::time::Duration::from_secs(30));
        assert!(!args.json);
        assert!(parse(&["diagnose", "--duration", "soon"]).is_err());
        assert!(parse(&["diagnose", "--top", "0"]).is_err());
    }

    #[test]
    fn top_interval_defaults_to_a_second_and_is_whole_seconds() {
        let Command::Top(args) = parse(&["top"]).expect("parse").command else {
            panic!("not top");
        };
        assert_eq!(args.interval, std::time::Duration::from_secs(1));
        let Command::Top(args) = parse(&["top", "--interval", "5s"]).expect("parse").command else {
            panic!("not top");
        };
        assert_eq!(args.options().interval, std::time::Duration::from_secs(5));
        for bad in ["0s", "500ms", "1.5s", "2h", "soon", "-1s"] {
            assert!(parse(&["top", "--interval", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2m30s"), Ok(Duration::from_secs(150)));
        assert!(parse_duration("-1s").is_err() && parse_duration("1d").is_err());
    }

    #[test]
    fn the_resync_audit_is_a_minute_by_default_and_can_be_turned_off() {
        use std::time::Duration;
        let every = |extra: &[&str]| {
            let mut args = vec!["run"];
            args.extend_from_slice(extra);
            match parse(&args).map(|cli| cli.command) {
                Ok(Command::Run(args)) => Ok(args.config().resync_every),
                Ok(_) => panic!("not run"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(every(&[]), Ok(Some(Duration::from_secs(60))));
        assert_eq!(
            every(&["--resync-every", "5m"]),
            Ok(Some(Duration::from_secs(300)))
        );
        assert_eq!(every(&["--resync-every", "off"]), Ok(None));
        assert!(every(&["--resync-every", "2s"]).is_err());
    }
}
