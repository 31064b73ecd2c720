//! Reading a whole BPF hash map in a few system calls: `BPF_MAP_LOOKUP_BATCH`, or
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH` to empty it as it is read. aya's iterator costs two
//! `bpf(2)` calls per entry, too many for tables of tens of thousands read once a second.
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;

/// Entries asked for per call.
const BATCH: usize = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A hash map of `K` to `V` (their sizes are the map's key and value sizes), with buffers for
/// one call's worth of entries.
pub struct BatchReader<K, V> {
    map: MapData,
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K: aya::Pod + Default, V: aya::Pod + Default> BatchReader<K, V> {
    pub fn new(map: MapData) -> Self {
        BatchReader {
            map,
            keys: vec![K::default(); BATCH],
            values: vec![V::default(); BATCH],
        }
    }

    /// Calls `each` for every entry; `delete`: and removes what it read (an entry added during
    /// the walk is read by a later walk).
    pub fn walk(&mut self, delete: bool, mut each: impl FnMut(&K, &V)) -> io::Result<()> {
        let command = if delete {
            BPF_MAP_LOOKUP_AND_DELETE_BATCH
        } else {
            BPF_MAP_LOOKUP_BATCH
        };
        // The position between calls: a bucket index for hash maps (a u32; a u64 leaves room).
        let mut token: u64 = 0;
        let mut first = true;
        loop {
            let mut next: u64 = 0;
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    std::ptr::from_ref(&token) as u64
                },
                out_batch: std::ptr::from_mut(&mut next) as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: `attr` is the `batch` member of `union bpf_attr` with every field set; the
            // kernel writes at most `count` keys and values into buffers of BATCH entries each,
            // of the map's key and value sizes (K and V, checked by the caller's map type), and
            // the position into `next`; `token` and `next` outlive the call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    command,
                    std::ptr::from_mut(&mut attr),
                    size_of::<BatchAttr>(),
                )
            };
            let error = (ret != 0).then(io::Error::last_os_error);
            let count = (attr.count as usize).min(BATCH);
            for (key, value) in self.keys.iter().zip(&self.values).take(count) {
                each(key, value);
            }
            match error {
                None => {}
                // The end of the map.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(e),
            }
            token = next;
            first = false;
        }
    }
}
