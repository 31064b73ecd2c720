//! Kernel compatibility (`tracer::kernel::compat`) against real BTF: the `.BTF` sections of
//! Debian 12's 6.1 kernel and of the newest kernel its archive has (6.12), recorded in
//! `kernel_btf/` (see its README for where they come from), and the running kernel, where the
//! choice is also loaded into the verifier, attached and fed real loopback traffic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use tracer::kernel::btf::KernelBtf;
use tracer::kernel::compat::{Compat, FEATURES, HookProblem, LIFECYCLE, RST_REASONS};
use tracer::kernel::decode as events;
use tracer::kernel::programs::{HookPlan, ProbeConfig, Probes};
use tracer::kernel::system::symbols;
use tracer_core::model::{Event, ResetDirection};

/// The recorded kernels, in the order their `.BTF` sections are concatenated in the fixture.
const FIXTURE: &str = "kernel_btf/debian-6.1-6.12.btf.xz";
const DEBIAN_6_1: &str = "6.1.0-57-amd64";
const DEBIAN_6_12: &str = "6.12.117+deb12-amd64";

/// The decompressed fixture, shared by the tests of this binary. A missing or damaged fixture
/// fails the test: it is part of the repository.
fn raw() -> &'static [u8] {
    static RAW: OnceLock<Vec<u8>> = OnceLock::new();
    RAW.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join(FIXTURE);
        let compressed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("the recorded kernel BTF {} is missing: {e}", path.display())
        });
        let mut raw = Vec::new();
        lzma_rs::xz_decompress(&mut compressed.as_slice(), &mut raw).expect("the fixture is xz");
        raw
    })
}

/// The recorded kernels' BTF, split at the lengths their headers give.
fn recorded() -> Vec<(&'static str, KernelBtf)> {
    let mut blobs = Vec::new();
    let mut rest = raw();
    while !rest.is_empty() {
        assert_eq!(&rest[..2], &0xeb9f_u16.to_le_bytes(), "BTF magic");
        let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().unwrap()) as usize;
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (word(4), word(8), word(12), word(16), word(20));
        let len = hdr_len + (type_off + type_len).max(str_off + str_len);
        blobs.push(KernelBtf::from_bytes(&rest[..len]).expect("recorded BTF parses"));
        rest = &rest[len..];
    }
    assert_eq!(blobs.len(), 2, "the fixture holds Debian's 6.1 and 6.12");
    let mut blobs = blobs.into_iter();
    vec![
        (DEBIAN_6_1, blobs.next().unwrap()),
        (DEBIAN_6_12, blobs.next().unwrap()),
    ]
}

/// Each known tracepoint's chosen program, or why there is none.
fn choices(compat: &Compat) -> BTreeMap<&'static str, Result<&'static str, HookProblem>> {
    compat.hooks.iter().cloned().collect()
}

fn disabled(compat: &Compat) -> Vec<&'static str> {
    compat
        .features
        .iter()
        .filter(|f| !f.enabled())
        .map(|f| f.name)
        .collect()
}

/// Every struct member the agent reads exists on both recorded kernels, and the offsets are the
/// ones the strict path computes too.
#[test]
fn every_offset_resolves_on_debian_6_1_and_6_12() {
    for (kernel, btf) in recorded() {
        let compat = Compat::check(&btf, kernel).expect("supported");
        assert_eq!(
            compat.missing_members,
            Vec::<(String, String)>::new(),
            "{kernel}"
        );
        let strict = btf.offsets().expect("every member resolves");
        assert_eq!(compat.offsets, strict, "{kernel}");
        assert_eq!(strict.valid, 1);
        assert_eq!(strict.sock_head_standard, 1, "{kernel}: one-read fast path");
        assert_eq!(
            strict.head_copy_fits, 1,
            "{kernel}: timewait heads copied at once"
        );
        assert_eq!(strict.skc_v6_rcv_saddr, strict.skc_v6_daddr + 16);
        assert!(strict.tw_timer > strict.skc_v6_rcv_saddr, "{kernel}");
        assert!(
            strict.icsk_ack_pending > strict.icsk_delack_timer,
            "{kernel}"
        );
        assert!(strict.tcp_mss_cache > strict.sk_protocol, "{kernel}");
        println!("{kernel}: {strict:?}");
    }
}

#[test]
fn debian_6_1_gets_the_two_argument_variants_and_no_nagle() {
    let (kernel, btf) = recorded().into_iter().next().unwrap();
    assert_eq!(kernel, DEBIAN_6_1);
    let compat = Compat::check(&btf, kernel).expect("6.1 is supported");
    let chosen = choices(&compat);
    assert_eq!(chosen["inet_sock_set_state"], Ok("inet_sock_set_state"));
    assert_eq!(chosen["tcp_retransmit_skb"], Ok("tcp_retransmit_skb_noerr"));
    assert_eq!(chosen["tcp_retransmit_synack"], Ok("tcp_retransmit_synack"));
    assert_eq!(chosen["tcp_receive_reset"], Ok("tcp_receive_reset"));
    assert_eq!(chosen["tcp_send_reset"], Ok("tcp_send_reset_noreason"));
    assert_eq!(chosen["tcp_sendmsg_locked"], Err(HookProblem::Absent));
    for timer in ["timer_start", "timer_cancel", "timer_expire_entry"] {
        assert_eq!(
            chosen[timer],
            Ok(timer),
            "6.1's timer_start has 3 arguments"
        );
    }
    assert_eq!(chosen["tcp_destroy_sock"], Ok("tcp_destroy_sock"));
    assert_eq!(chosen["tcp_cong_state_set"], Ok("tcp_cong_state_set"));
    assert_eq!(disabled(&compat), vec!["nagle", RST_REASONS]);
    assert_eq!(compat.program_for("tcp_sendmsg_locked"), Some(None));
    assert_eq!(
        compat.program_for("tcp_send_reset"),
        Some(Some("tcp_send_reset_noreason"))
    );
    let lines: Vec<String> = compat.degraded().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains(DEBIAN_6_1) && lines[0].contains("tcp_sendmsg_locked"));
    assert!(lines.iter().all(|l| !l.contains('\n')));
    // The reason enum does not exist yet, so RSTs carry no reason names.
    assert!(btf.rst_reasons().is_empty());
}

#[test]
fn debian_6_12_has_reset_reasons_but_the_old_retransmit_and_no_nagle() {
    let (kernel, btf) = recorded().into_iter().nth(1).unwrap();
    assert_eq!(kernel, DEBIAN_6_12);
    let compat = Compat::check(&btf, kernel).expect("6.12 is supported");
    let chosen = choices(&compat);
    assert_eq!(chosen["tcp_retransmit_skb"], Ok("tcp_retransmit_skb_noerr"));
    assert_eq!(chosen["tcp_send_reset"], Ok("tcp_send_reset"));
    assert_eq!(chosen["tcp_sendmsg_locked"], Err(HookProblem::Absent));
    assert_eq!(chosen["timer_start"], Ok("timer_start"));
    assert_eq!(disabled(&compat), vec!["nagle"]);
    assert!(compat.enabled(RST_REASONS));
    assert_eq!(
        btf.rst_reasons().get(&1).map(String::as_str),
        Some("no_socket")
    );
}

/// Every hook a feature needs has one variant chosen on each kernel where the feature is on, and
/// lifecycle is on everywhere (6.1 is the oldest kernel we promise).
#[test]
fn features_on_each_recorded_kernel_have_their_hooks() {
    for (kernel, btf) in recorded() {
        let compat = Compat::check(&btf, kernel).expect("supported");
        assert!(compat.enabled(LIFECYCLE));
        for feature in FEATURES {
            if !compat.enabled(feature.name) {
                continue;
            }
            for hook in feature.hooks {
                let program = compat.program_for(hook.tracepoint);
                assert!(
                    matches!(program, Some(Some(_))),
                    "{kernel}: {} on but {} has {program:?}",
                    feature.name,
                    hook.tracepoint
                );
            }
        }
    }
}

/// On this machine's kernel, every feature is on and the plan attaches what the agent attached
/// before the compatibility layer: the 3-argument retransmit program where the kernel passes
/// the error, the reset program with its reason, and all nine hooks. The verifier loads them.
#[test]
fn running_kernel_choice_matches_what_attaches() {
    require_root();
    let kernel = KernelBtf::load().expect("kernel BTF");
    let plan = HookPlan::for_kernel(&kernel).expect("this kernel is supported");
    assert_eq!(disabled(plan.compat()), Vec::<&str>::new());
    let retransmit = match kernel.tracepoint_arity("tcp_retransmit_skb").expect("tp") {
        3 => "tcp_retransmit_skb",
        _ => "tcp_retransmit_skb_noerr",
    };
    let expected = vec![
        ("inet_sock_set_state", "inet_sock_set_state"),
        (retransmit, "tcp_retransmit_skb"),
        ("tcp_retransmit_synack", "tcp_retransmit_synack"),
        ("tcp_receive_reset", "tcp_receive_reset"),
        ("tcp_send_reset", "tcp_send_reset"),
        ("tcp_sendmsg_locked", "tcp_sendmsg_locked"),
        ("timer_start", "timer_start"),
        ("timer_cancel", "timer_cancel"),
        ("timer_expire_entry", "timer_expire_entry"),
        ("tcp_cong_state_set", "tcp_cong_state_set"),
        ("softirq_entry", "softirq_entry"),
    ];
    assert_eq!(plan.attaching(), expected);
    assert_eq!(plan.compat().offsets, kernel.offsets().expect("offsets"));
    let probes = Probes::attach(
        &plan,
        &plan.compat().offsets,
        &symbols().expect("kallsyms"),
        &ProbeConfig {
            ring_buffer_bytes: 1 << 20,
        },
    )
    .expect("attach (run the tests as root)");
    let attached: Vec<&str> = expected.iter().map(|(_, tp)| *tp).collect();
    assert_eq!(probes.attached(), attached.as_slice());
}

/// The plan chosen for 6.1 (its variants, nagle off), with this kernel's offsets, passes this
/// kernel's verifier and attaches without the switched-off hook: what the agent would do there,
/// short of booting 6.1.
#[test]
fn the_debian_6_1_plan_loads_and_attaches_here() {
    require_root();
    let (kernel, old) = recorded().into_iter().next().unwrap();
    let mut compat = Compat::check(&old, kernel).expect("6.1 is supported");
    drop(old);
    let here = KernelBtf::load().expect("kernel BTF");
    compat.offsets = here.offsets().expect("offsets");
    let plan = HookPlan::from_compat(compat).targeting(&here);
    drop(here);
    let attaching = plan.attaching();
    assert_eq!(attaching.len(), 10, "{attaching:?}");
    assert!(attaching.contains(&("softirq_entry", "softirq_entry")));
    assert!(attaching.contains(&("tcp_send_reset_noreason", "tcp_send_reset")));
    assert!(attaching.contains(&("tcp_retransmit_skb_noerr", "tcp_retransmit_skb")));
    assert!(!attaching.iter().any(|(_, tp)| *tp == "tcp_sendmsg_locked"));
    let mut symbols = symbols().expect("kallsyms");
    plan.compat().mask_symbols(&mut symbols);
    let probes = Probes::attach(
        &plan,
        &plan.compat().offsets,
        &symbols,
        &ProbeConfig {
            ring_buffer_bytes: 1 << 20,
        },
    )
    .expect("6.1's variants load here");
    let tracepoints: Vec<&str> = attaching.iter().map(|(_, tp)| *tp).collect();
    assert_eq!(probes.attached(), tracepoints.as_slice());
}

/// The program 6.1 gets for `tcp_send_reset` reads only `(sk, skb)`, so this kernel's verifier
/// takes it too: attached here, it reports a RST this host sends (an abort: closing a socket
/// with unread data) with no reason, as it would on 6.1, where this kernel's own program names
/// the reason.
#[test]
fn the_reasonless_reset_program_counts_a_sent_reset() {
    require_root();
    let kernel = KernelBtf::load().expect("kernel BTF");
    let reasons = kernel.rst_reasons();
    let abort = reasons
        .iter()
        .find(|(_, name)| name.as_str() == "tcp_abort_on_close")
        .map(|(code, _)| *code)
        .expect("this kernel names its RST reasons");
    drop(kernel);
    assert_eq!(sent_reset_reasons("tcp_send_reset"), vec![Some(abort)]);
    assert_eq!(sent_reset_reasons("tcp_send_reset_noreason"), vec![None]);
}

/// Attaches the plan with `program` on `tcp_send_reset`, sends one RST on loopback, and returns
/// the reasons of the RSTs reported for that connection.
fn sent_reset_reasons(program: &'static str) -> Vec<Option<u16>> {
    let kernel = KernelBtf::load().expect("kernel BTF");
    let mut compat = Compat::check(&kernel, "running").expect("supported");
    for (tracepoint, choice) in &mut compat.hooks {
        if *tracepoint == "tcp_send_reset" {
            *choice = Ok(program);
        }
    }
    let plan = HookPlan::from_compat(compat).targeting(&kernel);
    drop(kernel);
    let offsets = plan.compat().offsets;
    let mut probes = Probes::attach(
        &plan,
        &offsets,
        &symbols().expect("kallsyms"),
        &ProbeConfig {
            ring_buffer_bytes: 1 << 20,
        },
    )
    .unwrap_or_else(|e| panic!("{program} loads and attaches: {e}"));
    let mut ring = probes.take_events().expect("ring");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let client_port = client.local_addr().expect("addr").port();
    let (accepted, _) = listener.accept().expect("accept");
    client.write_all(b"unread").expect("write");
    // Wait until the bytes are queued on the server side, then close it unread: the kernel
    // answers with a RST (tcp_send_active_reset).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peek = [0u8; 6];
    while accepted.peek(&mut peek).expect("peek") < 6 {
        assert!(Instant::now() < deadline, "data never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(accepted);
    let mut buf = [0u8; 1];
    let read = client.read(&mut buf);
    assert!(read.is_err(), "the client sees the reset: {read:?}");
    let _ = client.shutdown(Shutdown::Both);

    let mut sent = Vec::new();
    let mut decoded = Vec::new();
    while let Some(record) = ring.next() {
        decoded.clear();
        events::decode_record(&record, &mut decoded).expect("decode");
        for event in &decoded {
            // Matched on the peer's port: the kernel has already cleared the closing socket's
            // own.
            if let Event::Reset {
                direction: ResetDirection::Sent,
                tuple,
                reason,
                ..
            } = *event
                && tuple.dport == client_port
            {
                sent.push(reason);
            }
        }
    }
    sent
}

/// The agent exports which features run; on this kernel all of them.
#[test]
fn the_agent_reports_every_feature_enabled_here() {
    let mut agent = Agent::start(&[]);
    let text = agent.scrape();
    agent.stop();
    let mut names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
    names.push(RST_REASONS);
    for feature in names {
        assert_eq!(
            metric_value(&text, "tracer_feature_enabled", &[("feature", feature)]),
            1.0,
            "{feature}"
        );
    }
}
