//! The connections the plots' mix does not make: CLOSE_WAIT leaks (a server that never closes
//! what its clients closed) and stalled connections (a server that never reads, so that the
//! client's data sits in full buffers behind a zero window), recycled by the server closing with
//! unread data (a reset). Every loop is bounded by the deadline and a count.
use std::collections::VecDeque;
use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::plots::traffic::Workers;

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a holding server keeps at most.
const MAX_HELD: usize = 1_000;

/// Leaks and stalls, running until [`Held::finish`] (or drop), which closes everything.
pub struct Held {
    workers: Workers,
    /// Leaks made and stalled connections opened, for the report.
    pub leaks: Arc<AtomicU64>,
    pub stalls: Arc<AtomicU64>,
    /// The leaking server's port: the agent's leak reports name it as `sport`.
    pub leak_port: u16,
}

/// A loopback server that accepts and keeps every connection, reading nothing.
struct Holder {
    addr: SocketAddr,
    conns: Arc<Mutex<VecDeque<TcpStream>>>,
}

impl Holder {
    fn start(stop: Arc<AtomicBool>, end: Instant) -> Result<(Holder, JoinHandle<Result<()>>)> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a holding server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Mutex::new(VecDeque::new()));
        let kept = conns.clone();
        let thread = std::thread::Builder::new()
            .name("soak-holder".into())
            .spawn(move || -> Result<()> {
                while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let mut kept = lock(&kept)?;
                            if kept.len() < MAX_HELD {
                                kept.push_back(conn);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                // Close what is held: leaks end, stalls are reset.
                lock(&kept)?.clear();
                Ok(())
            })
            .context("spawning a holding server")?;
        Ok((Holder { addr, conns }, thread))
    }

    /// Closes the oldest connection held, if any.
    fn close_oldest(&self) -> Result<()> {
        lock(&self.conns)?.pop_front();
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("a soak traffic thread panicked"))
}

impl Held {
    /// One CLOSE_WAIT leak every `leak_every` until `leaks_until`, and `stalls` stalled
    /// connections held all along, the oldest reset and replaced every `recycle_every`; all held
    /// until `end`.
    pub fn start(
        end: Instant,
        leaks_until: Instant,
        leak_every: Duration,
        stalls: usize,
        recycle_every: Duration,
    ) -> Result<Held> {
        let stop = Arc::new(AtomicBool::new(false));
        let (leak_server, leak_thread) = Holder::start(stop.clone(), end)?;
        let leak_port = leak_server.addr.port();
        let (stall_server, stall_thread) = Holder::start(stop.clone(), end)?;
        let leaks = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicU64::new(0));
        let mut threads = vec![leak_thread, stall_thread];

        let (s, made) = (stop.clone(), leaks.clone());
        threads.push(
            std::thread::Builder::new()
                .name("soak-leaks".into())
                .spawn(move || -> Result<()> {
                    let mut next = Instant::now();
                    while !s.load(Ordering::SeqCst) && Instant::now() < leaks_until.min(end) {
                        if Instant::now() < next {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        next += leak_every;
                        if made.load(Ordering::SeqCst) as usize >= MAX_HELD {
                            continue;
                        }
                        // Connect and close: the server's end stays in CLOSE_WAIT.
                        let conn = TcpStream::connect_timeout(&leak_server.addr, IO_TIMEOUT)
                            .context("connecting to the leaking server")?;
                        std::thread::sleep(Duration::from_millis(50));
                        drop(conn);
                        made.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .context("spawning the leak client")?,
        );

        let (s, opened) = (stop.clone(), stalled.clone());
        threads.push(
            std::thread::Builder::new()
                .name("soak-stalls".into())
                .spawn(move || -> Result<()> {
                    let mut clients = VecDeque::new();
                    for _ in 0..stalls {
                        clients.push_back(stall(stall_server.addr)?);
                        opened.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut next = Instant::now() + recycle_every;
                    while !s.load(Ordering::SeqCst) && Instant::now() < end {
                        if Instant::now() < next {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        next += recycle_every;
                        // The server closes with unread data: a reset for the client.
                        stall_server.close_oldest()?;
                        clients.pop_front();
                        clients.push_back(stall(stall_server.addr)?);
                        opened.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .context("spawning the stalled clients")?,
        );
        Ok(Held {
            workers: Workers::new(stop, threads),
            leaks,
            stalls: stalled,
            leak_port,
        })
    }

    pub fn finish(self) -> Result<()> {
        self.workers.finish("soak traffic")
    }
}

/// A client that writes until its buffers and the peer's are full (the peer never reads), and
/// then holds the connection: a zero window, probed by the kernel.
fn stall(addr: SocketAddr) -> Result<TcpStream> {
    let mut conn =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connecting a stalled client")?;
    conn.set_nonblocking(true)?;
    let chunk = [b's'; 64 << 10];
    // Loopback buffers hold a few MiB at most: 1024 chunks are far more than enough.
    for _ in 0..1024 {
        match conn.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(conn),
            Err(e) => return Err(e).context("filling a stalled connection"),
        }
    }
    bail!("a stalled connection to {addr} never filled its buffers")
}
