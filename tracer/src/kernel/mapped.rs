//! Reading a BPF array created with `BPF_F_MMAPABLE` in place, through read-only shared
//! mappings of its values, instead of copying it out with `BPF_MAP_LOOKUP_BATCH`: the copy of
//! `PATH_SLOTS` (16 384 slots of 192 bytes, mostly free) once a second was about a third of
//! an idle agent's CPU. The values are mapped a window at a time and only while they are
//! read: the kernel memory they live in (counted among the BPF maps' memory) then adds at most
//! a window to the agent's RSS, not the whole array.
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;

/// About how much of the array is mapped at a time.
const WINDOW_BYTES: usize = 256 << 10;

/// An array map of `V`, whose values the kernel lays out back to back (`V`'s size is a
/// multiple of 8, as the kernel rounds each value up to 8 bytes).
pub struct MappedArray<V> {
    map: MapData,
    entries: usize,
    /// Values per window: a whole number of values and of pages, so that every window starts
    /// on a page (as `mmap` needs) and no value straddles two windows.
    per_window: usize,
    _value: PhantomData<V>,
}

impl<V: Copy> MappedArray<V> {
    /// Checks that `map` holds values of `V` and was created mappable.
    pub fn new(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let size = size_of::<V>();
        if info.value_size() as usize != size || size == 0 || !size.is_multiple_of(8) {
            return Err(io::Error::other(format!(
                "value size {} where {size} was expected",
                info.value_size()
            )));
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(io::Error::other("not created with BPF_F_MMAPABLE"));
        }
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&page| page > 0)
            .ok_or_else(|| io::Error::other("the page size is unknown"))?;
        let unit = lcm(size, page);
        Ok(MappedArray {
            map,
            entries: info.max_entries() as usize,
            per_window: (unit / size) * (WINDOW_BYTES / unit).max(1),
            _value: PhantomData,
        })
    }

    /// Calls `each` with a pointer to every value, in order, one window mapped at a time. The
    /// kernel writes the values meanwhile: read through the pointer only with volatile reads,
    /// check what was read (see `tables::read_slot`), and keep no pointer past the call.
    pub fn each(&self, mut each: impl FnMut(*const V)) -> io::Result<()> {
        let fd = self.map.fd().as_fd().as_raw_fd();
        let mut first = 0;
        while first < self.entries {
            let count = self.per_window.min(self.entries - first);
            let bytes = count * size_of::<V>();
            let offset = libc::off_t::try_from(first * size_of::<V>())
                .map_err(|_| io::Error::other("array too large to map"))?;
            // SAFETY: a new read-only shared mapping chosen by the kernel (no address given),
            // of `count` values from a page-aligned offset within the array, which the kernel
            // allows for a BPF_F_MMAPABLE array; unmapped below, and nothing else refers to it.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    offset,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let values = base.cast::<V>().cast_const();
            for index in 0..count {
                // SAFETY: within the mapping, which holds `count` values of `V` back to back.
                each(unsafe { values.add(index) });
            }
            // SAFETY: the mapping made above, of this length; `each` keeps no pointer into it.
            unsafe { libc::munmap(base, bytes) };
            first += count;
        }
        Ok(())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// `BPF_F_MMAPABLE`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    /// `PATH_SLOTS`' 192-byte slots on 4 KiB pages: 64 slots fill 3 pages exactly.
    #[test]
    fn windows_hold_whole_values_and_whole_pages() {
        let unit = lcm(192, 4096);
        assert_eq!((unit, unit / 192), (12_288, 64));
        let per_window = (unit / 192) * (WINDOW_BYTES / unit).max(1);
        assert_eq!(per_window * 192 % 4096, 0);
        assert!(per_window * 192 <= WINDOW_BYTES);
        assert_eq!(lcm(4096, 4096), 4096);
    }
}
