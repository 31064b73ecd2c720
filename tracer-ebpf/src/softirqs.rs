//! Counts the softirq runs the programs see. Some kernels run a whole softirq without any BPF
//! program (seen on 6.18: every run on top of one particular task, whose own events tracing
//! does not see either), and nothing counts the events lost then. The agent compares these
//! counts with the kernel's (`/proc/softirqs`) to count such runs instead.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::maps;

#[btf_tracepoint(function = "softirq_entry")]
pub fn softirq_entry(ctx: BtfTracePointContext) -> i32 {
    let vector: u32 = ctx.arg(0);
    if let Some(counter) = maps::SOFTIRQS.get_ptr_mut(vector) {
        // SAFETY: a pointer from the lookup of an existing index, valid for the program's run;
        // only this program writes the array, and it does not nest with itself on a CPU.
        unsafe { *counter += 1 };
    }
    0
}
