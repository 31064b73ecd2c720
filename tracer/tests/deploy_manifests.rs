//! The deployment files other than the systemd unit (whose capabilities `deploy.rs` proves on
//! the real agent) agree with it and with the agent: the Kubernetes DaemonSet grants the same
//! capabilities, with the host namespaces, mounts, port and limits the agent needs, and its
//! Service and Prometheus scrape configuration find it; the Containerfile ships the release
//! binary alone; the fleet configurations parse (promtool for the Prometheus ones) and wire
//! their components together.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde::Deserialize;
use serde_norway::Value as Yaml;

const UNIT: &str = "deploy/systemd/tracer.service";
const K8S: &str = "deploy/kubernetes/tracer.yaml";
const K8S_PROMETHEUS: &str = "deploy/kubernetes/prometheus.yml";
const CONTAINERFILE: &str = "deploy/container/Containerfile";
const FLEET_AGENT: &str = "deploy/fleet/prometheus-agent.yml";
const FLEET_FEDERATION: &str = "deploy/fleet/prometheus-federation.yml";
const VECTOR: &str = "deploy/fleet/vector.yaml";
const FLUENT_BIT: &str = "deploy/fleet/fluent-bit.yaml";

/// The agent's metrics port (`--listen` default).
const METRICS_PORT: u64 = 9645;
/// The event kinds of `--events json` (README, "Events").
const EVENT_KINDS: [&str; 4] = [
    "connection_closed",
    "time_wait_ended",
    "nagle_delack_stall",
    "close_wait_leak",
];
const PROMTOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every document of a YAML file (mappings reject duplicate keys).
fn yaml_documents(relative: &str) -> Vec<Yaml> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(relative: &str) -> Yaml {
    let mut docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

/// `value[a][b]...`, panicking with the path when a step is missing.
fn at<'a>(value: &'a Yaml, path: &[&str], what: &str) -> &'a Yaml {
    path.iter().fold(value, |v, key| {
        v.get(key)
            .unwrap_or_else(|| panic!("{what}: no `{}`", path.join(".")))
    })
}

fn str_at<'a>(value: &'a Yaml, path: &[&str], what: &str) -> &'a str {
    at(value, path, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{}` is not a string", path.join(".")))
}

fn seq_at<'a>(value: &'a Yaml, path: &[&str], what: &str) -> &'a [Yaml] {
    at(value, path, what)
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: `{}` is not a list", path.join(".")))
}

fn strings(values: &[Yaml]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// The unit's capabilities without the `CAP_` prefix, as Kubernetes and podman name them.
fn unit_capabilities() -> BTreeSet<String> {
    let text = read(UNIT);
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .unwrap_or_else(|| panic!("{UNIT} has no AmbientCapabilities="));
    line.split_ascii_whitespace()
        .map(|cap| cap.strip_prefix("CAP_").expect("CAP_ name").to_owned())
        .collect()
}

/// The unit's `MemoryMax=`, in MiB.
fn unit_memory_mib() -> u64 {
    let text = read(UNIT);
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("MemoryMax="))
        .unwrap_or_else(|| panic!("{UNIT} has no MemoryMax="));
    value.trim_end_matches('M').parse().expect("MemoryMax in M")
}

/// Runs promtool with `args` in `dir`; its output, or `Err` with it when promtool fails.
fn promtool(args: &[&str]) -> Result<String, String> {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): `cargo xtask setup` installs it"));
    if wait_timeout(&mut child, PROMTOOL_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`promtool {}` hung", args.join(" "));
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("WARNING") {
        Ok(text)
    } else {
        Err(text)
    }
}

fn promtool_ok(args: &[&str]) -> String {
    promtool(args).unwrap_or_else(|text| panic!("`promtool {}`:\n{text}", args.join(" ")))
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

fn k8s_object(kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = yaml_documents(K8S)
        .into_iter()
        .filter(|doc| doc.get("kind").and_then(Yaml::as_str) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "{K8S}: expected one {kind}");
    found.remove(0)
}

/// Quantities like `512Mi` or `128Mi`, in MiB.
fn mebibytes(quantity: &str) -> u64 {
    let (number, unit) = quantity.split_at(quantity.trim_end_matches(char::is_alphabetic).len());
    let number: u64 = number.parse().expect("a whole quantity");
    match unit {
        "Mi" => number,
        "Gi" => number * 1024,
        _ => panic!("{quantity}: expected Mi or Gi"),
    }
}

#[test]
fn daemonset_runs_the_agent_with_the_units_capabilities_and_what_it_needs() {
    let ds = k8s_object("DaemonSet");
    let what = "DaemonSet";
    let namespace = str_at(&ds, &["metadata", "namespace"], what);
    let spec = at(&ds, &["spec", "template", "spec"], what);
    // Host PIDs: the kernel's pids and other pods' /proc entries. Host network: the node's
    // namespace and its TIME_WAIT sysctls.
    assert_eq!(spec["hostPID"], Yaml::Bool(true), "{what}: hostPID");
    assert_eq!(spec["hostNetwork"], Yaml::Bool(true), "{what}: hostNetwork");
    assert_eq!(
        str_at(spec, &["dnsPolicy"], what),
        "ClusterFirstWithHostNet"
    );
    let labels = at(&ds, &["spec", "template", "metadata", "labels"], what);
    let selector = at(&ds, &["spec", "selector", "matchLabels"], what);
    assert_eq!(labels, selector, "{what}: the selector picks its own pods");

    let containers = seq_at(spec, &["containers"], what);
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    let args = strings(seq_at(c, &["args"], what));
    assert_eq!(args[0], "run", "{what}: args {args:?}");
    let pair = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    assert_eq!(pair("--events").as_deref(), Some("json"));
    assert_eq!(pair("--listen"), Some(format!("0.0.0.0:{METRICS_PORT}")));

    let ports = seq_at(c, &["ports"], what);
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == *"metrics" && p["containerPort"].as_u64() == Some(METRICS_PORT)),
        "{what}: port {METRICS_PORT} named metrics"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(str_at(c, &[probe, "httpGet", "path"], what), "/metrics");
    }

    let security = at(c, &["securityContext"], what);
    let added: BTreeSet<String> = strings(seq_at(security, &["capabilities", "add"], what))
        .into_iter()
        .collect();
    assert_eq!(
        added,
        unit_capabilities(),
        "{what}: the same capabilities as {UNIT} (proven by tests/deploy.rs)"
    );
    assert_eq!(
        strings(seq_at(security, &["capabilities", "drop"], what)),
        ["ALL"]
    );
    for (key, wanted) in [
        ("readOnlyRootFilesystem", true),
        ("allowPrivilegeEscalation", false),
        ("privileged", false),
    ] {
        assert_eq!(security[key], Yaml::Bool(wanted), "{what}: {key}");
    }
    // Kubernetes gives added capabilities to root only (no ambient set for other users).
    assert_eq!(security["runAsUser"].as_u64(), Some(0), "{what}: runAsUser");

    let resources = at(c, &["resources"], what);
    for key in ["cpu", "memory"] {
        at(resources, &["requests", key], what);
        at(resources, &["limits", key], what);
    }
    let limit = mebibytes(str_at(resources, &["limits", "memory"], what));
    let request = mebibytes(str_at(resources, &["requests", "memory"], what));
    assert!(request <= limit, "{what}: memory request above the limit");
    assert_eq!(limit, unit_memory_mib(), "{what}: the unit's MemoryMax");

    let volumes: BTreeSet<&str> = seq_at(spec, &["volumes"], what)
        .iter()
        .map(|v| str_at(v, &["name"], what))
        .collect();
    let mounts = seq_at(c, &["volumeMounts"], what);
    let mut paths = BTreeSet::new();
    for mount in mounts {
        let name = str_at(mount, &["name"], what);
        assert!(volumes.contains(name), "{what}: mount {name} has no volume");
        assert_eq!(
            mount["readOnly"],
            Yaml::Bool(true),
            "{what}: {name} read-only"
        );
        paths.insert(str_at(mount, &["mountPath"], what));
    }
    for needed in ["/sys/kernel/btf", "/sys/kernel/tracing"] {
        assert!(
            paths.contains(needed),
            "{what}: mounts {paths:?} lack {needed}"
        );
    }

    let service = k8s_object("Service");
    assert_eq!(
        str_at(&service, &["metadata", "namespace"], "Service"),
        namespace
    );
    assert_eq!(
        at(&service, &["spec", "selector"], "Service"),
        labels,
        "the Service selects the DaemonSet's pods"
    );
    let ports = seq_at(&service, &["spec", "ports"], "Service");
    assert!(
        ports.iter().any(|p| p["name"] == *"metrics"
            && p["port"].as_u64() == Some(METRICS_PORT)
            && p["targetPort"] == *"metrics"),
        "Service: port metrics -> metrics"
    );
    let ns = k8s_object("Namespace");
    assert_eq!(str_at(&ns, &["metadata", "name"], "Namespace"), namespace);
}

/// Debian's promtool is built without Kubernetes discovery, so it rejects
/// `kubernetes_sd_configs` as an unknown field. The file is then checked with that block
/// replaced by a static target (promtool checks all the rest: relabelling, timeouts), and the
/// block itself is checked here against the DaemonSet and its Service. A promtool that knows
/// Kubernetes checks the file as it is.
#[test]
fn kubernetes_scrape_config_finds_the_service_and_passes_promtool() {
    let config = yaml(K8S_PROMETHEUS);
    let jobs = seq_at(&config, &["scrape_configs"], K8S_PROMETHEUS);
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    let name = str_at(job, &["job_name"], K8S_PROMETHEUS);
    assert!(
        name.contains("tracer"),
        "TracerDown matches jobs named *tracer*"
    );
    let sd = seq_at(job, &["kubernetes_sd_configs"], K8S_PROMETHEUS);
    assert_eq!(str_at(&sd[0], &["role"], K8S_PROMETHEUS), "endpoints");
    let service = k8s_object("Service");
    let namespace = str_at(&service, &["metadata", "namespace"], "Service");
    let service_name = str_at(&service, &["metadata", "name"], "Service");
    assert_eq!(
        strings(seq_at(&sd[0], &["namespaces", "names"], K8S_PROMETHEUS)),
        [namespace]
    );
    let keep = seq_at(job, &["relabel_configs"], K8S_PROMETHEUS)
        .iter()
        .find(|r| r["action"] == *"keep")
        .expect("a keep rule");
    assert_eq!(
        strings(seq_at(keep, &["source_labels"], K8S_PROMETHEUS)),
        [
            "__meta_kubernetes_service_name",
            "__meta_kubernetes_endpoint_port_name"
        ]
    );
    assert_eq!(
        str_at(keep, &["regex"], K8S_PROMETHEUS),
        format!("{service_name};metrics")
    );

    let path = repo_file(K8S_PROMETHEUS);
    match promtool(&["check", "config", path.to_str().unwrap()]) {
        Ok(_) => {}
        Err(text) if text.contains("field kubernetes_sd_configs not found") => {
            let mut config = config.clone();
            let job = &mut config["scrape_configs"][0];
            let mapping = job.as_mapping_mut().expect("job mapping");
            mapping.remove("kubernetes_sd_configs");
            let targets: Yaml =
                serde_norway::from_str(&format!("- targets: ['node-1:{METRICS_PORT}']")).unwrap();
            mapping.insert("static_configs".into(), targets);
            let copy = TempFile(
                std::env::temp_dir()
                    .join(format!("tracer-k8s-prometheus-{}.yml", std::process::id())),
            );
            std::fs::write(&copy.0, serde_norway::to_string(&config).unwrap()).unwrap();
            promtool_ok(&["check", "config", copy.0.to_str().unwrap()]);
        }
        Err(text) => panic!("promtool check config {K8S_PROMETHEUS}:\n{text}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Container image
// ---------------------------------------------------------------------------------------------

/// The Containerfile's instructions (continuations joined, comments dropped), by stage.
fn stages() -> Vec<Vec<(String, String)>> {
    let text = read(CONTAINERFILE);
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        joined.push(std::mem::take(&mut current));
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for instruction in joined.iter().filter(|l| !l.is_empty()) {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .unwrap_or_else(|| panic!("{CONTAINERFILE}: {keyword} before FROM"))
            .push((keyword, rest.trim().to_owned()));
    }
    stages
}

#[test]
fn containerfile_builds_in_one_stage_and_ships_the_binary_alone() {
    let stages = stages();
    assert_eq!(
        stages.len(),
        2,
        "{CONTAINERFILE}: a builder and a final stage"
    );
    let builder = &stages[0];
    let from = &builder[0].1;
    let stage_name = from
        .split_ascii_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("as"))
        .nth(1)
        .unwrap_or_else(|| panic!("{CONTAINERFILE}: the first stage has no name: {from}"));
    assert!(
        builder
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains("cargo xtask build")),
        "{CONTAINERFILE}: the builder runs `cargo xtask build`"
    );
    // What the builder copies exists, and it is the whole workspace.
    let members = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("members = ["))
        .expect("workspace members")
        .trim_end_matches(']')
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .collect::<Vec<_>>();
    let copied: Vec<&str> = builder
        .iter()
        .filter(|(k, _)| k == "COPY")
        .flat_map(|(_, v)| {
            let words: Vec<&str> = v.split_ascii_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    for source in &copied {
        assert!(
            repo_file(source).exists(),
            "{CONTAINERFILE}: COPY {source}: no such path"
        );
    }
    for member in &members {
        assert!(
            copied.contains(&member.as_str()),
            "{CONTAINERFILE}: {member} not copied"
        );
    }

    let last = &stages[1];
    let copies: Vec<&String> = last
        .iter()
        .filter(|(k, _)| k == "COPY" || k == "ADD")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "{CONTAINERFILE}: the final stage copies one thing"
    );
    let words: Vec<&str> = copies[0].split_ascii_whitespace().collect();
    assert_eq!(
        words,
        [
            format!("--from={stage_name}").as_str(),
            "/out/tracer",
            "/usr/local/bin/tracer"
        ],
        "{CONTAINERFILE}: the final stage copies the binary only"
    );
    assert!(
        !last.iter().any(|(k, _)| k == "RUN"),
        "{CONTAINERFILE}: nothing runs in the final stage"
    );
    let exec_form = |keyword: &str| -> Vec<String> {
        let (_, value) = last
            .iter()
            .find(|(k, _)| k == keyword)
            .unwrap_or_else(|| panic!("{CONTAINERFILE}: no {keyword}"));
        serde_json::from_str(value)
            .unwrap_or_else(|e| panic!("{CONTAINERFILE}: {keyword} not in exec form ({e})"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), ["/usr/local/bin/tracer"]);
    assert_eq!(exec_form("CMD")[0], "run");
    assert!(
        last.iter()
            .any(|(k, v)| k == "EXPOSE" && v == &METRICS_PORT.to_string()),
        "{CONTAINERFILE}: EXPOSE {METRICS_PORT}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fleet shipping
// ---------------------------------------------------------------------------------------------

#[test]
fn fleet_prometheus_configs_pass_promtool() {
    let agent = repo_file(FLEET_AGENT);
    promtool_ok(&["check", "config", "--agent", agent.to_str().unwrap()]);
    let config = yaml(FLEET_AGENT);
    let writes = seq_at(&config, &["remote_write"], FLEET_AGENT);
    assert!(str_at(&writes[0], &["url"], FLEET_AGENT).starts_with("https://"));
    let keep = seq_at(&writes[0], &["write_relabel_configs"], FLEET_AGENT);
    assert!(
        str_at(&keep[0], &["regex"], FLEET_AGENT).contains("tracer_"),
        "{FLEET_AGENT}: the agent's series are sent"
    );
    at(&config, &["global", "external_labels"], FLEET_AGENT);

    let federation = repo_file(FLEET_FEDERATION);
    let out = promtool_ok(&["check", "config", federation.to_str().unwrap()]);
    assert!(out.contains("rule files found"), "{out}");
    let config = yaml(FLEET_FEDERATION);
    let job = &seq_at(&config, &["scrape_configs"], FLEET_FEDERATION)[0];
    assert_eq!(
        str_at(job, &["metrics_path"], FLEET_FEDERATION),
        "/federate"
    );
    assert_eq!(job["honor_labels"], Yaml::Bool(true));
    let matches = strings(seq_at(job, &["params", "match[]"], FLEET_FEDERATION));
    assert!(matches.iter().all(|m| m.contains("tracer")), "{matches:?}");
}

#[test]
fn vector_config_reads_the_units_events_and_wires_its_components() {
    let config = yaml(VECTOR);
    let mut names = BTreeSet::new();
    for section in ["sources", "transforms", "sinks"] {
        for (name, _) in at(&config, &[section], VECTOR)
            .as_mapping()
            .expect("mapping")
        {
            assert!(
                names.insert(name.as_str().expect("name").to_owned()),
                "{name:?}"
            );
        }
    }
    let sources = at(&config, &["sources"], VECTOR);
    let journal = at(sources, &["tracer_journal"], VECTOR);
    assert_eq!(str_at(journal, &["type"], VECTOR), "journald");
    let unit_name = Path::new(UNIT).file_name().unwrap().to_str().unwrap();
    assert_eq!(
        strings(seq_at(journal, &["include_units"], VECTOR)),
        [unit_name]
    );
    assert_eq!(str_at(sources, &["tracer_file", "type"], VECTOR), "file");

    let remap = at(&config, &["transforms", "tracer_events"], VECTOR);
    assert_eq!(str_at(remap, &["type"], VECTOR), "remap");
    let program = str_at(remap, &["source"], VECTOR);
    assert!(program.contains("parse_json(.message)") && program.contains("abort"));
    assert_eq!(remap["drop_on_abort"], Yaml::Bool(true));

    let sinks = at(&config, &["sinks"], VECTOR);
    assert_eq!(str_at(sinks, &["loki", "type"], VECTOR), "loki");
    assert_eq!(str_at(sinks, &["kafka", "type"], VECTOR), "kafka");
    // Loki labels stay few: no address, port or pid.
    let labels: BTreeSet<&str> = at(sinks, &["loki", "labels"], VECTOR)
        .as_mapping()
        .expect("labels")
        .keys()
        .map(|k| k.as_str().expect("label"))
        .collect();
    assert_eq!(labels, BTreeSet::from(["source", "host", "event"]));
    // Every component's inputs name another component.
    for section in ["transforms", "sinks"] {
        for (name, component) in at(&config, &[section], VECTOR).as_mapping().unwrap() {
            for input in strings(seq_at(component, &["inputs"], VECTOR)) {
                assert!(
                    names.contains(&input),
                    "{VECTOR}: {name:?} reads unknown {input}"
                );
            }
        }
    }
}

#[test]
fn fluent_bit_config_tails_the_daemonsets_logs_and_keeps_the_events() {
    let config = yaml(FLUENT_BIT);
    let ds = k8s_object("DaemonSet");
    let pod = str_at(&ds, &["metadata", "name"], "DaemonSet");
    let namespace = str_at(&ds, &["metadata", "namespace"], "DaemonSet");
    let container = str_at(
        &seq_at(
            &ds,
            &["spec", "template", "spec", "containers"],
            "DaemonSet",
        )[0],
        &["name"],
        "DaemonSet",
    );
    let inputs = seq_at(&config, &["pipeline", "inputs"], FLUENT_BIT);
    assert_eq!(inputs.len(), 1);
    let tail = &inputs[0];
    assert_eq!(str_at(tail, &["name"], FLUENT_BIT), "tail");
    assert_eq!(
        str_at(tail, &["path"], FLUENT_BIT),
        format!("/var/log/containers/{pod}-*_{namespace}_{container}-*.log"),
        "{FLUENT_BIT}: the runtime's log files of the DaemonSet's pods"
    );
    let tag = str_at(tail, &["tag"], FLUENT_BIT);

    let parsers: BTreeSet<&str> = seq_at(&config, &["parsers"], FLUENT_BIT)
        .iter()
        .map(|p| str_at(p, &["name"], FLUENT_BIT))
        .collect();
    let filters = seq_at(&config, &["pipeline", "filters"], FLUENT_BIT);
    let outputs = seq_at(&config, &["pipeline", "outputs"], FLUENT_BIT);
    for step in filters.iter().chain(outputs) {
        assert_eq!(str_at(step, &["match"], FLUENT_BIT), tag, "{step:?}");
    }
    let parser = filters
        .iter()
        .find(|f| f["name"] == *"parser")
        .expect("a parser filter");
    assert!(parsers.contains(str_at(parser, &["parser"], FLUENT_BIT)));
    let grep = filters
        .iter()
        .find(|f| f["name"] == *"grep")
        .expect("a grep filter");
    let regex = str_at(grep, &["regex"], FLUENT_BIT);
    let alternatives: BTreeSet<&str> = regex
        .strip_prefix("event ^(")
        .and_then(|r| r.strip_suffix(")$"))
        .unwrap_or_else(|| panic!("{FLUENT_BIT}: grep on `event`: {regex}"))
        .split('|')
        .collect();
    assert_eq!(alternatives, BTreeSet::from(EVENT_KINDS));
    let readme = read("README.md");
    for kind in EVENT_KINDS {
        assert!(
            readme.contains(&format!("`{kind}`,")),
            "README lacks event {kind}"
        );
    }
    let kinds: BTreeSet<&str> = outputs
        .iter()
        .map(|o| str_at(o, &["name"], FLUENT_BIT))
        .collect();
    assert_eq!(kinds, BTreeSet::from(["es", "kafka"]));
}
