//! The kernel's own view, in every network namespace the host has: timewait sockets (`ss`),
//! CLOSE_WAIT sockets (`ss`) and retransmitted segments (`nstat`).
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Network namespaces by inode, with a path to enter each (`None`: this process's own).
pub fn namespaces() -> BTreeMap<u64, Option<PathBuf>> {
    let mut found = BTreeMap::new();
    if let Ok(own) = std::fs::metadata("/proc/self/ns/net") {
        found.insert(own.ino(), None);
    }
    let mut consider = |path: PathBuf| {
        if let Ok(m) = std::fs::metadata(&path) {
            found.entry(m.ino()).or_insert(Some(path));
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten().take(10_000) {
                consider(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten().take(1_000_000) {
            if entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    found
}

/// Runs `program args` in the namespace at `path` (`None`: this one); its stdout.
fn in_netns(path: Option<&PathBuf>, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = match path {
        None => Command::new(program),
        Some(p) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", p.display())).arg(program);
            c
        }
    };
    let out = cmd
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Timewait sockets summed over every namespace: what `ss` lists in TIME-WAIT, and in
/// FIN-WAIT-2 with a timewait timer (the agent counts both, as the kernel does); and how many of
/// them have `port` as local port (the agent's own scrapes leave some). Namespaces that vanish
/// while being listed are skipped.
pub fn time_wait_total(port: u16) -> (u64, u64) {
    let (mut total, mut on_port) = (0, 0);
    let mine = format!(":{port}");
    for path in namespaces().values() {
        let Ok(tw) = in_netns(path.as_ref(), "ss", &["-Htan", "state", "time-wait"]) else {
            continue;
        };
        let Ok(fw2) = in_netns(path.as_ref(), "ss", &["-Htano", "state", "fin-wait-2"]) else {
            continue;
        };
        let lines = tw
            .lines()
            .chain(fw2.lines().filter(|l| l.contains("timer:(timewait")));
        for line in lines {
            total += 1;
            if path.is_none()
                && line
                    .split_whitespace()
                    .nth(2)
                    .is_some_and(|l| l.ends_with(&mine))
            {
                on_port += 1;
            }
        }
    }
    (total, on_port)
}

/// CLOSE_WAIT sockets summed over every namespace.
pub fn close_wait_total() -> u64 {
    namespaces()
        .values()
        .filter_map(|path| in_netns(path.as_ref(), "ss", &["-Htan", "state", "close-wait"]).ok())
        .map(|out| out.lines().count() as u64)
        .sum()
}

/// `TcpRetransSegs` of every namespace, by inode (absolute, without touching nstat's history).
pub fn retrans_segs() -> BTreeMap<u64, u64> {
    let mut counts = BTreeMap::new();
    for (inode, path) in namespaces() {
        let Ok(out) = in_netns(path.as_ref(), "nstat", &["-asz", "TcpRetransSegs"]) else {
            continue;
        };
        if let Some(value) = out.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "TcpRetransSegs").then(|| f.next()?.parse::<u64>().ok())?
        }) {
            counts.insert(inode, value);
        }
    }
    counts
}
