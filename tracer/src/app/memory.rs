//! The agent's own memory: what it can hand back to the system.

/// Asks the allocator to return freed memory to the system (glibc keeps it otherwise): after
/// start-up (the BTF parses) and after a burst of connections has closed.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory; it has no
    // preconditions and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
