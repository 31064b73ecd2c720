//! Workloads for the delayed-ACK / Nagle tests and the `tracer diagnose` tests: a client doing
//! write-write-read against a loopback server that answers only once it has both writes, and
//! the kernel's own delayed-ACK counter.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Each of the client's two writes.
pub const WRITE: &[u8] = b"0123456789";
/// The server's reply, sent once it has both writes.
pub const REPLY: &[u8] = b"abcdefghij";
/// Upper bound for any single socket operation of these workloads.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a write-write-read client did.
#[derive(Debug, Clone)]
pub struct WwrRun {
    pub server: SocketAddr,
    /// The client socket's local address.
    pub client: SocketAddr,
    /// `comm` of the client thread (it makes the writes).
    pub comm: String,
    /// Wall-clock time of each round (write, write, read reply).
    pub rounds: Vec<Duration>,
}

impl WwrRun {
    pub fn total(&self) -> Duration {
        self.rounds.iter().sum()
    }

    pub fn mean(&self) -> Duration {
        let n = u32::try_from(self.rounds.len().max(1)).expect("rounds fit u32");
        self.total() / n
    }

    /// The round times in milliseconds, for messages.
    pub fn rounds_ms(&self) -> String {
        self.rounds
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Serves one connection: reads 20 bytes (both writes), replies 10, until EOF; then closes.
fn serve_one(listener: TcpListener) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!("no connection within {IO_TIMEOUT:?}"));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut request = [0u8; 2 * WRITE.len()];
    for _ in 0..100_000 {
        let mut have = 0;
        while have < request.len() {
            match stream.read(&mut request[have..]) {
                Ok(0) if have == 0 => return Ok(()),
                Ok(0) => return Err(format!("EOF after {have} bytes of a request")),
                Ok(n) => have += n,
                Err(e) => return Err(format!("server read: {e}")),
            }
        }
        stream
            .write_all(REPLY)
            .map_err(|e| format!("server write: {e}"))?;
    }
    Err("too many rounds".into())
}

/// Runs `rounds` rounds of write(10 bytes), write(10 bytes), read(10-byte reply) on one
/// loopback connection, from a thread named `thread_name`, with or without TCP_NODELAY; the
/// client closes first. Returns once the server has closed its end too.
pub fn write_write_read(rounds: usize, nodelay: bool, thread_name: &str) -> WwrRun {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let server = listener.local_addr().expect("local_addr");
    let server_thread = thread::Builder::new()
        .name("wwr-server".into())
        .spawn(move || serve_one(listener))
        .expect("spawn server");
    let client_thread = thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || -> Result<WwrRun, String> {
            let comm = crate::common::thread_comm();
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10))
                .map_err(|e| format!("connect {server}: {e}"))?;
            s.set_nodelay(nodelay).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let client = s.local_addr().map_err(|e| e.to_string())?;
            let mut times = Vec::with_capacity(rounds);
            let mut reply = [0u8; REPLY.len()];
            for round in 0..rounds {
                let started = Instant::now();
                s.write_all(WRITE)
                    .map_err(|e| format!("round {round}: first write: {e}"))?;
                s.write_all(WRITE)
                    .map_err(|e| format!("round {round}: second write: {e}"))?;
                s.read_exact(&mut reply)
                    .map_err(|e| format!("round {round}: read reply: {e}"))?;
                times.push(started.elapsed());
                if reply != REPLY {
                    return Err(format!("round {round}: unexpected reply {reply:?}"));
                }
            }
            drop(s);
            Ok(WwrRun {
                server,
                client,
                comm,
                rounds: times,
            })
        })
        .expect("spawn client");
    let run = match client_thread.join() {
        Ok(Ok(run)) => run,
        Ok(Err(e)) => panic!("write-write-read client to {server}: {e}"),
        Err(_) => panic!("write-write-read client thread panicked"),
    };
    match server_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("write-write-read server on {server}: {e}"),
        Err(_) => panic!("write-write-read server thread panicked"),
    }
    run
}

/// The kernel's `TcpExtDelayedACKs` counter for this network namespace, read with `nstat`
/// (absolute value, history file left alone).
pub fn kernel_delayed_acks() -> u64 {
    let out = Command::new("nstat")
        .args(["-asz", "TcpExtDelayedACKs"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run nstat: {e}"));
    assert!(
        out.status.success(),
        "nstat failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("TcpExtDelayedACKs"))
                .then(|| f.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .unwrap_or_else(|| panic!("no TcpExtDelayedACKs in the output of nstat:\n{text}"))
}
