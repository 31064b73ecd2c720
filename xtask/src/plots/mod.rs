//! `cargo xtask plots`: the main dashboard's key panels as PNG files, drawn from Prometheus
//! range queries of a real run.
//!
//! By default (as root) it builds the agent, starts it, starts a Prometheus scraping it every
//! second, runs a bounded traffic mix (loopback churn, TIME_WAIT toward one peer,
//! retransmissions through a lossy veth, a Nagle client), and draws what Prometheus recorded.
//! With `--prometheus URL` it draws the last `--seconds` of an existing one instead. The
//! queries are the dashboard's own (`dashboards/grafana/tracer-overview.json`), with its
//! variables substituted as Grafana does.
mod render;
pub(crate) mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{require_root, step, workspace_root};
use render::{Axis, Line, Plot, Side};
use tracer_scrape::prometheus::{self as prom, Api, Prometheus};

/// The largest picture we commit.
const MAX_PNG_BYTES: u64 = 200 * 1024;
/// `$__rate_interval` for a 1 s scrape interval, a little wider for smoother lines.
const RATE_INTERVAL: &str = "10s";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Draw from this Prometheus (http://IP:PORT on this machine) instead of a run of our own.
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// With --prometheus: the agent's `instance` label (default: the first one found).
    #[arg(long)]
    instance: Option<String>,
    /// Seconds of traffic to run, or, with --prometheus, of history to draw.
    #[arg(long, default_value_t = 150)]
    seconds: u64,
    /// Where to write the PNG files, relative to the workspace root.
    #[arg(long, value_name = "DIR", default_value = "docs/img")]
    out: PathBuf,
}

/// A panel of the dashboard drawn on one axis.
struct Panel {
    id: u64,
    desc: &'static str,
    axis: Axis,
    /// Legend instead of the targets' `legendFormat` (tables have none).
    legend: Option<&'static str>,
    /// Draw only the lines with the largest values.
    top: usize,
}

const fn panel(id: u64, desc: &'static str, axis: Axis) -> Panel {
    Panel {
        id,
        desc,
        axis,
        legend: None,
        top: 8,
    }
}

/// One chart: a panel, and maybe a second one on the right axis.
struct Chart {
    left: Panel,
    right: Option<Panel>,
}

struct Picture {
    file: &'static str,
    heading: &'static str,
    charts: Vec<Chart>,
}

fn pictures() -> Vec<Picture> {
    vec![
        Picture {
            file: "connections.png",
            heading: "Connections: rate and duration",
            charts: vec![
                Chart {
                    left: panel(9, "connections / s", Axis::Linear),
                    right: None,
                },
                Chart {
                    left: panel(15, "duration (log scale)", Axis::LogSeconds),
                    right: None,
                },
            ],
        },
        Picture {
            file: "time_wait.png",
            heading: "TIME_WAIT by peer and ephemeral port exhaustion",
            charts: vec![Chart {
                left: Panel {
                    legend: Some("TIME_WAIT toward {{peer}}:{{port}}"),
                    top: 3,
                    ..panel(22, "TIME_WAIT sockets", Axis::Linear)
                },
                right: Some(Panel {
                    legend: Some("port exhaustion ratio toward {{peer}}:{{port}} (right axis)"),
                    top: 1,
                    ..panel(23, "ports held / ip_local_port_range", Axis::Percent)
                }),
            }],
        },
        Picture {
            file: "retransmits.png",
            heading: "Retransmissions",
            charts: vec![Chart {
                left: panel(27, "segments / s", Axis::Linear),
                right: None,
            }],
        },
        Picture {
            file: "delayed_acks.png",
            heading: "Delayed ACKs and Nagle stalls",
            charts: vec![
                Chart {
                    left: panel(30, "per second", Axis::Linear),
                    right: None,
                },
                Chart {
                    left: panel(32, "per second", Axis::Linear),
                    right: None,
                },
            ],
        },
    ]
}

pub fn run(args: Args) -> Result<()> {
    render::load_font()?;
    let dashboard = read_dashboard()?;
    let out = workspace_root().join(&args.out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    match &args.prometheus {
        Some(url) => {
            let api = Api::from_url(url)?;
            let instance = match &args.instance {
                Some(i) => i.clone(),
                None => first_instance(&api)?,
            };
            let end = unix_now();
            let start = end - args.seconds as f64;
            draw_all(&api, &dashboard, &instance, (start, end), &out, false)
        }
        None => own_run(&args, &dashboard, &out),
    }
}

fn read_dashboard() -> Result<Value> {
    let path = workspace_root().join("dashboards/grafana/tracer-overview.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn first_instance(api: &Api) -> Result<String> {
    let values = api.get("label/instance/values?match[]=tracer_build_info")?;
    values
        .as_array()
        .and_then(|v| v.first())
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("no tracer_build_info in that Prometheus: give --instance")
}

/// The agent, stopped on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        traffic::stop_child(&mut self.0);
    }
}

fn own_run(args: &Args, dashboard: &Value, out: &std::path::Path) -> Result<()> {
    require_root(
        "cargo xtask plots",
        "the agent loads eBPF programs and the traffic uses a network namespace (or give \
         --prometheus URL)",
    )?;
    let binary = crate::build()?;
    let port = prom::free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    step(&format!("starting the agent on {listen}"));
    let child = Command::new(&binary)
        .args(["run", "--events", "none", "--log-level", "warn"])
        .args(["--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut agent = Agent(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tracer_scrape::get(listen, "/metrics", Duration::from_secs(2))
        .map_or(true, |r| r.status != 200)
    {
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited during start-up ({status})");
        }
        if Instant::now() > deadline {
            bail!("the agent's /metrics did not answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = workspace_root().join(format!("target/plots/prometheus-{}", std::process::id()));
    let prometheus = Prometheus::start(
        &prom::Config {
            target: listen,
            interval: "1s",
            rule_files: &[],
        },
        &dir,
    )?;
    step(&format!(
        "Prometheus on {} scrapes it every second",
        prometheus.api.addr
    ));
    std::thread::sleep(Duration::from_secs(3));
    let start = unix_now();
    let ns = traffic::LossyNetns::create()?;
    let seconds = Duration::from_secs(args.seconds);
    step(&format!("running the traffic mix for {} s", args.seconds));
    let mix = traffic::Mix::start(seconds, &ns)?;
    let began = Instant::now();
    while began.elapsed() < seconds {
        std::thread::sleep(Duration::from_secs(1));
    }
    mix.finish()?;
    drop(ns);
    // The last scrape and rate windows catch up.
    std::thread::sleep(Duration::from_secs(3));
    let end = unix_now();
    draw_all(
        &prometheus.api,
        dashboard,
        &listen.to_string(),
        (start, end),
        out,
        true,
    )
}

/// Draws every picture from `start` to `end` (unix seconds). `strict`: a panel without data
/// is an error (our own run must show on every panel), else it is drawn saying so.
fn draw_all(
    api: &Api,
    dashboard: &Value,
    instance: &str,
    (start, end): (f64, f64),
    out: &std::path::Path,
    strict: bool,
) -> Result<()> {
    let step_s = ((end - start) / 1000.0).ceil().max(1.0);
    let mut too_big = Vec::new();
    for picture in pictures() {
        let mut plots = Vec::new();
        for chart in &picture.charts {
            let (mut title, left) =
                side(api, dashboard, &chart.left, instance, start, end, step_s)?;
            let right = match &chart.right {
                Some(p) => {
                    let (right_title, right) =
                        side(api, dashboard, p, instance, start, end, step_s)?;
                    title = format!("{title}, and {}", right_title.to_lowercase());
                    Some(right)
                }
                None => None,
            };
            if strict && left.lines.iter().all(|l| l.points.is_empty()) {
                bail!("{title}: no data from this run");
            }
            plots.push(Plot { title, left, right });
        }
        let path = out.join(picture.file);
        render::picture(&path, picture.heading, &plots, end - start)?;
        let size = std::fs::metadata(&path)?.len();
        step(&format!("wrote {} ({} KiB)", path.display(), size / 1024));
        if size > MAX_PNG_BYTES {
            too_big.push(format!("{} ({size} bytes)", path.display()));
        }
    }
    if !too_big.is_empty() {
        bail!("over {MAX_PNG_BYTES} bytes: {}", too_big.join(", "));
    }
    Ok(())
}

/// A panel's title and its lines: each target of the panel as a range query.
fn side(
    api: &Api,
    dashboard: &Value,
    panel: &Panel,
    instance: &str,
    start: f64,
    end: f64,
    step_s: f64,
) -> Result<(String, Side)> {
    let found = find_panel(&dashboard["panels"], panel.id)
        .with_context(|| format!("the dashboard has no panel {}", panel.id))?;
    let title = found["title"].as_str().unwrap_or_default().to_owned();
    let escaped = instance.replace('.', "\\\\.");
    let mut lines = Vec::new();
    for target in found["targets"].as_array().into_iter().flatten() {
        let expr = target["expr"].as_str().unwrap_or_default();
        let promql = expr
            .replace("$__rate_interval", RATE_INTERVAL)
            .replace("$instance", &escaped);
        let format = panel
            .legend
            .or(target["legendFormat"].as_str().filter(|f| !f.is_empty()))
            .unwrap_or("{{instance}}");
        for series in api.range(&promql, start, end, step_s)? {
            let points = series.points.iter().map(|&(t, v)| (t - start, v)).collect();
            lines.push(Line {
                // `peer="other"` has no port.
                name: legend(format, &series.labels)
                    .trim_end_matches(':')
                    .to_owned(),
                points,
            });
        }
    }
    let peak = |l: &Line| l.points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    lines.sort_by(|a, b| peak(b).total_cmp(&peak(a)));
    lines.truncate(panel.top);
    Ok((
        title,
        Side {
            desc: panel.desc.to_owned(),
            axis: panel.axis,
            lines,
        },
    ))
}

fn find_panel(list: &Value, id: u64) -> Option<&Value> {
    list.as_array()?.iter().find_map(|p| {
        if p["id"].as_u64() == Some(id) {
            Some(p)
        } else {
            find_panel(&p["panels"], id)
        }
    })
}

/// Grafana's legend format: `{{label}}` replaced by the series' label value.
fn legend(format: &str, labels: &Value) -> String {
    let mut out = String::new();
    let mut rest = format;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = after[..close].trim();
        out.push_str(labels[name].as_str().unwrap_or(""));
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legends_take_label_values_like_grafana() {
        let labels = serde_json::json!({"peer": "10.0.0.7", "port": "443", "kind": "syn"});
        assert_eq!(legend("{{peer}}:{{port}}", &labels), "10.0.0.7:443");
        assert_eq!(legend("p99 {{ kind }}", &labels), "p99 syn");
        assert_eq!(legend("{{missing}} x", &labels), " x");
        assert_eq!(legend("open {{peer", &labels), "open {{peer");
    }

    #[test]
    fn only_a_loopback_prometheus_is_queried() {
        assert!(Api::from_url("http://127.0.0.1:9090").is_ok());
        assert!(Api::from_url("http://localhost:9090/").is_ok());
        assert!(Api::from_url("http://10.0.0.1:9090").is_err());
        assert!(Api::from_url("https://127.0.0.1:9090").is_err());
    }

    #[test]
    fn every_picture_names_a_panel_of_the_dashboard() {
        let dashboard = read_dashboard().unwrap_or_default();
        for picture in pictures() {
            for chart in &picture.charts {
                for panel in std::iter::once(&chart.left).chain(&chart.right) {
                    assert!(
                        find_panel(&dashboard["panels"], panel.id)
                            .is_some_and(|p| p["targets"].is_array()),
                        "{}: no panel {} with queries in the dashboard",
                        picture.file,
                        panel.id
                    );
                }
            }
        }
    }
}
