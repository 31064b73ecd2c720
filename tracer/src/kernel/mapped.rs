//! Reading a BPF array created with `BPF_F_MMAPABLE` in place, through a read-only shared
//! mapping of its values, instead of copying it out with `BPF_MAP_LOOKUP_BATCH`: the copy of
//! `PATH_SLOTS` (16 384 slots of 192 bytes, mostly free) once a second was about a third of
//! an idle agent's CPU. The values are mapped only while they are read, so the kernel memory
//! they live in (counted among the BPF maps' memory) does not also count in the agent's RSS.
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::ptr::NonNull;

use aya::maps::MapData;

/// An array map of `V`, whose values the kernel lays out back to back (`V`'s size is a
/// multiple of 8, as the kernel rounds each value up to 8 bytes).
pub struct MappedArray<V> {
    map: MapData,
    entries: usize,
    bytes: usize,
    _value: PhantomData<V>,
}

/// The values while they are mapped; unmapped when dropped.
pub struct Mapping<'a, V> {
    base: NonNull<V>,
    entries: usize,
    bytes: usize,
    _array: PhantomData<&'a MappedArray<V>>,
}

impl<V: Copy> MappedArray<V> {
    /// Checks that `map` holds values of `V` and was created mappable.
    pub fn new(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let size = size_of::<V>();
        if info.value_size() as usize != size || !size.is_multiple_of(8) {
            return Err(io::Error::other(format!(
                "value size {} where {size} was expected",
                info.value_size()
            )));
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(io::Error::other("not created with BPF_F_MMAPABLE"));
        }
        let entries = info.max_entries() as usize;
        Ok(MappedArray {
            map,
            entries,
            bytes: entries * size,
            _value: PhantomData,
        })
    }

    /// Maps the values for reading.
    pub fn map(&self) -> io::Result<Mapping<'_, V>> {
        let fd = self.map.fd().as_fd().as_raw_fd();
        // SAFETY: a new read-only shared mapping chosen by the kernel (no address given), of
        // the map's values from offset 0, which the kernel allows for a BPF_F_MMAPABLE array
        // up to its size; it is unmapped by `Mapping`'s drop and nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<V>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        Ok(Mapping {
            base,
            entries: self.entries,
            bytes: self.bytes,
            _array: PhantomData,
        })
    }
}

impl<V> Mapping<'_, V> {
    /// Calls `each` with a pointer to every value, in order. The kernel writes them
    /// meanwhile: read through the pointer only with volatile reads, check what was read (see
    /// `tables::read_slot`), and keep no pointer past the call.
    pub fn each(&self, mut each: impl FnMut(*const V)) {
        for index in 0..self.entries {
            // SAFETY: within the mapping, which holds `entries` values of `V` back to back.
            each(unsafe { self.base.as_ptr().add(index).cast_const() });
        }
    }
}

impl<V> Drop for Mapping<'_, V> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `MappedArray::map`, of this length; `each` hands out no
        // pointer that outlives its call.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// `BPF_F_MMAPABLE`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
