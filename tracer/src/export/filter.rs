//! `--filter`: which connections the events and findings are about. Terms given in several
//! flags, or joined with `and` in one, must all match; the values of one term (`key=a,b`) are
//! alternatives:
//! - `workload=GLOB`: the workload's name (`nginx.service`, `docker/0123456789ab`,
//!   `pod/<uid>`), its systemd unit, container id or pod uid (`*` and `?` wildcards);
//! - `port=N`: the local or the remote port;
//! - `addr=IP` or `addr=IP/PREFIX`: the local or the remote address.
use std::net::IpAddr;

use globset::{Glob, GlobMatcher};

use crate::host::cgroups::Cgroup;
use tracer_core::model::Tuple;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter {0:?}: expected key=value with key workload, port or addr")]
    Syntax(String),
    #[error("filter {0:?}: unknown key {1:?} (expected workload, port or addr)")]
    Key(String, String),
    #[error("filter {0:?}: {1:?} is not a port (1-65535)")]
    Port(String, String),
    #[error("filter {0:?}: {1:?} is not an address or address/prefix")]
    Address(String, String),
    #[error("filter {0:?}: bad workload pattern {1:?}")]
    Glob(String, String),
}

/// The terms of every `--filter` given; empty: everything passes.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    terms: Vec<Term>,
}

#[derive(Clone, Debug)]
enum Term {
    Workload(Vec<GlobMatcher>),
    Port(Vec<u16>),
    Address(Vec<(IpAddr, u8)>),
}

/// What a filter is matched against.
pub struct Subject<'a> {
    pub tuple: &'a Tuple,
    /// The connection's cgroup, when named.
    pub cgroup: Option<&'a Cgroup>,
}

impl Filter {
    /// The filter of every `--filter` value.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Filter, FilterError> {
        let mut terms = Vec::new();
        for value in values {
            let value = value.as_ref();
            for part in value.split(" and ") {
                terms.push(term(value, part.trim())?);
            }
        }
        Ok(Filter { terms })
    }

    /// Every term of every filter: all must match.
    pub fn all(filters: impl IntoIterator<Item = Filter>) -> Filter {
        Filter {
            terms: filters.into_iter().flat_map(|f| f.terms).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether a filter names a workload (then connections of unknown workload never pass).
    pub fn has_workload(&self) -> bool {
        self.terms.iter().any(|t| matches!(t, Term::Workload(_)))
    }

    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Workload(globs) => subject.cgroup.is_some_and(|cgroup| {
                let w = &cgroup.workload;
                let names = [
                    Some(w.name.as_str()),
                    w.unit.as_deref(),
                    w.container_id.as_deref(),
                    w.pod_uid.as_deref(),
                ];
                globs
                    .iter()
                    .any(|g| names.iter().flatten().any(|name| g.is_match(name)))
            }),
            Term::Port(ports) => ports
                .iter()
                .any(|p| *p == subject.tuple.sport || *p == subject.tuple.dport),
            Term::Address(nets) => nets.iter().any(|(net, prefix)| {
                in_net(subject.tuple.src, *net, *prefix) || in_net(subject.tuple.dst, *net, *prefix)
            }),
        })
    }
}

fn term(whole: &str, part: &str) -> Result<Term, FilterError> {
    let (key, values) = part
        .split_once('=')
        .ok_or_else(|| FilterError::Syntax(whole.to_owned()))?;
    let values: Vec<&str> = values.split(',').map(str::trim).collect();
    if values.iter().any(|v| v.is_empty()) {
        return Err(FilterError::Syntax(whole.to_owned()));
    }
    match key.trim() {
        "workload" => values
            .iter()
            .map(|v| {
                Glob::new(v)
                    .map(|g| g.compile_matcher())
                    .map_err(|_| FilterError::Glob(whole.to_owned(), (*v).to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(Term::Workload),
        "port" => values
            .iter()
            .map(|v| {
                v.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| FilterError::Port(whole.to_owned(), (*v).to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(Term::Port),
        "addr" | "address" => values
            .iter()
            .map(|v| net(v).ok_or_else(|| FilterError::Address(whole.to_owned(), (*v).to_owned())))
            .collect::<Result<_, _>>()
            .map(Term::Address),
        other => Err(FilterError::Key(whole.to_owned(), other.to_owned())),
    }
}

/// `IP` or `IP/PREFIX`.
fn net(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= bits)?,
        None => bits,
    };
    Some((addr, prefix))
}

fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    // An IPv4 peer of an IPv6 socket is written as ::ffff:a.b.c.d.
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    let masked = |bits: u128, width: u32| {
        let prefix = u32::from(prefix);
        if prefix == 0 {
            0
        } else {
            bits >> (width - prefix)
        }
    };
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            masked(u128::from(u32::from(a)), 32) == masked(u128::from(u32::from(n)), 32)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => masked(u128::from(a), 128) == masked(u128::from(n), 128),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tracer_core::workload::Workload;

    fn tuple(sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport,
            dst: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            dport,
        }
    }

    fn cgroup(path: &str) -> Cgroup {
        Cgroup {
            id: 7,
            path: path.to_owned(),
            workload: Workload::from_cgroup_path(path),
        }
    }

    #[test]
    fn terms_combine_and_values_are_alternatives() {
        let nginx = cgroup("/system.slice/nginx.service");
        let t = tuple(40000, 8080);
        let subject = Subject {
            tuple: &t,
            cgroup: Some(&nginx),
        };
        let pass = |values: &[&str]| Filter::parse(values).unwrap().matches(&subject);
        assert!(pass(&[]));
        assert!(pass(&["workload=nginx*"]));
        assert!(pass(&["workload=redis.service,nginx.service"]));
        assert!(!pass(&["workload=redis*"]));
        assert!(pass(&["port=8080", "addr=10.0.0.0/8"]));
        assert!(pass(&["workload=nginx.service and port=40000"]));
        assert!(!pass(&["workload=nginx.service and port=9"]));
        assert!(!pass(&["addr=192.168.0.0/16"]));
        assert!(pass(&["addr=127.0.0.1"]));
        let unnamed = Subject {
            tuple: &t,
            cgroup: None,
        };
        assert!(!Filter::parse(&["workload=*"]).unwrap().matches(&unnamed));
    }

    #[test]
    fn bad_input_is_an_error() {
        for bad in [
            "nginx",
            "color=red",
            "port=http",
            "port=0",
            "port=70000",
            "addr=10.0.0.0/33",
            "addr=nowhere",
            "workload=",
            "workload=[",
        ] {
            assert!(Filter::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
