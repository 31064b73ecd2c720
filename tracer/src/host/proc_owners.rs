//! Finding the process that holds a socket, the way `ss -p` does: the socket's inode from
//! sock_diag, then the `/proc/<pid>/fd` link that points at it (read with `procfs`). Slow (it walks every process),
//! so only for rare findings such as a CLOSE_WAIT leak, whose owner the kernel events cannot
//! name (the transition into CLOSE_WAIT runs in softirq context).
use procfs::process::FDTarget;

use crate::host::{namespaces, sock_diag};
use tracer_core::model::Owner;
use tracer_core::model::{Comm, Tuple};

/// The process holding the socket with `tuple` in network namespace `netns`, if any.
pub fn socket_owner(netns: u32, tuple: &Tuple) -> Option<Owner> {
    inode_owner(socket_inode(netns, tuple)?)
}

/// The process holding the socket whose file has `inode` (socket inodes are unique across
/// network namespaces), if any.
pub fn inode_owner(inode: u32) -> Option<Owner> {
    let inode = u64::from(inode);
    // Processes and descriptors come and go during the walk: skip what vanished.
    for process in procfs::process::all_processes().ok()?.flatten() {
        let Ok(fds) = process.fd() else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode));
        if holds {
            let comm = process
                .stat()
                .map(|stat| Comm::from(stat.comm.as_str()))
                .unwrap_or_default();
            return Some(Owner {
                pid: u32::try_from(process.pid).ok()?,
                comm,
            });
        }
    }
    None
}

fn socket_inode(netns: u32, tuple: &Tuple) -> Option<u32> {
    let own = namespaces::current_netns_inode().ok()?;
    // Only sockets a process can hold with a peer: TIME_WAIT and request sockets, the bulk of
    // a busy host's, have no file.
    let sockets = if netns == own || netns == 0 {
        sock_diag::dump_tcp_connections().ok()?
    } else {
        let namespace = namespaces::other_namespaces(own)
            .into_iter()
            .find(|ns| ns.inode == netns)?;
        namespaces::in_namespace(&namespace, sock_diag::dump_tcp_connections).ok()?
    };
    sockets
        .iter()
        .find(|s| s.tuple == *tuple && s.inode != 0)
        .map(|s| s.inode)
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
