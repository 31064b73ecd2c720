//! What a connection cost, against software nobody here wrote: an iperf3 server in a network
//! namespace sends a fixed amount (`-R`) to a client on the host across a veth whose host end
//! drops one in 40 of the full-size segments coming from the server's port (nftables,
//! deterministic). iperf3's own report (`-J`: bytes sent, and the retransmits the server read
//! with TCP_INFO) must match the agent's event for the server's data connection, and the
//! retransmits by kind must sum to the namespace's own kernel counters (`nstat` inside it,
//! untouched by other traffic).
//!
//! Why the sender is the server, in reverse mode: an iperf3 server closes its data sockets as
//! soon as the client says the test ended, and a sending client says so once its last write
//! is in its socket buffer, so the server resets the connection with data unread and the
//! sender's acknowledged bytes fall short of what iperf3 counts as sent. In reverse mode the
//! client ends the test after receiving every byte, and the server's connection closes with
//! all of it acknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;
mod support_cost;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support_cost::{diagnose_during, finding};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(1);
/// What iperf3 sends: bounded in bytes, so the run is bounded in time by the link.
const BYTES: &str = "16M";

/// An nftables table in the host namespace dropping one in `every` full-size segments that
/// arrive on `iface` from `port`; deleted on drop (also when the test fails).
struct HostDrops(String);

impl HostDrops {
    fn add(iface: &str, port: u16, every: u32) -> HostDrops {
        require_tool("nft");
        let table = format!("tracer_cost_{}", std::process::id());
        let drops = HostDrops(table.clone());
        for command in [
            format!("add table inet {table}"),
            format!(
                "add chain inet {table} input {{ type filter hook input priority 0 ; policy \
                 accept ; }}"
            ),
            // Only full-size data segments: the control connection and ACKs pass.
            format!(
                "add rule inet {table} input iifname \"{iface}\" tcp sport {port} meta length \
                 > 1000 numgen inc mod {every} == 0 drop"
            ),
        ] {
            run_ok("nft", &[&command]);
        }
        drops
    }
}

impl Drop for HostDrops {
    fn drop(&mut self) {
        let _ = run_cmd("nft", &[&format!("delete table inet {}", self.0)]);
    }
}

/// An iperf3 server for one test (`-1`) in `ns`, killed on drop.
struct IperfServer(std::process::Child);

impl IperfServer {
    fn start(ns: &Netns, bind: &str, port: u16) -> IperfServer {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "iperf3", "-s", "-1", "-B", bind])
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s");
        let server = IperfServer(child);
        // Bounded wait until it listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        let needle = format!("{bind}:{port}");
        while !run_ok("ip", &["netns", "exec", &ns.name, "ss", "-Htln"]).contains(&needle) {
            assert!(
                Instant::now() < deadline,
                "iperf3 -s never listened on {needle}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The namespace's TCP counters (`nstat` inside it: absolute, history untouched).
fn nstat_in(ns: &Netns) -> HashMap<String, u64> {
    let out = run_ok("ip", &["netns", "exec", &ns.name, "nstat", "-asz"]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect()
}

fn counter(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    let get =
        |m: &HashMap<String, u64>| *m.get(name).unwrap_or_else(|| panic!("nstat has no {name}"));
    get(after) - get(before)
}

fn num(ev: &Value, key: &str) -> u64 {
    ev[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or null in {ev}"))
}

/// `iperf3 -J -R -n BYTES` from the host to the server in the namespace: its JSON report.
fn run_client(ns_ip: &str, port: u16) -> Value {
    let mut client = Command::new("iperf3")
        .args([
            "-J",
            "-R",
            "-c",
            ns_ip,
            "-p",
            &port.to_string(),
            "-n",
            BYTES,
        ])
        .args(["--connect-timeout", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start iperf3 -c");
    let mut stdout = client.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let status = wait_timeout(&mut client, Duration::from_secs(120)).unwrap_or_else(|| {
        let _ = client.kill();
        panic!("iperf3 -c did not finish in 120 s")
    });
    let report: Value = serde_json::from_str(&reader.join().unwrap()).expect("iperf3 -J output");
    assert!(status.success(), "iperf3 -c failed: {report}");
    report
}

#[test]
fn iperf3_bytes_and_retransmits_match_the_agent_across_a_lossy_veth() {
    require_root();
    require_tool("iperf3");
    require_tool("nstat");
    let ns = Netns::create();
    let port = free_port();
    let ns_ip = ns.ns_ip.to_string();
    let _drops = HostDrops::add(&ns.host_if, port, 40);
    let _server = IperfServer::start(&ns, &ns_ip, port);
    let mut agent = Agent::start(&[]);
    let metrics_before = agent.scrape();
    let before = nstat_in(&ns);

    // `tracer diagnose` watches the same run: it must name the lossy peer.
    let (report, diagnosis) = diagnose_during(12, || run_client(&ns_ip, port));
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().expect("bytes");
    let iperf_retrans = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .expect("retransmits");
    // The client's end of the data connection: the server's event has it as `dport`.
    let data_port = report["start"]["connected"][0]["local_port"]
        .as_u64()
        .expect("local_port");
    // iperf3 -R now and then writes one block more than the client reads before it ends the
    // test (seen: 16 908 288 sent, 16 777 216 received); the kernel acknowledged somewhere in
    // between. Exact equality is asserted when iperf3's own two counts agree.
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("bytes received");
    assert!(received <= sent, "received more than sent: {report}");
    let consistent = received == sent;
    assert!(
        iperf_retrans > 0,
        "no retransmits: the drop rule did not bite ({report})"
    );

    let netns = ns.inode();
    let ours =
        move |e: &Value| e["event"] == "connection_closed" && e["netns"].as_u64() == Some(netns);
    // Two connections in the namespace: the server's ends of iperf3's control and data
    // connections.
    let events = agent.wait_for_exactly(ours, 2, EVENT_TIMEOUT, SETTLE);
    let after = nstat_in(&ns);
    let data = events
        .iter()
        .find(|e| e["dport"].as_u64() == Some(data_port))
        .unwrap_or_else(|| panic!("no event for the data connection :{data_port}: {events:?}"));
    eprintln!(
        "iperf3: {sent} bytes, {iperf_retrans} retransmits; agent: {data}; nstat delta: \
         RetransSegs {} FastRetrans {}",
        counter(&before, &after, "TcpRetransSegs"),
        counter(&before, &after, "TcpExtTCPFastRetrans"),
    );
    assert_eq!(ev_str(data, "direction"), "passive", "{data}");

    // Bytes: the kernel's acknowledged sequence space is the payload plus, once
    // acknowledged, the FIN (a passive opener's SYN-ACK is not counted); where the path
    // tells, the agent's payload is exact.
    let acked = num(data, "seq_bytes_acked");
    assert!(
        acked >= received && acked <= sent + 2,
        "acked {acked} vs iperf3's {received} received, {sent} sent: {data}"
    );
    if consistent {
        assert!(acked >= sent, "acked {acked} vs iperf3's {sent}: {data}");
        if let Some(payload) = data["bytes_sent"].as_u64() {
            assert_eq!(payload, sent, "{data}");
        }
    }
    // Retransmits: iperf3 reads tcpi_total_retrans; the agent has both that and its own
    // per-event count.
    assert_eq!(num(data, "kernel_retransmits"), iperf_retrans, "{data}");
    assert_eq!(num(data, "retransmits"), iperf_retrans, "{data}");

    // RTT present and plausible: the floor no higher than the smoothed value, well under the
    // connection's life.
    let (srtt, min_rtt) = (num(data, "srtt_us"), num(data, "min_rtt_us"));
    assert!(min_rtt > 0 && min_rtt <= srtt, "{data}");
    assert!(srtt < num(data, "duration_us"), "{data}");
    assert!(num(data, "max_cwnd") >= num(data, "cwnd"), "{data}");
    let states: Vec<&str> = data["congestion_states"]
        .as_array()
        .expect("congestion_states")
        .iter()
        .filter_map(Value::as_str)
        .collect();

    // By kind, over the namespace's connections, against its own counters.
    let kind = |k: &str| -> u64 {
        events
            .iter()
            .map(|e| e["retransmits_by_kind"][k].as_u64().expect("kind"))
            .sum()
    };
    let all: u64 = ["syn", "synack", "fast", "timeout", "other"]
        .iter()
        .map(|k| kind(k))
        .sum();
    assert_eq!(all, counter(&before, &after, "TcpRetransSegs"));
    assert_eq!(
        kind("fast"),
        counter(&before, &after, "TcpExtTCPFastRetrans")
    );
    if kind("fast") > 0 {
        assert!(states.contains(&"recovery"), "{data}");
    }
    if kind("timeout") > 0 {
        assert!(states.contains(&"loss"), "{data}");
    }

    // The diagnosis: the server's peer (the host's end of the veth) is lossy, with the
    // connection's retransmits (the control connection had none to add).
    let lossy = finding(&diagnosis, "slow_peers");
    let peers = lossy["details"]["peers"]["top"].as_array().expect("peers");
    let host_ip = ns.host_ip.to_string();
    let row = peers
        .iter()
        .find(|p| p["peer"] == host_ip.as_str())
        .unwrap_or_else(|| panic!("{host_ip} not among {lossy:#}"));
    eprintln!("slow_peers row: {row}");
    assert_eq!(row["retransmitted"].as_u64(), Some(iperf_retrans), "{row}");
    assert!(row["connections"].as_u64() >= Some(2), "{row}");

    // The metrics saw it close.
    let metrics_after = agent.scrape();
    for (name, labels) in [
        ("tracer_connection_srtt_seconds_count", vec![]),
        ("tracer_connection_min_rtt_seconds_count", vec![]),
        ("tracer_connection_bytes_count", vec![("direction", "sent")]),
    ] {
        let d = metric_value(&metrics_after, name, &labels)
            - metric_value(&metrics_before, name, &labels);
        assert!(d >= 2.0, "{name}{labels:?} +{d}");
    }
    agent.stop();
}
