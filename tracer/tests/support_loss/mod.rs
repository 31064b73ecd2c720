//! Loopback churn that makes a small ring buffer overflow, and the kernel's view of every
//! socket (all network namespaces) for the loss-recovery and bounded-memory tests.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

/// The smallest ring buffer the agent accepts (`--ring-buffer-bytes`: a power of two, at least
/// 64 KiB).
pub const TINY_RING: &str = "65536";

/// Churn threads, and the bounds of each one's loop.
pub const THREADS: usize = 8;
pub const CHURN_LIMIT: Duration = Duration::from_secs(10);

/// A loopback server for short connections: `THREADS` threads share the listener, read each
/// accepted connection to its end and close it (the client closes first, so the client's end
/// goes into TIME_WAIT and the server's through LAST_ACK).
pub struct ChurnServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl ChurnServer {
    pub fn start() -> ChurnServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind churn server");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..THREADS)
            .map(|_| {
                let listener = listener.try_clone().expect("clone listener");
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut stream, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut sink = [0u8; 64];
                        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                    }
                })
            })
            .collect();
        ChurnServer {
            addr,
            stop,
            threads,
        }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        // One connection per thread wakes each blocked accept.
        for _ in 0..THREADS {
            let _ = TcpStream::connect(self.addr);
        }
        for t in self.threads {
            t.join().expect("churn server thread");
        }
    }
}

/// How a churned connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client closes first with a FIN: its end goes into TIME_WAIT.
    Close,
    /// The client aborts with a RST (`SO_LINGER` 0): no TIME_WAIT socket is left.
    Abort,
}

/// A burst of short connections to `server`: `THREADS` threads, each opening and closing at
/// most `per_thread` connections and stopping after `CHURN_LIMIT`. Returns how many were made.
pub fn churn(server: SocketAddr, per_thread: usize, end: End) -> usize {
    let made = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let made = made.clone();
            thread::spawn(move || {
                for _ in 0..per_thread {
                    if started.elapsed() >= CHURN_LIMIT {
                        break;
                    }
                    if let Ok(stream) = TcpStream::connect(server) {
                        if end == End::Abort {
                            set_linger_zero(&stream).expect("SO_LINGER");
                        }
                        drop(stream);
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("churn thread");
    }
    made.load(Ordering::Relaxed)
}

/// Connection pairs whose both ends the test holds: (client, server).
pub fn pairs(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(addr).expect("connect held pair");
            let (server, _) = listener.accept().expect("accept held pair");
            (client, server)
        })
        .collect()
}

/// One socket as `ss -Htano` lists it, with its namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub netns: u64,
    pub state: String,
    pub local: String,
    pub peer: String,
    pub timewait: bool,
}

/// Every TCP socket of every network namespace.
pub fn kernel_sockets() -> Result<BTreeSet<Listed>, String> {
    let own = host_netns_inode();
    let mut all = BTreeSet::new();
    for (inode, paths) in namespaces() {
        let lines = if inode == own {
            ss_in(None, &["-Htano"])?
        } else {
            let mut errors = Vec::new();
            let found = paths.iter().find_map(|p: &PathBuf| {
                ss_in(Some(p), &["-Htano"]).map_err(|e| errors.push(e)).ok()
            });
            found.ok_or_else(|| format!("netns {inode}: {}", errors.join("; ")))?
        };
        for line in lines {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                return Err(format!("unexpected `ss -Htano` line: {line:?}"));
            }
            all.insert(Listed {
                netns: inode,
                state: f[0].to_string(),
                local: f[3].to_string(),
                peer: f[4].to_string(),
                timewait: f[0] == "TIME-WAIT" || line.contains("timer:(timewait"),
            });
        }
    }
    Ok(all)
}

/// What the agent's gauges count, from the kernel's listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Connections past their handshake and not yet closed: ESTAB, FIN-WAIT-1, FIN-WAIT-2 (a
    /// full socket, not a timewait one), CLOSE-WAIT, LAST-ACK, CLOSING. Left out: listeners,
    /// timewait sockets, and SYN-SENT / SYN-RECV, which the kernel programs report only once
    /// the handshake is over.
    pub active: usize,
    pub close_wait: usize,
    /// Timewait sockets, either substate (what `/proc/net/sockstat` calls `tw`).
    pub time_wait: usize,
}

pub fn counts(sockets: &BTreeSet<Listed>) -> Counts {
    let mut c = Counts {
        active: 0,
        close_wait: 0,
        time_wait: 0,
    };
    for s in sockets {
        if s.timewait {
            c.time_wait += 1;
            continue;
        }
        match s.state.as_str() {
            "ESTAB" | "FIN-WAIT-1" | "FIN-WAIT-2" | "LAST-ACK" | "CLOSING" => c.active += 1,
            "CLOSE-WAIT" => {
                c.active += 1;
                c.close_wait += 1;
            }
            _ => {}
        }
    }
    c
}

/// Whether nothing changed between two listings but the sockets of the scrape in between
/// (to or from the agent's metrics port).
pub fn quiet(a: &BTreeSet<Listed>, b: &BTreeSet<Listed>, listen: SocketAddr) -> bool {
    let listen = listen.to_string();
    let scrape = |s: &&Listed| s.local == listen || s.peer == listen;
    let a: BTreeSet<&Listed> = a.iter().filter(|s| !scrape(s)).collect();
    let b: BTreeSet<&Listed> = b.iter().filter(|s| !scrape(s)).collect();
    a == b
}

/// `tracer_connections_active`, `tracer_close_wait_sockets` and `tracer_time_wait_sockets`
/// from a scrape; a missing metric fails the test.
pub fn gauges(text: &str) -> Counts {
    let get = |name: &str| metric_value(text, name, &[]) as usize;
    Counts {
        active: get("tracer_connections_active"),
        close_wait: get("tracer_close_wait_sockets"),
        time_wait: get("tracer_time_wait_sockets"),
    }
}

/// The agent's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// Series per metric name in a scrape.
pub fn series_by_name(text: &str) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        *by.entry(name.to_string()).or_insert(0) += 1;
    }
    by
}
