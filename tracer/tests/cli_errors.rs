//! Bad input ends the agent with a non-zero status and a one-line error, never a panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// Runs `tracer <args>` and waits (bounded) for it to exit.
fn run_agent(args: &[&str]) -> Outcome {
    let mut child = Command::new(AGENT_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tracer");
    if wait_timeout(&mut child, Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "`tracer {}` still ran after 30 s\n--- stderr ---\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = child.wait_with_output().unwrap();
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_clean_failure(args: &[&str], out: &Outcome) {
    let cmd = format!("tracer {}", args.join(" "));
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "`{cmd}` exited with {:?}, expected a non-zero exit code\n--- stderr ---\n{}",
        out.code,
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("stack backtrace"),
        "`{cmd}` panicked:\n{}",
        out.stderr
    );
}

fn assert_one_line(args: &[&str], out: &Outcome) {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "`tracer {}` should print a one-line error, printed:\n{}",
        args.join(" "),
        out.stderr
    );
}

#[test]
fn unknown_flag_is_a_one_line_error() {
    require_root();
    let args = ["run", "--bogus"];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert_one_line(&args, &out);
    assert!(out.stderr.contains("--bogus"), "{}", out.stderr);
}

#[test]
fn missing_command_is_a_one_line_error() {
    require_root();
    let args: [&str; 0] = [];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert_one_line(&args, &out);
    assert!(out.stderr.contains("run"), "{}", out.stderr);
}

#[test]
fn unparsable_diagnose_duration_is_a_one_line_error() {
    require_root();
    let args = ["diagnose", "--duration", "forever"];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert_one_line(&args, &out);
    assert!(out.stderr.contains("forever"), "{}", out.stderr);
}

/// Run as an unprivileged user (through `setpriv`), both commands refuse with one line naming
/// the missing capabilities before touching the kernel.
#[test]
fn not_root_is_a_one_line_error() {
    require_root();
    require_tool("setpriv");
    // The build directory may not be reachable for an unprivileged user (under /root, say):
    // run a world-readable copy.
    let copy = std::env::temp_dir().join(format!("tracer-not-root-{}", std::process::id()));
    std::fs::copy(AGENT_BIN, &copy).expect("copy the agent binary");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the copy executable");
    let binary = copy.to_str().expect("temp path is UTF-8").to_owned();
    for command in [&["run"][..], &["diagnose", "--duration", "1s"][..]] {
        let mut args = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            binary.as_str(),
        ];
        args.extend_from_slice(command);
        let out = Command::new("setpriv")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run setpriv");
        let out = Outcome {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert_clean_failure(command, &out);
        assert_one_line(command, &out);
        assert!(out.stderr.contains("root"), "{}", out.stderr);
        // An unprivileged user has no capability: the error names the missing ones.
        assert!(
            out.stderr
                .contains("missing CAP_BPF, CAP_PERFMON, CAP_SYSLOG"),
            "{}",
            out.stderr
        );
    }
    let _ = std::fs::remove_file(&copy);
}

#[test]
fn unparsable_listen_address_is_a_one_line_error() {
    require_root();
    let args = ["run", "--listen", "not-an-address"];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert_one_line(&args, &out);
    assert!(out.stderr.contains("not-an-address"), "{}", out.stderr);
}

#[test]
fn unknown_event_format_is_a_one_line_error() {
    require_root();
    let args = ["run", "--events", "xml"];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert_one_line(&args, &out);
}

#[test]
fn listen_port_in_use_fails_and_names_the_address() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args = ["run", "--listen", addr.as_str(), "--events", "none"];
    let out = run_agent(&args);
    assert_clean_failure(&args, &out);
    assert!(
        out.stderr.contains(&addr),
        "the error should name {addr}:\n{}",
        out.stderr
    );
    drop(taken);
}
