//! `cargo xtask`: set up the machine, build, run and test the tracer.
//!
//! Every step prints one line on stderr (stdout stays the agent's); a failing step stops with a
//! one-line error and a non-zero exit.
mod bench;
mod install;
mod layout;
mod plots;
mod setup;
mod soak;
mod test;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run and test the tracer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (Debian packages, rust-src, bpf-linker,
    /// cargo-deny).
    Setup,
    /// Set up, then build the agent in release mode (target/release/tracer).
    Build,
    /// Build, then run the agent as root: `cargo xtask run [-- AGENT_ARGS]`.
    Run {
        /// Arguments for `tracer run`, e.g. `--events json --listen 127.0.0.1:9645`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole suite, as CI runs it: setup, fmt, clippy, unit and integration tests (as root).
    Test,
    /// Check the layout rules: file sizes and no import cycles between modules (no root needed).
    Layout {
        /// A checkout to check instead of this one.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Build, then install the release agent and its systemd unit (as root, or --destdir).
    Install(install::Args),
    /// Measure what tracing costs (as root): throughput with and without the agent and peers.
    Bench(bench::Args),
    /// Draw the dashboard's key panels to PNG (docs/img/) from Prometheus range queries of a run.
    Plots(plots::Args),
    /// Run the release agent for a long time under mixed traffic (as root, not in CI) and report
    /// RSS over time, CPU, lost events and its agreement with `ss` and `nstat`.
    Soak(soak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build().map(|_| ()),
        Cmd::Run { args } => run(&args),
        Cmd::Test => test::run(),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Install(args) => install::run(args),
        Cmd::Plots(args) => plots::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Layout { root } => layout::check(root.as_deref().unwrap_or(workspace_root())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set up, then build the release agent; returns the path of the binary.
fn build() -> Result<PathBuf> {
    setup::run()?;
    step("building the agent (release)");
    run_cmd(cargo().args(["build", "--release", "--package", "tracer"]))?;
    let binary = target_dir().join("release/tracer");
    if !binary.is_file() {
        bail!("the build finished but {} is missing", binary.display());
    }
    step(&format!("agent built: {}", binary.display()));
    Ok(binary)
}

/// Build, then replace this process with `tracer run ARGS`.
fn run(args: &[String]) -> Result<()> {
    require_root("cargo xtask run", "the agent loads eBPF programs")?;
    let binary = build()?;
    step(&format!(
        "running {} run {}",
        binary.display(),
        args.join(" ")
    ));
    let err = Command::new(&binary).arg("run").args(args).exec();
    Err(err).with_context(|| format!("cannot execute {}", binary.display()))
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
}

/// Where cargo builds: `CARGO_TARGET_DIR` (relative to the workspace root) or `target/`.
fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// The cargo that runs us (stable), in the workspace root.
fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// One short line saying what happens next.
fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// Run a command to completion, inheriting stdio; a failure names the command.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Run a command and return its stdout, or `None` if it cannot start or fails.
fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The command line, for messages.
fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(OsStr::new("?"))
        .to_string_lossy()
        .into_owned();
    std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_root() -> bool {
    // /proc/self belongs to the effective user of the process reading it.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn require_root(what: &str, why: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} must run as root: {why}");
    }
    Ok(())
}
