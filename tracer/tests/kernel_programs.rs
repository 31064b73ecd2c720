//! The kernel programs against the running kernel (root): they load, attach, and report a
//! loopback connection's transitions through the ring buffer; the timer callbacks are found in
//! kallsyms.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use tracer::kernel::btf::KernelBtf;
use tracer::kernel::decode as events;
use tracer::kernel::programs::{HookPlan, ProbeConfig, Probes};
use tracer::kernel::softirqs::{SoftirqWatch, WATCHED};
use tracer::kernel::system::symbols;
use tracer_core::model::{Event, TcpState};

#[test]
fn kallsyms_has_the_timer_callbacks() {
    let found = symbols().expect("the running kernel's kallsyms (run as root)");
    assert_ne!(found.tw_timer_handler, 0);
    assert_ne!(found.tcp_delack_timer, 0);
    assert_ne!(found.tw_timer_handler, found.tcp_delack_timer);
}

/// Loads and attaches the real programs, makes one loopback connection, and finds its
/// client-side transitions in the ring buffer with the right ports and states.
#[test]
fn programs_load_attach_and_report_a_loopback_connection() {
    let kernel = KernelBtf::load().expect("kernel BTF");
    let offsets = kernel.offsets().expect("offsets");
    let symbols = symbols().expect("kallsyms");
    let plan = HookPlan::for_kernel(&kernel).expect("every hook's tracepoint is in BTF");
    let mut probes = Probes::attach(
        &plan,
        &offsets,
        &symbols,
        &ProbeConfig {
            ring_buffer_bytes: 1 << 20,
        },
    )
    .expect("attach (run the tests as root)");
    // The TCP hooks, and softirq_entry (the runs the programs see, `kernel::softirqs`).
    assert_eq!(probes.attached().len(), 11);
    let mut softirqs = SoftirqWatch::take(&mut probes).expect("SOFTIRQS table");
    assert_eq!(softirqs.unobserved().expect("baseline"), [0; WATCHED.len()]);
    let mut ring = probes.take_events().expect("ring");
    let lost = probes.take_lost_counter().expect("lost counter");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let client_port = client.local_addr().expect("addr").port();
    let (mut accepted, _) = listener.accept().expect("accept");
    client.write_all(b"x").expect("write");
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte).expect("read");
    drop(client);
    drop(accepted);
    std::thread::sleep(std::time::Duration::from_millis(200));

    // The client socket is the one whose connect() (CLOSE -> SYN_SENT) ran in this process
    // towards our port; later events are matched by socket, since the kernel clears the
    // local port before the final CLOSE.
    let mut client_sock = None;
    let mut client_path = Vec::new();
    // What the kernel said of the client beyond its states: cgroup, and cost at close.
    let mut client_cgroups = Vec::new();
    let mut client_cost = None;
    // Records that carried the client's state changes: its run is kept in the kernel and sent
    // as one record at CLOSE (the agent reads the open ones from the table meanwhile).
    let mut client_records = 0;
    let mut decoded = Vec::new();
    while let Some(record) = ring.next() {
        decoded.clear();
        events::decode_record(&record, &mut decoded).expect("decode");
        let mut carried_client = false;
        for event in &decoded {
            if let Event::SocketInfo {
                sock, cgroup, cost, ..
            } = *event
                && client_sock == Some(sock)
            {
                client_cgroups.push(cgroup);
                client_cost = client_cost.or(cost);
            }
            let Event::StateChange {
                sock,
                tuple,
                old,
                new,
                task,
                ..
            } = *event
            else {
                continue;
            };
            if old == TcpState::Close && new == TcpState::SynSent && tuple.dport == port {
                assert_eq!(
                    task.pid,
                    std::process::id(),
                    "connect() runs in our process"
                );
                client_sock = Some(sock);
            }
            if client_sock == Some(sock) {
                carried_client = true;
                if new == TcpState::Established {
                    assert_eq!(tuple.sport, client_port);
                }
                client_path.push(new);
                if new == TcpState::Close {
                    // The socket's memory may be reused by someone else's connection next.
                    client_sock = None;
                }
            }
        }
        client_records += usize::from(carried_client);
    }
    assert_eq!(
        client_path,
        vec![
            TcpState::SynSent,
            TcpState::Established,
            TcpState::FinWait1,
            TcpState::FinWait2,
            TcpState::Close
        ]
    );
    assert_eq!(client_records, 1, "one record, at CLOSE");
    // The socket's cgroup is this process's: the inode of its cgroup v2 directory.
    let mount = tracer::host::cgroups::find_cgroup2_mount().expect("a cgroup2 mount");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let dir = mount.mount_point.join(own.trim_start_matches('/'));
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).expect("stat"));
    assert_eq!(client_cgroups, vec![inode], "{dir:?}");
    // The client wrote one byte and received none. The kernel counts sequence space: its SYN
    // and FIN were acknowledged (1 + 1 + 1), and the server's FIN received (1).
    let cost = client_cost.expect("the closing record carries the cost");
    assert_eq!((cost.bytes_sent, cost.bytes_received), (3, 1), "{cost:?}");
    assert!(cost.segs_out >= 3 && cost.segs_in >= 2, "{cost:?}");
    assert!(cost.srtt_ns > 0 && cost.min_rtt_ns > 0, "{cost:?}");
    assert!(cost.cwnd > 0 && cost.max_cwnd >= cost.cwnd, "{cost:?}");
    assert_eq!(lost.total().expect("lost"), 0);
    // Both sides of the softirq comparison read after the traffic (its NET_RX runs).
    softirqs
        .unobserved()
        .expect("kernel and program softirq counts");
}
