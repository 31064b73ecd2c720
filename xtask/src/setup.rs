//! `cargo xtask setup`: install what is missing, and nothing when all is there.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{is_root, output_of, run_cmd, step, workspace_root};

/// Debian packages the build and the tests use, with what we need from each.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ss, nstat, ip"),
    ("nftables", "nft"),
    ("iperf3", "iperf3, the reference for what a connection cost"),
    ("prometheus", "promtool"),
    ("tmux", "tmux, for the test of `tracer top`"),
    ("systemd", "systemd-analyze"),
    ("fonts-dejavu-core", "the font of xtask plots"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-deny `cargo xtask test` checks the dependency tree with (see deny.toml).
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn run() -> Result<()> {
    debian_packages()?;
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    cargo_deny()?;
    step("setup complete");
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(name, _)| !deb_installed(name))
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        step("Debian packages present");
        return Ok(());
    }
    if output_of("dpkg-query", &["--version"]).is_none() {
        bail!(
            "dpkg-query not found: setup supports Debian; install {} yourself",
            DEBIAN_PACKAGES
                .iter()
                .map(|(name, what)| format!("{name} ({what})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    let _no_services = NoServiceStarts::install()?;
    step("updating the Debian package lists");
    run_cmd(apt_get().arg("update").arg("-q"))?;
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run_cmd(
        apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn deb_installed(name: &str) -> bool {
    output_of("dpkg-query", &["-W", "-f=${Status}", name])
        .is_some_and(|status| status == "install ok installed")
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Keeps package scripts from starting services (prometheus ships one) while apt-get runs, on a
/// machine with no `policy-rc.d` of its own: there the service would be left running.
struct NoServiceStarts(Option<&'static Path>);

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self(None));
        }
        step("forbidding service starts while installing (temporary policy-rc.d)");
        std::fs::write(
            path,
            "#!/bin/sh\n# Written by cargo xtask setup; removed after.\nexit 101\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        let guard = Self(Some(path));
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
        Ok(guard)
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0
            && let Err(err) = std::fs::remove_file(path)
        {
            eprintln!("xtask: warning: cannot remove {}: {err}", path.display());
        }
    }
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output_of("rustc", &["+nightly", "--print", "sysroot"])
        .context("no nightly Rust toolchain (`rustc +nightly` failed): install one with rustup")?;
    Ok(PathBuf::from(sysroot))
}

fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src").is_dir() {
        step("nightly rust-src present");
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    if let Some(version) = output_of("bpf-linker", &["--version"]) {
        step(&format!("{version} present"));
        return Ok(());
    }
    let (llvm_file, major) = nightly_llvm(sysroot)?;
    let prefix = llvm_prefix(sysroot, &llvm_file)?;
    step("bpf-linker missing or not runnable");
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} (about a minute or two)"
    ));
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(locked.then_some("--locked"))
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // bpf-linker finds LLVM at run time through the prefix (its RUNPATH), which lives in this
        // work tree; also look in the toolchain itself, so that it survives a fresh clone.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("-Clink-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
        );
        run_cmd(&mut cmd)
    };
    if let Err(err) = install(true) {
        step(&format!("{err:#}; retrying without --locked"));
        install(false)?;
    }
    let version = output_of("bpf-linker", &["--version"])
        .context("bpf-linker was installed but does not run: is cargo's bin directory on PATH?")?;
    step(&format!("{version} installed"));
    Ok(())
}

fn cargo_deny() -> Result<()> {
    if let Some(version) = output_of("cargo", &["deny", "--version"]) {
        step(&format!("{version} present"));
        return Ok(());
    }
    // Measured on a 2-core machine: about five and a half minutes.
    step(&format!(
        "building cargo-deny {CARGO_DENY_VERSION} from the Rust registry (about 6 minutes on 2 cores)"
    ));
    run_cmd(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-deny",
        "--version",
        CARGO_DENY_VERSION,
    ]))?;
    let version = output_of("cargo", &["deny", "--version"])
        .context("cargo-deny was installed but does not run: is cargo's bin directory on PATH?")?;
    step(&format!("{version} installed"));
    Ok(())
}

/// The nightly toolchain's LLVM library (`libLLVM.so.22.1-rust-...`) and its major version.
fn nightly_llvm(sysroot: &Path) -> Result<(String, u32)> {
    let lib = sysroot.join("lib");
    let entries =
        std::fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|digits| digits.parse().ok())
                .with_context(|| format!("cannot read the LLVM version from {name}"))?;
            return Ok((name, major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: cannot build bpf-linker",
        lib.display()
    )
}

/// A directory whose `lib/` makes the nightly LLVM look like an installed LLVM to bpf-linker.
fn llvm_prefix(sysroot: &Path, llvm_file: &str) -> Result<PathBuf> {
    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let target = sysroot.join("lib").join(llvm_file);
    for link in ["libLLVM.so", llvm_file] {
        let link = lib.join(link);
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(prefix)
}
