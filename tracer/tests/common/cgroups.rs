//! Real cgroup v2 directories for tests, named as systemd, docker or the kubelet would name
//! them, under one parent per test (`tracer-test-<pid>-<n>` at the top of the machine's cgroup2
//! hierarchy), with processes moved into them. Everything is removed when the guard drops,
//! even after a failed assertion; parents left by killed test processes are removed by the
//! next run.
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{require_root, require_tool};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long the processes of a cgroup may take to leave it once killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The cgroup2 mount as `/proc/self/mountinfo` lists it, read here without the agent's code:
/// `(mount point, root)` of each whole-hierarchy cgroup2 mount, `/sys/fs/cgroup` first.
pub fn cgroup2_mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut mounts: Vec<(PathBuf, String)> = text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split(' ').next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split(' ').collect();
            Some((PathBuf::from(fields.get(4)?), (*fields.get(3)?).to_owned()))
        })
        .collect();
    mounts.sort_by_key(|(point, _)| point.as_os_str().len());
    mounts
}

/// A test's own subtree of the cgroup2 hierarchy.
pub struct TestCgroups {
    /// The cgroup2 mount point.
    pub mount: PathBuf,
    /// The test's parent cgroup, as a directory.
    pub dir: PathBuf,
    /// The parent's path from the hierarchy's root, as `/proc/<pid>/cgroup` writes it.
    pub path: String,
    children: Vec<(String, Child)>,
}

impl TestCgroups {
    pub fn create() -> TestCgroups {
        require_root();
        require_tool("sleep");
        let (mount, root) = cgroup2_mounts()
            .into_iter()
            .find(|(_, root)| root == "/")
            .expect("no cgroup2 hierarchy mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)");
        remove_stale(&mount);
        let name = format!(
            "tracer-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = format!("{}/{name}", root.trim_end_matches('/'));
        TestCgroups {
            mount,
            dir,
            path,
            children: Vec::new(),
        }
    }

    /// Makes the cgroup `rel` (and its parents) below the test's parent; returns its directory.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let dir = self.dir.join(rel);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        dir
    }

    /// `rel`'s path from the hierarchy's root, as `/proc/<pid>/cgroup` writes it.
    pub fn path_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.path)
    }

    /// Starts a `sleep` and moves it into the cgroup `rel` (made if missing); returns its pid.
    pub fn spawn_in(&mut self, rel: &str) -> u32 {
        let dir = self.mkdir(rel);
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        self.children.push((rel.to_owned(), child));
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("write {pid} to {}: {e}", procs.display()));
        pid
    }

    /// Stops the processes started in `rel` and removes the cgroup.
    pub fn remove(&mut self, rel: &str) {
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.children)
            .into_iter()
            .partition(|(r, _)| r == rel);
        self.children = others;
        for (_, mut child) in mine {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = self.dir.join(rel);
        remove_tree(&dir).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = remove_tree(&self.dir) {
            if thread::panicking() {
                eprintln!("{e}");
            } else {
                panic!("{e}");
            }
        }
    }
}

/// Kills what is left in the cgroup `dir` and below (`cgroup.kill`), waits (bounded) until it
/// is empty, then removes its directories, deepest first.
fn remove_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let events = match std::fs::read_to_string(dir.join("cgroup.events")) {
            Ok(events) => events,
            // Removed meanwhile (another test cleaning the same stale parent).
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("read {}/cgroup.events: {e}", dir.display())),
        };
        if events.lines().any(|l| l == "populated 0") {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "cgroup {} still has processes: {events}",
                dir.display()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        dirs.push(d);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        match std::fs::remove_dir(&d) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(format!("rmdir {}: {e}", d.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes `tracer-test-<pid>-<n>` cgroups left by test processes that are gone.
fn remove_stale(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten().take(10_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("tracer-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(e) = remove_tree(&entry.path())
        {
            eprintln!("stale test cgroup: {e}");
        }
    }
}
