//! `cargo xtask test`: the whole suite, as CI runs it.
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, layout, require_root, run_cmd, setup, show, step, workspace_root};

/// Crates that would bring I/O, a runtime or the kernel into the pure core.
const NOT_IN_CORE: &[&str] = &[
    "aya",
    "aya-obj",
    "tokio",
    "mio",
    "libc",
    "clap",
    "hyper",
    "prometheus",
    "netlink-sys",
    "netlink-packet-core",
    "netlink-packet-sock-diag",
];

pub fn run() -> Result<()> {
    require_root(
        "cargo xtask test",
        "the integration tests load eBPF programs",
    )?;
    setup::run()?;

    step("checking formatting (cargo fmt)");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;

    // Early: a new dependency's licence or source is cheaper to hear about than a test run.
    step("checking dependencies: licences, duplicate versions, sources (cargo deny)");
    run_cmd(cargo().args(["deny", "check", "licenses", "bans", "sources"]))?;

    step("checking that tracer-core stays pure (cargo tree)");
    core_is_pure()?;

    step(&format!(
        "checking the layout (files under {} lines before their tests, no import cycles)",
        layout::MAX_LINES
    ));
    layout::check(workspace_root())?;

    step("linting (cargo clippy -D warnings)");
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;

    // tracer-ebpf targets the BPF machine: lint it there, with the nightly toolchain that builds
    // it, under the same workspace lints.
    step("linting the kernel programs (cargo +nightly clippy, bpfel-unknown-none)");
    run_cmd(Command::new("cargo").current_dir(workspace_root()).args([
        "+nightly",
        "clippy",
        "--package",
        "tracer-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("running unit tests (no root needed)");
    run_cmd(cargo().args(["test", "--lib", "--bins"]))?;
    run_cmd(cargo().args(["test", "--package", "tracer-core", "--tests"]))?;

    // Serial: they attach to the kernel and read host-wide counters.
    step("running integration tests (serially)");
    integration_tests()?;

    step("all tests passed");
    Ok(())
}

/// What a failing test's agent prints with its count of runs in which the kernel hid events
/// from the programs: softirqs run without any BPF program, and program runs skipped because
/// the program was already running on that CPU (`tracer/tests/common`, `BLIND_MARKER`).
const BLIND_MARKER: &str = "tracer-test: kernel runs that hid events from BPF during this test:";
/// Reruns of the tests that failed while the kernel hid events from the BPF programs.
const BLIND_RERUNS: u32 = 2;

/// Every integration test, serially and to the end. Some kernels run a softirq now and then
/// without any BPF program, and every kernel skips a program's run when its hook fires again on
/// a CPU where the program is already running (README, "Lost events"): the agent counts such runs but cannot know the
/// events they held, so a test that failed while its agent counted some is run again, up to
/// `BLIND_RERUNS` times. A test that failed without any fails the suite at once.
fn integration_tests() -> Result<()> {
    let (mut passed, output) = cargo_test(&[])?;
    let mut failed = failures(&output);
    for rerun in 1..=BLIND_RERUNS {
        if !failed.plain.is_empty() {
            bail!(
                "integration tests failed: {} (the kernel hid no event from the programs during \
                 them)",
                failed.plain.join(", ")
            );
        }
        if failed.blind.is_empty() {
            if passed {
                return Ok(());
            }
            bail!("the integration tests failed, and no test is named as failed in their output");
        }
        step(&format!(
            "rerun {rerun} of {BLIND_RERUNS}: {} failed while the kernel hid events from the \
             programs (softirqs run without BPF, or program runs skipped)",
            failed.blind.join(", ")
        ));
        let names: Vec<&str> = failed.blind.iter().map(String::as_str).collect();
        let output;
        (passed, output) = cargo_test(&names)?;
        failed = failures(&output);
        if passed && failed.blind.is_empty() && failed.plain.is_empty() {
            return Ok(());
        }
    }
    let all: Vec<String> = failed.blind.into_iter().chain(failed.plain).collect();
    bail!("integration tests failed: {}", all.join(", "))
}

/// `cargo test` of every integration test binary (or only the tests named `exactly`), serially
/// and without stopping at the first failing binary; its output is shown as it comes and
/// returned with whether it passed.
fn cargo_test(exactly: &[&str]) -> Result<(bool, String)> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--package",
        "tracer",
        "--test",
        "*",
        "--no-fail-fast",
        "--",
    ]);
    if !exactly.is_empty() {
        cmd.arg("--exact").args(exactly);
    }
    cmd.arg("--test-threads=1").stdout(Stdio::piped());
    let shown = show(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("no output from `{shown}`"))?;
    let mut output = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("reading the output of `{shown}`"))?;
        println!("{line}");
        output.push_str(&line);
        output.push('\n');
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok((status.success(), output))
}

/// The failed tests of a `cargo test` run's output, by whether their captured output says the
/// kernel hid events from the programs during them (`BLIND_MARKER` with a count above 0).
#[derive(Debug, Default, PartialEq)]
struct Failures {
    blind: Vec<String>,
    plain: Vec<String>,
}

fn failures(output: &str) -> Failures {
    let mut blind = BTreeSet::new();
    let mut failed = BTreeSet::new();
    // The test whose captured output is being read ("---- NAME stdout ----"), and whether the
    // lines are the list that ends each failing binary's report ("failures:", then the names).
    let mut section: Option<&str> = None;
    let mut in_list = false;
    for line in output.lines() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            section = Some(name);
            in_list = false;
        } else if line == "failures:" {
            section = None;
            in_list = true;
        } else if in_list {
            if let Some(name) = line.strip_prefix("    ") {
                failed.insert(name.trim().to_string());
            } else if !line.trim().is_empty() {
                in_list = false;
            }
        } else if let Some(name) = section
            && let Some((_, count)) = line.split_once(BLIND_MARKER)
            && count.trim().parse::<f64>().is_ok_and(|n| n > 0.0)
        {
            blind.insert(name.to_string());
        }
    }
    let (blind, plain) = failed.into_iter().partition(|name| blind.contains(name));
    Failures { blind, plain }
}

/// Fails when a crate that does I/O or touches the kernel is in tracer-core's dependency tree.
fn core_is_pure() -> Result<()> {
    let out = cargo()
        .args([
            "tree",
            "--package",
            "tracer-core",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .context("cannot run `cargo tree`")?;
    if !out.status.success() {
        bail!(
            "`cargo tree --package tracer-core` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| NOT_IN_CORE.contains(name))
        .collect();
    if !found.is_empty() {
        bail!(
            "tracer-core must stay pure (no I/O, no kernel crates) but depends on {}",
            found.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "
running 3 tests
test a_plain_failure ... FAILED
test blind_failure ... FAILED
test passes ... ok

failures:

---- a_plain_failure stdout ----
thread 'a_plain_failure' panicked at tracer/tests/x.rs:10:5:
expected 3, got 2
tracer-test: kernel runs that hid events from BPF during this test: 0
--- agent stderr ---
    an indented line of the agent's log

---- blind_failure stdout ----
thread 'blind_failure' panicked at tracer/tests/x.rs:20:5:
expected 480 matching events within 20s, got 408
tracer-test: kernel runs that hid events from BPF during this test: 3

failures:
    a_plain_failure
    blind_failure

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out
";

    #[test]
    fn a_failure_is_rerun_only_when_the_kernel_hid_events_from_the_programs_during_it() {
        assert_eq!(
            failures(RUN),
            Failures {
                blind: vec!["blind_failure".into()],
                plain: vec!["a_plain_failure".into()],
            }
        );
    }

    #[test]
    fn a_failure_without_any_agent_output_is_a_plain_failure() {
        let run = "failures:\n\n---- t stdout ----\nthread 't' panicked\n\nfailures:\n    t\n\n\
                   test result: FAILED. 0 passed; 1 failed\n";
        assert_eq!(
            failures(run),
            Failures {
                blind: vec![],
                plain: vec!["t".into()],
            }
        );
    }

    #[test]
    fn a_passing_run_names_no_failure() {
        let run = "running 2 tests\ntest a ... ok\ntest b ... ok\n\ntest result: ok. 2 passed\n";
        assert_eq!(failures(run), Failures::default());
    }
}
