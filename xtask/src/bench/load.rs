//! Load generators, std threads only, loopback only.
//!
//! - churn: one server thread accepts, answers a 1-byte request with 1 byte and closes first;
//!   client threads connect, send, read the reply and close, as fast as they can.
//! - timers: pairs of threads playing 1-byte ping-pong over a loopback connection whose reads
//!   have a timeout (`SO_RCVTIMEO`): every read that waits arms and cancels a kernel timer
//!   (`schedule_timeout`), and TCP re-arms its own timers, so the `timer:*` tracepoints fire
//!   hundreds of thousands of times a second.
//! - idle connections: helper processes that open or accept many connections and hold them.
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// What one round of a workload did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundLoad {
    /// Completed operations (connections, or ping-pong round trips).
    pub ops: u64,
    /// Failed attempts (connect refused, address unavailable, reset).
    pub errors: u64,
    /// Wall time from the start signal until every thread had stopped.
    pub seconds: f64,
}

impl RoundLoad {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Upper bound of operations per thread and round, whatever the duration.
const MAX_OPS_PER_THREAD: u64 = 5_000_000;

/// The churn server: accepts, reads one byte, writes it back, closes (server-first close, so the
/// server side holds TIME_WAIT and the client's ephemeral ports are not tied up).
pub struct ChurnServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ChurnServer {
    pub fn start() -> Result<Self> {
        // std sets SO_REUSEADDR on listening sockets: the port can be bound again while
        // TIME_WAIT sockets of earlier connections on it remain.
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the churn server")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                for stream in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    // No read timeout on purpose: it would arm a kernel timer per read and
                    // mix timer tracepoint cost into this workload. Clients always send.
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = stream.write_all(&byte);
                    }
                    // Dropped here: the server closes first.
                }
            })
            .context("spawning the churn server")?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// One round: `clients` threads churning connections for `duration`.
    pub fn round(&self, clients: u32, duration: Duration) -> RoundLoad {
        let addr = self.addr;
        run_threads(clients, duration, move |deadline| {
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut byte = [1u8; 1];
            while ops < MAX_OPS_PER_THREAD && Instant::now() < deadline {
                match TcpStream::connect(addr) {
                    Ok(mut stream) => {
                        if stream.write_all(&byte).is_ok() && stream.read_exact(&mut byte).is_ok() {
                            ops += 1;
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        // Out of ports or refused: do not spin.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            (ops, errors)
        })
    }
}

impl Drop for ChurnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One round of the timer workload: `pairs` ping-pong pairs for `duration`; ops are round trips.
pub fn timer_round(pairs: u32, duration: Duration) -> Result<RoundLoad> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the ping-pong listener")?;
    let addr = listener.local_addr()?;
    let mut ends = Vec::new();
    for _ in 0..pairs {
        let client = TcpStream::connect(addr).context("connecting a ping-pong pair")?;
        let (server, _) = listener.accept().context("accepting a ping-pong pair")?;
        for stream in [&client, &server] {
            // A finite receive timeout is what makes each blocking read arm a kernel timer.
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.set_nodelay(true)?;
        }
        ends.push((client, server));
    }
    let echoes: Vec<JoinHandle<()>> = ends
        .iter()
        .map(|(_, server)| {
            let mut server = server.try_clone()?;
            Ok(std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while let Ok(1) = server.read(&mut byte) {
                    if server.write_all(&byte).is_err() {
                        break;
                    }
                }
            }))
        })
        .collect::<std::io::Result<_>>()?;
    let clients: Vec<TcpStream> = ends
        .iter()
        .map(|(client, _)| client.try_clone())
        .collect::<std::io::Result<_>>()?;
    let clients = Arc::new(std::sync::Mutex::new(clients));
    let load = run_threads(pairs, duration, move |deadline| {
        let Some(mut stream) = clients.lock().ok().and_then(|mut c| c.pop()) else {
            return (0, 1);
        };
        let (mut ops, mut errors) = (0u64, 0u64);
        let mut byte = [1u8; 1];
        while ops < MAX_OPS_PER_THREAD && Instant::now() < deadline {
            if stream.write_all(&byte).is_ok() && stream.read_exact(&mut byte).is_ok() {
                ops += 1;
            } else {
                errors += 1;
                break;
            }
        }
        (ops, errors)
    });
    for (client, _) in &ends {
        let _ = client.shutdown(Shutdown::Both);
    }
    drop(ends);
    for echo in echoes {
        let _ = echo.join();
    }
    Ok(load)
}

/// Runs `threads` copies of `work(deadline)` started together; sums their (ops, errors).
fn run_threads<F>(threads: u32, duration: Duration, work: F) -> RoundLoad
where
    F: Fn(Instant) -> (u64, u64) + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (work, barrier) = (work.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                work(Instant::now() + duration)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut load = RoundLoad::default();
    for handle in handles {
        if let Ok((ops, errors)) = handle.join() {
            load.ops += ops;
            load.errors += errors;
        }
    }
    load.seconds = start.elapsed().as_secs_f64();
    load
}

/// Helper process: listen on `listeners` ports of 127.0.0.1, print them on one line
/// (`ports P1 P2 ...`), accept and hold every connection until stdin closes, then exit.
pub fn idle_server(listeners: u32) -> Result<()> {
    super::sys::raise_nofile(u64::MAX).ok();
    let mut ports = Vec::new();
    let mut bound = Vec::new();
    for _ in 0..listeners {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        ports.push(listener.local_addr()?.port().to_string());
        bound.push(listener);
    }
    for listener in bound {
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => held.push(stream),
                    // Out of descriptors: stop accepting, keep what we hold.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    println!("ports {}", ports.join(" "));
    std::io::stdout().flush()?;
    wait_for_stdin_eof();
    // Exiting closes every held connection at once.
    std::process::exit(0)
}

/// Helper process: open `count` connections spread round-robin over `targets`, print
/// `connected OK FAILED`, hold them until stdin closes, then exit.
pub fn idle_client(count: u32, targets: &[SocketAddr]) -> Result<()> {
    if targets.is_empty() {
        bail!("no targets");
    }
    super::sys::raise_nofile(u64::MAX).ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = Vec::with_capacity(count as usize);
    let mut failed = 0u64;
    let mut i = 0usize;
    while held.len() < count as usize && Instant::now() < deadline && failed < 1000 {
        let target = targets[i % targets.len()];
        i += 1;
        match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
            Ok(stream) => held.push(stream),
            Err(_) => failed += 1,
        }
    }
    println!("connected {} {failed}", held.len());
    std::io::stdout().flush()?;
    wait_for_stdin_eof();
    std::process::exit(0)
}

fn wait_for_stdin_eof() {
    let stdin = std::io::stdin();
    let mut line = String::new();
    while let Ok(n) = stdin.lock().read_line(&mut line) {
        if n == 0 {
            break;
        }
        line.clear();
    }
}
