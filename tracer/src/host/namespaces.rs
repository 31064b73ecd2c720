//! The host's network namespaces: this one's inode (as the kernel events carry it), every other
//! one that can be entered, and a sock_diag dump taken from inside one.
use std::collections::HashSet;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::sock_diag::{HostError, Lister};

/// Inode of the calling thread's network namespace, the kernel's `net->ns.inum` that the kernel
/// events carry.
pub fn current_netns_inode() -> Result<u32, HostError> {
    // `/proc/self` is the thread-group leader: a thread that entered another namespace must
    // read its own entry. `/proc/thread-self` exists since Linux 3.17.
    let metadata = match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let path = "/proc/self/ns/net";
            std::fs::metadata(path).map_err(|source| HostError::Netns { path, source })?
        }
        Err(source) => {
            return Err(HostError::Netns {
                path: "/proc/thread-self/ns/net",
                source,
            });
        }
    };
    let ino = metadata.ino();
    u32::try_from(ino).map_err(|_| HostError::NetnsInode(ino))
}

/// A network namespace other than the agent's, and a path that lets us enter it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u32,
    pub path: std::path::PathBuf,
}

/// Every network namespace on the host that can be entered, except `own`: those named under
/// `/run/netns` (`ip netns add`) and those of running processes, one path per namespace. A
/// namespace with neither (kept alive only by a socket) cannot be entered and is not listed.
pub fn other_namespaces(own: u32) -> Vec<Namespace> {
    let mut seen = HashSet::from([own]);
    let mut found = Vec::new();
    let mut consider = |path: std::path::PathBuf| {
        if let Ok(metadata) = std::fs::metadata(&path)
            && let Ok(inode) = u32::try_from(metadata.ino())
            && seen.insert(inode)
        {
            found.push(Namespace { inode, path });
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                consider(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    found
}

/// A sock_diag socket of another network namespace, opened inside it (see `in_namespace`) and
/// usable from any thread.
pub fn lister_in(namespace: &Namespace) -> Result<Lister, HostError> {
    in_namespace(namespace, Lister::open)
}

/// Runs `work` inside another network namespace, on a short-lived thread that enters it (a
/// thread's namespace can change without affecting the rest of the agent).
pub fn in_namespace<T: Send + 'static>(
    namespace: &Namespace,
    work: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, HostError> {
    let path = namespace.path.clone();
    let worker = std::thread::Builder::new()
        .name("tracer-netns".into())
        .spawn(move || -> Result<T, HostError> {
            let file = std::fs::File::open(&path).map_err(|source| HostError::EnterNetns {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the descriptor is open for the duration of the call and CLONE_NEWNET asks
            // only for a network namespace switch of this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(HostError::EnterNetns {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            work()
        })
        .map_err(HostError::Socket)?;
    worker.join().unwrap_or_else(|_| {
        Err(HostError::Socket(io::Error::other(
            "the namespace thread panicked",
        )))
    })
}
