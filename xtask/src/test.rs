//! `cargo xtask test`: the whole suite, as CI runs it.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, layout, require_root, run_cmd, setup, step, workspace_root};

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
    "btf-rs",
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
    run_cmd(cargo().args([
        "test",
        "--package",
        "tracer",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]))?;

    step("all tests passed");
    Ok(())
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
