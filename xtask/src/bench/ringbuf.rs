//! Experiment: what the kernel-to-user transport costs, and what batching the wake-ups saves.
//!
//! A raw_tp program writes one record per event (the size of the agent's `RawEvent`) into a
//! BPF ring buffer, and a thread of the bench drains it, doing nothing with the records:
//!
//! - `wakeup`: submitted with default flags: the kernel wakes the reader whenever it had caught
//!   up, and each wake-up is an IRQ-work self-interrupt raised inside the traced code path
//!   (a trapped APIC write in a virtual machine);
//! - `batched`: submitted with `BPF_RB_NO_WAKEUP`, forcing a wake-up only when more than
//!   `BATCH_BYTES` are pending; the reader also drains every `POLL_MS` milliseconds.
use std::ffi::{c_int, c_long, c_short, c_void};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result, bail};

use super::bpf::{BPF_PSEUDO_MAP_FD, Insn, attach_raw_tp, create_map, insn, load_raw_tp};

const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const RING_BYTES: u32 = 8 << 20;
/// The agent's event record is 96 bytes.
const RECORD_BYTES: i32 = 96;
const BATCH_BYTES: i32 = 256 << 10;
const POLL_MS: c_int = 10;

const PROT_READ: c_int = 1;
const PROT_WRITE: c_int = 2;
const MAP_SHARED: c_int = 1;
const POLLIN: c_short = 1;
const SC_PAGESIZE: c_int = 30;

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: c_short,
    revents: c_short,
}

unsafe extern "C" {
    fn mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: i64,
    ) -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> c_int;
    fn poll(fds: *mut PollFd, nfds: u64, timeout: c_int) -> c_int;
    fn sysconf(name: c_int) -> c_long;
}

/// Reserve, fill, submit; `batched` picks the wake-up policy.
fn program(map_fd: i32, batched: bool) -> Vec<Insn> {
    let mut p = vec![
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // r1 = ring
        insn(0x00, 0, 0, 0, 0),
        insn(0xb7, 2, 0, 0, RECORD_BYTES), // r2 = size
        insn(0xb7, 3, 0, 0, 0),            // r3 = 0
        insn(0x85, 0, 0, 0, 131),          // call bpf_ringbuf_reserve
        insn(0x15, 0, 0, 0, 0),            // if r0 == 0 goto out (patched below)
        insn(0xbf, 7, 0, 0, 0),            // r7 = r0
    ];
    for slot in 0..(RECORD_BYTES / 8) as i16 {
        p.push(insn(0x7a, 7, 0, slot * 8, 0)); // *(u64 *)(r7 + 8 * slot) = 0
    }
    if batched {
        p.extend([
            insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // r1 = ring
            insn(0x00, 0, 0, 0, 0),
            insn(0xb7, 2, 0, 0, 0),           // r2 = BPF_RB_AVAIL_DATA
            insn(0x85, 0, 0, 0, 134),         // call bpf_ringbuf_query
            insn(0xb7, 2, 0, 0, 1),           // r2 = BPF_RB_NO_WAKEUP
            insn(0xa5, 0, 0, 1, BATCH_BYTES), // if r0 < BATCH_BYTES goto +1
            insn(0xb7, 2, 0, 0, 2),           // r2 = BPF_RB_FORCE_WAKEUP
        ]);
    } else {
        p.push(insn(0xb7, 2, 0, 0, 0)); // r2 = 0: wake the reader if it had caught up
    }
    p.extend([
        insn(0xbf, 1, 7, 0, 0),   // r1 = r7
        insn(0x85, 0, 0, 0, 132), // call bpf_ringbuf_submit
    ]);
    let out = p.len();
    p.extend([insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)]); // out: return 0
    p[5] = insn(0x15, 0, 0, (out - 6) as i16, 0);
    p
}

/// The experiment while attached; detached and joined when dropped.
pub struct RingbufExperiment {
    _links: Vec<OwnedFd>,
    _prog: OwnedFd,
    stop: Arc<AtomicBool>,
    consumed: Arc<AtomicU64>,
    reader: Option<JoinHandle<()>>,
}

impl RingbufExperiment {
    pub fn attach(tracepoints: &[&str], batched: bool) -> Result<Self> {
        let ring = create_map(BPF_MAP_TYPE_RINGBUF, 0, 0, RING_BYTES, "bench_ring")
            .context("creating a ring buffer")?;
        let prog = load_raw_tp(&program(ring.as_raw_fd(), batched), "bench_ring")?;
        let mapping = Mapping::new(&ring)?;
        let stop = Arc::new(AtomicBool::new(false));
        let consumed = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), consumed.clone());
        let reader = std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || mapping.drain_until(&ring, &flag, &count, batched))
            .context("spawning the ring reader")?;
        let links = tracepoints
            .iter()
            .map(|tp| attach_raw_tp(&prog, tp))
            .collect::<Result<_>>()?;
        Ok(Self {
            _links: links,
            _prog: prog,
            stop,
            consumed,
            reader: Some(reader),
        })
    }

    /// Records drained so far.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

impl Drop for RingbufExperiment {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The consumer page (read-write) and the producer page plus the twice-mapped data (read-only).
struct Mapping {
    consumer: *mut c_void,
    producer: *mut c_void,
    page: usize,
}

// SAFETY: the mappings are plain shared memory owned by this value; only the reader thread
// uses them after the move.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(ring: &OwnedFd) -> Result<Self> {
        // SAFETY: sysconf takes an integer and returns one.
        let page = usize::try_from(unsafe { sysconf(SC_PAGESIZE) }).unwrap_or(4096);
        let fd = ring.as_raw_fd();
        // SAFETY: mapping a ring buffer map's consumer page, as the kernel documents; the
        // result is checked before use.
        let consumer = unsafe {
            mmap(
                std::ptr::null_mut(),
                page,
                PROT_READ | PROT_WRITE,
                MAP_SHARED,
                fd,
                0,
            )
        };
        if consumer as isize == -1 {
            bail!(
                "mmap of the consumer page: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as above, the producer page and the data area mapped twice, read-only.
        let producer = unsafe {
            mmap(
                std::ptr::null_mut(),
                page + 2 * RING_BYTES as usize,
                PROT_READ,
                MAP_SHARED,
                fd,
                page as i64,
            )
        };
        if producer as isize == -1 {
            let err = std::io::Error::last_os_error();
            // SAFETY: unmapping what was mapped just above.
            unsafe { munmap(consumer, page) };
            bail!("mmap of the ring data: {err}");
        }
        Ok(Self {
            consumer,
            producer,
            page,
        })
    }

    fn drain_until(self, ring: &OwnedFd, stop: &AtomicBool, count: &AtomicU64, batched: bool) {
        // SAFETY: both positions are 8-byte aligned u64 at the start of their pages, which
        // stay mapped for the life of `self`; the kernel updates them concurrently, hence
        // atomics.
        let (cons_pos, prod_pos) = unsafe {
            (
                &*self.consumer.cast::<AtomicU64>(),
                &*self.producer.cast::<AtomicU64>(),
            )
        };
        // SAFETY: the data area starts one page after the producer page.
        let data = unsafe { self.producer.cast::<u8>().add(self.page) };
        let mask = u64::from(RING_BYTES) - 1;
        let timeout = if batched { POLL_MS } else { 100 };
        while !stop.load(Ordering::Relaxed) {
            let mut cons = cons_pos.load(Ordering::Acquire);
            let prod = prod_pos.load(Ordering::Acquire);
            while cons < prod {
                // SAFETY: `cons & mask` is inside the data area; record headers are 8-byte
                // aligned u32 words written by the kernel.
                let header = unsafe { &*data.add((cons & mask) as usize).cast::<AtomicU32>() };
                let len = header.load(Ordering::Acquire);
                if len & (1 << 31) != 0 {
                    break; // still being written
                }
                let len = u64::from(len & !(3 << 30));
                cons += (len + 8 + 7) & !7;
                cons_pos.store(cons, Ordering::Release);
                count.fetch_add(1, Ordering::Relaxed);
            }
            let mut fds = PollFd {
                fd: ring.as_raw_fd(),
                events: POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { poll(&mut fds, 1, timeout) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the two regions mapped in `new`.
        unsafe {
            munmap(self.consumer, self.page);
            munmap(self.producer, self.page + 2 * RING_BYTES as usize);
        }
    }
}
