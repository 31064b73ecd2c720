//! A minimal eBPF program loaded straight through bpf(2), for the "floor" configuration: it only
//! bumps a per-CPU counter, so what it costs is the hook itself. Also the kernel's own run-time
//! statistics of loaded programs (`BPF_ENABLE_STATS`, read from `/proc/PID/fdinfo`).
//!
//! No libbpf and no compiler: the program is a dozen hand-assembled instructions.
use std::collections::HashMap;
use std::ffi::{CString, c_long};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{Context as _, Result, bail};

#[cfg(target_arch = "x86_64")]
const SYS_BPF: c_long = 321;
#[cfg(target_arch = "aarch64")]
const SYS_BPF: c_long = 280;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYS_BPF: c_long = -1;

const BPF_MAP_CREATE: c_long = 0;
const BPF_MAP_LOOKUP_ELEM: c_long = 1;
const BPF_PROG_LOAD: c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: c_long = 17;
const BPF_ENABLE_STATS: c_long = 32;

const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_STATS_RUN_TIME: u32 = 0;
pub(super) const BPF_PSEUDO_MAP_FD: u8 = 1;

unsafe extern "C" {
    fn syscall(num: c_long, ...) -> c_long;
}

/// bpf(2) with an attribute struct of type `T`; returns the (non-negative) result.
fn bpf<T>(cmd: c_long, attr: &mut T) -> std::io::Result<c_long> {
    if SYS_BPF < 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    }
    // SAFETY: bpf(2) reads (and for some commands writes) at most `size_of::<T>()` bytes of
    // `attr`, which is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, alive and
    // exclusively borrowed across the call; pointers inside it point at live buffers.
    let ret = unsafe {
        syscall(
            SYS_BPF,
            cmd,
            std::ptr::from_mut(attr).cast::<u8>(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: c_long) -> OwnedFd {
    // SAFETY: `ret` is a file descriptor the kernel has just created for us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(ret as RawFd) }
}

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C, align(8))]
struct MapLookup {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C, align(8))]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C, align(8))]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct EnableStats {
    stats_type: u32,
}

/// One `struct bpf_insn`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

pub(super) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

/// Creates a map.
pub(super) fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<OwnedFd> {
    let mut create = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name16(name),
    };
    Ok(owned_fd(bpf(BPF_MAP_CREATE, &mut create)?))
}

/// Loads a raw tracepoint program; a refusal carries the verifier's log.
pub(super) fn load_raw_tp(insns: &[Insn], name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name16(name),
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    match bpf(BPF_PROG_LOAD, &mut load) {
        Ok(fd) => Ok(owned_fd(fd)),
        Err(first) => {
            // Once more with the verifier's log, to say why.
            let mut log = vec![0u8; 64 << 10];
            load.log_level = 1;
            load.log_size = log.len() as u32;
            load.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut load);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            bail!("the kernel refused the raw_tp program {name}: {first}; verifier: {text}");
        }
    }
}

/// Attaches a raw tracepoint program; detached when the returned descriptor closes.
pub(super) fn attach_raw_tp(prog: &OwnedFd, tracepoint: &str) -> Result<OwnedFd> {
    let name = CString::new(tracepoint).context("tracepoint name")?;
    let mut open = RawTracepointOpen {
        name: name.as_ptr() as u64,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    let fd = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)
        .with_context(|| format!("the kernel refused raw_tp/{tracepoint}"))?;
    Ok(owned_fd(fd))
}

/// `(*counter[0])++` on this CPU, `return 0`.
fn counter_program(map_fd: i32) -> Vec<Insn> {
    vec![
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // r1 = map (ld_imm64)
        insn(0x00, 0, 0, 0, 0),                      //   (second half)
        insn(0x62, 10, 0, -4, 0),                    // *(u32 *)(r10 - 4) = 0
        insn(0xbf, 2, 10, 0, 0),                     // r2 = r10
        insn(0x07, 2, 0, 0, -4),                     // r2 += -4
        insn(0x85, 0, 0, 0, 1),                      // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 3, 0),                      // if r0 == 0 goto +3
        insn(0x79, 1, 0, 0, 0),                      // r1 = *(u64 *)(r0 + 0)
        insn(0x07, 1, 0, 0, 1),                      // r1 += 1
        insn(0x7b, 0, 1, 0, 0),                      // *(u64 *)(r0 + 0) = r1
        insn(0xb7, 0, 0, 0, 0),                      // r0 = 0
        insn(0x95, 0, 0, 0, 0),                      // exit
    ]
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (slot, byte) in out.iter_mut().take(15).zip(name.bytes()) {
        *slot = byte;
    }
    out
}

/// A counter program attached to raw tracepoints; detached when dropped.
pub struct RawFloor {
    map: OwnedFd,
    _prog: OwnedFd,
    _links: Vec<OwnedFd>,
    cpus: usize,
}

impl RawFloor {
    /// Loads the counter program and attaches it to each raw tracepoint in `tracepoints`
    /// (names without the group, e.g. `inet_sock_set_state`).
    pub fn attach(tracepoints: &[&str]) -> Result<Self> {
        let map = create_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, "bench_floor")
            .context("creating a per-CPU map")?;
        let prog = load_raw_tp(&counter_program(map.as_raw_fd()), "bench_floor")?;
        let links = tracepoints
            .iter()
            .map(|tp| attach_raw_tp(&prog, tp))
            .collect::<Result<_>>()?;
        Ok(Self {
            map,
            _prog: prog,
            _links: links,
            cpus: super::sys::possible_cpus(),
        })
    }

    /// How many times the program ran, summed over CPUs.
    pub fn count(&self) -> Result<u64> {
        // Per-CPU values are 8-byte aligned slots, one per possible CPU.
        let mut values = vec![0u64; self.cpus];
        let key = 0u32;
        let mut lookup = MapLookup {
            map_fd: self.map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: values.as_mut_ptr() as u64,
            flags: 0,
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup).context("reading the floor counter")?;
        Ok(values.iter().sum())
    }
}

/// Kernel run-time statistics of every eBPF program, for as long as this value lives.
pub struct Stats(#[allow(dead_code)] OwnedFd);

impl Stats {
    pub fn enable() -> Result<Self> {
        let mut attr = EnableStats {
            stats_type: BPF_STATS_RUN_TIME,
        };
        let fd = bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS")?;
        Ok(Self(owned_fd(fd)))
    }
}

/// One program's counters, as shown in `/proc/PID/fdinfo`.
#[derive(Debug, Clone)]
pub struct ProgStats {
    pub id: u64,
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The programs a process holds open, with their run counters (non-zero only while statistics
/// are enabled). Names come from the JIT symbols in `/proc/kallsyms` (`bpf_prog_TAG_NAME`).
/// The value of `key` in an fdinfo file's text.
fn fdinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Kernel memory of the BPF maps `pid` holds (their `memlock` in `/proc/PID/fdinfo`, in KiB):
/// memory the agent's RSS does not show (preallocated tables, the ring buffer).
pub fn map_memory_kib(pid: u32) -> Option<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |key: &str| fdinfo_field(&text, key);
        if field("map_type").is_some()
            && let Some(memlock) = field("memlock").and_then(|v| v.parse::<u64>().ok())
        {
            bytes += memlock;
        }
    }
    Some(bytes / 1024)
}

pub fn programs_of(pid: u32) -> Result<Vec<ProgStats>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut by_id: HashMap<u64, (String, u64, u64)> = HashMap::new();
    // Links name what they attach to (`tp_name`), better than the JIT's 15-character names.
    let mut attached_to: HashMap<u64, String> = HashMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |key: &str| fdinfo_field(&text, key);
        if let (Some(id), Some(tp)) = (
            field("prog_id").and_then(|v| v.parse().ok()),
            field("tp_name"),
        ) {
            attached_to.insert(id, tp.to_owned());
            continue;
        }
        let (Some(id), Some(tag), Some(cnt), Some(time)) = (
            field("prog_id").and_then(|v| v.parse().ok()),
            field("prog_tag"),
            field("run_cnt").and_then(|v| v.parse().ok()),
            field("run_time_ns").and_then(|v| v.parse().ok()),
        ) else {
            continue;
        };
        by_id.insert(id, (tag.to_owned(), cnt, time));
    }
    let names = jit_names();
    let mut out: Vec<ProgStats> = by_id
        .into_iter()
        .map(|(id, (tag, run_cnt, run_time_ns))| ProgStats {
            id,
            name: attached_to
                .get(&id)
                .or_else(|| names.get(&tag))
                .cloned()
                .unwrap_or_else(|| format!("prog {id}")),
            run_cnt,
            run_time_ns,
        })
        .collect();
    out.sort_by_key(|p| p.id);
    Ok(out)
}

/// Other processes holding tracing eBPF programs (kprobe, tracepoint, perf event, raw
/// tracepoint, tracing), except this process and its children: `comm (pid N)` for each. They
/// skew every configuration, `none` too.
pub fn foreign_tracers() -> Vec<String> {
    const TRACING_TYPES: [&str; 5] = ["2", "5", "7", "17", "26"];
    let own = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        let tracing = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|text| {
                text.lines().any(|line| {
                    line.strip_prefix("prog_type:")
                        .is_some_and(|t| TRACING_TYPES.contains(&t.trim()))
                })
            })
        });
        if tracing && parent_of(pid) != Some(own) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push(format!("{} (pid {pid})", comm.trim()));
        }
    }
    found
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, then the parent's pid.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Program tag → name, from `bpf_prog_<tag>_<name>` symbols.
fn jit_names() -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| {
            let symbol = line.split_whitespace().nth(2)?;
            let rest = symbol.strip_prefix("bpf_prog_")?;
            let (tag, name) = rest.split_once('_')?;
            Some((tag.to_owned(), name.to_owned()))
        })
        .collect()
}
