//! A `tracer diagnose --json` run around a workload, for the connection-cost tests.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{AGENT_BIN, wait_timeout};

/// Attaching and seeding (the host may hold many TIME_WAIT sockets) before the run watches.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// After the watch ends: detaching and writing the report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `tracer diagnose --duration <secs>s --json --top 100` and `workload` once the run
/// watches; returns the workload's result and the JSON report. The workload must end within
/// the run.
pub fn diagnose_during<T>(secs: u64, workload: impl FnOnce() -> T) -> (T, Value) {
    let mut child = Command::new(AGENT_BIN)
        .args([
            "diagnose",
            "--duration",
            &format!("{secs}s"),
            "--json",
            "--top",
            "100",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {AGENT_BIN} diagnose: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let stdout = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let (tx, watching) = mpsc::channel();
    let stderr = thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if !told && String::from_utf8_lossy(&all).contains("watching TCP") {
                        told = true;
                        let _ = tx.send(());
                    }
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    if watching.recv_timeout(ATTACH_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "tracer diagnose did not start watching: {}",
            stderr.join().unwrap_or_default()
        );
    }
    let started = Instant::now();
    let result = workload();
    let took = started.elapsed();
    let status = wait_timeout(
        &mut child,
        Duration::from_secs(secs) + ATTACH_TIMEOUT + REPORT_TIMEOUT,
    )
    .unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tracer diagnose did not end");
    });
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    assert!(
        took < Duration::from_secs(secs),
        "the workload ({took:?}) outlasted the run ({secs} s)"
    );
    assert!(
        status.success(),
        "tracer diagnose failed ({status}): {stdout:?} {stderr:?}"
    );
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the --json report is not JSON ({e}): {stdout}"));
    (result, report)
}

/// The finding of `topic`, failing with the report when there is none.
pub fn finding<'a>(report: &'a Value, topic: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["topic"] == topic)
        .unwrap_or_else(|| panic!("no {topic} finding in {report:#}"))
}
