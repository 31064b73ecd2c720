//! Getting the timewait exits each CPU holds (`TW_EXIT_BATCH`) into the ring: the agent runs
//! the never-attached `tw_exit_flush` program on every online CPU with `BPF_PROG_TEST_RUN`.
//! On another CPU the kernel runs it from an interrupt, between any two of that CPU's timer
//! programs (they run with interrupts off), so once every CPU has run it, every exit before
//! that moment is in the ring.
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_F_TEST_RUN_ON_CPU`: run on `cpu` rather than where the caller runs.
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so that it is zero: the kernel refuses non-zero bytes past the last field.
    _pad: u32,
}

/// The loaded `tw_exit_flush` program.
pub struct ExitFlush {
    program: OwnedFd,
}

impl ExitFlush {
    pub fn new(program: OwnedFd) -> ExitFlush {
        ExitFlush { program }
    }

    /// Runs the program on every online CPU. On a failure, or a CPU whose batch the full ring
    /// could not take, the exits not sent wait for the next flush, and the caller must not
    /// count them as read.
    pub fn run(&self) -> io::Result<()> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
        // Every CPU, even past a failure: a CPU's batch left unsent holds back no other.
        let mut outcome = Ok(());
        for cpu in cpus {
            if let Err(e) = self.run_on(cpu) {
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }

    fn run_on(&self, cpu: u32) -> io::Result<()> {
        let fd = self.program.as_fd().as_raw_fd();
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
            flags: BPF_F_TEST_RUN_ON_CPU,
            cpu,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is the `test` member of `union bpf_attr` with every field set, no
        // buffers (all sizes 0), and outlives the call; the kernel writes only `retval`,
        // `duration` and the output sizes into it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                std::ptr::from_mut(&mut attr),
                size_of::<TestRunAttr>(),
            )
        };
        if ret != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!("running tw_exit_flush on CPU {cpu}: {error}"),
            ));
        }
        if attr.retval != 0 {
            return Err(io::Error::other(format!(
                "the ring buffer was full when CPU {cpu}'s timewait exits were flushed (they are \
                 kept for the next flush)"
            )));
        }
        Ok(())
    }
}
