//! Listening sockets and their accept-queue overflows, per network namespace.
//!
//! A SYN dropped because a listener's accept queue is full never reaches the drop tracepoint
//! (the kernel counts it and frees nothing traceable), so the kernel's own counters are read
//! instead: `TcpExtListenOverflows` in the namespace's `/proc/net/netstat`, and each listener's
//! `sk_drops` from sock_diag's meminfo (what `ss -tlnm` prints as `d<N>`), with its accept
//! queue length and limit (`ss -tln` Recv-Q / Send-Q). Slow: read on a worker, never per event.
use std::io;
use std::net::IpAddr;

use netlink_packet_core::NlasIterator;
use netlink_packet_sock_diag::constants::INET_DIAG_SKMEMINFO;
use netlink_packet_sock_diag::inet::ExtensionFlags;

use super::namespaces::{self, Namespace};
use super::sock_diag::{self, HostError, Query};
use tracer_core::model::TcpState;

/// `SK_MEMINFO_DROPS`: the index of `sk_drops` in the `INET_DIAG_SKMEMINFO` array of u32.
const SK_MEMINFO_DROPS: usize = 8;

/// Listeners kept per namespace; a host with more is cut short (logged).
pub const MAX_LISTENERS: usize = 65_536;

/// One listening TCP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket file's inode, to find the process holding it.
    pub inode: u32,
    /// The kernel's socket cookie: tells a listener from one reopened on the same port.
    pub cookie: u64,
    /// Connections waiting in the accept queue (`sk_ack_backlog`, `ss -tln` Recv-Q).
    pub queue_length: u32,
    /// The accept queue's limit: the `listen()` backlog capped by `net.core.somaxconn`
    /// (`sk_max_ack_backlog`, `ss -tln` Send-Q).
    pub queue_limit: u32,
    /// `sk_drops`: SYNs and handshake ACKs dropped by this listener, overflows of its accept
    /// queue above all (`ss -tlnm` `d<N>`). `None` if the kernel did not send meminfo.
    pub drops: Option<u32>,
}

/// What one network namespace says about its listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceListeners {
    pub netns: u32,
    /// `TcpExtListenOverflows` since the namespace was created; `None` if unreadable.
    pub listen_overflows: Option<u64>,
    /// `net.core.somaxconn` in this namespace.
    pub somaxconn: Option<u32>,
    pub listeners: Vec<Listener>,
}

/// The listeners of the calling thread's network namespace, whose inode is `netns`.
pub fn here(netns: u32) -> Result<NamespaceListeners, HostError> {
    Ok(NamespaceListeners {
        netns,
        listen_overflows: read_proc_net("netstat")
            .ok()
            .and_then(|text| netstat_value(&text, "TcpExt", "ListenOverflows")),
        somaxconn: std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok()),
        listeners: dump_listeners(netns)?,
    })
}

/// The listeners of every network namespace that can be entered, this one first. A namespace
/// that cannot be read (it went away meanwhile) is left out.
pub fn everywhere() -> Result<Vec<NamespaceListeners>, HostError> {
    let own = namespaces::current_netns_inode()?;
    let mut all = vec![here(own)?];
    for namespace in namespaces::other_namespaces(own) {
        match in_namespace(&namespace) {
            Ok(found) => all.push(found),
            Err(e) => log::debug!(
                "listeners: skipping namespace {} ({}): {e}",
                namespace.inode,
                namespace.path.display()
            ),
        }
    }
    Ok(all)
}

fn in_namespace(namespace: &Namespace) -> Result<NamespaceListeners, HostError> {
    let inode = namespace.inode;
    namespaces::in_namespace(namespace, move || here(inode))
}

/// `/proc/net/<name>` of the calling thread's namespace (`/proc/self/net` would be the
/// thread-group leader's, which may be another namespace).
fn read_proc_net(name: &str) -> io::Result<String> {
    match std::fs::read_to_string(format!("/proc/thread-self/net/{name}")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::read_to_string(format!("/proc/self/net/{name}"))
        }
        other => other,
    }
}

/// One counter of `/proc/net/netstat` or `/proc/net/snmp`: each group is a line of names
/// followed by a line of values, both starting with `<group>:`.
pub fn netstat_value(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let position = names.split_ascii_whitespace().position(|n| n == name);
        if let Some(position) = position {
            return values.split_ascii_whitespace().nth(position)?.parse().ok();
        }
    }
    None
}

fn dump_listeners(netns: u32) -> Result<Vec<Listener>, HostError> {
    let mut listeners = Vec::new();
    let mut cut = false;
    sock_diag::dump(
        Query {
            states: 1 << TcpState::Listen as u32,
            extensions: ExtensionFlags::SKMEMINFO.bits(),
        },
        &mut |header, attributes| {
            if header.state != TcpState::Listen as u8 {
                return Ok(());
            }
            if listeners.len() >= MAX_LISTENERS {
                cut = true;
                return Ok(());
            }
            listeners.push(Listener {
                netns,
                addr: header.socket_id.source_address,
                port: header.socket_id.source_port,
                inode: header.inode,
                cookie: sock_diag::socket_entry(header).map_or(0, |entry| entry.cookie),
                queue_length: header.recv_queue,
                queue_limit: header.send_queue,
                drops: drops(attributes),
            });
            Ok(())
        },
    )?;
    if cut {
        log::debug!("listeners: namespace {netns} has more than {MAX_LISTENERS}; cut short");
    }
    Ok(listeners)
}

/// `sk_drops` from a socket record's attributes, if they carry `INET_DIAG_SKMEMINFO`.
fn drops(attributes: &[u8]) -> Option<u32> {
    let meminfo = NlasIterator::new(attributes)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == INET_DIAG_SKMEMINFO)?;
    let start = SK_MEMINFO_DROPS * 4;
    let bytes = meminfo.value().get(start..start + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    use super::*;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops
TcpExt: 0 3 24 26
IpExt: InNoRoutes ListenOverflows
IpExt: 0 99
";

    #[test]
    fn netstat_counters_by_group_and_name() {
        assert_eq!(
            netstat_value(NETSTAT, "TcpExt", "ListenOverflows"),
            Some(24)
        );
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "ListenDrops"), Some(26));
        assert_eq!(netstat_value(NETSTAT, "IpExt", "ListenOverflows"), Some(99));
        assert_eq!(netstat_value(NETSTAT, "TcpExt", "Missing"), None);
        assert_eq!(
            netstat_value("TcpExt: ListenOverflows\n", "TcpExt", "ListenOverflows"),
            None
        );
        assert_eq!(netstat_value("", "TcpExt", "ListenOverflows"), None);
    }

    #[test]
    fn drops_come_from_skmeminfo() {
        let mut attribute = Vec::new();
        let values: [u32; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 48];
        attribute.extend(((4 + 36) as u16).to_ne_bytes());
        attribute.extend(INET_DIAG_SKMEMINFO.to_ne_bytes());
        for v in values {
            attribute.extend(v.to_ne_bytes());
        }
        // Another attribute first (INET_DIAG_SHUTDOWN, one byte, padded).
        let mut attributes = vec![5, 0, 8, 0, 0, 0, 0, 0];
        attributes.extend(&attribute);
        assert_eq!(drops(&attributes), Some(48));
        assert_eq!(drops(&attributes[..8]), None);
        assert_eq!(drops(&[1, 2, 3]), None);
    }

    #[test]
    fn lists_a_listener_with_its_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        // SAFETY: listen() on an open socket of ours; changing the backlog has no memory effect.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 3) }, 0);
        let port = listener.local_addr().expect("addr").port();
        let netns = namespaces::current_netns_inode().expect("netns");
        let found = here(netns).expect("listeners");
        let mine = found
            .listeners
            .iter()
            .find(|l| l.port == port)
            .expect("our listener is listed");
        assert_eq!(mine.queue_limit, 3);
        assert_eq!(mine.queue_length, 0);
        assert_eq!(mine.drops, Some(0));
        assert_ne!(mine.inode, 0);
        assert!(found.listen_overflows.is_some());
        assert!(found.somaxconn.is_some_and(|n| n > 0));
    }
}
