//! The Grafana dashboard and the Prometheus files under `dashboards/` agree with the agent:
//! promtool accepts the alert rules, the scrape configuration and every dashboard query; the
//! dashboard is well formed; every alert says how bad it is and what it means; and every
//! metric they name is one a real agent exports (and every family it exports has a panel).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use serde_norway::Value as YamlValue;

const ALERTS: &str = "prometheus/alerts.yml";
/// `promtool test rules` unit tests of the alerts.
const ALERTS_TEST: &str = "prometheus/alerts_test.yml";
const PROMETHEUS_CONFIG: &str = "prometheus/prometheus.yml";
const DASHBOARD: &str = "grafana/tracer-overview.json";
const PROVISIONING: [&str; 2] = [
    "grafana/provisioning/dashboards.yml",
    "grafana/provisioning/datasources.yml",
];

/// How long one promtool run may take.
const PROMTOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the labelled families (which appear with traffic) may take to show up.
const FAMILIES_TIMEOUT: Duration = Duration::from_secs(30);

/// The alerts the runbooks in `dashboards/README.md` describe, with their severities.
const REQUIRED_ALERTS: &[(&str, &str)] = &[
    ("TracerDown", "warning"),
    ("TracerEventsLost", "warning"),
    ("ConnectionTableEvictions", "warning"),
    ("TimeWaitPortExhaustion", "warning"),
    ("TimeWaitPortExhaustion", "critical"),
    ("TimeWaitBucketsNearLimit", "warning"),
    ("NagleDelayedAckStalls", "warning"),
    ("CloseWaitLeak", "warning"),
    ("HighRetransmitRate", "warning"),
    ("ListenQueueOverflows", "warning"),
];

/// What every dashboard query filters on: the `instance` variable.
const INSTANCE_FILTER: &str = "{instance=~\"$instance\"";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("dashboards")
}

fn read(relative: &str) -> String {
    let path = dashboards_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------------------------

/// Runs `promtool args...` and returns its stdout and stderr together; panics (never skips)
/// when promtool is missing, hangs or fails.
fn promtool(args: &[&str]) -> String {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dashboards_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (Debian package `prometheus`, or `cargo \
                 xtask setup`)"
            )
        });
    if wait_timeout(&mut child, PROMTOOL_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`promtool {}` did not finish within {PROMTOOL_TIMEOUT:?}",
            args.join(" ")
        );
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// The rule count of promtool's `SUCCESS: N rules found`.
fn rules_found(promtool_output: &str) -> usize {
    promtool_output
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("SUCCESS: ")?
                .strip_suffix(" rules found")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `SUCCESS: N rules found` in:\n{promtool_output}"))
}

/// A file removed when dropped, even when the test panics.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------------------------

/// Reads a YAML file of `dashboards/`. Into `serde_norway::Value` rather than a JSON value: its
/// mappings reject duplicate keys, which YAML forbids but a JSON map would silently overwrite.
fn read_yaml(relative: &str) -> YamlValue {
    serde_norway::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

/// What keeps the file checks strict: YAML forbids duplicate keys, and a reader that let the
/// last one win would check a value other than the one a tool may use.
#[test]
fn yaml_reader_rejects_duplicate_keys() {
    let parsed = serde_norway::from_str::<YamlValue>("a: 1\nb:\n  c: 2\n  c: 3\n");
    assert!(parsed.is_err(), "a duplicate key was accepted: {parsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------------------------

/// Every `tracer_[a-z0-9_]+` identifier in `text` (not part of a longer identifier).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("tracer_") {
        let start = i + found;
        let mut end = start + "tracer_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let standalone = (start == 0 || !is_ident(bytes[start - 1]))
            && (end == bytes.len() || !is_ident(bytes[end]));
        if standalone && end > start + "tracer_".len() {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn metric_names_are_extracted_whole() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(tracer_a_seconds_bucket{x=\"y\"}[5m]))) / \
         tracer_b_total and up{job=~\".*tracer.*\"} + my_tracer_c + tracer_d:rate5m",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["tracer_a_seconds_bucket", "tracer_b_total"]
    );
}

// ---------------------------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------------------------

struct Alert {
    name: String,
    expr: String,
    severity: String,
}

/// The alerting rules of `alerts.yml`, checked for the fields every alert must carry.
fn alert_rules() -> Vec<Alert> {
    let text = read(ALERTS);
    let doc = read_yaml(ALERTS);
    let groups = doc["groups"]
        .as_sequence()
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| panic!("{ALERTS}: no `groups`"));
    let mut alerts = Vec::new();
    for group in groups {
        let group_name = group["name"].as_str().expect("every group has a name");
        let rules = group["rules"]
            .as_sequence()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| panic!("{ALERTS}: group {group_name} has no rules"));
        for rule in rules {
            let name = rule["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{ALERTS}: a rule of {group_name} is not an alert"));
            // Prometheus takes these as strings only: a number or a mapping here is an error.
            let text_of = |value: &YamlValue, what: &str| -> String {
                let text = value.as_str().unwrap_or_default().trim();
                assert!(
                    !text.is_empty(),
                    "{ALERTS}: alert {name} has no {what} (or it is not a string)"
                );
                text.to_owned()
            };
            let expr = text_of(&rule["expr"], "expr");
            let hold = text_of(&rule["for"], "`for`");
            assert!(
                hold.starts_with(|c: char| c.is_ascii_digit())
                    && hold
                        .chars()
                        .all(|c| c.is_ascii_digit() || "smhdwy".contains(c)),
                "{ALERTS}: alert {name}: `for: {hold}` is not a duration"
            );
            let severity = text_of(&rule["labels"]["severity"], "labels.severity");
            assert!(
                ["warning", "critical", "info"].contains(&severity.as_str()),
                "{ALERTS}: alert {name}: severity {severity:?} is not warning, critical or info"
            );
            for annotation in ["summary", "description", "runbook"] {
                let text = text_of(
                    &rule["annotations"][annotation],
                    &format!("annotations.{annotation}"),
                );
                assert!(
                    text.len() >= 20,
                    "{ALERTS}: alert {name}: annotations.{annotation} is too short to help: \
                     {text:?}"
                );
            }
            alerts.push(Alert {
                name: name.to_owned(),
                expr,
                severity,
            });
        }
    }
    // The reader found every rule that is in the file.
    let written = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(alerts.len(), written, "{ALERTS}: rules misread");
    alerts
}

/// Every panel, those inside rows included; rows themselves excluded.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                assert!(
                    panel["title"].as_str().is_some_and(|t| !t.is_empty()),
                    "a row has no title: {panel}"
                );
            } else {
                out.push(panel);
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// `(panel id, panel title, refId, expr)` of every dashboard query.
fn dashboard_exprs(dashboard: &Value) -> Vec<(u64, String, String, String)> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        let id = panel["id"].as_u64().unwrap_or_default();
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((
                id,
                title.clone(),
                target["refId"].as_str().unwrap_or_default().to_owned(),
                target["expr"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    exprs
}

/// A dashboard query with Grafana's variables replaced by values Prometheus accepts.
fn as_promql(expr: &str) -> String {
    let promql = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(
        !promql.contains('$'),
        "a dashboard query uses a variable the dashboard does not define: {expr}"
    );
    promql
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn alert_rules_and_scrape_config_pass_promtool_and_say_what_to_do() {
    let rules_check = promtool(&["check", "rules", ALERTS]);
    let alerts = alert_rules();
    assert_eq!(
        rules_found(&rules_check),
        alerts.len(),
        "promtool and the reader disagree on the rule count:\n{rules_check}"
    );
    let config_check = promtool(&["check", "config", PROMETHEUS_CONFIG]);
    assert!(
        config_check.contains("1 rule files found") && config_check.contains("alerts.yml"),
        "{PROMETHEUS_CONFIG} does not load the alert rules:\n{config_check}"
    );
    // Read as YAML, not searched as text: the comments mention the port too.
    let config = read_yaml(PROMETHEUS_CONFIG);
    let rule_files = config["rule_files"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{PROMETHEUS_CONFIG}: no `rule_files` list"));
    assert!(
        rule_files.iter().any(|f| f == "alerts.yml"),
        "{PROMETHEUS_CONFIG}: `rule_files` does not name alerts.yml: {rule_files:?}"
    );
    let jobs = config["scrape_configs"]
        .as_sequence()
        .filter(|jobs| !jobs.is_empty())
        .unwrap_or_else(|| panic!("{PROMETHEUS_CONFIG}: no `scrape_configs`"));
    let scrapes_agent = |job: &YamlValue| {
        // Prometheus's default path is /metrics, where the agent serves.
        let path_ok = job.get("metrics_path").is_none_or(|p| p == "/metrics");
        let targets = job["static_configs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|c| c["targets"].as_sequence().into_iter().flatten());
        path_ok
            && targets
                .filter_map(YamlValue::as_str)
                .any(|t| t.ends_with(":9645"))
    };
    let job = jobs
        .iter()
        .find(|job| scrapes_agent(job))
        .unwrap_or_else(|| {
            panic!("{PROMETHEUS_CONFIG}: no job scrapes /metrics on the agent's default port 9645")
        });
    // The alert TracerDown matches jobs whose name contains "tracer".
    let job_name = job["job_name"].as_str().unwrap_or_default();
    assert!(
        job_name.contains("tracer"),
        "{PROMETHEUS_CONFIG}: the agent's job is named {job_name:?}, which TracerDown's \
         `job=~\".*tracer.*\"` does not match"
    );

    for (name, severity) in REQUIRED_ALERTS {
        assert!(
            alerts
                .iter()
                .any(|a| a.name == *name && a.severity == *severity),
            "{ALERTS}: no {name} alert with severity {severity}"
        );
    }
    let mut seen = BTreeSet::new();
    for alert in &alerts {
        assert!(
            seen.insert((alert.name.as_str(), alert.severity.as_str())),
            "{ALERTS}: two {} alerts with severity {}",
            alert.name,
            alert.severity
        );
        assert!(
            alert.name.starts_with(|c: char| c.is_ascii_uppercase())
                && alert.name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{ALERTS}: alert name {} is not CamelCase",
            alert.name
        );
    }
    // The port-exhaustion thresholds match the dashboard's (0.5 warning, 0.8 critical).
    for (severity, threshold) in [("warning", "> 0.5"), ("critical", "> 0.8")] {
        let alert = alerts
            .iter()
            .find(|a| a.name == "TimeWaitPortExhaustion" && a.severity == severity)
            .expect("checked above");
        assert!(
            alert
                .expr
                .contains("tracer_time_wait_port_exhaustion_ratio")
                && alert.expr.ends_with(threshold),
            "TimeWaitPortExhaustion ({severity}): {}",
            alert.expr
        );
    }
}

#[test]
fn promtool_unit_tests_show_every_alert_firing_and_staying_quiet() {
    let out = promtool(&["test", "rules", ALERTS_TEST]);
    assert!(
        out.contains("SUCCESS") && !out.contains("FAILED"),
        "`promtool test rules {ALERTS_TEST}` did not succeed:\n{out}"
    );
    let doc = read_yaml(ALERTS_TEST);
    let rule_files: Vec<&str> = doc["rule_files"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(YamlValue::as_str)
        .collect();
    assert_eq!(
        rule_files,
        ["alerts.yml"],
        "{ALERTS_TEST} must test the rules of alerts.yml, and only them"
    );
    // (alert, severity) of every expected firing, and the alerts with a case where they must
    // stay quiet (an empty or absent `exp_alerts`).
    let mut firing: BTreeSet<(String, String)> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let tests = doc["tests"]
        .as_sequence()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("{ALERTS_TEST}: no `tests`"));
    for test in tests {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"]
                .as_str()
                .unwrap_or_else(|| panic!("{ALERTS_TEST}: a case without alertname: {case:?}"))
                .to_owned();
            let expected = case["exp_alerts"]
                .as_sequence()
                .cloned()
                .unwrap_or_default();
            if expected.is_empty() {
                quiet.insert(name);
                continue;
            }
            for alert in &expected {
                let severity = alert["exp_labels"]["severity"].as_str().unwrap_or_else(|| {
                    panic!("{ALERTS_TEST}: an expected {name} alert without severity")
                });
                firing.insert((name.clone(), severity.to_owned()));
            }
        }
    }
    let alerts = alert_rules();
    for alert in &alerts {
        assert!(
            firing.contains(&(alert.name.clone(), alert.severity.clone())),
            "{ALERTS_TEST}: no case where {} ({}) fires",
            alert.name,
            alert.severity
        );
        assert!(
            quiet.contains(&alert.name),
            "{ALERTS_TEST}: no case where {} must stay quiet",
            alert.name
        );
    }
    // And no case tests an alert that alerts.yml does not have.
    for (name, severity) in &firing {
        assert!(
            alerts
                .iter()
                .any(|a| &a.name == name && &a.severity == severity),
            "{ALERTS_TEST}: expects {name} ({severity}), which alerts.yml does not define"
        );
    }
    for name in &quiet {
        assert!(
            alerts.iter().any(|a| &a.name == name),
            "{ALERTS_TEST}: tests {name}, which alerts.yml does not define"
        );
    }
}

#[test]
fn dashboard_is_well_formed_and_every_query_parses() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion must be at least 36"
    );
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let instance = variable("instance");
    assert_eq!(instance["type"], "query");
    let query = instance["query"]
        .as_str()
        .or_else(|| instance["query"]["query"].as_str())
        .unwrap_or_default();
    assert_eq!(query, "label_values(tracer_build_info, instance)");

    let panels = panels(&dashboard);
    assert!(panels.len() >= 20, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel has no title: {panel}");
        assert!(
            panel["description"].as_str().is_some_and(|d| d.len() >= 40),
            "panel {title:?} has no description that tells what it means"
        );
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel {title:?}: duplicate id"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24)
                && grid["h"].as_u64().is_some_and(|h| h > 0)
                && grid["y"].as_u64().is_some(),
            "panel {title:?}: bad gridPos {grid}"
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} does not use the datasource variable"
        );
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no target");
        let mut ref_ids = BTreeSet::new();
        for target in &targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?}: a target has no expr"
            );
            assert!(
                ref_ids.insert(target["refId"].as_str().unwrap_or_default()),
                "panel {title:?}: duplicate refId"
            );
            // Every series selector filters on the instance variable.
            for (at, _) in expr.match_indices("tracer_") {
                let rest = &expr[at..];
                let name_len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                assert!(
                    rest[name_len..].starts_with(INSTANCE_FILTER),
                    "panel {title:?}: {} is not filtered by {INSTANCE_FILTER}...}}: {expr}",
                    &rest[..name_len]
                );
            }
        }
    }

    // PromQL syntax: every query, as a recording rule in a temporary rules file, through
    // promtool. The file is JSON, which YAML readers accept.
    let exprs = dashboard_exprs(&dashboard);
    let rules: Vec<Value> = exprs
        .iter()
        .map(|(id, _, ref_id, expr)| {
            json!({
                "record": format!("tracer_dashboard:panel_{id}:{}", ref_id.to_ascii_lowercase()),
                "expr": as_promql(expr),
            })
        })
        .collect();
    let file = TempFile(std::env::temp_dir().join(format!(
        "tracer-dashboard-queries-{}.yml",
        std::process::id()
    )));
    let body = json!({"groups": [{"name": "tracer-dashboard-queries", "rules": rules}]});
    std::fs::write(&file.0, body.to_string()).expect("write the temporary rules file");
    let path = file.0.to_str().expect("a UTF-8 temporary path");
    let check = promtool(&["check", "rules", path]);
    assert_eq!(
        rules_found(&check),
        exprs.len(),
        "promtool did not check every dashboard query:\n{check}"
    );
    drop(file);

    // The provisioning files point at the dashboard directory and a Prometheus datasource.
    let [dashboards_yml, datasources_yml] = PROVISIONING.map(read_yaml);
    assert_eq!(dashboards_yml["apiVersion"], 1);
    assert_eq!(dashboards_yml["providers"][0]["type"], "file");
    assert!(dashboards_yml["providers"][0]["options"]["path"].is_string());
    assert_eq!(datasources_yml["apiVersion"], 1);
    assert_eq!(datasources_yml["datasources"][0]["type"], "prometheus");
    assert!(datasources_yml["datasources"][0]["url"].is_string());
}

#[test]
fn every_metric_the_files_name_is_exported_by_a_real_agent() {
    require_root();
    require_tool("promtool");
    let alerts_text = read(ALERTS);
    let dashboard = dashboard();
    let mut referenced: BTreeMap<String, &str> = BTreeMap::new();
    for name in metric_names(&alerts_text) {
        referenced.insert(name, ALERTS);
    }
    let dashboard_names: BTreeSet<String> = dashboard_exprs(&dashboard)
        .iter()
        .flat_map(|(_, _, _, expr)| metric_names(expr))
        .collect();
    // Descriptions and variables count too: a name an SRE reads must exist.
    for name in metric_names(&read(DASHBOARD)) {
        referenced.insert(name, DASHBOARD);
    }
    for name in metric_names(&read("README.md")) {
        referenced.entry(name).or_insert("README.md");
    }
    for alert in alert_rules() {
        assert!(
            !metric_names(&alert.expr).is_empty() || alert.expr.contains("up{"),
            "alert {}: its expr names no tracer metric: {}",
            alert.name,
            alert.expr
        );
    }

    // Many TIME_WAIT peers may exist on a shared machine: show them all, so the test's own
    // peer gets its per-peer series.
    // The metrics by workload are opt-in: ask for them, so that their panels are checked too.
    let mut agent = Agent::start(&["--time-wait-top-peers", "1000", "--metrics-by", "workload"]);
    // Connections the client closes first: state transitions, and client-side TIME_WAIT
    // sockets toward the server, whose per-peer and port-exhaustion series appear within a
    // refresh (1 s).
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        5,
    );
    let server_addr = server.addr;
    run_clients(server_addr, ClientMode::CloseFirst, 5, "tracer-dashbrd");
    server.join();
    // A listener that never accepts, with backlog 1, and a few connects: its accept queue fills
    // and overflows, so the per-listener families (queue length and limit, overflows by port)
    // appear at the listener worker's next read.
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    set_backlog(&slow, 1);
    let overflowing = nonblocking_connects(slow.local_addr().unwrap(), 8);

    // The labelled families appear with traffic: wait (bounded) for them all, and for the
    // test's own peer in the port-exhaustion series that feed the TIME_WAIT panels.
    let own_peer = [
        ("peer", "127.0.0.1".to_owned()),
        ("port", server_addr.port().to_string()),
    ];
    let started = Instant::now();
    let (exported, missing, own_series) = loop {
        let scrape = agent.scrape();
        let exported = exposition(&scrape);
        let missing: Vec<(String, &str)> = referenced
            .iter()
            .filter(|(name, _)| exported.family_of(name).is_none())
            .map(|(name, file)| (name.clone(), *file))
            .collect();
        let labels: Vec<(&str, &str)> = own_peer.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let own_series = !exported
            .matching("tracer_time_wait_port_exhaustion_ratio", &labels)
            .is_empty()
            && !exported
                .matching("tracer_time_wait_sockets_by_peer", &labels)
                .is_empty();
        if (missing.is_empty() && own_series) || started.elapsed() >= FAMILIES_TIMEOUT {
            break (exported, missing, own_series);
        }
        thread::sleep(Duration::from_millis(500));
    };
    abort_all(overflowing);
    drop(slow);
    assert!(
        missing.is_empty(),
        "metrics named in dashboards/ that the agent does not export (within \
         {FAMILIES_TIMEOUT:?}): {missing:?}\n--- families exported ---\n{}",
        exported
            .types()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        own_series,
        "no TIME_WAIT per-peer and port-exhaustion series for {own_peer:?} within \
         {FAMILIES_TIMEOUT:?}"
    );

    // Every family the agent exports has a panel.
    let on_dashboard: BTreeSet<&str> = dashboard_names
        .iter()
        .filter_map(|name| exported.family_of(name))
        .collect();
    let without_panel: Vec<&String> = exported
        .types()
        .keys()
        .filter(|family| family.starts_with("tracer_") && !on_dashboard.contains(family.as_str()))
        .collect();
    assert!(
        without_panel.is_empty(),
        "metric families the agent exports but no query of {DASHBOARD} shows: \
         {without_panel:?}; add a panel for them"
    );
    agent.stop();
}
