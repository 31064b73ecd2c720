//! Atomic operations on map values.
use core::intrinsics::{self, AtomicOrdering};

use aya_ebpf::maps::Array;

// Atomics through the compiler's intrinsics: `core`'s atomic types offer no read-modify-write
// operation on the BPF target, but the instructions exist (compare-and-swap and fetch-add,
// kernel 5.12 and later) and LLVM emits them.

/// `*word` (an aligned `u64` of a map value, valid for the program's run).
#[inline(always)]
pub(crate) fn load(word: *mut u64) -> u64 {
    // SAFETY: `word` is aligned and valid for the program's run; writers use atomics.
    unsafe { core::ptr::read_volatile(word) }
}

/// Adds `delta` to `*word` (as for [`load`]) atomically, a full barrier.
#[inline(always)]
pub(crate) fn add(word: *mut u64, delta: u64) {
    // SAFETY: `word` is an aligned u64 of a map value, valid for the program's run.
    unsafe { intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(word, delta) };
}

/// Sets `*word` (as for [`load`]) to `new` if it holds `old`, atomically; whether it did.
#[inline(always)]
pub(crate) fn swap_if(word: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: `word` is an aligned u64 of a map value, valid for the program's run.
    unsafe {
        intrinsics::atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word, old, new,
        )
    }
    .1
}

/// Whether the table that `counter` (a one-slot array of its entries, kept with [`add`])
/// counts may hold entries: when not, nothing need be looked for there.
#[inline(always)]
pub(crate) fn in_use(counter: &Array<u64>) -> bool {
    counter.get_ptr_mut(0).is_none_or(|count| load(count) != 0)
}

/// Counts an entry added to the table `counter` counts (`delta` 1) or deleted from it
/// (`u64::MAX`, wrapping).
#[inline(always)]
pub(crate) fn count(counter: &Array<u64>, delta: u64) {
    if let Some(count) = counter.get_ptr_mut(0) {
        add(count, delta);
    }
}
