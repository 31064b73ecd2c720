//! Command line. (being wired up)
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
