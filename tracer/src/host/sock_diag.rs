//! The kernel's sock_diag netlink interface, as `ss -tan` uses it: every TCP socket of both
//! address families in the calling thread's network namespace (the netlink socket is created in
//! the namespace the thread is in). Nothing here keeps global state.
use std::io;
use std::os::fd::AsRawFd;
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

use tracer_core::model::{TcpState, Tuple};

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

/// `struct inet_diag_msg`'s size: a socket record's attributes start after it.
const INET_DIAG_MSG_LEN: usize = 72;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
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
pub fn dump_tcp() -> Result<Vec<SocketEntry>, HostError> {
    dump_states(ALL_STATES)
}

/// Every TCP state but request sockets (`NEW_SYN_RECV`, a SYN flood's worth) and listeners:
/// with [`LISTENING`], what a resync compares the tracker with.
pub const NOT_LISTENING: u32 =
    ALL_STATES & !(1 << TcpState::NewSynRecv as u32) & !(1 << TcpState::Listen as u32);

/// Listening sockets only.
pub const LISTENING: u32 = 1 << TcpState::Listen as u32;

/// The TCP sockets a process can hold a file of, with a peer: every state but LISTEN, TIME_WAIT
/// and request sockets (`NEW_SYN_RECV`), which are most of a busy host's sockets. What an
/// owner lookup by 4-tuple searches.
pub fn dump_tcp_connections() -> Result<Vec<SocketEntry>, HostError> {
    let skip = [TcpState::Listen, TcpState::TimeWait, TcpState::NewSynRecv]
        .iter()
        .fold(0, |mask, state| mask | 1 << *state as u32);
    dump_states(ALL_STATES & !skip)
}

/// The TCP sockets in `states` (`1 << state` bits), in the calling thread's network namespace.
fn dump_states(states: u32) -> Result<Vec<SocketEntry>, HostError> {
    let mut entries = Vec::new();
    Lister::open()?.each(states, |entry| entries.push(entry))?;
    Ok(entries)
}

/// A sock_diag socket with its receive buffer. It lists the sockets of the network namespace
/// it was opened in, from whichever thread uses it, so a namespace is entered only to open it.
pub struct Lister {
    socket: Socket,
    buffer: Vec<u8>,
}

impl Lister {
    pub fn open() -> Result<Lister, HostError> {
        Ok(Lister {
            socket: open_socket()?,
            buffer: vec![0u8; RECV_BUFFER],
        })
    }

    /// Hands each TCP socket in `states` (`1 << state` bits) to `each` as it is read: nothing
    /// is collected, so a dump of a busy host costs a buffer, not a copy of its socket table.
    pub fn each(
        &mut self,
        states: u32,
        mut each: impl FnMut(SocketEntry),
    ) -> Result<(), HostError> {
        let query = Query {
            states,
            extensions: 0,
        };
        self.records(query, &mut |header, _attributes| {
            if let Some(entry) = socket_entry(header) {
                each(entry);
            }
            Ok(())
        })
    }

    /// Hands each socket record that `query` selects to `on_record`, at most `MAX_ENTRIES`.
    fn records(&mut self, query: Query, on_record: &mut OnRecord<'_>) -> Result<(), HostError> {
        let mut count = 0usize;
        let mut counted = |header: &InetResponseHeader, attributes: &[u8]| {
            count += 1;
            if count > MAX_ENTRIES {
                return Err(HostError::TooMany);
            }
            on_record(header, attributes)
        };
        for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
            dump_family(
                &self.socket,
                query,
                family,
                seq,
                &mut self.buffer,
                &mut counted,
            )?;
        }
        Ok(())
    }
}

/// What a dump asks the kernel for.
#[derive(Clone, Copy, Debug)]
pub(super) struct Query {
    /// `1 << state` for each TCP state wanted.
    pub states: u32,
    /// Attributes the kernel should add to each socket record (`ExtensionFlags` bits).
    pub extensions: u8,
}

/// Called with each socket record: its fixed header and the attributes that follow it.
pub(super) type OnRecord<'a> = dyn FnMut(&InetResponseHeader, &[u8]) -> Result<(), HostError> + 'a;

/// Dumps the TCP sockets of both address families that `query` selects, in the calling
/// thread's network namespace, handing each record to `on_record`. At most `MAX_ENTRIES`
/// records per dump.
pub(super) fn dump(query: Query, on_record: &mut OnRecord<'_>) -> Result<(), HostError> {
    Lister::open()?.records(query, on_record)
}

/// The fixed part of a socket record as a `SocketEntry`; `None` for a state this build does
/// not know.
pub(super) fn socket_entry(header: &InetResponseHeader) -> Option<SocketEntry> {
    let Some(state) = TcpState::from_kernel(header.state) else {
        log::debug!(
            "sock_diag: skipping a socket in unknown state {}",
            header.state
        );
        return None;
    };
    let id = &header.socket_id;
    Some(SocketEntry {
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
    })
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 { "IPv6" } else { "IPv4" }
}

fn open_socket() -> Result<Socket, HostError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(HostError::Socket)?;
    socket.bind_auto().map_err(HostError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(HostError::Socket)?;
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(HostError::Socket)?;
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

fn request(query: Query, family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::from_bits_retain(query.extensions),
            states: StateFlags::from_bits_retain(query.states),
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
    query: Query,
    family: u8,
    seq: u32,
    buffer: &mut [u8],
    on_record: &mut OnRecord<'_>,
) -> Result<(), HostError> {
    let name = family_name(family);
    let request = request(query, family, seq);
    let sent = socket.send(&request, 0).map_err(|source| HostError::Send {
        family: name,
        source,
    })?;
    if sent != request.len() {
        return Err(HostError::Send {
            family: name,
            source: io::Error::new(io::ErrorKind::WriteZero, "short send"),
        });
    }
    loop {
        let len = match socket.recv(&mut &mut buffer[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(HostError::Timeout { family: name });
            }
            Err(source) => {
                return Err(HostError::Recv {
                    family: name,
                    source,
                });
            }
        };
        if len > buffer.len() {
            return Err(HostError::Malformed {
                family: name,
                reason: format!(
                    "a {len}-byte datagram does not fit the {}-byte buffer",
                    buffer.len()
                ),
            });
        }
        if len == 0 {
            return Err(HostError::Malformed {
                family: name,
                reason: "empty datagram before the end of the dump".to_string(),
            });
        }
        if parse_records(&buffer[..len], family, seq, on_record)? == Progress::Done {
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Appends the sockets of one received datagram to `entries` (the tests' view of
/// `parse_records`).
#[cfg(test)]
fn parse_datagram(
    datagram: &[u8],
    family: u8,
    seq: u32,
    entries: &mut Vec<SocketEntry>,
) -> Result<Progress, HostError> {
    parse_records(datagram, family, seq, &mut |header, _| {
        if let Some(entry) = socket_entry(header) {
            entries.push(entry);
        }
        Ok(())
    })
}

/// Hands the socket records of one received datagram (one or more netlink messages) to
/// `on_record`.
fn parse_records(
    datagram: &[u8],
    family: u8,
    seq: u32,
    on_record: &mut OnRecord<'_>,
) -> Result<Progress, HostError> {
    let name = family_name(family);
    let malformed = |reason: String| HostError::Malformed {
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
                // The fixed `struct inet_diag_msg` is parsed here; the attributes that follow
                // are left to the caller, which reads only those it asked for, so that
                // attributes of newer kernels cannot fail the dump.
                let header = InetResponseHeader::parse(payload)
                    .map_err(|e| malformed(format!("socket record: {e}")))?;
                let attributes = payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default();
                on_record(&header, attributes)?;
            }
            NLMSG_DONE => {
                // The kernel may send an empty NLMSG_DONE; otherwise it carries the dump's
                // final status.
                if payload.len() >= 4 {
                    let done = DoneBuffer::new_checked(payload)
                        .map_err(|e| malformed(format!("NLMSG_DONE: {e}")))?;
                    if done.code() < 0 {
                        return Err(HostError::Kernel {
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
                    Some(code) => Err(HostError::Kernel {
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

    use std::net::{IpAddr, Ipv4Addr};
    use std::num::NonZeroI32;

    use netlink_packet_core::{DoneMessage, ErrorMessage, NetlinkPayload};
    use netlink_packet_sock_diag::inet::InetResponse;

    use super::*;

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
            HostError::Kernel { family, source } => {
                assert_eq!(*family, "IPv6");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("tcp_diag"), "{err}");
        let err = parse_datagram(&done(3, -libc::ENOMEM), AF_INET, 3, &mut entries).unwrap_err();
        assert!(matches!(err, HostError::Kernel { .. }), "{err:?}");
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
        assert!(matches!(err, HostError::Malformed { .. }), "{err:?}");
        // Cut inside the fixed record.
        let mut short = record[..NLMSG_HDRLEN + 8].to_vec();
        short[..4].copy_from_slice(&((NLMSG_HDRLEN + 8) as u32).to_ne_bytes());
        let err = parse_datagram(&short, AF_INET, 1, &mut entries).unwrap_err();
        assert!(matches!(err, HostError::Malformed { .. }), "{err:?}");
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
    fn a_connections_dump_lists_both_ends_and_leaves_listeners_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(at).expect("connect");
        let (_accepted, _) = listener.accept().expect("accept");
        let local = client.local_addr().expect("addr");
        let sockets = dump_tcp_connections().expect("dump");
        let ends = |src: std::net::SocketAddr, dst: std::net::SocketAddr| {
            sockets.iter().any(|s| {
                (s.tuple.src, s.tuple.sport, s.tuple.dst, s.tuple.dport)
                    == (src.ip(), src.port(), dst.ip(), dst.port())
            })
        };
        assert!(
            ends(local, at) && ends(at, local),
            "both ends of the connection"
        );
        assert!(
            !sockets
                .iter()
                .any(|s| s.state == TcpState::Listen || s.state == TcpState::TimeWait),
            "no listener and no TIME_WAIT socket"
        );
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
        let bytes = request(
            Query {
                states: ALL_STATES,
                extensions: 0,
            },
            AF_INET6,
            9,
        );
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
}
