//! Finding the process that holds a socket, the way `ss -p` does: the socket's inode from
//! sock_diag, then the `/proc/<pid>/fd` link that points at it. Slow (it walks every process),
//! so only for rare findings such as a CLOSE_WAIT leak, whose owner the kernel events cannot
//! name (the transition into CLOSE_WAIT runs in softirq context).
use std::path::Path;

use crate::host::{namespaces, sock_diag};
use tracer_core::model::Owner;
use tracer_core::model::{Comm, Tuple};

/// The process holding the socket with `tuple` in network namespace `netns`, if any.
pub fn socket_owner(netns: u32, tuple: &Tuple) -> Option<Owner> {
    let inode = socket_inode(netns, tuple)?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()) {
                return Some(Owner {
                    pid,
                    comm: read_comm(&entry.path()),
                });
            }
        }
    }
    None
}

fn socket_inode(netns: u32, tuple: &Tuple) -> Option<u32> {
    let own = namespaces::current_netns_inode().ok()?;
    let sockets = if netns == own || netns == 0 {
        sock_diag::dump_tcp().ok()?
    } else {
        let namespace = namespaces::other_namespaces(own)
            .into_iter()
            .find(|ns| ns.inode == netns)?;
        namespaces::dump_tcp_in(&namespace).ok()?
    };
    sockets
        .iter()
        .find(|s| s.tuple == *tuple && s.inode != 0)
        .map(|s| s.inode)
}

fn read_comm(proc_dir: &Path) -> Comm {
    std::fs::read_to_string(proc_dir.join("comm"))
        .map(|c| Comm::from(c.trim_end()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn finds_this_process_as_owner_of_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let tuple = Tuple {
            src: client.local_addr().expect("addr").ip(),
            sport: client.local_addr().expect("addr").port(),
            dst: client.peer_addr().expect("addr").ip(),
            dport: client.peer_addr().expect("addr").port(),
        };
        let netns = namespaces::current_netns_inode().expect("netns");
        let owner = socket_owner(netns, &tuple).expect("owner found");
        assert_eq!(owner.pid, std::process::id());
        let unknown = Tuple { sport: 1, ..tuple };
        assert_eq!(socket_owner(netns, &unknown), None);
    }
}
