//! `cargo xtask test`: the whole suite, as CI runs it.
use anyhow::Result;

use crate::{cargo, require_root, run_cmd, setup, step};

pub fn run() -> Result<()> {
    require_root(
        "cargo xtask test",
        "the integration tests load eBPF programs",
    )?;
    setup::run()?;

    step("checking formatting (cargo fmt)");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;

    // Default members only: tracer-ebpf targets the BPF machine and is built (for the kernel) by
    // tracer's build script.
    step("linting (cargo clippy -D warnings)");
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;

    step("running unit tests");
    run_cmd(cargo().args(["test", "--lib", "--bins"]))?;

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
