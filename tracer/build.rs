//! Builds the kernel programs (`tracer-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, so that `include_bytes_aligned!` can embed the object in the agent.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("tracer has no parent directory"))?
        .join("tracer-ebpf");
    let root = root
        .to_str()
        .context("path of tracer-ebpf is not UTF-8")?
        .to_owned();
    let package = Package {
        name: "tracer-ebpf",
        root_dir: &root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building the eBPF programs failed: run `cargo xtask setup` to install the nightly rust-src component and bpf-linker")
}
