//! What the agent learns from the running kernel before loading anything: privileges, struct
//! member offsets from BTF (Rust eBPF has no CO-RE), tracepoint prototypes, and tracefs.
use std::io;
use std::path::Path;

use btf_rs::{Btf, Type};
use thiserror::Error;
use tracer_common::{KernelOffsets, KernelSymbols};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const KALLSYMS: &str = "/proc/kallsyms";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("tracer must run as root (it loads eBPF programs and reads kernel BTF)")]
    NotRoot,
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

/// Fails unless the effective user is root: loading programs needs CAP_BPF and CAP_PERFMON,
/// and the kernel's answer without them is a confusing EPERM deep in the loader.
pub fn require_root() -> Result<(), KernelError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(KernelError::NotRoot);
    }
    Ok(())
}

/// Mounts tracefs where it is missing (fresh machines do not mount it). `tp_btf` programs do
/// not need it, but operators and the classic tracepoint formats do.
pub fn ensure_tracefs() -> Result<bool, KernelError> {
    if Path::new(TRACEFS).join("events").exists() {
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

/// Where a struct member lives: its byte, and for bitfields the bit shift within that byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberOffset {
    pub byte: u32,
    pub bit_shift: u32,
    pub bits: Option<u32>,
}

/// The running kernel's type information.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf, KernelError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<KernelBtf, KernelError> {
        if !path.exists() {
            return Err(KernelError::NoBtf);
        }
        let btf = Btf::from_file(path).map_err(|e| KernelError::BadBtf(e.to_string()))?;
        Ok(KernelBtf { btf })
    }

    /// Offset of `path` (members separated by dots, e.g. `__sk_common.skc_daddr`) inside
    /// `struct outer`. Anonymous unions and structs are searched through, as C lets you name
    /// their members directly.
    pub fn member_offset(&self, outer: &str, path: &str) -> Result<MemberOffset, KernelError> {
        let missing = || KernelError::Missing(format!("struct {outer} member {path}"));
        let mut current = self.struct_named(outer)?;
        let mut bits = 0u32;
        let mut bitfield = None;
        let mut parts = path.split('.').peekable();
        while let Some(name) = parts.next() {
            let (offset, member_type, size) =
                self.find_member(&current, name)?.ok_or_else(missing)?;
            bits += offset;
            bitfield = size;
            if parts.peek().is_some() {
                current = self.as_struct(member_type).ok_or_else(missing)?;
            }
        }
        Ok(MemberOffset {
            byte: bits / 8,
            bit_shift: bits % 8,
            bits: bitfield,
        })
    }

    /// Number of arguments the BTF-typed tracepoint `name` passes to a `tp_btf` program.
    pub fn tracepoint_arity(&self, name: &str) -> Result<usize, KernelError> {
        let missing = || KernelError::NoTracepoint(name.to_owned());
        let typedef = format!("btf_trace_{name}");
        let types = self
            .btf
            .resolve_types_by_name(&typedef)
            .map_err(|_| missing())?;
        for ty in types {
            let Type::Typedef(td) = ty else { continue };
            let Ok(Type::Ptr(ptr)) = self.btf.resolve_chained_type(&td) else {
                continue;
            };
            if let Ok(Type::FuncProto(proto)) = self.btf.resolve_chained_type(&ptr) {
                // The first parameter is the tracepoint's private `void *__data`.
                return Ok(proto.parameters.len().saturating_sub(1));
            }
        }
        Err(missing())
    }

    /// Names of the kernel's RST reasons (`enum sk_rst_reason`), by value, lower case without
    /// their `SK_RST_REASON_` prefix, e.g. `tcp_abort_on_data`. Empty where the kernel has none.
    pub fn rst_reasons(&self) -> std::collections::HashMap<u16, String> {
        let mut names = std::collections::HashMap::new();
        let Ok(types) = self.btf.resolve_types_by_name("sk_rst_reason") else {
            return names;
        };
        for ty in types {
            let Type::Enum(e) = ty else { continue };
            for member in &e.members {
                let (Ok(name), Ok(value)) =
                    (self.btf.resolve_name(member), u16::try_from(member.val()))
                else {
                    continue;
                };
                let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(&name);
                names.insert(value, short.to_ascii_lowercase());
            }
        }
        names
    }

    fn struct_named(&self, name: &str) -> Result<btf_rs::Struct, KernelError> {
        let missing = || KernelError::Missing(format!("struct {name}"));
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| missing())?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(missing)
    }

    /// Follows typedefs and qualifiers down to a struct or union.
    fn as_struct(&self, mut ty: Type) -> Option<btf_rs::Struct> {
        for _ in 0..16 {
            ty = match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Const(t) => self.btf.resolve_chained_type(&t).ok()?,
                Type::Volatile(t) => self.btf.resolve_chained_type(&t).ok()?,
                _ => return None,
            };
        }
        None
    }

    /// Bit offset, type and bitfield size of member `name`, searching anonymous members.
    fn find_member(
        &self,
        outer: &btf_rs::Struct,
        name: &str,
    ) -> Result<Option<(u32, Type, Option<u32>)>, KernelError> {
        for member in &outer.members {
            let member_name = self
                .btf
                .resolve_name(member)
                .map_err(|e| KernelError::BadBtf(e.to_string()))?;
            let member_type = self
                .btf
                .resolve_chained_type(member)
                .map_err(|e| KernelError::BadBtf(e.to_string()))?;
            if member_name == name {
                return Ok(Some((
                    member.bit_offset(),
                    member_type,
                    member.bitfield_size(),
                )));
            }
            if member_name.is_empty()
                && let Some(inner) = self.as_struct(member_type)
                && let Some((offset, ty, size)) = self.find_member(&inner, name)?
            {
                return Ok(Some((member.bit_offset() + offset, ty, size)));
            }
        }
        Ok(None)
    }

    /// Everything the kernel programs read, as one struct for their read-only data.
    pub fn offsets(&self) -> Result<KernelOffsets, KernelError> {
        let sock =
            |path: &str| -> Result<u32, KernelError> { Ok(self.member_offset("sock", path)?.byte) };
        let ca_state = self.member_offset("inet_connection_sock", "icsk_ca_state")?;
        let cb = self.member_offset("sk_buff", "cb")?.byte;
        let gso_segs = self.member_offset("tcp_skb_cb", "tcp_gso_segs")?.byte;
        let nonagle = self.member_offset("tcp_sock", "nonagle")?;
        Ok(KernelOffsets {
            skc_daddr: sock("__sk_common.skc_daddr")?,
            skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr")?,
            skc_dport: sock("__sk_common.skc_dport")?,
            skc_num: sock("__sk_common.skc_num")?,
            skc_family: sock("__sk_common.skc_family")?,
            skc_v6_daddr: sock("__sk_common.skc_v6_daddr")?,
            skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr")?,
            skc_net: sock("__sk_common.skc_net")?,
            skc_state: sock("__sk_common.skc_state")?,
            net_ns_inum: self.member_offset("net", "ns.inum")?.byte,
            sk_protocol: sock("sk_protocol")?,
            icsk_ca_state_byte: ca_state.byte,
            icsk_ca_state_shift: ca_state.bit_shift,
            skb_tcp_gso_segs: cb + gso_segs,
            timer_function: self.member_offset("timer_list", "function")?.byte,
            tw_timer: self.member_offset("inet_timewait_sock", "tw_timer")?.byte,
            tw_substate: self
                .member_offset("inet_timewait_sock", "tw_substate")?
                .byte,
            timer_expires: self.member_offset("timer_list", "expires")?.byte,
            icsk_delack_timer: self
                .member_offset("inet_connection_sock", "icsk_delack_timer")?
                .byte,
            icsk_ack_pending: self
                .member_offset("inet_connection_sock", "icsk_ack.pending")?
                .byte,
            icsk_ack_pingpong: self
                .member_offset("inet_connection_sock", "icsk_ack.pingpong")?
                .byte,
            tcp_nonagle_byte: nonagle.byte,
            tcp_nonagle_shift: nonagle.bit_shift,
            tcp_packets_out: self.member_offset("tcp_sock", "packets_out")?.byte,
            tcp_mss_cache: self.member_offset("tcp_sock", "mss_cache")?.byte,
            msghdr_left: self.member_offset("msghdr", "msg_iter")?.byte
                + self.member_offset("iov_iter", "count")?.byte,
            valid: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> KernelBtf {
        KernelBtf::load().expect("these tests read the running kernel's BTF and need it present")
    }

    // The layout of sock_common's start has been stable for a decade; these are the values the
    // kernel's own headers give on x86_64 and they anchor the recursive search.
    #[test]
    fn sock_common_offsets_match_the_kernel_layout() {
        let off = kernel().offsets().expect("offsets");
        assert_eq!(off.skc_daddr, 0);
        assert_eq!(off.skc_rcv_saddr, 4);
        assert_eq!(off.skc_dport, 12);
        assert_eq!(off.skc_num, 14);
        assert_eq!(off.skc_family, 16);
        assert_eq!(off.skc_state, 18);
        assert_eq!(off.valid, 1);
    }

    #[test]
    fn deeper_offsets_are_inside_their_structs() {
        let off = kernel().offsets().expect("offsets");
        // skc_v6 addresses sit inside sock_common, sk_protocol and icsk fields after it.
        assert!(off.skc_v6_daddr > off.skc_state && off.skc_v6_daddr < 136);
        assert_eq!(off.skc_v6_rcv_saddr, off.skc_v6_daddr + 16);
        assert!(off.sk_protocol >= 136);
        assert!(off.icsk_ca_state_byte > off.sk_protocol);
        assert!(off.icsk_ca_state_shift < 8);
        assert!(off.skb_tcp_gso_segs >= 8);
    }

    #[test]
    fn bitfield_offset_is_reported_in_bits() {
        let ca = kernel()
            .member_offset("inet_connection_sock", "icsk_ca_state")
            .expect("icsk_ca_state");
        assert_eq!(ca.bits, Some(5));
    }

    #[test]
    fn tracepoint_arity_comes_from_btf() {
        let k = kernel();
        assert_eq!(k.tracepoint_arity("inet_sock_set_state").expect("tp"), 3);
        assert_eq!(k.tracepoint_arity("tcp_receive_reset").expect("tp"), 1);
        assert!(k.tracepoint_arity("tcp_retransmit_skb").expect("tp") >= 2);
        assert!(matches!(
            k.tracepoint_arity("no_such_tracepoint"),
            Err(KernelError::NoTracepoint(_))
        ));
    }

    #[test]
    fn timer_offsets_place_the_timewait_timer_after_sock_common() {
        let k = kernel();
        let off = k.offsets().expect("offsets");
        let sock_common = k
            .member_offset("inet_timewait_sock", "__tw_common")
            .expect("common");
        assert_eq!(
            sock_common.byte, 0,
            "a timewait socket starts with its sock_common"
        );
        assert!(off.tw_timer > off.skc_v6_rcv_saddr);
        assert!(off.tw_substate > 0);
        assert!(off.timer_function > 0 && off.timer_function < 64);
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
        assert!(
            super::symbols()
                .expect("the running kernel's kallsyms")
                .tw_timer_handler
                != 0
        );
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

    #[test]
    fn rst_reasons_are_named_from_btf() {
        let reasons = kernel().rst_reasons();
        assert_eq!(reasons.get(&1).map(String::as_str), Some("no_socket"));
        assert!(reasons.values().any(|r| r == "tcp_abort_on_data"));
    }

    #[test]
    fn missing_or_corrupt_btf_is_a_clear_error() {
        let missing = KernelBtf::from_file(Path::new("/nonexistent/vmlinux"));
        assert!(matches!(missing, Err(KernelError::NoBtf)));
        let garbage = std::env::temp_dir().join(format!("tracer-bad-btf-{}", std::process::id()));
        std::fs::write(&garbage, b"not BTF at all").expect("write");
        let corrupt = KernelBtf::from_file(&garbage);
        let _ = std::fs::remove_file(&garbage);
        let err = corrupt.err().expect("garbage is not BTF");
        assert!(matches!(err, KernelError::BadBtf(_)), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn unknown_members_are_a_clear_error() {
        let err = kernel()
            .member_offset("sock", "no_such_member")
            .expect_err("missing member");
        assert!(err.to_string().contains("no_such_member"));
    }
}
