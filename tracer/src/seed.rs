//! The TCP sockets that existed before the agent started, from the kernel's sock_diag netlink
//! interface (what `ss -tan` shows), and the connection seeds derived from them.
//!
//! `dump_tcp` reads the network namespace of the calling thread: the netlink socket is created
//! in the namespace the thread is in, so a thread that entered another namespace with `setns`
//! dumps that one. Nothing here keeps global state.
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, Timer,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, SockDiagMessage,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

use tracer_core::model::{Direction, TcpState, Tuple};
use tracer_core::record::Seed;

/// The most sockets one dump returns before it is abandoned as runaway.
pub const MAX_ENTRIES: usize = 4_000_000;

/// Receive buffer. The kernel fills each dump datagram up to about 32 KiB; a datagram that does
/// not fit is reported as an error rather than silently truncated.
const RECV_BUFFER: usize = 256 * 1024;

/// How long one read of the dump may block before the dump is given up.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);

/// Every TCP state, `TCP_ESTABLISHED` (1) to `TCP_NEW_SYN_RECV` (12), as `ss -a` asks for.
const ALL_STATES: u32 = ((1 << 13) - 1) & !1;

/// `struct nlmsghdr`'s size and alignment.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ALIGNTO: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot open a sock_diag netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot send the sock_diag {family} TCP dump request: {source}")]
    Send {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the sock_diag {family} TCP dump: {source}")]
    Recv {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the sock_diag {family} TCP dump stalled: no reply within {} s",
        RECV_TIMEOUT.as_secs()
    )]
    Timeout { family: &'static str },
    #[error(
        "the kernel refused the sock_diag {family} TCP dump: {source} \
         (is the tcp_diag kernel module available?)"
    )]
    Kernel {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed sock_diag {family} reply: {reason}")]
    Malformed {
        family: &'static str,
        reason: String,
    },
    #[error("the sock_diag TCP dump returned more than {MAX_ENTRIES} sockets; giving up")]
    TooMany,
    #[error("cannot read the network namespace of this thread ({path}): {source}")]
    Netns {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    EnterNetns {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace inode {0} does not fit in 32 bits")]
    NetnsInode(u64),
}

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketEntry {
    /// `src` is the local address and port, `dst` the remote ones (unspecified for listeners).
    /// IPv4 sockets have V4 addresses; IPv6 sockets keep V6 ones, v4-mapped included.
    pub tuple: Tuple,
    /// TIME_WAIT sockets report their sub-state (TIME_WAIT, or FIN_WAIT2 when the application
    /// closed before the peer's FIN); request sockets report SYN_RECV, as `ss` shows them.
    pub state: TcpState,
    /// Inode of the socket file; 0 for sockets no file refers to any more (orphans, TIME_WAIT,
    /// request sockets).
    pub inode: u32,
    pub uid: u32,
    /// The kernel's socket cookie (`SO_COOKIE`).
    pub cookie: u64,
    /// A timewait mini socket (its timer is the TIME_WAIT timer), in either substate.
    pub timewait: bool,
}

/// Every TCP socket of both address families, in all states, in the calling thread's network
/// namespace.
pub fn dump_tcp() -> Result<Vec<SocketEntry>, SeedError> {
    let socket = open_socket()?;
    let mut entries = Vec::new();
    let mut buffer = vec![0u8; RECV_BUFFER];
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        dump_family(&socket, family, seq, &mut buffer, &mut entries)?;
    }
    Ok(entries)
}

/// Inode of the calling thread's network namespace, the kernel's `net->ns.inum` that the kernel
/// events carry.
pub fn current_netns_inode() -> Result<u32, SeedError> {
    // `/proc/self` is the thread-group leader: a thread that entered another namespace must
    // read its own entry. `/proc/thread-self` exists since Linux 3.17.
    let metadata = match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let path = "/proc/self/ns/net";
            std::fs::metadata(path).map_err(|source| SeedError::Netns { path, source })?
        }
        Err(source) => {
            return Err(SeedError::Netns {
                path: "/proc/thread-self/ns/net",
                source,
            });
        }
    };
    let ino = metadata.ino();
    u32::try_from(ino).map_err(|_| SeedError::NetnsInode(ino))
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

/// `dump_tcp` inside another network namespace, from a short-lived thread that enters it (a
/// thread's namespace can change without affecting the rest of the agent).
pub fn dump_tcp_in(namespace: &Namespace) -> Result<Vec<SocketEntry>, SeedError> {
    let path = namespace.path.clone();
    let worker = std::thread::Builder::new()
        .name("tracer-netns".into())
        .spawn(move || -> Result<Vec<SocketEntry>, SeedError> {
            let file = std::fs::File::open(&path).map_err(|source| SeedError::EnterNetns {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the descriptor is open for the duration of the call and CLONE_NEWNET asks
            // only for a network namespace switch of this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(SeedError::EnterNetns {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            dump_tcp()
        })
        .map_err(SeedError::Socket)?;
    worker.join().unwrap_or_else(|_| {
        Err(SeedError::Socket(io::Error::other(
            "the namespace dump thread panicked",
        )))
    })
}

/// The connections among `entries` (one namespace's dump), as tracker seeds. Listeners,
/// TIME_WAIT, request sockets (SYN_RECV) and CLOSE sockets are left out, and so are TIME_WAIT
/// sockets still in their FIN_WAIT2 sub-state: their socket already reported CLOSE, so no event
/// would ever end them.
///
/// A connection is Passive when its local port has a listener on its local address or on the
/// wildcard address of its family (an IPv6 wildcard listener also covers IPv4: dual stack), and
/// Active otherwise.
pub fn seeds(entries: &[SocketEntry], netns: u32) -> Vec<Seed> {
    let listeners: HashSet<(IpAddr, u16)> = entries
        .iter()
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| (e.tuple.src, e.tuple.sport))
        .collect();
    entries
        .iter()
        .filter(|e| is_connection(e))
        .map(|e| Seed {
            netns,
            tuple: e.tuple,
            state: e.state,
            direction: if is_listening(&listeners, e.tuple.src, e.tuple.sport) {
                Direction::Passive
            } else {
                Direction::Active
            },
        })
        .collect()
}

fn is_connection(entry: &SocketEntry) -> bool {
    match entry.state {
        TcpState::Listen
        | TcpState::TimeWait
        | TcpState::SynRecv
        | TcpState::NewSynRecv
        | TcpState::Close => false,
        // A TIME_WAIT socket in its FIN_WAIT2 sub-state has no file (inode 0). A full orphaned
        // FIN_WAIT2 socket (only when tcp_fin_timeout exceeds 60 s) looks the same and is left
        // out too: its events start a partial record instead.
        TcpState::FinWait2 if entry.timewait || entry.inode == 0 => false,
        _ => entry.tuple.is_complete(),
    }
}

fn is_listening(listeners: &HashSet<(IpAddr, u16)>, local: IpAddr, port: u16) -> bool {
    let listens = |addr: IpAddr| listeners.contains(&(addr, port));
    match local {
        IpAddr::V4(v4) => {
            listens(local)
                || listens(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                || listens(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
                || listens(IpAddr::V6(v4.to_ipv6_mapped()))
        }
        IpAddr::V6(_) => listens(local) || listens(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    }
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 { "IPv6" } else { "IPv4" }
}

fn open_socket() -> Result<Socket, SeedError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SeedError::Socket)?;
    socket.bind_auto().map_err(SeedError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(SeedError::Socket)?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(SeedError::Socket)?;
    Ok(socket)
}

/// `SO_RCVTIMEO`, in whole seconds.
fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: 0,
    };
    // SAFETY: the descriptor is open for the lifetime of `socket`; `tv` is a valid `timeval`
    // that outlives the call, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast::<libc::c_void>(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn request(family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_retain(ALL_STATES),
            socket_id: if family == AF_INET6 {
                SocketId::new_v6()
            } else {
                SocketId::new_v4()
            },
        })
        .into(),
    );
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

fn dump_family(
    socket: &Socket,
    family: u8,
    seq: u32,
    buffer: &mut [u8],
    entries: &mut Vec<SocketEntry>,
) -> Result<(), SeedError> {
    let name = family_name(family);
    let request = request(family, seq);
    let sent = socket.send(&request, 0).map_err(|source| SeedError::Send {
        family: name,
        source,
    })?;
    if sent != request.len() {
        return Err(SeedError::Send {
            family: name,
            source: io::Error::new(io::ErrorKind::WriteZero, "short send"),
        });
    }
    loop {
        let len = match socket.recv(&mut &mut buffer[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(SeedError::Timeout { family: name });
            }
            Err(source) => {
                return Err(SeedError::Recv {
                    family: name,
                    source,
                });
            }
        };
        if len > buffer.len() {
            return Err(SeedError::Malformed {
                family: name,
                reason: format!(
                    "a {len}-byte datagram does not fit the {}-byte buffer",
                    buffer.len()
                ),
            });
        }
        if len == 0 {
            return Err(SeedError::Malformed {
                family: name,
                reason: "empty datagram before the end of the dump".to_string(),
            });
        }
        if parse_datagram(&buffer[..len], family, seq, entries)? == Progress::Done {
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Appends the sockets of one received datagram (one or more netlink messages) to `entries`.
fn parse_datagram(
    datagram: &[u8],
    family: u8,
    seq: u32,
    entries: &mut Vec<SocketEntry>,
) -> Result<Progress, SeedError> {
    let name = family_name(family);
    let malformed = |reason: String| SeedError::Malformed {
        family: name,
        reason,
    };
    let mut offset = 0;
    while offset < datagram.len() {
        let message = NetlinkBuffer::new_checked(&datagram[offset..])
            .map_err(|e| malformed(format!("at byte {offset}: {e}")))?;
        let length = message.length() as usize;
        let payload = &datagram[offset + NLMSG_HDRLEN..offset + length];
        offset += length.next_multiple_of(NLMSG_ALIGNTO);
        if message.sequence_number() != seq {
            // Not an answer to this request (none is expected on a fresh socket).
            continue;
        }
        match message.message_type() {
            SOCK_DIAG_BY_FAMILY => {
                // Only the fixed `struct inet_diag_msg`: the attributes that follow are not
                // needed, and skipping them keeps attributes of newer kernels from failing
                // the dump.
                let header = InetResponseHeader::parse(payload)
                    .map_err(|e| malformed(format!("socket record: {e}")))?;
                let Some(state) = TcpState::from_kernel(header.state) else {
                    log::debug!(
                        "sock_diag: skipping a socket in unknown state {}",
                        header.state
                    );
                    continue;
                };
                if entries.len() >= MAX_ENTRIES {
                    return Err(SeedError::TooMany);
                }
                let id = &header.socket_id;
                entries.push(SocketEntry {
                    tuple: Tuple {
                        src: id.source_address,
                        sport: id.source_port,
                        dst: id.destination_address,
                        dport: id.destination_port,
                    },
                    state,
                    inode: header.inode,
                    uid: header.uid,
                    cookie: cookie(id.cookie),
                    timewait: matches!(header.timer, Some(Timer::TimeWait)),
                });
            }
            NLMSG_DONE => {
                // The kernel may send an empty NLMSG_DONE; otherwise it carries the dump's
                // final status.
                if payload.len() >= 4 {
                    let done = DoneBuffer::new_checked(payload)
                        .map_err(|e| malformed(format!("NLMSG_DONE: {e}")))?;
                    if done.code() < 0 {
                        return Err(SeedError::Kernel {
                            family: name,
                            source: io::Error::from_raw_os_error(-done.code()),
                        });
                    }
                }
                return Ok(Progress::Done);
            }
            NLMSG_ERROR => {
                let error = ErrorBuffer::new_checked(payload)
                    .map_err(|e| malformed(format!("NLMSG_ERROR: {e}")))?;
                return match error.code() {
                    // An acknowledgement: nothing more follows.
                    None => Ok(Progress::Done),
                    Some(code) => Err(SeedError::Kernel {
                        family: name,
                        source: io::Error::from_raw_os_error(code.get().saturating_abs()),
                    }),
                };
            }
            NLMSG_NOOP => {}
            NLMSG_OVERRUN => return Err(malformed("the kernel reported lost data".to_string())),
            other => return Err(malformed(format!("unexpected message type {other}"))),
        }
    }
    Ok(Progress::More)
}

/// `inet_diag_sockid.idiag_cookie`: two host-order 32-bit words, low word first.
fn cookie(bytes: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let high = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    u64::from(high) << 32 | u64::from(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::net::{SocketAddr as NetAddr, TcpListener, TcpStream};
    use std::num::NonZeroI32;
    use std::process::Command;
    use std::time::Instant;

    use netlink_packet_core::{DoneMessage, ErrorMessage, NetlinkPayload};
    use netlink_packet_sock_diag::inet::InetResponse;

    // ---- seeds(): pure ----

    fn entry(src: &str, dst: &str, state: TcpState) -> SocketEntry {
        let src: NetAddr = src.parse().unwrap();
        let dst: NetAddr = dst.parse().unwrap();
        SocketEntry {
            tuple: Tuple {
                src: src.ip(),
                sport: src.port(),
                dst: dst.ip(),
                dport: dst.port(),
            },
            state,
            inode: 1000,
            uid: 0,
            cookie: 1,
            timewait: state == TcpState::TimeWait,
        }
    }

    fn listener(addr: &str) -> SocketEntry {
        let unspecified = if addr.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        entry(addr, unspecified, TcpState::Listen)
    }

    fn direction_of(seeds: &[Seed], src: &str) -> Option<Direction> {
        let src: NetAddr = src.parse().unwrap();
        seeds
            .iter()
            .find(|s| s.tuple.src == src.ip() && s.tuple.sport == src.port())
            .map(|s| s.direction)
    }

    #[test]
    fn seeds_infers_direction_from_listeners() {
        let entries = [
            listener("0.0.0.0:80"),
            listener("10.0.0.1:443"),
            listener("[::]:8080"),
            listener("[fe80::1]:9000"),
            listener("[::ffff:10.0.0.9]:7000"),
            // Accepted on the v4 wildcard listener.
            entry("10.0.0.1:80", "10.0.0.2:50000", TcpState::Established),
            // Accepted on the specific-address listener.
            entry("10.0.0.1:443", "10.0.0.2:50001", TcpState::CloseWait),
            // Same port, other address: not covered by 10.0.0.1:443.
            entry("10.0.0.5:443", "10.0.0.2:50002", TcpState::Established),
            // Dual stack: the v6 wildcard covers v4 and v4-mapped addresses.
            entry("10.0.0.1:8080", "10.0.0.2:50003", TcpState::Established),
            entry(
                "[::ffff:10.0.0.1]:8080",
                "[::ffff:10.0.0.2]:50004",
                TcpState::Established,
            ),
            entry(
                "[2001:db8::1]:8080",
                "[2001:db8::2]:50005",
                TcpState::FinWait1,
            ),
            // A specific v6 listener does not cover v4, nor other v6 addresses.
            entry("10.0.0.1:9000", "10.0.0.2:50006", TcpState::Established),
            entry("[fe80::2]:9000", "[fe80::3]:50007", TcpState::Established),
            entry("[fe80::1]:9000", "[fe80::3]:50008", TcpState::Established),
            // A v4-mapped listener covers its v4 address.
            entry("10.0.0.9:7000", "10.0.0.2:50009", TcpState::Established),
            // A v4 wildcard does not cover IPv6.
            entry(
                "[2001:db8::1]:80",
                "[2001:db8::2]:50010",
                TcpState::Established,
            ),
            // Clients.
            entry("10.0.0.1:41000", "10.0.0.3:80", TcpState::Established),
            entry("10.0.0.1:41001", "10.0.0.3:80", TcpState::SynSent),
            entry(
                "[2001:db8::1]:41002",
                "[2001:db8::3]:443",
                TcpState::LastAck,
            ),
        ];
        let seeds = seeds(&entries, 4026531840);
        assert!(seeds.iter().all(|s| s.netns == 4026531840));
        assert_eq!(seeds.len(), 14);
        let expect = [
            ("10.0.0.1:80", Direction::Passive),
            ("10.0.0.1:443", Direction::Passive),
            ("10.0.0.5:443", Direction::Active),
            ("10.0.0.1:8080", Direction::Passive),
            ("[::ffff:10.0.0.1]:8080", Direction::Passive),
            ("[2001:db8::1]:8080", Direction::Passive),
            ("10.0.0.1:9000", Direction::Active),
            ("[fe80::2]:9000", Direction::Active),
            ("[fe80::1]:9000", Direction::Passive),
            ("10.0.0.9:7000", Direction::Passive),
            ("[2001:db8::1]:80", Direction::Active),
            ("10.0.0.1:41000", Direction::Active),
            ("10.0.0.1:41001", Direction::Active),
            ("[2001:db8::1]:41002", Direction::Active),
        ];
        for (src, direction) in expect {
            assert_eq!(direction_of(&seeds, src), Some(direction), "{src}");
        }
        let seed = seeds
            .iter()
            .find(|s| s.tuple.sport == 50000 || s.tuple.dport == 50000)
            .unwrap();
        assert_eq!(seed.state, TcpState::Established);
        assert_eq!(seed.tuple, entries[5].tuple);
    }

    #[test]
    fn seeds_skips_non_connections() {
        let mut orphan_fin_wait2 = entry("10.0.0.1:41003", "10.0.0.3:80", TcpState::FinWait2);
        orphan_fin_wait2.inode = 0;
        orphan_fin_wait2.timewait = true;
        let mut orphan_fin_wait1 = entry("10.0.0.1:41004", "10.0.0.3:80", TcpState::FinWait1);
        orphan_fin_wait1.inode = 0;
        let entries = [
            listener("0.0.0.0:80"),
            entry("10.0.0.1:80", "10.0.0.2:50000", TcpState::TimeWait),
            entry("10.0.0.1:80", "10.0.0.2:50001", TcpState::SynRecv),
            entry("10.0.0.1:80", "10.0.0.2:50002", TcpState::NewSynRecv),
            entry("10.0.0.1:41000", "0.0.0.0:0", TcpState::Close),
            entry("10.0.0.1:0", "10.0.0.3:80", TcpState::SynSent),
            orphan_fin_wait2,
            // Kept: a socket with its file still open, and an orphan in another state.
            entry("10.0.0.1:41005", "10.0.0.3:80", TcpState::FinWait2),
            orphan_fin_wait1,
        ];
        let seeds = seeds(&entries, 1);
        let kept: Vec<u16> = seeds.iter().map(|s| s.tuple.sport).collect();
        assert_eq!(kept, [41005, 41004]);
        assert!(seeds.iter().all(|s| s.direction == Direction::Active));
        assert!(super::seeds(&[], 1).is_empty());
    }

    // ---- reply parsing: synthetic datagrams ----

    fn message(seq: u32, payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = netlink_packet_core::NLM_F_MULTIPART;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut bytes = vec![0u8; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn socket_record(seq: u32, socket_id: SocketId, state: u8, inode: u32) -> Vec<u8> {
        let family = if socket_id.source_address.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        };
        let response = InetResponse {
            header: InetResponseHeader {
                family,
                state,
                // As the kernel fills it: a timewait socket reports the TIME_WAIT timer.
                timer: Some(if state == 6 {
                    Timer::TimeWait
                } else {
                    Timer::KeepAlive(Duration::from_millis(1000))
                }),
                socket_id,
                recv_queue: 0,
                send_queue: 0,
                uid: 1000,
                inode,
            },
            nlas: Default::default(),
        };
        message(
            seq,
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(response))),
        )
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        let mut done = DoneMessage::default();
        done.code = code;
        message(seq, NetlinkPayload::Done(done))
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut error = ErrorMessage::default();
        error.code = NonZeroI32::new(code);
        error.header = vec![0; NLMSG_HDRLEN];
        message(seq, NetlinkPayload::Error(error))
    }

    fn v4_id(sport: u16, dport: u16, cookie: u64) -> SocketId {
        let mut id = SocketId::new_v4();
        id.source_address = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        id.source_port = sport;
        id.destination_address = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
        id.destination_port = dport;
        let low = (cookie as u32).to_ne_bytes();
        let high = ((cookie >> 32) as u32).to_ne_bytes();
        id.cookie = [
            low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3],
        ];
        id
    }

    #[test]
    fn parses_multipart_records_until_done() {
        let mut first = socket_record(7, v4_id(443, 50000, 0x1234_5678_9abc_def0), 1, 42);
        first.extend(socket_record(7, v4_id(80, 0, 5), 10, 43));
        // A stale answer to another request is ignored.
        first.extend(socket_record(6, v4_id(1, 2, 3), 1, 44));
        // An unknown future state is skipped.
        first.extend(socket_record(7, v4_id(3, 4, 5), 42, 45));
        let mut entries = Vec::new();
        assert_eq!(
            parse_datagram(&first, AF_INET, 7, &mut entries).unwrap(),
            Progress::More
        );
        let mut v6 = SocketId::new_v6();
        v6.source_address = "2001:db8::1".parse().unwrap();
        v6.source_port = 22;
        v6.destination_address = "::ffff:192.0.2.9".parse().unwrap();
        v6.destination_port = 60000;
        let mut second = socket_record(7, v6, 6, 0);
        second.extend(done(7, 0));
        assert_eq!(
            parse_datagram(&second, AF_INET6, 7, &mut entries).unwrap(),
            Progress::Done
        );
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0],
            SocketEntry {
                tuple: Tuple {
                    src: "192.0.2.1".parse().unwrap(),
                    sport: 443,
                    dst: "198.51.100.7".parse().unwrap(),
                    dport: 50000,
                },
                state: TcpState::Established,
                inode: 42,
                uid: 1000,
                cookie: 0x1234_5678_9abc_def0,
                timewait: false,
            }
        );
        assert_eq!(entries[1].state, TcpState::Listen);
        assert_eq!(entries[2].state, TcpState::TimeWait);
        assert!(entries[2].timewait && !entries[1].timewait);
        assert_eq!(
            entries[2].tuple.dst,
            "::ffff:192.0.2.9".parse::<IpAddr>().unwrap()
        );
        assert!(entries[2].tuple.src.is_ipv6());
    }

    #[test]
    fn reports_kernel_errors() {
        let mut entries = Vec::new();
        let err = parse_datagram(&error(3, -libc::ENOENT), AF_INET6, 3, &mut entries).unwrap_err();
        match &err {
            SeedError::Kernel { family, source } => {
                assert_eq!(*family, "IPv6");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("tcp_diag"), "{err}");
        let err = parse_datagram(&done(3, -libc::ENOMEM), AF_INET, 3, &mut entries).unwrap_err();
        assert!(matches!(err, SeedError::Kernel { .. }), "{err:?}");
        // An acknowledgement ends the dump.
        assert_eq!(
            parse_datagram(&error(3, 0), AF_INET, 3, &mut entries).unwrap(),
            Progress::Done
        );
        // An empty NLMSG_DONE too.
        let mut empty_done = done(3, 0);
        empty_done.truncate(NLMSG_HDRLEN);
        empty_done[..4].copy_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        assert_eq!(
            parse_datagram(&empty_done, AF_INET, 3, &mut entries).unwrap(),
            Progress::Done
        );
        assert!(entries.is_empty());
    }

    #[test]
    fn rejects_malformed_datagrams() {
        let mut entries = Vec::new();
        let record = socket_record(1, v4_id(1, 2, 3), 1, 1);
        // Cut inside the message.
        let err =
            parse_datagram(&record[..record.len() - 8], AF_INET, 1, &mut entries).unwrap_err();
        assert!(matches!(err, SeedError::Malformed { .. }), "{err:?}");
        // Cut inside the fixed record.
        let mut short = record[..NLMSG_HDRLEN + 8].to_vec();
        short[..4].copy_from_slice(&((NLMSG_HDRLEN + 8) as u32).to_ne_bytes());
        let err = parse_datagram(&short, AF_INET, 1, &mut entries).unwrap_err();
        assert!(matches!(err, SeedError::Malformed { .. }), "{err:?}");
        // A length field shorter than a header.
        let mut bogus = record.clone();
        bogus[..4].copy_from_slice(&4u32.to_ne_bytes());
        let err = parse_datagram(&bogus, AF_INET, 1, &mut entries).unwrap_err();
        assert!(
            err.to_string().contains("malformed sock_diag IPv4 reply"),
            "{err}"
        );
        assert!(entries.is_empty());
    }

    #[test]
    fn cookie_words_are_host_order_low_first() {
        let low = 0xdead_beefu32.to_ne_bytes();
        let high = 0x0000_0001u32.to_ne_bytes();
        let bytes = [
            low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3],
        ];
        assert_eq!(cookie(bytes), 0x1_dead_beef);
    }

    #[test]
    fn request_asks_for_every_tcp_state() {
        let bytes = request(AF_INET6, 9);
        let message = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(message.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(message.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(message.sequence_number(), 9);
        let payload = &bytes[NLMSG_HDRLEN..];
        assert_eq!(payload[0], AF_INET6);
        assert_eq!(payload[1], IPPROTO_TCP);
        let states = u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]);
        for state in TcpState::ALL {
            assert_ne!(states & (1 << state as u32), 0, "{state}");
        }
    }

    // ---- against the kernel (root, loopback) ----

    /// Established sockets whose local port is `port`, as `ss` counts them.
    fn ss_established_on(port: u16) -> usize {
        let filter = format!("( sport = :{port} )");
        let output = Command::new("ss")
            .args(["-Htan", "state", "established", &filter])
            .output()
            .unwrap_or_else(|e| {
                panic!("this test compares with `ss` (iproute2), which cannot be run: {e}")
            });
        assert!(
            output.status.success(),
            "`ss` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    }

    fn find(entries: &[SocketEntry], local: NetAddr, remote: Option<NetAddr>) -> Vec<&SocketEntry> {
        entries
            .iter()
            .filter(|e| e.tuple.src == local.ip() && e.tuple.sport == local.port())
            .filter(|e| remote.is_none_or(|r| e.tuple.dst == r.ip() && e.tuple.dport == r.port()))
            .collect()
    }

    fn connect_pairs(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
        let addr = listener.local_addr().unwrap();
        (0..n)
            .map(|_| {
                let client = TcpStream::connect(addr).unwrap();
                let (server, _) = listener.accept().unwrap();
                (client, server)
            })
            .collect()
    }

    fn check_loopback(bind: &str) {
        const N: usize = 5;
        let listener = TcpListener::bind(bind)
            .unwrap_or_else(|e| panic!("cannot listen on {bind} (loopback needed): {e}"));
        let laddr = listener.local_addr().unwrap();
        let pairs = connect_pairs(&listener, N);

        let entries = dump_tcp().unwrap();

        let listening = find(&entries, laddr, None);
        assert!(
            listening.iter().any(|e| e.state == TcpState::Listen
                && e.tuple.dport == 0
                && e.tuple.dst.is_unspecified()
                && e.inode != 0),
            "no LISTEN entry for {laddr}: {listening:?}"
        );
        for (client, server) in &pairs {
            let (caddr, saddr) = (client.local_addr().unwrap(), server.local_addr().unwrap());
            assert_eq!(saddr, laddr);
            let c = find(&entries, caddr, Some(laddr));
            assert_eq!(c.len(), 1, "client {caddr}: {c:?}");
            assert_eq!(c[0].state, TcpState::Established);
            assert_eq!(c[0].tuple.dport, laddr.port());
            assert_ne!(c[0].inode, 0);
            let s = find(&entries, laddr, Some(caddr));
            assert_eq!(s.len(), 1, "accepted {laddr} <- {caddr}: {s:?}");
            assert_eq!(s[0].state, TcpState::Established);
            assert_ne!(s[0].inode, 0);
            assert_ne!(c[0].cookie, s[0].cookie);
            assert_eq!(c[0].uid, s[0].uid);
        }
        for e in &entries {
            assert_eq!(
                e.tuple.src.is_ipv4(),
                e.tuple.dst.is_ipv4(),
                "mixed families: {e:?}"
            );
        }

        let accepted = entries
            .iter()
            .filter(|e| {
                e.state == TcpState::Established
                    && e.tuple.src == laddr.ip()
                    && e.tuple.sport == laddr.port()
            })
            .count();
        assert_eq!(accepted, N);
        assert_eq!(accepted, ss_established_on(laddr.port()));

        let seeds = seeds(&entries, current_netns_inode().unwrap());
        for (client, _) in &pairs {
            let caddr = client.local_addr().unwrap();
            let seed = seeds
                .iter()
                .find(|s| s.tuple.src == caddr.ip() && s.tuple.sport == caddr.port())
                .unwrap();
            assert_eq!(seed.direction, Direction::Active, "{seed:?}");
            assert_eq!(seed.state, TcpState::Established);
            let seed = seeds
                .iter()
                .find(|s| {
                    s.tuple.sport == laddr.port()
                        && s.tuple.dst == caddr.ip()
                        && s.tuple.dport == caddr.port()
                })
                .unwrap();
            assert_eq!(seed.direction, Direction::Passive, "{seed:?}");
        }
        assert!(
            !seeds
                .iter()
                .any(|s| s.tuple.sport == laddr.port() && s.state == TcpState::Listen)
        );
    }

    #[test]
    fn dump_matches_ss_ipv4() {
        check_loopback("127.0.0.1:0");
    }

    #[test]
    fn dump_matches_ss_ipv6() {
        check_loopback("[::1]:0");
    }

    #[test]
    fn dump_shows_time_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let laddr = listener.local_addr().unwrap();
        let mut pairs = connect_pairs(&listener, 1);
        let (client, mut server) = pairs.remove(0);
        let caddr = client.local_addr().unwrap();
        // The client closes first, so it holds TIME_WAIT once the server closes too.
        drop(client);
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).unwrap(), 0);
        drop(server);

        let deadline = Instant::now() + Duration::from_secs(5);
        let entry = loop {
            let entries = dump_tcp().unwrap();
            let found = find(&entries, caddr, Some(laddr));
            if let Some(e) = found.iter().find(|e| e.state == TcpState::TimeWait) {
                break **e;
            }
            assert!(
                Instant::now() < deadline,
                "{caddr} -> {laddr} never reached TIME_WAIT: {found:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(entry.inode, 0, "a TIME_WAIT socket has no file");
        assert!(entry.timewait, "its timer is the TIME_WAIT timer");
        assert!(seeds(&[entry], 1).is_empty());
    }

    #[test]
    fn dump_handles_many_sockets() {
        // About 1000 sockets: far more than one datagram of the dump holds.
        const N: usize = 500;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let laddr = listener.local_addr().unwrap();
        let mut pairs = connect_pairs(&listener, N);
        // Some traffic, so that the records are not all alike.
        pairs[0].0.write_all(b"x").unwrap();
        let entries = dump_tcp().unwrap();
        let ours = entries
            .iter()
            .filter(|e| {
                e.state == TcpState::Established
                    && ((e.tuple.src == laddr.ip() && e.tuple.sport == laddr.port())
                        || (e.tuple.dst == laddr.ip() && e.tuple.dport == laddr.port()))
            })
            .count();
        assert_eq!(ours, 2 * N);
        assert_eq!(ss_established_on(laddr.port()), N);
        let mut cookies: Vec<u64> = pairs
            .iter()
            .flat_map(|(c, s)| [c, s])
            .map(|stream| {
                let local = stream.local_addr().unwrap();
                let remote = stream.peer_addr().unwrap();
                let found = find(&entries, local, Some(remote));
                assert_eq!(found.len(), 1, "{local} -> {remote}: {found:?}");
                found[0].cookie
            })
            .collect();
        cookies.sort_unstable();
        cookies.dedup();
        assert_eq!(cookies.len(), 2 * N, "socket cookies are unique");
    }

    #[test]
    fn netns_inode_matches_proc() {
        let link = std::fs::read_link("/proc/self/ns/net").unwrap();
        let link = link.to_string_lossy();
        let inode: u32 = link
            .strip_prefix("net:[")
            .and_then(|s| s.strip_suffix(']'))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(current_netns_inode().unwrap(), inode);
        // The same from another thread (no setns: same namespace).
        let other = std::thread::spawn(current_netns_inode)
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(other, inode);
    }
}
