//! Prometheus for the plots: a temporary server scraping the agent every second, and range
//! queries over its HTTP API (loopback only, through the tests' HTTP client).
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// One series of a range query: its labels and its (unix seconds, value) points.
pub struct Series {
    pub labels: Value,
    pub points: Vec<(f64, f64)>,
}

/// A Prometheus HTTP API on a loopback address.
pub struct Api {
    pub addr: SocketAddr,
}

impl Api {
    /// From `http://HOST:PORT` (HOST a loopback IP address, or `localhost`).
    pub fn from_url(url: &str) -> Result<Api> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("--prometheus {url}: expected http://HOST:PORT"))?;
        let host_port = rest.trim_end_matches('/');
        let host_port = host_port.replace("localhost:", "127.0.0.1:");
        let addr: SocketAddr = host_port
            .parse()
            .with_context(|| format!("--prometheus {url}: expected http://IP:PORT"))?;
        if !addr.ip().is_loopback() {
            bail!("--prometheus {url}: only a Prometheus on this machine (loopback) is queried");
        }
        Ok(Api { addr })
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    pub fn get(&self, path: &str) -> Result<Value> {
        let resp = tracer_scrape::get(self.addr, &format!("/api/v1/{path}"), API_TIMEOUT)
            .with_context(|| format!("GET /api/v1/{path} on {}", self.addr))?;
        let body: Value = serde_json::from_str(&resp.body)
            .with_context(|| format!("/api/v1/{path}: not JSON: {}", resp.body))?;
        if resp.status != 200 || body["status"] != "success" {
            bail!("/api/v1/{path} answered {}: {}", resp.status, resp.body);
        }
        Ok(body["data"].clone())
    }

    /// `query_range` from `start` to `end` (unix seconds) every `step` seconds.
    pub fn range(&self, promql: &str, start: f64, end: f64, step: f64) -> Result<Vec<Series>> {
        let data = self.get(&format!(
            "query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(promql)
        ))?;
        let mut out = Vec::new();
        for series in data["result"].as_array().into_iter().flatten() {
            let points = series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|pair| {
                    let t = pair[0].as_f64()?;
                    let v: f64 = pair[1].as_str()?.parse().ok()?;
                    v.is_finite().then_some((t, v))
                })
                .collect();
            out.push(Series {
                labels: series["metric"].clone(),
                points,
            });
        }
        Ok(out)
    }
}

/// Percent-encodes everything but the unreserved characters (RFC 3986).
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A `prometheus` process scraping one agent every second, with its own directory; stopped
/// and its directory removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub api: Api,
}

impl Prometheus {
    pub fn start(target: SocketAddr, dir: &Path) -> Result<Prometheus> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: \
             [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).context("writing prometheus.yml")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = File::create(dir.join("prometheus.log")).context("creating the log")?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start prometheus (Debian package `prometheus`: cargo xtask setup)")?;
        let mut prometheus = Prometheus {
            child,
            dir: dir.to_owned(),
            api: Api { addr },
        };
        let started = Instant::now();
        loop {
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited ({status}): {}", prometheus.log());
            }
            let ready = tracer_scrape::get(addr, "/-/ready", Duration::from_secs(2));
            if ready.is_ok_and(|r| r.status == 200) {
                return Ok(prometheus);
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "prometheus was not ready within {READY_TIMEOUT:?}: {}",
                    prometheus.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        crate::plots::traffic::stop_child(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
