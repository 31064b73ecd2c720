//! Connections that existed before the agent started (or whose open it missed), derived from
//! one namespace's sock_diag dump. Pure, but for `walk`, which reads the dump.
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::sock_diag::{HostError, LISTENING, Lister, NOT_LISTENING, SocketEntry};
use tracer_core::model::{Direction, TcpState};
use tracer_core::record::Seed;

/// The connections among `entries` (one namespace's dump), as tracker seeds. Listeners,
/// TIME_WAIT, request sockets (SYN_RECV) and CLOSE sockets are left out, and so are TIME_WAIT
/// sockets still in their FIN_WAIT2 sub-state: their socket already reported CLOSE, so no event
/// would ever end them.
///
/// A connection is Passive when its local port has a listener on its local address or on the
/// wildcard address of its family (an IPv6 wildcard listener also covers IPv4: dual stack), and
/// Active otherwise.
#[cfg(test)]
pub fn seeds(entries: &[SocketEntry], netns: u32) -> Vec<Seed> {
    let mut listening = Listening::default();
    entries.iter().for_each(|entry| listening.add(entry));
    entries
        .iter()
        .filter_map(|entry| listening.seed(entry, netns))
        .collect()
}

/// One namespace's sockets as they are read, listeners first (each as `(entry, None)`), then
/// every other socket but request sockets, with its seed when it is a connection (see
/// `seeds`). Two dumps rather than one: a connection's direction needs every listener, and an
/// IPv6 listener covering IPv4 comes after the IPv4 connections; a listener opened between the
/// two is missed, and only connections it accepted meanwhile, which events show anyway, are
/// taken for active ones.
pub fn walk(
    lister: &mut Lister,
    netns: u32,
    mut each: impl FnMut(&SocketEntry, Option<Seed>),
) -> Result<(), HostError> {
    let mut listening = Listening::default();
    lister.each(LISTENING, |entry| {
        listening.add(&entry);
        each(&entry, None);
    })?;
    lister.each(NOT_LISTENING, |entry| {
        each(&entry, listening.seed(&entry, netns));
    })
}

/// The listening sockets of one namespace, by local address and port.
#[derive(Default)]
struct Listening(HashSet<(IpAddr, u16)>);

impl Listening {
    fn add(&mut self, entry: &SocketEntry) {
        if entry.state == TcpState::Listen {
            self.0.insert((entry.tuple.src, entry.tuple.sport));
        }
    }

    /// `entry` as a seed, when it is a connection.
    fn seed(&self, entry: &SocketEntry, netns: u32) -> Option<Seed> {
        is_connection(entry).then(|| Seed {
            netns,
            tuple: entry.tuple,
            state: entry.state,
            direction: if self.listens(entry.tuple.src, entry.tuple.sport) {
                Direction::Passive
            } else {
                Direction::Active
            },
        })
    }

    fn listens(&self, local: IpAddr, port: u16) -> bool {
        let listens = |addr: IpAddr| self.0.contains(&(addr, port));
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

#[cfg(test)]
mod tests {

    use std::net::SocketAddr as NetAddr;

    use super::*;
    use tracer_core::model::Tuple;

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
}
