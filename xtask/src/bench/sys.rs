//! The few system interfaces the bench needs that std does not offer: signals, resource limits,
//! the clock tick, `/proc` figures of a process and the agent's `/metrics`.
//!
//! xtask has no `libc` dependency; these C functions come from the C library that std links
//! anyway, declared here with their Linux signatures.
use std::ffi::{c_int, c_long};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tracer_scrape::Exposition;

pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGTERM: c_int = 15;
pub const SIGCONT: c_int = 18;
pub const SIGSTOP: c_int = 19;

const RLIMIT_NOFILE: c_int = 7;
const SC_CLK_TCK: c_int = 2;

#[repr(C)]
struct RLimit {
    cur: u64,
    max: u64,
}

unsafe extern "C" {
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn getrlimit(resource: c_int, rlim: *mut RLimit) -> c_int;
    fn setrlimit(resource: c_int, rlim: *const RLimit) -> c_int;
    fn sysconf(name: c_int) -> c_long;
}

/// Sends `sig` to the process `pid` (one process, never a group).
pub fn signal(pid: u32, sig: c_int) -> Result<()> {
    let pid = c_int::try_from(pid).context("process id out of range")?;
    if pid <= 0 {
        bail!("refusing to signal process id {pid}");
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a positive pid names
    // exactly one process (a child of ours).
    if unsafe { kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

/// Signals a child, waits up to `grace` for it to exit, then kills it. Returns its status.
pub fn stop_child(child: &mut Child, sig: c_int, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // The child may exit between the check and the signal: then kill reports ESRCH, harmless.
    let _ = signal(child.id(), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = signal(child.id(), SIGKILL);
    Ok(child.wait()?)
}

/// The open-file limit of this process: (soft, hard).
pub fn nofile_limit() -> Result<(u64, u64)> {
    let mut lim = RLimit { cur: 0, max: 0 };
    // SAFETY: getrlimit writes one `struct rlimit` (two 64-bit values on Linux) into `lim`.
    if unsafe { getrlimit(RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok((lim.cur, lim.max))
}

/// Sets the open-file limit (soft and hard); raising the hard limit needs CAP_SYS_RESOURCE.
pub fn set_nofile_limit(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = RLimit {
        cur: soft,
        max: hard,
    };
    // SAFETY: setrlimit reads one `struct rlimit` from `lim`, which lives across the call.
    if unsafe { setrlimit(RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-file limit to `wanted`, raising the hard limit too when allowed.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(wanted: u64) -> Result<u64> {
    let (soft, hard) = nofile_limit()?;
    if soft >= wanted {
        return Ok(soft);
    }
    if hard >= wanted || set_nofile_limit(wanted, wanted).is_err() {
        set_nofile_limit(hard.min(wanted), hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(nofile_limit()?.0)
}

/// Clock ticks per second, the unit of `utime` and `stime` in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes an integer and returns one.
    let ticks = unsafe { sysconf(SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User plus system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Voluntary context switches of all threads of a process: how often it went to sleep (and
/// was woken up again).
pub fn voluntary_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// A `kB` figure of `/proc/PID/status`, such as `VmRSS` or `VmHWM`.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Fetches and parses the agent's `/metrics` page; an error unless it answers 200 with a valid
/// exposition.
pub fn scrape(addr: SocketAddr) -> Result<Exposition> {
    let response = tracer_scrape::get(addr, "/metrics", Duration::from_secs(5))?;
    if response.status != 200 {
        bail!("/metrics answered {}", response.status);
    }
    Ok(Exposition::parse(&response.body)?)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The kernel's ephemeral port range, `net.ipv4.ip_local_port_range`.
pub fn ephemeral_ports() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u32>().ok());
            let (low, high) = (parts.next()??, parts.next()??);
            Some(high.saturating_sub(low) + 1)
        })
        .unwrap_or(28_232)
}

/// Number of CPUs the kernel may ever bring up (the size of a per-CPU map value array).
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|text| parse_cpu_list(text.trim()))
        .unwrap_or_else(online_cpus)
}

fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut highest = None;
    for part in text.split(',') {
        let last = part.rsplit('-').next()?.parse::<usize>().ok()?;
        highest = highest.max(Some(last));
    }
    highest.map(|h| h + 1)
}

pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The running kernel's release, e.g. `6.18.1`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// System-wide interrupt counts of interest, summed over CPUs: IRQ work (`IWI`, raised by a
/// BPF ring buffer wake-up among others), rescheduling IPIs (`RES`) and function-call IPIs
/// (`CAL`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Interrupts {
    pub irq_work: u64,
    pub resched: u64,
    pub call: u64,
}

pub fn interrupts() -> Option<Interrupts> {
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    let mut out = Interrupts::default();
    for line in text.lines() {
        let Some((name, rest)) = line.trim_start().split_once(':') else {
            continue;
        };
        let slot = match name {
            "IWI" => &mut out.irq_work,
            "RES" => &mut out.resched,
            "CAL" => &mut out.call,
            _ => continue,
        };
        *slot = rest
            .split_whitespace()
            .map_while(|n| n.parse::<u64>().ok())
            .sum();
    }
    Some(out)
}

/// Share of CPU time the whole machine spent idle over `window` (from `/proc/stat`).
pub fn idle_share(window: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = values.iter().take(8).sum();
        let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
        Some((idle, total))
    }
    let (idle0, total0) = sample()?;
    std::thread::sleep(window);
    let (idle1, total1) = sample()?;
    let total = total1.saturating_sub(total0);
    (total > 0).then(|| idle1.saturating_sub(idle0) as f64 / total as f64)
}

/// True if `path` exists.
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one HTTP response on loopback, closing after it as the agent does.
    fn serve_once(response: &'static str) -> SocketAddr {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // Read the whole request head: closing with unread bytes would reset the connection.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            stream.write_all(response.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn scrape_sums_the_agents_counters_and_rejects_errors() {
        // The body ends where the server closes, as with `Connection: close`.
        let page = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n\
             # TYPE tracer_events_total counter\n\
             tracer_events_total{kind=\"state\"} 10\n\
             tracer_events_total{kind=\"reset\"} 2\n",
        );
        let page = scrape(page).unwrap();
        assert_eq!(page.sum("tracer_events_total", &[]), Some(12.0));
        assert_eq!(page.sum("tracer_events_lost_total", &[]), None);
        let missing = serve_once("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert!(scrape(missing).is_err());
        let garbled = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot text\n");
        assert!(scrape(garbled).is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8-9"), Some(10));
    }
}
