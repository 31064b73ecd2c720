//! Softirq runs in which the kernel ran no BPF program. On some kernels a whole softirq run goes
//! without any program (seen on 6.18: every run made on top of one particular task, whose own
//! events the kernel's tracing does not record either). The TCP events of such a run (a burst of
//! timewait expiries, the packets a NET_RX run delivered) reach no program and no kernel counter
//! says so. The `softirq_entry` program counts the runs it sees; the kernel counts every run in
//! `/proc/softirqs`; the difference is the runs the programs missed, counted as loss.
use std::io;

use aya::maps::{MapData, PerCpuArray};

use crate::kernel::programs::{ProbeError, Probes};

/// The vectors in which TCP changes state or fires its timers: `(vector, name in
/// /proc/softirqs, metric label)`. Timers (retransmit, delayed ACK, keepalive, TIME_WAIT),
/// packets in, TCP small queues' tasklet, and the pacing / compressed-ACK hrtimers.
pub const WATCHED: [(u32, &str, &str); 4] = [
    (1, "TIMER", "timer"),
    (3, "NET_RX", "net_rx"),
    (6, "TASKLET", "tasklet"),
    (8, "HRTIMER", "hrtimer"),
];

const PROC_SOFTIRQS: &str = "/proc/softirqs";

/// Per-CPU run counts of vector `name` in the text of `/proc/softirqs` (one column per possible
/// CPU, as the kernel's per-CPU arrays are); `None` when the line is missing or malformed.
pub fn parse_proc_softirqs(text: &str, name: &str) -> Option<Vec<u32>> {
    let line = text.lines().find_map(|line| {
        let (label, counts) = line.trim_start().split_once(':')?;
        (label == name).then_some(counts)
    })?;
    line.split_whitespace().map(|n| n.parse().ok()).collect()
}

/// The runs the kernel made and the programs did not see, per watched vector, since the
/// baseline. Pure: it is given both sides' counts.
#[derive(Debug)]
pub struct Unobserved {
    /// Per vector and CPU: the kernel's last count (a 32-bit counter that wraps) and what it
    /// grew by since the baseline.
    kernel_last: Vec<Vec<u32>>,
    kernel_grown: Vec<Vec<u64>>,
    /// Per vector and CPU: the programs' count at the baseline.
    seen_base: Vec<Vec<u64>>,
    /// Only ever grows: a counter.
    totals: [u64; WATCHED.len()],
}

impl Unobserved {
    /// The baseline. `seen` (the programs' counts) must be read before `kernel`: a run in
    /// between then counts on the kernel's side only, which lowers what is found later, never
    /// raises it.
    pub fn new(seen: &[Vec<u64>], kernel: &[Vec<u32>]) -> Unobserved {
        Unobserved {
            kernel_last: kernel.to_vec(),
            kernel_grown: kernel.iter().map(|cpus| vec![0; cpus.len()]).collect(),
            seen_base: seen.to_vec(),
            totals: [0; WATCHED.len()],
        }
    }

    /// Takes new counts, `kernel` read before `seen` (a run in between is then on the programs'
    /// side only), and returns the totals so far per watched vector. Runs are compared CPU by
    /// CPU, so that runs one CPU missed are not hidden by another's that are still on their way
    /// to the program (the kernel counts a run just before its tracepoint).
    pub fn update(&mut self, kernel: &[Vec<u32>], seen: &[Vec<u64>]) -> [u64; WATCHED.len()] {
        for (vector, total) in self.totals.iter_mut().enumerate() {
            let (Some(now), Some(last), Some(grown)) = (
                kernel.get(vector),
                self.kernel_last.get_mut(vector),
                self.kernel_grown.get_mut(vector),
            ) else {
                continue;
            };
            let base = self.seen_base.get(vector);
            let seen_now = seen.get(vector);
            let mut missed = 0u64;
            for (cpu, (&count, (last, grown))) in now
                .iter()
                .zip(last.iter_mut().zip(grown.iter_mut()))
                .enumerate()
            {
                *grown += u64::from(count.wrapping_sub(*last));
                *last = count;
                let seen_grown = match (seen_now.and_then(|s| s.get(cpu)), base) {
                    (Some(&now), Some(base)) => {
                        now.saturating_sub(base.get(cpu).copied().unwrap_or(0))
                    }
                    _ => 0,
                };
                missed += grown.saturating_sub(seen_grown);
            }
            *total = (*total).max(missed);
        }
        self.totals
    }
}

/// Reads both sides, in the order [`Unobserved`] needs.
pub struct SoftirqWatch {
    seen: PerCpuArray<MapData, u64>,
    unobserved: Option<Unobserved>,
    /// A failure is said once, not every refresh.
    said: bool,
}

impl SoftirqWatch {
    pub fn take(probes: &mut Probes) -> Result<SoftirqWatch, ProbeError> {
        let map = probes.take_map("SOFTIRQS")?;
        let seen = PerCpuArray::try_from(map).map_err(|e| ProbeError::Map("SOFTIRQS", e))?;
        Ok(SoftirqWatch {
            seen,
            unobserved: None,
            said: false,
        })
    }

    /// The runs missed so far, summed over the vectors, as last read.
    pub fn total(&self) -> u64 {
        self.unobserved
            .as_ref()
            .map_or(0, |unobserved| unobserved.totals.iter().sum())
    }

    /// [`Self::unobserved`], with a failure logged once; `None` when it failed.
    pub fn refresh(&mut self) -> Option<[u64; WATCHED.len()]> {
        match self.unobserved() {
            Ok(totals) => Some(totals),
            Err(e) => {
                if !std::mem::replace(&mut self.said, true) {
                    log::warn!("{e}");
                }
                None
            }
        }
    }

    /// The runs missed so far per watched vector (all zero on the first call, the baseline).
    pub fn unobserved(&mut self) -> Result<[u64; WATCHED.len()], SoftirqError> {
        if self.unobserved.is_none() {
            let seen = read_seen(&self.seen)?;
            let kernel = read_kernel()?;
            self.unobserved = Some(Unobserved::new(&seen, &kernel));
            return Ok([0; WATCHED.len()]);
        }
        let kernel = read_kernel()?;
        let seen = read_seen(&self.seen)?;
        Ok(self
            .unobserved
            .as_mut()
            .map_or([0; WATCHED.len()], |u| u.update(&kernel, &seen)))
    }
}

fn read_seen(seen: &PerCpuArray<MapData, u64>) -> Result<Vec<Vec<u64>>, SoftirqError> {
    WATCHED
        .iter()
        .map(|&(vector, _, _)| {
            let values = seen.get(&vector, 0).map_err(SoftirqError::Map)?;
            Ok(values.iter().copied().collect())
        })
        .collect()
}

fn read_kernel() -> Result<Vec<Vec<u32>>, SoftirqError> {
    let text = std::fs::read_to_string(PROC_SOFTIRQS).map_err(SoftirqError::Read)?;
    WATCHED
        .iter()
        .map(|&(_, name, _)| parse_proc_softirqs(&text, name).ok_or(SoftirqError::Format(name)))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SoftirqError {
    #[error("cannot read {PROC_SOFTIRQS}: {0} (softirq runs without the programs go uncounted)")]
    Read(#[source] io::Error),
    #[error(
        "{PROC_SOFTIRQS} has no readable {0} line (softirq runs without the programs go uncounted)"
    )]
    Format(&'static str),
    #[error("cannot read the SOFTIRQS table: {0}")]
    Map(#[source] aya::maps::MapError),
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "                    CPU0       CPU1
          HI:          0          0
       TIMER:    1398060    1218835
      NET_TX:        909        812
      NET_RX:  249138412  214954783
       BLOCK:     816087     641322
    IRQ_POLL:          0          0
     TASKLET:        437        424
       SCHED:    2570385    1546764
     HRTIMER:       5232       4578
         RCU:    8316802    6040632
";

    #[test]
    fn reads_each_cpus_count_of_a_vector() {
        assert_eq!(
            parse_proc_softirqs(TEXT, "TIMER"),
            Some(vec![1_398_060, 1_218_835])
        );
        assert_eq!(parse_proc_softirqs(TEXT, "HRTIMER"), Some(vec![5232, 4578]));
        assert_eq!(
            parse_proc_softirqs(TEXT, "NET_RX"),
            Some(vec![249_138_412, 214_954_783])
        );
        // "TIMER" is not "HRTIMER" and vice versa; a missing or garbled line is no count.
        assert_eq!(parse_proc_softirqs(TEXT, "MISSING"), None);
        assert_eq!(parse_proc_softirqs("TIMER: 12 x\n", "TIMER"), None);
    }

    #[test]
    fn every_watched_vector_is_in_the_kernels_file() {
        for (_, name, _) in WATCHED {
            assert!(parse_proc_softirqs(TEXT, name).is_some(), "{name}");
        }
    }

    fn counts<T: Copy>(each: [[T; 2]; 4]) -> Vec<Vec<T>> {
        each.iter().map(|cpus| cpus.to_vec()).collect()
    }

    #[test]
    fn runs_the_kernel_counted_and_no_program_saw_are_counted_per_vector() {
        let mut u = Unobserved::new(
            &counts([[0, 0], [10, 10], [5, 5], [0, 0]]),
            &counts([[100, 200], [1000, 2000], [7, 7], [3, 3]]),
        );
        // Timer: CPU0 ran 50, the program saw 47; CPU1 ran 20 and saw them all.
        // NET_RX: all seen. Tasklet: CPU1 missed 2. Hrtimer: nothing ran.
        let totals = u.update(
            &counts([[150, 220], [1500, 2500], [7, 9], [3, 3]]),
            &counts([[47, 20], [510, 1010], [5, 5], [0, 0]]),
        );
        assert_eq!(totals, [3, 0, 2, 0]);
    }

    #[test]
    fn runs_on_their_way_to_the_program_on_one_cpu_do_not_hide_another_cpus_misses() {
        let mut u = Unobserved::new(&counts([[0, 0]; 4]), &counts([[0, 0]; 4]));
        // CPU0 missed 4; CPU1's program counted 3 more runs than the kernel had when read (the
        // programs are read last).
        let totals = u.update(
            &counts([[10, 10], [0, 0], [0, 0], [0, 0]]),
            &counts([[6, 13], [0, 0], [0, 0], [0, 0]]),
        );
        assert_eq!(totals[0], 4);
    }

    #[test]
    fn the_kernels_32_bit_counter_wraps_without_a_jump() {
        let start = u32::MAX - 5;
        let mut u = Unobserved::new(
            &counts([[0, 0]; 4]),
            &counts([[start, 0], [0, 0], [0, 0], [0, 0]]),
        );
        let totals = u.update(
            &counts([[4, 0], [0, 0], [0, 0], [0, 0]]),
            &counts([[10, 0], [0, 0], [0, 0], [0, 0]]),
        );
        assert_eq!(totals, [0; 4], "10 runs across the wrap, all seen");
        let totals = u.update(
            &counts([[14, 0], [0, 0], [0, 0], [0, 0]]),
            &counts([[18, 0], [0, 0], [0, 0], [0, 0]]),
        );
        assert_eq!(totals[0], 2);
    }

    #[test]
    fn the_total_never_goes_down() {
        let mut u = Unobserved::new(&counts([[0, 0]; 4]), &counts([[0, 0]; 4]));
        let busy = u.update(
            &counts([[10, 0], [0, 0], [0, 0], [0, 0]]),
            &counts([[5, 0], [0, 0], [0, 0], [0, 0]]),
        );
        assert_eq!(busy[0], 5);
        // A read where the programs' side is ahead (runs made after the kernel's side was read)
        // takes nothing back.
        let later = u.update(
            &counts([[11, 0], [0, 0], [0, 0], [0, 0]]),
            &counts([[12, 0], [0, 0], [0, 0], [0, 0]]),
        );
        assert_eq!(later[0], 5);
    }
}
