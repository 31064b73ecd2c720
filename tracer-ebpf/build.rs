use which::which;

/// Rebuild the programs when bpf-linker changes (for example after `cargo xtask setup` rebuilt it
/// against a new LLVM): cargo does not track the linker otherwise.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
