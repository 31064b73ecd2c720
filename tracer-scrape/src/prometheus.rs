//! A real Prometheus for the end-to-end test and `cargo xtask plots`: a temporary `prometheus`
//! process (Debian's package) scraping one agent, and instant and range queries over its HTTP
//! API, on loopback only.
use std::fmt;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Prometheus may take to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, in one line for the caller's message.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn error(what: impl fmt::Display) -> Error {
    Error(what.to_string())
}

/// One series of a query: its labels and its (unix seconds, value) points (one for an instant
/// query).
#[derive(Clone, Debug)]
pub struct Series {
    pub labels: Value,
    pub points: Vec<(f64, f64)>,
}

/// A Prometheus HTTP API on a loopback address.
#[derive(Clone, Copy, Debug)]
pub struct Api {
    pub addr: SocketAddr,
}

impl Api {
    /// From `http://HOST:PORT` (HOST a loopback IP address, or `localhost`).
    pub fn from_url(url: &str) -> Result<Api, Error> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| error(format!("{url}: expected http://HOST:PORT")))?;
        let host_port = rest
            .trim_end_matches('/')
            .replace("localhost:", "127.0.0.1:");
        let addr: SocketAddr = host_port
            .parse()
            .map_err(|_| error(format!("{url}: expected http://IP:PORT")))?;
        if !addr.ip().is_loopback() {
            return Err(error(format!(
                "{url}: only a Prometheus on this machine (loopback) is queried"
            )));
        }
        Ok(Api { addr })
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    pub fn get(&self, path: &str) -> Result<Value, Error> {
        let resp = crate::get(self.addr, &format!("/api/v1/{path}"), API_TIMEOUT)
            .map_err(|e| error(format!("GET /api/v1/{path} on {}: {e}", self.addr)))?;
        let body: Value = serde_json::from_str(&resp.body)
            .map_err(|e| error(format!("/api/v1/{path}: not JSON ({e}): {}", resp.body)))?;
        if resp.status != 200 || body["status"] != "success" {
            return Err(error(format!(
                "/api/v1/{path} answered {}: {}",
                resp.status, resp.body
            )));
        }
        Ok(body["data"].clone())
    }

    /// An instant query: each series with its one point; a scalar as one series without labels.
    pub fn query(&self, promql: &str) -> Result<Vec<Series>, Error> {
        let data = self.get(&format!("query?query={}", url_encode(promql)))?;
        let point = |pair: &Value| -> Result<(f64, f64), Error> {
            let t = pair[0].as_f64();
            let v = pair[1].as_str().and_then(|s| s.parse::<f64>().ok());
            match (t, v) {
                (Some(t), Some(v)) => Ok((t, v)),
                _ => Err(error(format!(
                    "{promql}: not a [time, \"value\"] pair: {pair}"
                ))),
            }
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    Ok(Series {
                        labels: s["metric"].clone(),
                        points: vec![point(&s["value"])?],
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Series {
                labels: Value::Null,
                points: vec![point(&data["result"])?],
            }]),
            other => Err(error(format!(
                "{promql}: unexpected result type {other:?}: {data}"
            ))),
        }
    }

    /// `query_range` from `start` to `end` (unix seconds) every `step` seconds; points that are
    /// not finite numbers are left out.
    pub fn range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Series>, Error> {
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
pub fn url_encode(text: &str) -> String {
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

/// What the temporary Prometheus scrapes and evaluates.
pub struct Config<'a> {
    /// The agent's `/metrics` address, scraped as job `tracer`.
    pub target: SocketAddr,
    /// Scrape and evaluation interval, e.g. `1s`.
    pub interval: &'a str,
    /// Rule files copied into its directory and loaded.
    pub rule_files: &'a [&'a Path],
}

/// A `prometheus` process with its own directory; stopped (SIGTERM, then killed) and its
/// directory removed on drop.
pub struct Prometheus {
    child: Option<Child>,
    dir: PathBuf,
    pub api: Api,
}

impl Prometheus {
    /// Starts Prometheus in `dir` (emptied first) on a free loopback port; returns once it is
    /// ready.
    pub fn start(config: &Config<'_>, dir: &Path) -> Result<Prometheus, Error> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| error(format!("creating {}: {e}", dir.display())))?;
        let mut rules = String::new();
        for (i, file) in config.rule_files.iter().enumerate() {
            let name = format!("rules-{i}.yml");
            std::fs::copy(file, dir.join(&name))
                .map_err(|e| error(format!("copying {}: {e}", file.display())))?;
            rules.push_str(&format!("  - {name}\n"));
        }
        let interval = config.interval;
        let target = config.target;
        let mut text = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
             evaluation_interval: {interval}\n"
        );
        if !rules.is_empty() {
            text.push_str(&format!("rule_files:\n{rules}"));
        }
        text.push_str(&format!(
            "scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: \
             [\"{target}\"]\n"
        ));
        std::fs::write(dir.join("prometheus.yml"), text)
            .map_err(|e| error(format!("writing prometheus.yml: {e}")))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = File::create(dir.join("prometheus.log"))
            .map_err(|e| error(format!("creating the log: {e}")))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                error(format!(
                    "cannot start prometheus ({e}): install Debian's `prometheus` (cargo xtask setup)"
                ))
            })?;
        let mut prometheus = Prometheus {
            child: Some(child),
            dir: dir.to_owned(),
            api: Api { addr },
        };
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    fn wait_ready(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let mut last = String::from("no attempt yet");
        while started.elapsed() < READY_TIMEOUT {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(error(format!(
                    "prometheus exited ({status}) before it was ready: {}",
                    self.log()
                )));
            }
            match crate::get(self.api.addr, "/-/ready", Duration::from_secs(2)) {
                Ok(resp) if resp.status == 200 => return Ok(()),
                Ok(resp) => last = format!("status {}", resp.status),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(error(format!(
            "prometheus was not ready on {} within {READY_TIMEOUT:?} (last: {last}): {}",
            self.api.addr,
            self.log()
        )))
    }

    /// What Prometheus wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, then a kill if it has not exited within [`STOP_TIMEOUT`]; always reaped.
fn stop(child: &mut Child) {
    // `kill` with SIGTERM through the command line tool keeps this crate free of `unsafe`.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, Error> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| error(format!("binding 127.0.0.1:0: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| error(format!("local address: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_taken() {
        assert_eq!(
            Api::from_url("http://localhost:9090/").unwrap().addr,
            "127.0.0.1:9090".parse().unwrap()
        );
        assert!(Api::from_url("http://127.0.0.1:9090").is_ok());
        assert!(Api::from_url("http://192.0.2.1:9090").is_err());
        assert!(Api::from_url("https://127.0.0.1:9090").is_err());
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(url_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}
