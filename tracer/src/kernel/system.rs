//! What the agent checks and reads on the host before loading anything: capabilities, tracefs,
//! the timer callbacks' addresses in kallsyms, and the TCP sysctls.
use std::io;
use std::path::Path;

use thiserror::Error;
use tracer_common::KernelSymbols;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub const TRACEFS: &str = "/sys/kernel/tracing";

pub const KALLSYMS: &str = "/proc/kallsyms";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "tracer must run as root or with CAP_BPF, CAP_PERFMON and CAP_SYSLOG: missing {0} (see deploy/systemd/tracer.service)"
    )]
    MissingCapabilities(String),
    #[error(
        "kernel BTF not found at {VMLINUX_BTF}: tracer needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf,
    #[error("cannot parse kernel BTF at {VMLINUX_BTF}: {0}")]
    BadBtf(String),
    #[error("kernel BTF has no {0}: this kernel is not supported")]
    Missing(String),
    #[error("tracepoint {0} not found in kernel BTF: this kernel lacks a tracepoint tracer needs")]
    NoTracepoint(String),
    #[error("cannot read {KALLSYMS}: {0}")]
    Kallsyms(io::Error),
    #[error(
        "kernel symbol {0} not found in {KALLSYMS} (or its address is hidden: check kernel.kptr_restrict)"
    )]
    NoSymbol(&'static str),
    #[error("cannot mount tracefs at {TRACEFS}: {0}")]
    Tracefs(io::Error),
}

/// A capability: its number in the kernel's bit sets and its name.
pub type Capability = (u32, &'static str);

pub const CAP_DAC_READ_SEARCH: Capability = (2, "CAP_DAC_READ_SEARCH");
pub const CAP_SYS_PTRACE: Capability = (19, "CAP_SYS_PTRACE");
pub const CAP_SYS_ADMIN: Capability = (21, "CAP_SYS_ADMIN");
pub const CAP_SYSLOG: Capability = (34, "CAP_SYSLOG");
pub const CAP_PERFMON: Capability = (38, "CAP_PERFMON");
pub const CAP_BPF: Capability = (39, "CAP_BPF");

/// Without these the agent cannot attach: loading tracing programs and the ring buffer
/// (CAP_BPF, CAP_PERFMON; CAP_SYS_ADMIN stands in for both, as on kernels before 5.8), and the
/// timer callbacks' addresses in kallsyms (CAP_SYSLOG).
pub const REQUIRED: &[Capability] = &[CAP_BPF, CAP_PERFMON, CAP_SYSLOG];

/// Without these the agent runs but sees less: other network namespaces (setns needs
/// CAP_SYS_ADMIN) and other users' processes (`/proc/PID/ns/net`, `/proc/PID/fd`).
pub const WANTED: &[(Capability, &str)] = &[
    (
        CAP_SYS_ADMIN,
        "sockets of other network namespaces are not listed (no seeding there)",
    ),
    (
        CAP_SYS_PTRACE,
        "other users' processes are not searched for namespaces and socket owners",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "other users' /proc/PID/fd are not searched for socket owners",
    ),
];

/// Fails unless the effective capabilities allow loading the programs (root has them all);
/// without this the kernel's answer is a confusing EPERM deep in the loader. Returns what is
/// missing of [`WANTED`], with what it costs, for the caller to log.
pub fn require_capabilities() -> Result<Vec<String>, KernelError> {
    let effective = effective_capabilities();
    let (missing, lacking) = check_capabilities(effective);
    if !missing.is_empty() {
        return Err(KernelError::MissingCapabilities(missing.join(", ")));
    }
    Ok(lacking)
}

/// The calling thread's effective set (`CapEff` in `/proc/thread-self/status`); empty when it
/// cannot be read, so that the check fails with the names rather than passes.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let hex = line.strip_prefix("CapEff:")?.trim();
                u64::from_str_radix(hex, 16).ok()
            })
        })
        .unwrap_or(0)
}

/// The required capabilities missing from `effective`, and the wanted ones missing with their
/// cost.
fn check_capabilities(effective: u64) -> (Vec<&'static str>, Vec<String>) {
    let has = |(bit, _): Capability| effective & (1 << bit) != 0;
    let missing = REQUIRED
        .iter()
        .filter(|&&cap| {
            let stand_in = cap != CAP_SYSLOG && has(CAP_SYS_ADMIN);
            !has(cap) && !stand_in
        })
        .map(|(_, name)| *name)
        .collect();
    let lacking = WANTED
        .iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|((_, name), cost)| format!("no {name}: {cost}"))
        .collect();
    (missing, lacking)
}

/// Mounts tracefs where it is missing (fresh machines do not mount it). `tp_btf` programs do
/// not need it, but operators and the classic tracepoint formats do.
pub fn ensure_tracefs() -> Result<bool, KernelError> {
    if Path::new(TRACEFS).join("events").exists() || tracefs_in_mounts() {
        return Ok(false);
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call and the
    // data argument is null, which tracefs accepts.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(KernelError::Tracefs(io::Error::last_os_error()));
    }
    Ok(true)
}

/// Whether tracefs is mounted at [`TRACEFS`] even if this user cannot look inside (it is
/// root's, mode 0700): without CAP_DAC_READ_SEARCH, `events` cannot be seen.
fn tracefs_in_mounts() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_ascii_whitespace().skip(1);
            fields.next() == Some(TRACEFS) && fields.next() == Some("tracefs")
        })
    })
}

/// Addresses of the timer callbacks the timer programs filter on.
pub fn symbols() -> Result<KernelSymbols, KernelError> {
    let text = std::fs::read_to_string(KALLSYMS).map_err(KernelError::Kallsyms)?;
    symbols_from(&text)
}

fn symbols_from(kallsyms: &str) -> Result<KernelSymbols, KernelError> {
    let find = |wanted: &'static str| -> Result<u64, KernelError> {
        kallsyms
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_ascii_whitespace();
                let address = fields.next()?;
                let _kind = fields.next()?;
                let name = fields.next()?;
                // Module symbols carry a fourth field; these callbacks are built in.
                (name == wanted && fields.next().is_none()).then_some(address)
            })
            .find_map(|address| u64::from_str_radix(address, 16).ok())
            .filter(|&address| address != 0)
            .ok_or(KernelError::NoSymbol(wanted))
    };
    Ok(KernelSymbols {
        tw_timer_handler: find("tw_timer_handler")?,
        tcp_delack_timer: find("tcp_delack_timer")?,
    })
}

/// The sysctls that govern TIME_WAIT and ephemeral ports, in the agent's network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSysctls {
    pub tcp_tw_reuse: Option<i64>,
    pub tcp_max_tw_buckets: Option<i64>,
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub ip_local_port_range: Option<(u16, u16)>,
}

impl TcpSysctls {
    pub fn read() -> TcpSysctls {
        let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok();
        let number = |name: &str| read(name)?.trim().parse::<i64>().ok();
        TcpSysctls {
            tcp_tw_reuse: number("tcp_tw_reuse"),
            tcp_max_tw_buckets: number("tcp_max_tw_buckets"),
            ip_local_port_range: read("ip_local_port_range")
                .and_then(|text| parse_port_range(&text)),
        }
    }

    pub fn port_range_size(&self) -> Option<u32> {
        let (low, high) = self.ip_local_port_range?;
        (high >= low).then(|| u32::from(high - low) + 1)
    }
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_ascii_whitespace();
    let low = fields.next()?.parse().ok()?;
    let high = fields.next()?.parse().ok()?;
    Some((low, high))
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn capabilities_name_what_is_missing() {
        let all = u64::MAX;
        assert_eq!(check_capabilities(all), (vec![], vec![]));
        let (missing, lacking) = check_capabilities(0);
        assert_eq!(missing, ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG"]);
        assert_eq!(lacking.len(), WANTED.len());
        let bit = |(bit, _): Capability| 1u64 << bit;
        // CAP_SYS_ADMIN covers loading programs, not the kallsyms addresses.
        let (missing, lacking) = check_capabilities(bit(CAP_SYS_ADMIN));
        assert_eq!(missing, ["CAP_SYSLOG"]);
        assert_eq!(lacking.len(), 2);
        let documented = bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_SYSLOG);
        assert_eq!(check_capabilities(documented).0, Vec::<&str>::new());
        let message = KernelError::MissingCapabilities("CAP_BPF".into()).to_string();
        assert!(
            message.contains("root") && message.contains("CAP_PERFMON"),
            "{message}"
        );
    }

    #[test]
    fn kallsyms_parsing_finds_built_in_callbacks_only() {
        let text = "ffffffff820089f0 t tw_timer_handler\n\
                    ffffffffc0001000 t tw_timer_handler\t[some_module]\n\
                    ffffffff8202e460 t tcp_delack_timer\n";
        let symbols = symbols_from(text).expect("symbol");
        assert_eq!(symbols.tw_timer_handler, 0xffff_ffff_8200_89f0);
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert!(matches!(
            symbols_from(hidden),
            Err(KernelError::NoSymbol(_))
        ));
    }

    #[test]
    fn port_range_parses_and_sizes() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("garbage"), None);
        let sysctls = TcpSysctls {
            ip_local_port_range: Some((32768, 60999)),
            ..TcpSysctls::default()
        };
        assert_eq!(sysctls.port_range_size(), Some(28232));
        let live = TcpSysctls::read();
        assert!(live.ip_local_port_range.is_some() && live.tcp_tw_reuse.is_some());
    }
}
