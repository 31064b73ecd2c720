//! Nothing of the agent stays in the kernel: after SIGTERM, SIGINT or SIGKILL every program,
//! link and map it held is gone from the kernel's own lists (BPF_*_GET_NEXT_ID, read with aya),
//! within a bounded wait. The agent's objects are told apart from those of anything else on the
//! host by the descriptors it holds (`/proc/PID/fdinfo`: `prog_id`, `link_id`, `map_id`).
//!
//! Two agents on one host: a second one on the same metrics port refuses in one line with a
//! non-zero exit and loads nothing (it binds before it loads); on another port the two coexist,
//! each with its own programs, and each reports the same connections.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long the kernel may take to free what a dead agent held (links go at close, programs
/// and maps after an RCU grace period).
const GONE_TIMEOUT: Duration = Duration::from_secs(15);

/// The BPF objects a process holds descriptors of, by id.
#[derive(Debug, Default)]
struct Held {
    programs: BTreeSet<u32>,
    links: BTreeSet<u32>,
    maps: BTreeSet<u32>,
}

fn held_by(pid: u32) -> Held {
    let mut held = Held::default();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return held; // exited meanwhile
    };
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let id = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        // A link's fdinfo names its program too: the link is what counts there.
        if let Some(link) = id("link_id:") {
            held.links.insert(link);
        } else if let Some(program) = id("prog_id:") {
            held.programs.insert(program);
        } else if let Some(map) = id("map_id:") {
            held.maps.insert(map);
        }
    }
    held
}

/// Program ids held by any process on the host.
fn programs_held_by_anyone() -> BTreeSet<u32> {
    let mut all = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        {
            all.extend(held_by(pid).programs);
        }
    }
    all
}

/// Whether an error of the kernel's lists means the object went away while listing.
fn vanished(err: &dyn std::error::Error) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.to_string().contains("No such file or directory") {
            return true;
        }
        source = e.source();
    }
    false
}

/// The kernel's loaded programs: id -> name.
fn kernel_programs() -> BTreeMap<u32, String> {
    let mut programs = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        match info {
            Ok(info) => {
                programs.insert(info.id(), info.name_as_str().unwrap_or("").to_string());
            }
            Err(e) if vanished(&e) => {}
            Err(e) => panic!("listing the kernel's BPF programs: {e}"),
        }
    }
    programs
}

/// The kernel's links: id -> program id.
fn kernel_links() -> BTreeMap<u32, u32> {
    let mut links = BTreeMap::new();
    for info in aya::programs::loaded_links() {
        match info {
            Ok(info) => {
                links.insert(info.id(), info.program_id());
            }
            Err(e) if vanished(&e) => {}
            Err(e) => panic!("listing the kernel's BPF links: {e}"),
        }
    }
    links
}

fn kernel_maps() -> BTreeSet<u32> {
    let mut maps = BTreeSet::new();
    for info in aya::maps::loaded_maps() {
        match info {
            Ok(info) => {
                maps.insert(info.id());
            }
            Err(e) if vanished(&e) => {}
            Err(e) => panic!("listing the kernel's BPF maps: {e}"),
        }
    }
    maps
}

/// The hooks of the "attached to a, b, c" log line.
fn attached_hooks(agent: &Agent) -> Vec<String> {
    let log = agent.stderr_text();
    let line = log
        .lines()
        .find_map(|l| {
            l.split_once("attached to ")
                .map(|(_, hooks)| hooks.to_string())
        })
        .unwrap_or_else(|| panic!("no \"attached to\" line in the log:\n{log}"));
    line.split(", ").map(str::to_string).collect()
}

/// What the running agent holds, checked against the kernel's lists: its programs there under
/// the names of the hooks it says it attached (the kernel keeps 15 bytes of a name), one link
/// per hook, each to one of its programs.
fn agent_objects(agent: &Agent) -> Held {
    let held = held_by(agent.pid());
    let programs = kernel_programs();
    let links = kernel_links();
    let maps = kernel_maps();
    let hooks = attached_hooks(agent);
    assert!(!hooks.is_empty());
    let names: BTreeSet<&str> = held
        .programs
        .iter()
        .map(|id| {
            programs
                .get(id)
                .unwrap_or_else(|| panic!("program {id} held by the agent is not listed"))
                .as_str()
        })
        .collect();
    for hook in &hooks {
        let short = &hook[..hook.len().min(15)];
        assert!(
            names.contains(short),
            "no program named {short:?} among the agent's {names:?}"
        );
    }
    assert_eq!(
        held.links.len(),
        hooks.len(),
        "one link per hook: {held:?} {hooks:?}"
    );
    for link in &held.links {
        let program = links
            .get(link)
            .unwrap_or_else(|| panic!("link {link} held by the agent is not listed"));
        assert!(held.programs.contains(program), "link {link} -> {program}");
    }
    for map in &held.maps {
        assert!(
            maps.contains(map),
            "map {map} held by the agent is not listed"
        );
    }
    assert!(!held.maps.is_empty(), "the agent holds no map: {held:?}");
    held
}

/// Waits (bounded) until none of `held` is in the kernel's lists any more.
fn assert_all_gone(held: &Held, after: &str) {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let programs: BTreeSet<u32> = kernel_programs().into_keys().collect();
        let links: BTreeSet<u32> = kernel_links().into_keys().collect();
        let maps = kernel_maps();
        let left = (
            held.programs.intersection(&programs).count(),
            held.links.intersection(&links).count(),
            held.maps.intersection(&maps).count(),
        );
        if left == (0, 0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}, {} programs, {} links and {} maps of the agent are still loaded \
             ({GONE_TIMEOUT:?} later): {held:?}",
            left.0,
            left.1,
            left.2
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// One connection on loopback that closes, and its report: work in flight.
fn some_traffic(agents: &[&Agent]) {
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerMode::EchoWaitClientClose,
        1,
    );
    let addr = server.addr;
    run_clients(addr, ClientMode::CloseFirst, 1, "tracer-client");
    server.join();
    for agent in agents {
        agent.wait_for_events(is_client_of(addr), 1, EVENT_TIMEOUT);
        agent.scrape();
    }
}

fn leaves_nothing_after(signal: libc::c_int, name: &str) {
    require_root();
    let mut agent = Agent::start(&[]);
    let held = agent_objects(&agent);
    some_traffic(&[&agent]);
    if signal == libc::SIGKILL {
        // No handler runs: the kernel closes the descriptors as the process dies.
        send_signal(agent.pid(), libc::SIGKILL);
        assert_all_gone(&held, name);
        drop(agent); // reaps it
    } else {
        agent.stop_with(signal);
        assert_all_gone(&held, name);
    }
}

#[test]
fn sigterm_leaves_no_program_link_or_map() {
    leaves_nothing_after(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_leaves_no_program_link_or_map() {
    leaves_nothing_after(libc::SIGINT, "SIGINT");
}

#[test]
fn sigkill_leaves_no_program_link_or_map() {
    leaves_nothing_after(libc::SIGKILL, "SIGKILL");
}

#[test]
fn a_second_agent_on_the_same_port_refuses_in_one_line_and_loads_nothing() {
    require_root();
    let mut first = Agent::start(&[]);
    let held = agent_objects(&first);
    let before: BTreeSet<u32> = kernel_programs().into_keys().collect();

    let listen = first.listen.to_string();
    let mut second = Command::new(AGENT_BIN)
        .args(["run", "--listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second agent");
    let status = wait_timeout(&mut second, READY_TIMEOUT);
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("the second agent on {listen} is still running after {READY_TIMEOUT:?}");
    };
    let output = second.wait_with_output().expect("second agent's output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "the second agent exited with {status}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line on stderr, got:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot serve metrics on {listen}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);

    // Nothing new is loaded and left unheld (an object nobody holds would be a leftover; other
    // software on the host may load programs meanwhile, but holds them).
    let held_now = programs_held_by_anyone();
    let orphans: Vec<(u32, String)> = kernel_programs()
        .into_iter()
        .filter(|(id, _)| !before.contains(id) && !held_now.contains(id))
        .collect();
    assert!(orphans.is_empty(), "programs left behind: {orphans:?}");

    // The first agent is untouched.
    let still = held_by(first.pid());
    assert_eq!(still.programs, held.programs);
    assert_eq!(still.links, held.links);
    some_traffic(&[&first]);
    first.stop();
    assert_all_gone(&held, "SIGTERM of the first agent");
}

#[test]
fn two_agents_on_different_ports_coexist_and_both_report() {
    require_root();
    let mut first = Agent::start(&[]);
    let mut second = Agent::start(&[]);
    let (held_first, held_second) = (agent_objects(&first), agent_objects(&second));
    assert!(
        held_first.programs.is_disjoint(&held_second.programs)
            && held_first.links.is_disjoint(&held_second.links),
        "each agent has its own programs and links: {held_first:?} {held_second:?}"
    );
    some_traffic(&[&first, &second]);

    first.stop();
    assert_all_gone(&held_first, "SIGTERM of the first agent");
    // The second goes on, with all it had.
    let still = held_by(second.pid());
    assert_eq!(still.programs, held_second.programs);
    assert_eq!(still.links, held_second.links);
    some_traffic(&[&second]);
    second.stop();
    assert_all_gone(&held_second, "SIGTERM of the second agent");
}
