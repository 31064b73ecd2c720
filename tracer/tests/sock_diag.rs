//! The sock_diag client against the running kernel: its dump lists what `ss` lists (IPv4, IPv6,
//! TIME_WAIT, thousands of sockets), and the namespace inode is the one `/proc` shows.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
use std::io::{Read, Write};
use std::net::{SocketAddr as NetAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tracer::host::namespaces::current_netns_inode;
use tracer::host::seeds::walk;
use tracer::host::sock_diag::{Lister, SocketEntry, dump_tcp};
use tracer_core::model::{Direction, TcpState};
use tracer_core::record::Seed;

// ---- against the kernel (root, loopback) ----

/// Established sockets whose local port is `port`, as `ss` counts them.
fn ss_established_on(port: u16) -> usize {
    let filter = format!("( sport = :{port} )");
    let output = Command::new("ss")
        .args(["-Htan", "state", "established", &filter])
        .output()
        .unwrap_or_else(|e| {
            panic!("this test compares with `ss` (iproute2), which cannot be run: {e}")
        });
    assert!(
        output.status.success(),
        "`ss` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn find(entries: &[SocketEntry], local: NetAddr, remote: Option<NetAddr>) -> Vec<&SocketEntry> {
    entries
        .iter()
        .filter(|e| e.tuple.src == local.ip() && e.tuple.sport == local.port())
        .filter(|e| remote.is_none_or(|r| e.tuple.dst == r.ip() && e.tuple.dport == r.port()))
        .collect()
}

fn connect_pairs(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, server)
        })
        .collect()
}

fn check_loopback(bind: &str) {
    const N: usize = 5;
    let listener = TcpListener::bind(bind)
        .unwrap_or_else(|e| panic!("cannot listen on {bind} (loopback needed): {e}"));
    let laddr = listener.local_addr().unwrap();
    let pairs = connect_pairs(&listener, N);

    let entries = dump_tcp().unwrap();

    let listening = find(&entries, laddr, None);
    assert!(
        listening.iter().any(|e| e.state == TcpState::Listen
            && e.tuple.dport == 0
            && e.tuple.dst.is_unspecified()
            && e.inode != 0),
        "no LISTEN entry for {laddr}: {listening:?}"
    );
    for (client, server) in &pairs {
        let (caddr, saddr) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        assert_eq!(saddr, laddr);
        let c = find(&entries, caddr, Some(laddr));
        assert_eq!(c.len(), 1, "client {caddr}: {c:?}");
        assert_eq!(c[0].state, TcpState::Established);
        assert_eq!(c[0].tuple.dport, laddr.port());
        assert_ne!(c[0].inode, 0);
        let s = find(&entries, laddr, Some(caddr));
        assert_eq!(s.len(), 1, "accepted {laddr} <- {caddr}: {s:?}");
        assert_eq!(s[0].state, TcpState::Established);
        assert_ne!(s[0].inode, 0);
        assert_ne!(c[0].cookie, s[0].cookie);
        assert_eq!(c[0].uid, s[0].uid);
    }
    for e in &entries {
        assert_eq!(
            e.tuple.src.is_ipv4(),
            e.tuple.dst.is_ipv4(),
            "mixed families: {e:?}"
        );
    }

    let accepted = entries
        .iter()
        .filter(|e| {
            e.state == TcpState::Established
                && e.tuple.src == laddr.ip()
                && e.tuple.sport == laddr.port()
        })
        .count();
    assert_eq!(accepted, N);
    assert_eq!(accepted, ss_established_on(laddr.port()));

    let seeds = walked_seeds();
    for (client, _) in &pairs {
        let caddr = client.local_addr().unwrap();
        let seed = seeds
            .iter()
            .find(|s| s.tuple.src == caddr.ip() && s.tuple.sport == caddr.port())
            .unwrap();
        assert_eq!(seed.direction, Direction::Active, "{seed:?}");
        assert_eq!(seed.state, TcpState::Established);
        let seed = seeds
            .iter()
            .find(|s| {
                s.tuple.sport == laddr.port()
                    && s.tuple.dst == caddr.ip()
                    && s.tuple.dport == caddr.port()
            })
            .unwrap();
        assert_eq!(seed.direction, Direction::Passive, "{seed:?}");
    }
    assert!(
        !seeds
            .iter()
            .any(|s| s.tuple.sport == laddr.port() && s.state == TcpState::Listen)
    );
}

/// The seeds the agent takes from this namespace, read as it reads them (listeners first).
fn walked_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut lister = Lister::open().unwrap();
    walk(&mut lister, current_netns_inode().unwrap(), |_, seed| {
        seeds.extend(seed)
    })
    .unwrap();
    seeds
}

#[test]
fn dump_matches_ss_ipv4() {
    check_loopback("127.0.0.1:0");
}

#[test]
fn dump_matches_ss_ipv6() {
    check_loopback("[::1]:0");
}

#[test]
fn dump_shows_time_wait() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let laddr = listener.local_addr().unwrap();
    let mut pairs = connect_pairs(&listener, 1);
    let (client, mut server) = pairs.remove(0);
    let caddr = client.local_addr().unwrap();
    // The client closes first, so it holds TIME_WAIT once the server closes too.
    drop(client);
    let mut rest = Vec::new();
    assert_eq!(server.read_to_end(&mut rest).unwrap(), 0);
    drop(server);

    let deadline = Instant::now() + Duration::from_secs(5);
    let entry = loop {
        let entries = dump_tcp().unwrap();
        let found = find(&entries, caddr, Some(laddr));
        if let Some(e) = found.iter().find(|e| e.state == TcpState::TimeWait) {
            break **e;
        }
        assert!(
            Instant::now() < deadline,
            "{caddr} -> {laddr} never reached TIME_WAIT: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(entry.inode, 0, "a TIME_WAIT socket has no file");
    assert!(entry.timewait, "its timer is the TIME_WAIT timer");
    assert!(
        !walked_seeds().iter().any(|seed| seed.tuple == entry.tuple),
        "a TIME_WAIT socket is not a connection"
    );
}

#[test]
fn dump_handles_many_sockets() {
    // About 1000 sockets: far more than one datagram of the dump holds.
    const N: usize = 500;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let laddr = listener.local_addr().unwrap();
    let mut pairs = connect_pairs(&listener, N);
    // Some traffic, so that the records are not all alike.
    pairs[0].0.write_all(b"x").unwrap();
    let entries = dump_tcp().unwrap();
    let ours = entries
        .iter()
        .filter(|e| {
            e.state == TcpState::Established
                && ((e.tuple.src == laddr.ip() && e.tuple.sport == laddr.port())
                    || (e.tuple.dst == laddr.ip() && e.tuple.dport == laddr.port()))
        })
        .count();
    assert_eq!(ours, 2 * N);
    assert_eq!(ss_established_on(laddr.port()), N);
    let mut cookies: Vec<u64> = pairs
        .iter()
        .flat_map(|(c, s)| [c, s])
        .map(|stream| {
            let local = stream.local_addr().unwrap();
            let remote = stream.peer_addr().unwrap();
            let found = find(&entries, local, Some(remote));
            assert_eq!(found.len(), 1, "{local} -> {remote}: {found:?}");
            found[0].cookie
        })
        .collect();
    cookies.sort_unstable();
    cookies.dedup();
    assert_eq!(cookies.len(), 2 * N, "socket cookies are unique");
}

#[test]
fn netns_inode_matches_proc() {
    let link = std::fs::read_link("/proc/self/ns/net").unwrap();
    let link = link.to_string_lossy();
    let inode: u32 = link
        .strip_prefix("net:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(current_netns_inode().unwrap(), inode);
    // The same from another thread (no setns: same namespace).
    let other = std::thread::spawn(current_netns_inode)
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(other, inode);
}
