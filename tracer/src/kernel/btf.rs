//! Struct member offsets and tracepoint prototypes from the running kernel's BTF: Rust eBPF has
//! no CO-RE relocations, so the programs get their offsets as globals at load time.
use std::cell::RefCell;
use std::path::Path;

use super::btf_types::{BtfTypes, Kind, Type};
use super::system::{KernelError, VMLINUX_BTF};
use tracer_common::KernelOffsets;

/// Where a struct member lives: its byte, and for bitfields the bit shift within that byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberOffset {
    pub byte: u32,
    pub bit_shift: u32,
    pub bits: Option<u32>,
}

/// The running kernel's type information.
pub struct KernelBtf {
    btf: BtfTypes,
    /// While `offsets_lenient` runs: the members not found, which then read as offset 0.
    misses: RefCell<Option<Vec<(String, String)>>>,
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf, KernelError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<KernelBtf, KernelError> {
        if !path.exists() {
            return Err(KernelError::NoBtf);
        }
        let bytes = std::fs::read(path)
            .map_err(|e| KernelError::BadBtf(format!("reading {}: {e}", path.display())))?;
        Self::parse(bytes)
    }

    /// Type information from a raw `.BTF` blob, e.g. one extracted from another kernel's image.
    pub fn from_bytes(bytes: &[u8]) -> Result<KernelBtf, KernelError> {
        Self::parse(bytes.to_vec())
    }

    fn parse(bytes: Vec<u8>) -> Result<KernelBtf, KernelError> {
        Ok(KernelBtf {
            btf: BtfTypes::parse(bytes).map_err(KernelError::BadBtf)?,
            misses: RefCell::default(),
        })
    }

    /// The types, for the compatibility checks (`compat`).
    pub(crate) fn types(&self) -> &BtfTypes {
        &self.btf
    }

    /// Offset of `path` (members separated by dots, e.g. `__sk_common.skc_daddr`) inside
    /// `struct outer`. Anonymous unions and structs are searched through, as C lets you name
    /// their members directly.
    pub fn member_offset(&self, outer: &str, path: &str) -> Result<MemberOffset, KernelError> {
        let found = self.resolve_member(outer, path);
        if let Err(KernelError::Missing(_)) = found
            && let Some(misses) = self.misses.borrow_mut().as_mut()
        {
            misses.push((outer.to_owned(), path.to_owned()));
            return Ok(MemberOffset {
                byte: 0,
                bit_shift: 0,
                bits: None,
            });
        }
        found
    }

    /// [`Self::offsets`], with every member the kernel lacks listed as `(struct, member path)`
    /// and read as 0 instead of failing: `compat` switches off the features that need them.
    pub fn offsets_lenient(&self) -> Result<(KernelOffsets, Vec<(String, String)>), KernelError> {
        *self.misses.borrow_mut() = Some(Vec::new());
        let offsets = self.offsets();
        let misses = self.misses.borrow_mut().take().unwrap_or_default();
        Ok((offsets?, misses))
    }

    fn resolve_member(&self, outer: &str, path: &str) -> Result<MemberOffset, KernelError> {
        let missing = || KernelError::Missing(format!("struct {outer} member {path}"));
        let mut current = self.struct_named(outer)?;
        let mut bits = 0u32;
        let mut bitfield = None;
        let mut parts = path.split('.').peekable();
        while let Some(name) = parts.next() {
            let (offset, member_type, size) =
                self.find_member(current, name, 0).ok_or_else(missing)?;
            bits += offset;
            bitfield = size;
            if parts.peek().is_some() {
                current = as_struct(member_type).ok_or_else(missing)?;
            }
        }
        Ok(MemberOffset {
            byte: bits / 8,
            bit_shift: bits % 8,
            bits: bitfield,
        })
    }

    /// BTF-typed tracepoint `name`'s typedef (`btf_trace_<name>`, a pointer to its function
    /// prototype) and that prototype.
    fn tracepoint(&self, name: &str) -> Option<(Type<'_>, Type<'_>)> {
        let typedef = format!("btf_trace_{name}");
        self.btf
            .named(&typedef)
            .filter(|ty| ty.kind() == Kind::Typedef)
            .find_map(|typedef| {
                let ptr = typedef.referenced().filter(|ty| ty.kind() == Kind::Ptr)?;
                let proto = ptr.referenced().filter(|ty| ty.kind() == Kind::FuncProto)?;
                Some((typedef, proto))
            })
    }

    /// The function prototype of BTF-typed tracepoint `name`.
    pub(crate) fn tracepoint_prototype(&self, name: &str) -> Option<Type<'_>> {
        self.tracepoint(name).map(|(_, proto)| proto)
    }

    /// The type id of tracepoint `name`'s typedef, which a `tp_btf` program is loaded against
    /// (its `attach_btf_id`): the one whose prototype the compatibility checks read.
    pub fn tracepoint_type_id(&self, name: &str) -> Option<u32> {
        self.tracepoint(name).map(|(typedef, _)| typedef.id())
    }

    /// Number of arguments the BTF-typed tracepoint `name` passes to a `tp_btf` program.
    pub fn tracepoint_arity(&self, name: &str) -> Result<usize, KernelError> {
        let proto = self
            .tracepoint_prototype(name)
            .ok_or_else(|| KernelError::NoTracepoint(name.to_owned()))?;
        // The first parameter is the tracepoint's private `void *__data`.
        Ok(proto.parameters().count().saturating_sub(1))
    }

    /// Names of the kernel's RST reasons (`enum sk_rst_reason`), by value, lower case without
    /// their `SK_RST_REASON_` prefix, e.g. `tcp_abort_on_data`. Empty where the kernel has none.
    pub fn rst_reasons(&self) -> std::collections::HashMap<u16, String> {
        let mut names = std::collections::HashMap::new();
        for ty in self.btf.named("sk_rst_reason") {
            if ty.kind() != Kind::Enum {
                continue;
            }
            for (name, value) in ty.enumerators() {
                let Ok(value) = u16::try_from(value) else {
                    continue;
                };
                let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(name);
                names.insert(value, short.to_ascii_lowercase());
            }
        }
        names
    }

    fn struct_named(&self, name: &str) -> Result<Type<'_>, KernelError> {
        self.btf
            .named(name)
            .find(|ty| ty.kind() == Kind::Struct && ty.members().next().is_some())
            .ok_or_else(|| KernelError::Missing(format!("struct {name}")))
    }

    /// Bit offset, type and bitfield size of member `name`, searching anonymous members
    /// (nested at most `MAX_DEPTH` deep, so that a corrupt file cannot recurse forever).
    fn find_member<'a>(
        &'a self,
        outer: Type<'a>,
        name: &str,
        depth: usize,
    ) -> Option<(u32, Type<'a>, Option<u32>)> {
        const MAX_DEPTH: usize = 16;
        for member in outer.members() {
            let member_type = self.btf.get(member.type_id)?;
            if member.name == name {
                return Some((member.bit_offset, member_type, member.bitfield_size));
            }
            if member.name.is_empty()
                && depth < MAX_DEPTH
                && let Some(inner) = as_struct(member_type)
                && let Some((offset, ty, size)) = self.find_member(inner, name, depth + 1)
            {
                return Some((member.bit_offset + offset, ty, size));
            }
        }
        None
    }

    /// Everything the kernel programs read, as one struct for their read-only data.
    pub fn offsets(&self) -> Result<KernelOffsets, KernelError> {
        let sock =
            |path: &str| -> Result<u32, KernelError> { Ok(self.member_offset("sock", path)?.byte) };
        let ca_state = self.member_offset("inet_connection_sock", "icsk_ca_state")?;
        let cb = self.member_offset("sk_buff", "cb")?.byte;
        let gso_segs = self.member_offset("tcp_skb_cb", "tcp_gso_segs")?.byte;
        let nonagle = self.member_offset("tcp_sock", "nonagle")?;
        let tcp = |path: &str| -> Result<u32, KernelError> {
            Ok(self.member_offset("tcp_sock", path)?.byte)
        };
        Ok(KernelOffsets {
            sk_cgroup: sock("sk_cgrp_data.cgroup")?,
            cgroup_kn: self.member_offset("cgroup", "kn")?.byte,
            kernfs_id: self.member_offset("kernfs_node", "id")?.byte,
            tcp_bytes_acked: tcp("bytes_acked")?,
            tcp_bytes_received: tcp("bytes_received")?,
            tcp_segs_in: tcp("segs_in")?,
            tcp_segs_out: tcp("segs_out")?,
            tcp_total_retrans: tcp("total_retrans")?,
            tcp_srtt_us: tcp("srtt_us")?,
            tcp_mdev_us: tcp("mdev_us")?,
            // `rtt_min.s[0].v`: the window's best sample.
            tcp_rtt_min: tcp("rtt_min.s")? + self.member_offset("minmax_sample", "v")?.byte,
            tcp_snd_cwnd: tcp("snd_cwnd")?,
            // `chrono_stat[TCP_CHRONO_RWND_LIMITED - 1]`, an array of u32.
            tcp_rwnd_limited: tcp("chrono_stat")? + 4,
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
            sock_head_standard: 0,
            head_copy_fits: 0,
            valid: 1,
        })
        .map(|mut off| {
            off.sock_head_standard = u32::from(
                (
                    off.skc_daddr,
                    off.skc_rcv_saddr,
                    off.skc_dport,
                    off.skc_num,
                    off.skc_family,
                    off.skc_state,
                ) == (0, 4, 12, 14, 16, 18),
            );
            off.head_copy_fits = u32::from(off.head_fits());
            off
        })
    }
}

/// Follows typedefs and qualifiers down to a struct or union.
fn as_struct(mut ty: Type<'_>) -> Option<Type<'_>> {
    for _ in 0..16 {
        ty = match ty.kind() {
            Kind::Struct | Kind::Union => return Some(ty),
            Kind::Typedef | Kind::Const | Kind::Volatile => ty.referenced()?,
            _ => return None,
        };
    }
    None
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
        assert_eq!(off.sock_head_standard, 1, "the word-load fast path applies");
        assert_eq!(off.valid, 1);
        assert_eq!(off.head_copy_fits, 1, "timewait heads are copied at once");
        // One member past the copied window turns the copy off.
        let past = KernelOffsets {
            tw_substate: tracer_common::SOCK_HEAD_BYTES,
            ..off
        };
        assert!(!past.head_fits());
        let last_byte = KernelOffsets {
            tw_substate: tracer_common::SOCK_HEAD_BYTES - 1,
            ..off
        };
        assert!(last_byte.head_fits());
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
