//! The traffic the pictures show, in phases over one run: loopback churn throughout, TIME_WAIT
//! piling up toward one peer, connections through a veth into a namespace that drops packets
//! (nftables), and a Nagle write-write-read client. Threads of std only; every loop is bounded
//! by the run's deadline, every socket operation by a timeout.
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const NS_PORT: u16 = 8080;
const NFT_TABLE: &str = "tracer_plots";
const SIGTERM: i32 = 15;
const CLONE_NEWNET: i32 = 0x4000_0000;

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn setns(fd: i32, nstype: i32) -> i32;
}

/// SIGTERM, up to 10 s to exit, then SIGKILL; the child is reaped.
pub fn stop_child(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our child, not yet reaped,
        // so it names no other process.
        unsafe { kill(pid, SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A namespace behind a veth pair whose input drops every 4th SYN and every 7th TCP segment
/// to its server port; deleted (with its nftables table) on drop.
pub struct LossyNetns {
    name: String,
    host_if: String,
    pub server: SocketAddr,
}

impl LossyNetns {
    pub fn create() -> Result<LossyNetns> {
        remove_stale();
        let pid = std::process::id();
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .context("cannot run ip (Debian package iproute2)")?;
        let used = String::from_utf8_lossy(&used.stdout).into_owned();
        let octet = (0..250u32)
            .map(|i| (pid + i) % 250 + 1)
            .find(|n| !used.contains(&format!("10.232.{n}.")))
            .context("no free 10.232.x.0/24 subnet")?;
        let octet = u8::try_from(octet)?;
        let ns = LossyNetns {
            name: format!("tracer-plots-{pid}"),
            host_if: format!("trp{}h", pid % 100_000),
            server: SocketAddr::from((Ipv4Addr::new(10, 232, octet, 2), NS_PORT)),
        };
        let ns_if = format!("trp{}n", pid % 100_000);
        let (name, host_if) = (ns.name.as_str(), ns.host_if.as_str());
        run("ip", &["netns", "add", name])?;
        // From here on, drop cleans up.
        let host_cidr = format!("10.232.{octet}.1/24");
        let ns_cidr = format!("10.232.{octet}.2/24");
        let veth = [
            "link", "add", host_if, "type", "veth", "peer", "name", &ns_if,
        ];
        run("ip", &[&veth[..], &["netns", name]].concat())?;
        run("ip", &["addr", "add", &host_cidr, "dev", host_if])?;
        run("ip", &["link", "set", host_if, "up"])?;
        run("ip", &["-n", name, "addr", "add", &ns_cidr, "dev", &ns_if])?;
        run("ip", &["-n", name, "link", "set", &ns_if, "up"])?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        for command in [
            format!("add table inet {NFT_TABLE}"),
            format!(
                "add chain inet {NFT_TABLE} input {{ type filter hook input priority 0 ; \
                 policy accept ; }}"
            ),
            format!(
                "add rule inet {NFT_TABLE} input tcp dport {NS_PORT} tcp flags & (syn | ack) \
                 == syn numgen inc mod 4 == 0 drop"
            ),
            format!(
                "add rule inet {NFT_TABLE} input tcp dport {NS_PORT} numgen inc mod 7 == 0 drop"
            ),
        ] {
            run("ip", &["netns", "exec", name, "nft", &command])
                .context("nftables (Debian package nftables)")?;
        }
        // The carrier comes up within a moment; the first SYN may be lost otherwise.
        std::thread::sleep(Duration::from_millis(500));
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for LossyNetns {
    fn drop(&mut self) {
        let table = format!("delete table inet {NFT_TABLE}");
        let _ = run("ip", &["netns", "exec", &self.name, "nft", &table]);
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

/// Deletes the `tracer-plots-<pid>` namespaces of runs that are gone (killed before their
/// clean-up ran).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten().take(10_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("tracer-plots-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

/// When each part of the mix runs, in seconds from the start of a run of `total` seconds.
struct Phases {
    time_wait: (f64, f64),
    lossy: (f64, f64),
    nagle: (f64, f64),
}

impl Phases {
    fn of(total: f64) -> Phases {
        Phases {
            time_wait: (0.05 * total, 0.45 * total),
            lossy: (0.2 * total, 0.6 * total),
            nagle: (0.45 * total, 0.85 * total),
        }
    }
}

/// The running mix; stopped and joined by [`Mix::finish`] (or on drop).
pub struct Mix {
    workers: Workers,
}

/// Threads that share a stop flag: stopped and joined by [`Workers::finish`] (which reports
/// their errors) or, on an early return, when dropped.
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Workers {
    pub fn new(stop: Arc<AtomicBool>, threads: Vec<JoinHandle<Result<()>>>) -> Workers {
        Workers { stop, threads }
    }

    /// Stops and joins every thread; an error names `what` and every thread's failure.
    pub fn finish(mut self, what: &str) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let mut errors = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push(format!("a {what} thread panicked")),
            }
        }
        if !errors.is_empty() {
            bail!("{what}: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Mix {
    pub fn start(total: Duration, ns: &LossyNetns) -> Result<Mix> {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let end = t0 + total;
        let phases = Phases::of(total.as_secs_f64());
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut threads = Vec::new();
        let mut spawn = |name: &str, job: Box<dyn FnOnce() -> Result<()> + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(job)
                .map(|t| threads.push(t))
                .context("spawning a traffic thread")
        };

        // Churn all along: the server closes first, 40 connections a second.
        let churn = server(None, true, stop.clone(), end)?;
        let s = stop.clone();
        spawn("churn", Box::new(move || paced(churn, 40.0, (t0, end), &s)))?;
        // TIME_WAIT toward one peer: the client closes first, 100 connections a second.
        let tw = server(None, false, stop.clone(), end)?;
        let (s, w) = (
            stop.clone(),
            (at(phases.time_wait.0), at(phases.time_wait.1)),
        );
        spawn("time-wait", Box::new(move || paced(tw, 100.0, w, &s)))?;
        // Through the lossy veth.
        server(Some(ns.path()), false, stop.clone(), end)?;
        let (s, w, addr) = (
            stop.clone(),
            (at(phases.lossy.0), at(phases.lossy.1)),
            ns.server,
        );
        spawn("lossy", Box::new(move || paced(addr, 10.0, w, &s)))?;
        // Nagle: write, write, read on one connection.
        let (s, w) = (stop.clone(), (at(phases.nagle.0), at(phases.nagle.1)));
        spawn("nagle", Box::new(move || nagle(w, &s)))?;
        Ok(Mix {
            workers: Workers::new(stop, threads),
        })
    }

    pub fn finish(self) -> Result<()> {
        self.workers.finish("traffic")
    }
}

fn timeouts(s: &TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// An echo server (in the namespace at `netns`, if given, on [`NS_PORT`]): one thread per
/// connection reads a byte and echoes it; it then closes first, or waits for the client's
/// close. Runs until `stop` or `end`.
fn server(
    netns: Option<String>,
    close_first: bool,
    stop: Arc<AtomicBool>,
    end: Instant,
) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("plots-server".into())
        .spawn(move || {
            let bound = (|| -> Result<TcpListener> {
                let bind = match &netns {
                    Some(path) => {
                        let file = std::fs::File::open(path)?;
                        // SAFETY: the fd is an open nsfs file owned by `file` for the whole
                        // call; setns only moves this thread (ours, serving only this
                        // listener) into the namespace and touches no memory.
                        if unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) } != 0 {
                            bail!("setns {path}: {}", std::io::Error::last_os_error());
                        }
                        SocketAddr::from(([0, 0, 0, 0], NS_PORT))
                    }
                    None => SocketAddr::from(([127, 0, 0, 1], 0)),
                };
                let listener = TcpListener::bind(bind)?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })();
            let listener = match bound {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = std::thread::Builder::new()
                            .name("plots-conn".into())
                            .spawn(move || echo(conn, close_first));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })
        .context("spawning a server thread")?;
    let addr = rx
        .recv_timeout(IO_TIMEOUT)
        .context("the server thread did not start")??;
    Ok(addr)
}

fn echo(mut conn: TcpStream, close_first: bool) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    timeouts(&conn)?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte)?;
    conn.write_all(&byte)?;
    if !close_first {
        // Wait for the client's FIN.
        let _ = conn.read(&mut byte)?;
    }
    Ok(())
}

/// Connections to `addr` at `rate` a second during `window`: write a byte, read the echo, and
/// close (after the server, or first if the server waits).
fn paced(
    addr: SocketAddr,
    rate: f64,
    (from, until): (Instant, Instant),
    stop: &AtomicBool,
) -> Result<()> {
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut next = from;
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next += gap;
        let one = || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            timeouts(&s)?;
            s.write_all(b"x")?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)?;
            Ok(())
        };
        if let Err(e) = one() {
            failures += 1;
            if failures > 20 {
                bail!("connections to {addr} keep failing: {e}");
            }
        }
        // Behind schedule (a slow connect): skip ahead rather than burst.
        next = next.max(Instant::now() - gap);
    }
    Ok(())
}

/// Write 10 bytes, write 10 more, read a 10-byte reply, on one loopback connection, during
/// `window`: each second write waits for the peer's delayed ACK (Nagle).
fn nagle((from, until): (Instant, Instant), stop: &AtomicBool) -> Result<()> {
    while Instant::now() < from {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::Builder::new()
        .name("nagle-server".into())
        .spawn(move || -> std::io::Result<()> {
            let (mut conn, _) = listener.accept()?;
            timeouts(&conn)?;
            let mut request = [0u8; 20];
            // Until the client closes (or a read times out); a round takes at least 40 ms.
            for _ in 0..10_000_000 {
                match conn.read_exact(&mut request) {
                    Ok(()) => conn.write_all(&[b'r'; 10])?,
                    Err(_) => break,
                }
            }
            Ok(())
        })?;
    let mut client = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    timeouts(&client)?;
    let mut reply = [0u8; 10];
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        client.write_all(&[b'w'; 10])?;
        client.write_all(&[b'w'; 10])?;
        client.read_exact(&mut reply)?;
    }
    drop(client);
    match server.join() {
        Ok(result) => Ok(result?),
        Err(_) => bail!("the Nagle server panicked"),
    }
}
