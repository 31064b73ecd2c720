//! What this kernel can run, decided from its BTF before anything loads: for each tracepoint the
//! program variant whose argument list matches the kernel's `btf_trace_<name>` prototype, and for
//! each feature whether its tracepoints and struct members exist. A required feature that cannot
//! run is a one-line error naming the kernel and what it lacks; an optional one is switched off
//! (logged, and shown as `tracer_feature_enabled{feature} 0`) so that older kernels still run
//! everything else.
use std::fmt;

use thiserror::Error;
use tracer_common::{KernelOffsets, KernelSymbols};

use super::btf::KernelBtf;
use super::btf_types::{Kind, Type};
use super::system::KernelError;

/// One program built for a tracepoint, and the argument list it was written for.
#[derive(Debug)]
pub struct Variant {
    pub program: &'static str,
    /// The tracepoint's arguments after its private `void *__data`, with `const` / `volatile`
    /// dropped and typedef names kept (e.g. `struct sock *`, `int`, `enum sk_rst_reason`).
    pub args: &'static [&'static str],
    /// The program reads only these leading arguments and means the same whatever follows
    /// (the timer tracepoints have gained and lost trailing arguments over the years).
    pub prefix: bool,
}

/// A tracepoint and its program variants, preferred first.
#[derive(Debug)]
pub struct Hook {
    pub tracepoint: &'static str,
    pub variants: &'static [Variant],
}

/// Something the agent reports, what it needs, and whether it can run without it.
#[derive(Debug)]
pub struct Feature {
    /// The `feature` label of `tracer_feature_enabled`.
    pub name: &'static str,
    pub required: bool,
    /// What is lost when it is off, for the log line.
    pub loss: &'static str,
    pub hooks: &'static [&'static Hook],
    /// `(struct, member path)` the programs read for it (see `KernelBtf::offsets`).
    pub members: &'static [(&'static str, &'static str)],
}

const SOCK: &str = "struct sock *";
const SKB: &str = "struct sk_buff *";
const TIMER: &str = "struct timer_list *";

pub static INET_SOCK_SET_STATE: Hook = Hook {
    tracepoint: "inet_sock_set_state",
    variants: &[Variant {
        program: "inet_sock_set_state",
        args: &[SOCK, "int", "int"],
        prefix: false,
    }],
};

pub static TCP_RETRANSMIT_SKB: Hook = Hook {
    tracepoint: "tcp_retransmit_skb",
    variants: &[
        // Kernels newer than 6.12 also fire for failed attempts and pass the error (Debian's
        // 6.12 still has the two-argument form).
        Variant {
            program: "tcp_retransmit_skb",
            args: &[SOCK, SKB, "int"],
            prefix: false,
        },
        Variant {
            program: "tcp_retransmit_skb_noerr",
            args: &[SOCK, SKB],
            prefix: false,
        },
    ],
};

pub static TCP_RETRANSMIT_SYNACK: Hook = Hook {
    tracepoint: "tcp_retransmit_synack",
    variants: &[Variant {
        program: "tcp_retransmit_synack",
        args: &[SOCK, "struct request_sock *"],
        prefix: false,
    }],
};

pub static TCP_RECEIVE_RESET: Hook = Hook {
    tracepoint: "tcp_receive_reset",
    variants: &[Variant {
        program: "tcp_receive_reset",
        args: &[SOCK],
        prefix: false,
    }],
};

pub static TCP_SEND_RESET: Hook = Hook {
    tracepoint: "tcp_send_reset",
    variants: &[
        // 6.10 and later say why (`enum sk_rst_reason`).
        Variant {
            program: "tcp_send_reset",
            args: &[SOCK, SKB, "enum sk_rst_reason"],
            prefix: false,
        },
        Variant {
            program: "tcp_send_reset_noreason",
            args: &[SOCK, SKB],
            prefix: false,
        },
    ],
};

pub static TCP_SENDMSG_LOCKED: Hook = Hook {
    tracepoint: "tcp_sendmsg_locked",
    variants: &[Variant {
        program: "tcp_sendmsg_locked",
        args: &[SOCK, "struct msghdr *", SKB, "int"],
        prefix: false,
    }],
};

pub static TIMER_START: Hook = Hook {
    tracepoint: "timer_start",
    variants: &[Variant {
        program: "timer_start",
        args: &[TIMER],
        prefix: true,
    }],
};

pub static TIMER_CANCEL: Hook = Hook {
    tracepoint: "timer_cancel",
    variants: &[Variant {
        program: "timer_cancel",
        args: &[TIMER],
        prefix: true,
    }],
};

pub static TIMER_EXPIRE_ENTRY: Hook = Hook {
    tracepoint: "timer_expire_entry",
    variants: &[Variant {
        program: "timer_expire_entry",
        args: &[TIMER],
        prefix: true,
    }],
};

/// Not attached yet (no feature claims it); listed so that its prototype is checked on every
/// kernel we test. A feature that uses it adds it to its `hooks`.
pub static TCP_DESTROY_SOCK: Hook = Hook {
    tracepoint: "tcp_destroy_sock",
    variants: &[Variant {
        program: "tcp_destroy_sock",
        args: &[SOCK],
        prefix: false,
    }],
};

pub static TCP_CONG_STATE_SET: Hook = Hook {
    tracepoint: "tcp_cong_state_set",
    variants: &[Variant {
        program: "tcp_cong_state_set",
        args: &[SOCK, "u8"],
        prefix: false,
    }],
};

/// Every hook this module knows, attached or not.
pub static HOOKS: &[&Hook] = &[
    &INET_SOCK_SET_STATE,
    &TCP_RETRANSMIT_SKB,
    &TCP_RETRANSMIT_SYNACK,
    &TCP_RECEIVE_RESET,
    &TCP_SEND_RESET,
    &TCP_SENDMSG_LOCKED,
    &TIMER_START,
    &TIMER_CANCEL,
    &TIMER_EXPIRE_ENTRY,
    &TCP_DESTROY_SOCK,
    &TCP_CONG_STATE_SET,
];

/// The feature whose absence stops the agent; every other one degrades.
pub const LIFECYCLE: &str = "lifecycle";
/// On when `tcp_send_reset` says why a RST was sent (6.10 and later).
pub const RST_REASONS: &str = "rst_reasons";

/// What the agent does with each hook. Members not listed under any feature are treated as
/// required: a new offset stops the agent on a kernel that lacks it until it is listed here.
pub static FEATURES: &[Feature] = &[
    Feature {
        name: LIFECYCLE,
        required: true,
        loss: "connection states",
        hooks: &[&INET_SOCK_SET_STATE],
        members: &[
            ("sock", "__sk_common.skc_daddr"),
            ("sock", "__sk_common.skc_rcv_saddr"),
            ("sock", "__sk_common.skc_dport"),
            ("sock", "__sk_common.skc_num"),
            ("sock", "__sk_common.skc_family"),
            ("sock", "__sk_common.skc_v6_daddr"),
            ("sock", "__sk_common.skc_v6_rcv_saddr"),
            ("sock", "__sk_common.skc_net"),
            ("sock", "__sk_common.skc_state"),
            ("net", "ns.inum"),
            ("sock", "sk_protocol"),
        ],
    },
    Feature {
        name: "retransmits",
        required: false,
        loss: "retransmitted segments are not counted",
        hooks: &[&TCP_RETRANSMIT_SKB],
        members: &[
            ("sk_buff", "cb"),
            ("tcp_skb_cb", "tcp_gso_segs"),
            ("inet_connection_sock", "icsk_ca_state"),
        ],
    },
    Feature {
        name: "synack_retransmits",
        required: false,
        loss: "SYN-ACK retransmits are not counted",
        hooks: &[&TCP_RETRANSMIT_SYNACK],
        members: &[],
    },
    Feature {
        name: "resets_received",
        required: false,
        loss: "RSTs received are not counted",
        hooks: &[&TCP_RECEIVE_RESET],
        members: &[],
    },
    Feature {
        name: "resets_sent",
        required: false,
        loss: "RSTs sent are not counted",
        hooks: &[&TCP_SEND_RESET],
        members: &[],
    },
    Feature {
        name: "nagle",
        required: false,
        loss: "writes held back by Nagle are not seen",
        hooks: &[&TCP_SENDMSG_LOCKED],
        members: &[
            ("tcp_sock", "nonagle"),
            ("tcp_sock", "packets_out"),
            ("tcp_sock", "mss_cache"),
            ("msghdr", "msg_iter"),
            ("iov_iter", "count"),
        ],
    },
    Feature {
        name: "time_wait",
        required: false,
        loss: "TIME_WAIT sockets are not followed",
        hooks: &[&TIMER_START, &TIMER_CANCEL, &TIMER_EXPIRE_ENTRY],
        members: &[
            ("timer_list", "function"),
            ("inet_timewait_sock", "tw_timer"),
            ("inet_timewait_sock", "tw_substate"),
        ],
    },
    Feature {
        name: "connection_cost",
        required: false,
        loss: "bytes, segments, RTT and window of each connection are not reported",
        hooks: &[],
        members: &[
            ("tcp_sock", "bytes_acked"),
            ("tcp_sock", "bytes_received"),
            ("tcp_sock", "segs_in"),
            ("tcp_sock", "segs_out"),
            ("tcp_sock", "total_retrans"),
            ("tcp_sock", "srtt_us"),
            ("tcp_sock", "mdev_us"),
            ("tcp_sock", "rtt_min.s"),
            ("minmax_sample", "v"),
            ("tcp_sock", "snd_cwnd"),
            ("tcp_sock", "chrono_stat"),
        ],
    },
    Feature {
        name: "congestion_states",
        required: false,
        loss: "the congestion states a connection went through are not reported",
        hooks: &[&TCP_CONG_STATE_SET],
        members: &[("tcp_sock", "snd_cwnd")],
    },
    Feature {
        name: "workload",
        required: false,
        loss: "connections are not attributed to their cgroup (service, container, pod)",
        hooks: &[],
        members: &[
            ("sock", "sk_cgrp_data.cgroup"),
            ("cgroup", "kn"),
            ("kernfs_node", "id"),
        ],
    },
    Feature {
        name: "delayed_ack",
        required: false,
        loss: "delayed ACKs are not seen",
        hooks: &[&TIMER_START, &TIMER_EXPIRE_ENTRY],
        members: &[
            ("timer_list", "function"),
            ("timer_list", "expires"),
            ("inet_connection_sock", "icsk_delack_timer"),
            ("inet_connection_sock", "icsk_ack.pending"),
            ("inet_connection_sock", "icsk_ack.pingpong"),
        ],
    },
];

#[derive(Debug, Error)]
pub enum CompatError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("kernel {kernel} is not supported: {feature} needs {missing}")]
    Unsupported {
        kernel: String,
        feature: &'static str,
        missing: String,
    },
}

/// Why a hook cannot be used on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookProblem {
    /// No `btf_trace_<name>`: the kernel has no such tracepoint.
    Absent,
    /// The tracepoint exists with an argument list no program variant was written for.
    Unknown(Vec<String>),
}

impl fmt::Display for HookProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookProblem::Absent => f.write_str("is absent"),
            HookProblem::Unknown(args) => write!(f, "has unknown arguments ({})", args.join(", ")),
        }
    }
}

/// A feature's verdict on this kernel: `missing` is empty when it runs.
#[derive(Clone, Debug)]
pub struct FeatureState {
    pub name: &'static str,
    pub required: bool,
    pub loss: &'static str,
    pub missing: Vec<String>,
}

impl FeatureState {
    pub fn enabled(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Everything decided for one kernel.
#[derive(Clone, Debug)]
pub struct Compat {
    /// The kernel's release, for messages.
    pub kernel: String,
    /// Each known tracepoint's matching program, or why none matches.
    pub hooks: Vec<(&'static str, Result<&'static str, HookProblem>)>,
    pub features: Vec<FeatureState>,
    /// Offsets for the programs; those of switched-off features are 0 and unused.
    pub offsets: KernelOffsets,
    /// `(struct, member)` the kernel lacks, of all the agent reads.
    pub missing_members: Vec<(String, String)>,
}

impl Compat {
    /// Decides for the kernel described by `btf`; `kernel` names it in messages (its release).
    pub fn check(btf: &KernelBtf, kernel: &str) -> Result<Compat, CompatError> {
        let hooks: Vec<_> = HOOKS
            .iter()
            .map(|hook| (hook.tracepoint, choose(btf, hook)))
            .collect();
        let (offsets, missing_members) = btf.offsets_lenient()?;
        let chosen = |tracepoint: &str| {
            hooks
                .iter()
                .find(|(tp, _)| *tp == tracepoint)
                .map(|(_, choice)| choice.clone())
        };
        let mut features = Vec::with_capacity(FEATURES.len() + 1);
        for feature in FEATURES {
            let mut missing = Vec::new();
            for hook in feature.hooks {
                if let Some(Err(problem)) = chosen(hook.tracepoint) {
                    missing.push(format!("tracepoint {} (it {problem})", hook.tracepoint));
                }
            }
            for (outer, path) in &missing_members {
                if feature.members.iter().any(|(o, p)| o == outer && p == path) {
                    missing.push(format!("struct {outer} member {path}"));
                }
            }
            features.push(FeatureState {
                name: feature.name,
                required: feature.required,
                loss: feature.loss,
                missing,
            });
        }
        // A member no feature claims is read by code that always runs.
        let unclaimed: Vec<String> = missing_members
            .iter()
            .filter(|(outer, path)| {
                !FEATURES
                    .iter()
                    .any(|f| f.members.iter().any(|(o, p)| o == outer && p == path))
            })
            .map(|(outer, path)| format!("struct {outer} member {path}"))
            .collect();
        if !unclaimed.is_empty() {
            return Err(CompatError::Unsupported {
                kernel: kernel.to_owned(),
                feature: LIFECYCLE,
                missing: unclaimed.join(", "),
            });
        }
        if let Some(failed) = features.iter().find(|f| f.required && !f.enabled()) {
            return Err(CompatError::Unsupported {
                kernel: kernel.to_owned(),
                feature: failed.name,
                missing: failed.missing.join(", "),
            });
        }
        let reasons = matches!(
            chosen(TCP_SEND_RESET.tracepoint),
            Some(Ok("tcp_send_reset"))
        );
        features.push(FeatureState {
            name: RST_REASONS,
            required: false,
            loss: "RSTs sent are counted without the kernel's reason",
            missing: if reasons {
                Vec::new()
            } else {
                vec!["tracepoint tcp_send_reset with its reason argument (6.10 and later)".into()]
            },
        });
        Ok(Compat {
            kernel: kernel.to_owned(),
            hooks,
            features,
            offsets,
            missing_members,
        })
    }

    /// Whether feature `name` runs on this kernel.
    pub fn enabled(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.enabled())
    }

    /// The program to attach to `tracepoint`: `Some(Some(program))`, `Some(None)` when it
    /// cannot run here or every feature that needs it is off, and `None` for a tracepoint no
    /// feature claims (the caller keeps its own program for it).
    pub fn program_for(&self, tracepoint: &str) -> Option<Option<&'static str>> {
        let (_, choice) = self.hooks.iter().find(|(tp, _)| *tp == tracepoint)?;
        let mut claimed = FEATURES
            .iter()
            .filter(|f| f.hooks.iter().any(|h| h.tracepoint == tracepoint))
            .peekable();
        claimed.peek()?;
        let wanted = claimed.any(|f| self.enabled(f.name));
        Some(match choice {
            Ok(program) if wanted => Some(*program),
            _ => None,
        })
    }

    /// Zeroes the timer callbacks of switched-off features, so that the shared timer programs
    /// ignore those timers.
    pub fn mask_symbols(&self, symbols: &mut KernelSymbols) {
        if !self.enabled("time_wait") {
            symbols.tw_timer_handler = 0;
        }
        if !self.enabled("delayed_ack") {
            symbols.tcp_delack_timer = 0;
        }
    }

    /// One line per switched-off feature, for the log.
    pub fn degraded(&self) -> impl Iterator<Item = String> + '_ {
        self.features.iter().filter(|f| !f.enabled()).map(|f| {
            format!(
                "kernel {}: feature {} is off ({}): missing {}",
                self.kernel,
                f.name,
                f.loss,
                f.missing.join(", ")
            )
        })
    }
}

/// The first variant of `hook` whose argument list matches the kernel's prototype.
fn choose(btf: &KernelBtf, hook: &Hook) -> Result<&'static str, HookProblem> {
    let Some(args) = tracepoint_args(btf, hook.tracepoint) else {
        return Err(HookProblem::Absent);
    };
    hook.variants
        .iter()
        .find(|v| {
            if v.prefix {
                args.len() >= v.args.len() && args.iter().zip(v.args).all(|(a, b)| a == b)
            } else {
                args.iter().map(String::as_str).eq(v.args.iter().copied())
            }
        })
        .map(|v| v.program)
        .ok_or(HookProblem::Unknown(args))
}

/// The argument types of BTF-typed tracepoint `name` (after `void *__data`), rendered as in
/// [`Variant::args`]; `None` when the kernel has no such tracepoint.
pub fn tracepoint_args(btf: &KernelBtf, name: &str) -> Option<Vec<String>> {
    let proto = btf.tracepoint_prototype(name)?;
    Some(
        proto
            .parameters()
            .skip(1)
            .map(|id| match btf.types().get(id) {
                Some(ty) => render(ty),
                None => "?".to_owned(),
            })
            .collect(),
    )
}

/// A C-like name for `ty`, qualifiers dropped.
fn render(mut ty: Type<'_>) -> String {
    let mut stars = String::new();
    // Bounded: BTF chains of qualifiers and pointers are short, and a loop in a corrupt file
    // must not hang the agent.
    for _ in 0..32 {
        let sep = if stars.is_empty() { "" } else { " " };
        let prefix = match ty.kind() {
            Kind::Void => return format!("void{sep}{stars}"),
            Kind::Int | Kind::Float | Kind::Typedef => "",
            Kind::Struct | Kind::Fwd => "struct ",
            Kind::Union => "union ",
            Kind::Enum | Kind::Enum64 => "enum ",
            // A pointer adds a star; qualifiers drop out. Either way, on to what it refers to.
            Kind::Ptr | Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => {
                if ty.kind() == Kind::Ptr {
                    stars.push('*');
                }
                let Some(next) = ty.referenced() else {
                    return "?".to_owned();
                };
                ty = next;
                continue;
            }
            other => return format!("{other:?}{stars}"),
        };
        return format!("{prefix}{}{sep}{stars}", ty.name());
    }
    "?".to_owned()
}

/// The running kernel's release (`uname -r`), for messages.
pub fn running_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(unknown release)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> KernelBtf {
        KernelBtf::load().expect("these tests read the running kernel's BTF and need it present")
    }

    /// A well-formed BTF blob with no types at all: a kernel that has nothing we need.
    fn empty() -> KernelBtf {
        let blob = crate::kernel::btf_types::blob(&[], b"\0").expect("an empty BTF fits");
        KernelBtf::from_bytes(&blob).expect("an empty BTF parses")
    }

    #[test]
    fn prototypes_render_as_c_types() {
        let k = running();
        let args = |tp| tracepoint_args(&k, tp).expect(tp);
        assert_eq!(args("inet_sock_set_state"), ["struct sock *", "int", "int"]);
        assert_eq!(args("tcp_receive_reset"), ["struct sock *"]);
        assert_eq!(args("tcp_cong_state_set"), ["struct sock *", "u8"]);
        assert_eq!(args("timer_cancel"), ["struct timer_list *"]);
        assert_eq!(tracepoint_args(&k, "no_such_tracepoint"), None);
    }

    #[test]
    fn the_arity_check_and_the_prototype_agree() {
        let k = running();
        for hook in HOOKS {
            let args = tracepoint_args(&k, hook.tracepoint).expect(hook.tracepoint);
            assert_eq!(
                Some(args.len()),
                k.tracepoint_arity(hook.tracepoint).ok(),
                "{}",
                hook.tracepoint
            );
        }
    }

    #[test]
    fn a_kernel_without_the_state_tracepoint_is_a_one_line_error() {
        let err = Compat::check(&empty(), "4.19.0-test").expect_err("nothing to attach to");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "kernel 4.19.0-test is not supported: lifecycle needs tracepoint \
                 inet_sock_set_state (it is absent)"
            ),
            "{text}"
        );
        assert!(
            text.contains("struct sock member __sk_common.skc_daddr"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    /// Every member `KernelBtf::offsets` reads is claimed by a feature, so that a kernel lacking
    /// it switches that feature off (an unclaimed one would stop the agent).
    #[test]
    fn every_member_the_agent_reads_belongs_to_a_feature() {
        let (_, missing) = empty().offsets_lenient().expect("lenient");
        assert!(missing.len() >= 20, "{missing:?}");
        for (outer, path) in &missing {
            assert!(
                FEATURES
                    .iter()
                    .any(|f| f.members.iter().any(|(o, p)| o == outer && p == path)),
                "struct {outer} member {path} is read but no feature in compat::FEATURES needs it"
            );
        }
    }

    #[test]
    fn switched_off_timer_features_hide_their_callbacks() {
        let mut compat = Compat::check(&running(), "running").expect("supported");
        for feature in &mut compat.features {
            if feature.name == "delayed_ack" {
                feature.missing.push("test".to_owned());
            }
        }
        let mut symbols = KernelSymbols {
            tw_timer_handler: 1,
            tcp_delack_timer: 2,
        };
        compat.mask_symbols(&mut symbols);
        assert_eq!((symbols.tw_timer_handler, symbols.tcp_delack_timer), (1, 0));
        // time_wait still needs all three timer hooks.
        assert_eq!(
            compat.program_for("timer_cancel"),
            Some(Some("timer_cancel"))
        );
        assert_eq!(compat.program_for("no_such_tracepoint"), None);
        assert_eq!(
            compat.program_for("tcp_destroy_sock"),
            None,
            "claimed by no feature"
        );
    }
}
