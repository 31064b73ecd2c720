//! The kernel's and the agent's view of TIME_WAIT for the TIME_WAIT tests: timewait sockets
//! by network namespace as `ss` lists them (both substates), `/proc/net/sockstat`'s `tw` summed
//! over namespaces, and comparisons with the agent at quiet moments.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

pub const SETTLE: Duration = Duration::from_secs(1);
/// An early exit is reported once its cancel settled and the 1 s reuse window passed; a
/// namespace is torn down asynchronously after `ip netns del`.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the kernel may take to show a socket in TIME_WAIT after the connection ended.
pub const KERNEL_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent refreshes the per-peer gauges and settles what only time decides once a second.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Bounds for the search of a quiet moment (see [`agrees_with_kernel`]).
pub const STABLE_ATTEMPTS: u32 = 60;
/// The test agents' audit period (`--resync-every`): a mismatch with the kernel is compared
/// again after the agent's next audits, since the kernel can run a softirq without the agent's
/// programs (README, "Lost events") and only a sock_diag dump brings those events back.
pub const AUDIT_EVERY: Duration = Duration::from_secs(10);
const AUDIT_EVERY_ARG: &str = "10s";
const RESYNCS: &str = "tracer_resyncs_total";

/// Waits (bounded) until the agent applied `n` more resyncs than at `before`.
pub fn wait_for_audits(agent: &Agent, before: &str, n: u32) {
    wait_delta(
        agent,
        before,
        RESYNCS,
        &[],
        f64::from(n),
        AUDIT_EVERY * (n + 1) + Duration::from_secs(10),
    );
}
pub const STABLE_TIMEOUT: Duration = Duration::from_secs(90);

pub const GAUGE: &str = "tracer_time_wait_sockets";
pub const ENTERED: &str = "tracer_time_wait_entered_total";
pub const EXITED: &str = "tracer_time_wait_exited_total";
pub const FIN_WAIT2_EXITS: &str = "tracer_time_wait_fin_wait2_exits_total";
pub const BY_PEER: &str = "tracer_time_wait_sockets_by_peer";
pub const RATIO: &str = "tracer_time_wait_port_exhaustion_ratio";
pub const SETTINGS: &str = "tracer_time_wait_settings_info";
pub const EPHEMERAL: &str = "tracer_ephemeral_ports";
pub const MAX_BUCKETS: &str = "tracer_tcp_max_tw_buckets";
pub const LOST: &str = "tracer_events_lost_total";

/// Timewait sockets by network namespace inode: (local, peer) as `ss` prints them.
pub type Snapshot = BTreeMap<u64, BTreeSet<(String, String)>>;

pub fn require_tools() {
    require_root();
    require_tool("ss");
    require_tool("nsenter");
    require_tool("ip");
}

/// Timewait sockets in the namespace at `path` (`None`: this one), either substate: what `ss`
/// lists as TIME-WAIT, and as FIN-WAIT-2 with a `timewait` timer (an orphaned socket whose
/// peer has not sent its FIN yet; a full socket in FIN_WAIT2 has another timer). `filter` is
/// added to the `ss` command line.
pub fn ss_time_wait(
    path: Option<&PathBuf>,
    filter: &[&str],
) -> Result<BTreeSet<(String, String)>, String> {
    // Two states: ss prints the State column first.
    let mut args = vec!["-Htano", "state", "time-wait", "state", "fin-wait-2"];
    args.extend_from_slice(filter);
    let mut sockets = BTreeSet::new();
    for line in ss_in(path, &args)? {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() >= 5,
            "unexpected `ss {}` line: {line:?}",
            args.join(" ")
        );
        if f[0] == "TIME-WAIT" || line.contains("timer:(timewait") {
            sockets.insert((f[3].to_string(), f[4].to_string()));
        }
    }
    Ok(sockets)
}

/// Timewait sockets in every network namespace; an error when one could not be listed.
pub fn snapshot() -> Result<Snapshot, String> {
    per_namespace(|path| ss_time_wait(path, &[]), BTreeSet::is_empty)
}

/// `probe` in every network namespace (a `None` path is this one), by namespace inode, leaving
/// out the values `skip` says are empty; an error when one could not be read.
pub fn per_namespace<T>(
    probe: impl Fn(Option<&PathBuf>) -> Result<T, String>,
    skip: impl Fn(&T) -> bool,
) -> Result<BTreeMap<u64, T>, String> {
    let own = host_netns_inode();
    let mut all = BTreeMap::new();
    for (inode, paths) in namespaces() {
        let value = if inode == own {
            probe(None)?
        } else {
            let mut errors = Vec::new();
            let read = paths
                .iter()
                .find_map(|p| probe(Some(p)).map_err(|e| errors.push(e)).ok());
            read.ok_or_else(|| format!("netns {inode}: {}", errors.join("; ")))?
        };
        if !skip(&value) {
            all.insert(inode, value);
        }
    }
    Ok(all)
}

/// `/proc/net/sockstat`'s TCP `tw` in the namespace at `path` (`None`: this one): the kernel's
/// own count of timewait sockets, both substates.
pub fn sockstat_tw(path: Option<&PathBuf>) -> Result<u64, String> {
    let text = match path {
        None => std::fs::read_to_string("/proc/net/sockstat").map_err(|e| e.to_string())?,
        Some(p) => {
            let net = format!("--net={}", p.display());
            let out = run_cmd("nsenter", &[net.as_str(), "cat", "/proc/net/sockstat"]);
            if !out.status.success() {
                return Err(format!(
                    "nsenter {net} cat /proc/net/sockstat: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let tcp = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| format!("no TCP line in sockstat: {text:?}"))?;
    let fields: Vec<&str> = tcp.split_whitespace().collect();
    let at = fields
        .iter()
        .position(|f| *f == "tw")
        .ok_or_else(|| format!("no tw in {tcp:?}"))?;
    fields
        .get(at + 1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad tw in {tcp:?}"))
}

/// `sockstat`'s `tw` in every namespace that has timewait sockets.
pub fn sockstat_all() -> Result<BTreeMap<u64, u64>, String> {
    per_namespace(sockstat_tw, |tw| *tw == 0)
}

pub fn total(snap: &Snapshot) -> usize {
    snap.values().map(BTreeSet::len).sum()
}

pub fn describe(snap: &Snapshot) -> String {
    let per_ns: Vec<String> = snap
        .iter()
        .map(|(ns, s)| format!("netns {ns}: {}", s.len()))
        .collect();
    format!("{} in all ({})", total(snap), per_ns.join(", "))
}

/// TIME_WAIT sockets of this namespace (or of `ns`) as parsed addresses.
pub fn tw_sockets(ns: Option<&Netns>) -> Vec<(SocketAddr, SocketAddr)> {
    let path = ns.map(|n| PathBuf::from(n.path()));
    let listed = ss_time_wait(path.as_ref(), &[]).unwrap_or_else(|e| panic!("{e}"));
    listed
        .iter()
        .filter_map(|(l, p)| Some((l.parse().ok()?, p.parse().ok()?)))
        .collect()
}

/// Waits (bounded) until `probe` returns `Ok`; panics with `what` and the last error.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?} (last: {last})"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until `ss` in `ns` (`None`: this namespace) lists in TIME_WAIT exactly one
/// socket per address in `clients` for their connections to `server`: the server's ends when
/// `server_holds`, else the clients' ends.
pub fn wait_kernel_time_wait(
    ns: Option<&Netns>,
    server: SocketAddr,
    clients: &[SocketAddr],
    server_holds: bool,
) {
    let want: HashSet<(SocketAddr, SocketAddr)> = clients
        .iter()
        .map(|c| {
            if server_holds {
                (server, *c)
            } else {
                (*c, server)
            }
        })
        .collect();
    wait_until(
        "the kernel lists the connections' ends in TIME_WAIT",
        KERNEL_TIMEOUT,
        || {
            let have: HashSet<(SocketAddr, SocketAddr)> = tw_sockets(ns)
                .into_iter()
                .filter(|(l, p)| {
                    if server_holds {
                        *l == server
                    } else {
                        *p == server
                    }
                })
                .collect();
            if have == want {
                Ok(())
            } else {
                Err(format!(
                    "ss lists {} of the {} expected TIME_WAIT sockets ({} in all toward {server})",
                    have.intersection(&want).count(),
                    want.len(),
                    have.len()
                ))
            }
        },
    );
}

/// `net.ipv4.ip_local_port_range` as the kernel has it.
pub fn port_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read ip_local_port_range");
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

pub fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .unwrap_or_else(|e| panic!("read net.ipv4.{name}: {e}"))
        .trim()
        .to_string()
}

/// How many sockets a new TIME_WAIT group needs to be among the `top` largest, as the agent
/// groups them (remote address and service port: the remote port when the local one is in
/// ip_local_port_range, else the local port; over all namespaces), given what is in TIME_WAIT
/// now. A margin covers ties (broken by address) and growth meanwhile.
pub fn enough_to_rank(top: usize, at_least: usize) -> usize {
    let (low, high) = port_range();
    let snap = snapshot().unwrap_or_else(|e| panic!("{e}"));
    let split = |s: &str| -> Option<(String, u16)> {
        let (ip, port) = s.rsplit_once(':')?;
        Some((ip.to_string(), port.parse().ok()?))
    };
    let mut groups: std::collections::HashMap<(String, u16), usize> = Default::default();
    for (local, peer) in snap.values().flatten() {
        let (Some((_, lport)), Some((pip, pport))) = (split(local), split(peer)) else {
            continue;
        };
        let service = if (low..=high).contains(&lport) {
            pport
        } else {
            lport
        };
        *groups.entry((pip, service)).or_default() += 1;
    }
    let mut sizes: Vec<usize> = groups.into_values().collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let kth = sizes.get(top - 1).copied().unwrap_or(0);
    let n = if sizes.len() + 100 < top {
        at_least
    } else {
        at_least.max(kth + 10)
    };
    assert!(
        n <= 3000,
        "{top} TIME_WAIT groups of {kth} sockets or more exist on this host: too many to \
         outnumber"
    );
    n
}

/// The agent with `args` and a large ring buffer: exact accounting needs every event, and
/// other work on the host may open connections by the thousand meanwhile. Losses still show
/// in `tracer_events_lost_total`, which the failure messages quote.
pub fn start_agent(args: &[&str]) -> Agent {
    let mut all = vec![
        "--ring-buffer-bytes",
        "67108864",
        "--resync-every",
        AUDIT_EVERY_ARG,
    ];
    all.extend_from_slice(args);
    Agent::start(&all)
}

/// How often a scenario is run when the kernel hid events from every BPF program meanwhile.
pub const BLIND_ATTEMPTS: u32 = 3;

/// Runs in which the kernel hid events from the agent's programs between two scrapes
/// (`kernel_hid_events`); panics when the agent does not expose the softirq counter.
pub fn hidden_between(before: &str, after: &str) -> f64 {
    let total = |text: &str| {
        kernel_hid_events(text)
            .unwrap_or_else(|| panic!("tracer_softirqs_unobserved_total is not exposed:\n{text}"))
    };
    total(after) - total(before)
}

/// One run of a scenario that counts events exactly; see [`exact_unless_kernel_blind`].
#[derive(Default)]
pub struct Attempt {
    agent: Option<(Agent, String)>,
}

impl Attempt {
    /// Starts this attempt's agent ([`start_agent`]) and remembers its counters at the start.
    pub fn start_agent(&mut self, args: &[&str]) -> &Agent {
        let agent = start_agent(args);
        let before = agent.scrape();
        &self.agent.insert((agent, before)).0
    }
}

/// Runs `scenario` (which starts its agent with [`Attempt::start_agent`]) until it passes. The
/// kernel can run a softirq without any BPF program, or skip a program's run while it
/// already runs on that CPU (README, "Lost events"); the agent counts such runs (`kernel_hid_events`)
/// but cannot know what they held. A failed run during which the agent counted some says so
/// on stderr and runs again, up to
/// `BLIND_ATTEMPTS` runs; a failed run without any fails the test at once, as does the last.
pub fn exact_unless_kernel_blind(scenario: impl Fn(&mut Attempt)) {
    for run in 1..=BLIND_ATTEMPTS {
        let mut attempt = Attempt::default();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&mut attempt)));
        let Err(failure) = outcome else {
            return;
        };
        let Some((agent, before)) = attempt.agent.take() else {
            std::panic::resume_unwind(failure);
        };
        // The agent compares the counts once a second.
        thread::sleep(REFRESH * 2);
        let blind = hidden_between(&before, &agent.scrape());
        if blind == 0.0 || run == BLIND_ATTEMPTS {
            eprintln!("run {run}: {blind} kernel runs that hid events from the agent's programs");
            std::panic::resume_unwind(failure);
        }
        eprintln!(
            "run {run} failed (above) while the kernel hid events from the programs in {blind} \
             runs (softirqs without BPF, or program runs skipped): running the scenario again"
        );
    }
}

/// The value of the one sample `name{labels}`; panics when it is not exposed.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = matching_samples(text, name, labels);
    assert!(
        found.len() == 1,
        "expected one sample {name}{labels:?}, found {}:\n{text}",
        found.len()
    );
    found[0].value
}

/// The value of `name{labels}`, 0 when the series is not exposed. Only for the per-peer
/// breakdown (`tracer_time_wait_sockets_by_peer`): the agent shows a group only while it holds
/// timewait sockets and is in the top N, and the tests that read it show enough peers that
/// their group is never folded into `other`, so there absence means 0.
pub fn series_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value_or_zero(text, name, labels)
}

pub fn delta(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(after, name, labels) - sample(before, name, labels)
}

/// Scrapes until `name{labels}` grew by at least `min` since `before` (bounded by `timeout`).
pub fn wait_delta(
    agent: &Agent,
    before: &str,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
    timeout: Duration,
) -> String {
    let what = format!("{name}{labels:?} grows by {min}");
    wait_until(&what, timeout, || {
        let now = agent.scrape();
        let d = delta(before, &now, name, labels);
        if d >= min {
            Ok(now)
        } else {
            Err(format!("grew by {d}"))
        }
    })
}

/// Compares an agent value with the kernel's at a quiet moment: the kernel is sampled, the
/// agent scraped, the kernel sampled again, retried (bounded) until both kernel samples agree;
/// then the agent must agree too. The agent settles the exit of a socket whose timer was
/// cancelled ~10 ms after the cancel, at the latest on its once-a-second refresh, and refreshes
/// the per-peer gauges then; so a mismatch is confirmed by a second quiet sample taken more
/// than a refresh later before the test fails. `same(a, b)` says whether nothing the agent
/// should have counted changed between the samples. Returns the first sample and the scrape.
pub fn agrees_with_kernel<K>(
    agent: &Agent,
    what: &str,
    kernel: impl Fn() -> Result<K, String>,
    same: impl Fn(&K, &K) -> bool,
    kernel_count: impl Fn(&K) -> f64,
    kernel_describe: impl Fn(&K) -> String,
    agent_value: impl Fn(&str) -> f64,
) -> (K, String) {
    let mut deadline = Instant::now() + STABLE_TIMEOUT;
    let mut mismatch: Option<String> = None;
    let mut audited = false;
    let mut unstable = 0u32;
    let mut last_error = None;
    for attempt in 0..STABLE_ATTEMPTS {
        let a = kernel();
        let text = agent.scrape();
        let b = kernel();
        match (a, b) {
            (Ok(a), Ok(b)) if same(&a, &b) => {
                let want = kernel_count(&a);
                let got = agent_value(&text);
                if got == want {
                    return (a, text);
                }
                let lost = metric_value(&text, LOST, &[]);
                let report = format!(
                    "{what}: the agent says {got}, the kernel {want} ({}) at attempt {attempt}{}",
                    kernel_describe(&a),
                    if lost > 0.0 {
                        format!(
                            " -- the agent lost {lost} events (ring buffer full): it cannot be \
                             exact, the host was too busy for this test"
                        )
                    } else {
                        " (no event lost)".to_string()
                    },
                );
                if let Some(first) = mismatch.take() {
                    if !audited {
                        // Events the kernel never showed the agent come back with its audit:
                        // compare again after two (the first may have dumped before the last
                        // event of the test). Said on stderr, so that a run shows it.
                        eprintln!(
                            "{what}: the agent differs from the kernel, waiting for its audit:\n\
                             {first}\n{report}"
                        );
                        wait_for_audits(agent, &text, 2);
                        audited = true;
                        deadline = Instant::now() + STABLE_TIMEOUT;
                        continue;
                    }
                    panic!(
                        "{what} disagrees with the kernel at two quiet moments more than {REFRESH:?} \
                         apart, after two audits of the agent:\n{first}\n{report}\n--- last \
                         scrape ---\n{text}"
                    );
                }
                mismatch = Some(report);
                thread::sleep(REFRESH + Duration::from_millis(200));
            }
            (a, b) => {
                if let Err(e) = a.and(b) {
                    last_error = Some(e);
                }
                unstable += 1;
                thread::sleep(Duration::from_millis(150 + 50 * u64::from(attempt.min(10))));
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    panic!(
        "{what}: no quiet moment to compare with the kernel within {STABLE_ATTEMPTS} attempts / \
         {STABLE_TIMEOUT:?} ({unstable} unstable samples; mismatch seen: {mismatch:?}; last \
         listing error: {last_error:?})"
    );
}

/// Whether `b` is `a` plus, at most, the TIME_WAIT socket of the scrape in between: the
/// agent's HTTP server closes first, so each scrape leaves its end of the connection in
/// TIME_WAIT, after the metrics were rendered.
pub fn same_but_the_scrape(listen: SocketAddr) -> impl Fn(&Snapshot, &Snapshot) -> bool {
    let listen = listen.to_string();
    move |a, b| {
        let own = host_netns_inode();
        let empty = BTreeSet::new();
        let inodes: BTreeSet<&u64> = a.keys().chain(b.keys()).collect();
        inodes.into_iter().all(|ns| {
            let (sa, sb) = (a.get(ns).unwrap_or(&empty), b.get(ns).unwrap_or(&empty));
            sa.is_subset(sb)
                && sb
                    .difference(sa)
                    .all(|(l, p)| *ns == own && (*l == listen || *p == listen))
        })
    }
}

/// `tracer_time_wait_sockets` equals the sum over namespaces of the timewait sockets `ss`
/// lists (TIME-WAIT, and FIN-WAIT-2 with a timewait timer).
pub fn assert_gauge_matches_ss(agent: &Agent, when: &str) -> (Snapshot, String) {
    agrees_with_kernel(
        agent,
        &format!("{GAUGE} {when}"),
        snapshot,
        same_but_the_scrape(agent.listen),
        |s| total(s) as f64,
        describe,
        |text| sample(text, GAUGE, &[]),
    )
}

/// `tracer_time_wait_sockets` equals `/proc/net/sockstat`'s `tw` summed over namespaces. Two
/// kernel reads agree when nothing changed but, in this namespace, the scrape's own TIME_WAIT
/// socket (the agent's HTTP server closes first, after rendering).
pub fn assert_gauge_matches_sockstat(agent: &Agent, when: &str) -> BTreeMap<u64, u64> {
    let own = host_netns_inode();
    let (counts, _) = agrees_with_kernel(
        agent,
        &format!("{GAUGE} against sockstat tw {when}"),
        sockstat_all,
        |a, b| {
            let inodes: BTreeSet<&u64> = a.keys().chain(b.keys()).collect();
            inodes.into_iter().all(|ns| {
                let (x, y) = (
                    a.get(ns).copied().unwrap_or(0),
                    b.get(ns).copied().unwrap_or(0),
                );
                x == y || (*ns == own && y == x + 1)
            })
        },
        |c| c.values().sum::<u64>() as f64,
        |c| format!("sockstat tw by namespace: {c:?}"),
        |text| sample(text, GAUGE, &[]),
    );
    counts
}

/// `time_wait_ended` events for the socket with local end `local` in namespace `netns`.
pub fn ended_at(netns: u64, local: SocketAddr) -> impl Fn(&Value) -> bool + Clone {
    let ip = local.ip().to_string();
    let port = local.port();
    move |e| {
        e["event"] == "time_wait_ended"
            && e["netns"] == netns
            && e["saddr"] == ip.as_str()
            && e["sport"] == port
    }
}

pub fn ports_of(addrs: &[SocketAddr]) -> HashSet<u16> {
    addrs.iter().map(SocketAddr::port).collect()
}

/// The one IP address of `addrs`.
pub fn addr_ip_of(addrs: &[SocketAddr]) -> String {
    let ips: HashSet<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    assert_eq!(ips.len(), 1, "{addrs:?}");
    ips.into_iter().next().unwrap().to_string()
}

/// Sets an integer socket option.
pub fn set_int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    use std::os::fd::AsRawFd;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("socklen");
    // SAFETY: the fd is a live socket owned by `fd`; the value points to an initialised c_int
    // that outlives the call and `len` is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            len,
        )
    };
    assert!(
        rc == 0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
}

/// A connection to `server` from exactly `local` (SO_REUSEADDR, bind, connect) that sent the
/// request and read the echo. Errors keep their kind (`AddrInUse` when `local` is taken).
pub fn connect_from(local: SocketAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let fail =
        |what: String, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    use std::os::fd::AsRawFd;
    let (SocketAddr::V4(local4), SocketAddr::V4(server4)) = (local, server) else {
        panic!("connect_from handles IPv4 only");
    };
    // SAFETY: socket(2) has no memory-safety preconditions.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(fail("socket".into(), std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns; OwnedFd closes it once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let mut stream = TcpStream::from(fd);
    // The send timeout also bounds the blocking connect below.
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET"),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("len");
    let bind_to = sockaddr(local4);
    // SAFETY: the fd is a live socket owned by `stream`; the address is an initialised
    // sockaddr_in that outlives the call and `len` is its size.
    let rc = unsafe {
        libc::bind(
            stream.as_raw_fd(),
            std::ptr::from_ref(&bind_to).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(fail(
            format!("bind {local}"),
            std::io::Error::last_os_error(),
        ));
    }
    let connect_to = sockaddr(server4);
    // SAFETY: as for bind above.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&connect_to).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(fail(format!("connect {local} -> {server}"), e));
    }
    stream
        .write_all(REQUEST)
        .map_err(|e| fail("client write".into(), e))?;
    let mut buf = vec![0u8; REQUEST.len()];
    stream
        .read_exact(&mut buf)
        .map_err(|e| fail("client read echo".into(), e))?;
    Ok(stream)
}

/// Reads the server's FIN (nothing more may come), then closes.
pub fn close_after_fin(mut stream: TcpStream) -> Result<(), String> {
    let mut rest = [0u8; 64];
    match stream.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("the server sent {n} more bytes instead of its FIN")),
        Err(e) => Err(format!("client wait for FIN: {e}")),
    }
}
