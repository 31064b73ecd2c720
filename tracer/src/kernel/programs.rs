//! Loading the embedded kernel programs, attaching them, and handing out their maps.
//! Dropping `Probes` detaches everything (aya owns the links).
use aya::maps::{MapData, PerCpuArray, RingBuf};
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};
use thiserror::Error;
use tracer_common::{KernelOffsets, KernelSymbols};

use crate::kernel::btf::KernelBtf;
use crate::kernel::btf_types;
use crate::kernel::compat::{Compat, CompatError, running_release};
use crate::kernel::system::KernelError;

/// The kernel programs, built by `build.rs` from `tracer-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Compat(#[from] CompatError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0} (build mismatch)")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0} (build mismatch)")]
    MissingMap(&'static str),
    #[error("the kernel refused program {program} on tracepoint {tracepoint}: {source}")]
    Program {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("reading kernel table {0}: {1}")]
    Table(&'static str, #[source] std::io::Error),
    #[error("reading kernel BTF for the loader: {0}")]
    Btf(#[source] aya::BtfError),
}

/// One program and the tracepoint it attaches to.
struct Hook {
    program: &'static str,
    tracepoint: &'static str,
}

/// Loaded and attached programs.
pub struct Probes {
    ebpf: Ebpf,
    /// (tracepoint, program) of each attachment.
    programs: Vec<(&'static str, &'static str)>,
}

pub struct ProbeConfig {
    /// Ring buffer size in bytes: a power of two and a multiple of the page size.
    pub ring_buffer_bytes: u32,
}

impl ProbeConfig {
    /// Pending bytes past which the kernel wakes the agent; below it the agent drains on its
    /// own timer (`agent::DRAIN_EVERY`). Small next to the ring so a burst cannot fill it first.
    pub fn wakeup_bytes(&self) -> u64 {
        (u64::from(self.ring_buffer_bytes) / 8).min(256 << 10)
    }
}

/// Which program serves each hook on this kernel, checked against its BTF before anything is
/// loaded. Taking this first lets the caller free its parsed BTF before aya parses its own.
#[derive(Clone, Debug)]
pub struct HookPlan {
    retransmit: &'static str,
    /// `(tracepoint, id)`: the kernel BTF id of each hooked tracepoint's `btf_trace_<name>`
    /// typedef, a `tp_btf` program's `attach_btf_id` (see `attach_btf`).
    attach_ids: Vec<(&'static str, u32)>,
    /// The variants and features chosen from BTF (`compat`); a hook it does not know keeps the
    /// program named in `hooks`.
    compat: Compat,
}

impl HookPlan {
    pub fn for_kernel(kernel: &KernelBtf) -> Result<HookPlan, ProbeError> {
        let compat = Compat::check(kernel, &running_release())?;
        let plan = HookPlan::from_compat(compat);
        for hook in &plan.hooks() {
            if plan.compat.program_for(hook.tracepoint).is_none() {
                kernel.tracepoint_arity(hook.tracepoint)?;
            }
        }
        Ok(plan.targeting(kernel))
    }

    /// The plan with the running kernel's attach ids (`kernel`: its BTF), which
    /// [`Probes::attach`] needs; a plan chosen from another kernel's BTF takes them here.
    pub fn targeting(mut self, kernel: &KernelBtf) -> HookPlan {
        self.attach_ids = self
            .hooks()
            .iter()
            .filter(|hook| self.program(hook).is_some())
            .filter_map(|hook| Some((hook.tracepoint, kernel.tracepoint_type_id(hook.tracepoint)?)))
            .collect();
        self
    }

    /// The plan `compat` chose.
    pub fn from_compat(compat: Compat) -> HookPlan {
        let retransmit = compat
            .program_for("tcp_retransmit_skb")
            .flatten()
            .unwrap_or("tcp_retransmit_skb");
        HookPlan {
            retransmit,
            attach_ids: Vec::new(),
            compat,
        }
    }

    /// What was chosen, and the offsets that go with it.
    pub fn compat(&self) -> &Compat {
        &self.compat
    }

    /// A BTF that aya reads the programs' attach ids from: each hooked tracepoint's typedef at
    /// its kernel id, and a 12-byte placeholder at every other id. aya looks a `tp_btf`
    /// program's target up by name in a parsed BTF; a parse of the kernel's own (tens of MiB)
    /// would be the agent's start-up peak, and the ids were read already (`KernelBtf`).
    fn attach_btf(&self) -> Result<Btf, ProbeError> {
        const PTR_TO_VOID: [u32; 3] = [0, 2 << 24, 0];
        const TYPEDEF: u32 = 8 << 24;
        let last = self.attach_ids.iter().map(|&(_, id)| id).max().unwrap_or(0);
        let mut strings = vec![0u8];
        let mut records = vec![PTR_TO_VOID; usize::try_from(last).unwrap_or(0)];
        for &(tracepoint, id) in &self.attach_ids {
            let name = u32::try_from(strings.len()).unwrap_or(0);
            strings.extend(format!("btf_trace_{tracepoint}").bytes());
            strings.push(0);
            if let Some(record) = usize::try_from(id)
                .ok()
                .and_then(|id| records.get_mut(id.wrapping_sub(1)))
            {
                // A typedef of void: aya reads only its kind and name.
                *record = [name, TYPEDEF, 0];
            }
        }
        // Ids come from a BTF that fits in 4 GiB, and so does this smaller one.
        let blob = btf_types::blob(records.as_flattened(), &strings).unwrap_or_default();
        Btf::parse(&blob, aya::Endianness::Little).map_err(ProbeError::Btf)
    }

    /// `(program, tracepoint)` of every hook that [`Probes::attach`] attaches.
    pub fn attaching(&self) -> Vec<(&'static str, &'static str)> {
        self.hooks()
            .iter()
            .filter_map(|hook| self.program(hook).map(|p| (p, hook.tracepoint)))
            .collect()
    }

    /// The program for `hook` on this kernel, `None` when its features are switched off.
    fn program(&self, hook: &Hook) -> Option<&'static str> {
        match self.compat.program_for(hook.tracepoint) {
            Some(chosen) => chosen,
            None => Some(hook.program),
        }
    }

    fn hooks(&self) -> [Hook; 11] {
        let retransmit = self.retransmit;
        [
            Hook {
                program: "inet_sock_set_state",
                tracepoint: "inet_sock_set_state",
            },
            Hook {
                program: retransmit,
                tracepoint: "tcp_retransmit_skb",
            },
            Hook {
                program: "tcp_retransmit_synack",
                tracepoint: "tcp_retransmit_synack",
            },
            Hook {
                program: "tcp_receive_reset",
                tracepoint: "tcp_receive_reset",
            },
            Hook {
                program: "tcp_send_reset",
                tracepoint: "tcp_send_reset",
            },
            Hook {
                program: "tcp_sendmsg_locked",
                tracepoint: "tcp_sendmsg_locked",
            },
            Hook {
                program: "timer_start",
                tracepoint: "timer_start",
            },
            Hook {
                program: "timer_cancel",
                tracepoint: "timer_cancel",
            },
            Hook {
                program: "timer_expire_entry",
                tracepoint: "timer_expire_entry",
            },
            Hook {
                program: "tcp_cong_state_set",
                tracepoint: "tcp_cong_state_set",
            },
            // Not a TCP hook: counts the softirq runs the programs see (`kernel::softirqs`).
            Hook {
                program: "softirq_entry",
                tracepoint: "softirq_entry",
            },
        ]
    }
}

impl Probes {
    /// Loads the programs with `offsets` and attaches every hook of `plan`. On error nothing
    /// stays attached: the partially set-up `Ebpf` is dropped, which detaches what was attached.
    pub fn attach(
        plan: &HookPlan,
        offsets: &KernelOffsets,
        symbols: &KernelSymbols,
        config: &ProbeConfig,
    ) -> Result<Probes, ProbeError> {
        let hooks = plan.hooks();
        let btf = plan.attach_btf()?;
        // `EbpfLoader::new` parses the kernel's BTF for CO-RE relocations, which Rust eBPF
        // programs do not have: dropped at once (`btf(None)`), so that only one such parse
        // is ever alive.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global("OFFSETS", offsets, true)
            .override_global("SYMBOLS", symbols, true)
            .override_global("WAKEUP_BYTES", &config.wakeup_bytes(), true)
            .map_max_entries("EVENTS", config.ring_buffer_bytes)
            .load(PROGRAMS)
            .map_err(ProbeError::Load)?;
        let mut programs = Vec::with_capacity(hooks.len());
        for hook in &hooks {
            let Some(name) = plan.program(hook) else {
                continue;
            };
            let program_error = |source| ProbeError::Program {
                program: name,
                tracepoint: hook.tracepoint,
                source,
            };
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(program_error)?;
            program.load(hook.tracepoint, &btf).map_err(program_error)?;
            program.attach().map_err(program_error)?;
            log::debug!("attached {name} to tp_btf/{}", hook.tracepoint);
            programs.push((hook.tracepoint, name));
        }
        Ok(Probes { ebpf, programs })
    }

    /// The tracepoints attached, for the start-up log.
    pub fn attached(&self) -> Vec<&'static str> {
        self.programs
            .iter()
            .map(|&(tracepoint, _)| tracepoint)
            .collect()
    }

    /// Runs the kernel skipped since the programs were loaded, by tracepoint: a program does not
    /// nest with itself on a CPU, so a hook hit while it runs there (from an interrupt) is
    /// dropped and counted (`recursion_misses` in the program's fdinfo, kept whether or not
    /// run-time statistics are on). A program whose count cannot be read is left out.
    pub fn misses(&self) -> Vec<(&'static str, u64)> {
        self.programs
            .iter()
            .filter_map(|&(tracepoint, name)| {
                let fd = self.ebpf.program(name)?.fd().ok()?.as_fd().as_raw_fd();
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let misses = info
                    .lines()
                    .find_map(|line| line.strip_prefix("recursion_misses:"))?
                    .trim()
                    .parse()
                    .ok()?;
                Some((tracepoint, misses))
            })
            .collect()
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|e| ProbeError::Map("EVENTS", e))
    }

    /// One of the programs' maps, by name; each can be taken once.
    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
        self.ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))
    }

    /// Per-CPU count of events the kernel could not queue; can be taken once.
    pub fn take_lost_counter(&mut self) -> Result<LostCounter, ProbeError> {
        let map = self
            .ebpf
            .take_map("LOST")
            .ok_or(ProbeError::MissingMap("LOST"))?;
        let array = PerCpuArray::try_from(map).map_err(|e| ProbeError::Map("LOST", e))?;
        Ok(LostCounter { array })
    }

    /// Forwards the programs' aya-log messages to the `log` crate. `None` when the object
    /// carries no log statements.
    pub fn logger(&mut self) -> Option<KernelLogger> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::debug!("kernel-side logging unavailable: {e}");
                None
            }
        }
    }
}

/// aya-log's reader, forwarding to the `log` crate's global logger.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Events dropped in the kernel because the ring buffer was full.
pub struct LostCounter {
    array: PerCpuArray<MapData, u64>,
}

impl LostCounter {
    /// The total over all programs' slots and all CPUs since the programs were loaded.
    pub fn total(&self) -> Result<u64, ProbeError> {
        let mut total = 0u64;
        for slot in 0..tracer_common::LOST_SLOTS {
            let values = self
                .array
                .get(&slot, 0)
                .map_err(|e| ProbeError::Map("LOST", e))?;
            total = total.saturating_add(values.iter().sum());
        }
        Ok(total)
    }
}
