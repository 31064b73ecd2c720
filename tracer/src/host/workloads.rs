//! The agent's view of workload names: cgroup ids of sockets to the cgroups they name, looked
//! up in the resolver's cache on the event path and resolved (a walk of the hierarchy) only on
//! the event loop's refresh tick, at most once per `ResolverConfig::rescan_interval`.
//!
//! A handle shared by the event sink and the event loop (one thread: `Rc`). Without a cgroup2
//! mount every lookup answers "unknown" and nothing waits for a walk.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use foldhash::{HashSet, HashSetExt};

use crate::host::cgroups::{Cgroup, CgroupResolver, ResolverConfig};

/// Ids waiting for the next walk, at most.
const MAX_WANTED: usize = 4096;

/// Cgroup ids to names; cheap to clone (a shared handle).
#[derive(Clone)]
pub struct WorkloadNames {
    inner: Rc<RefCell<Inner>>,
}

struct Inner {
    resolver: Option<CgroupResolver>,
    /// Ids looked up and not in the cache: resolved at the next refresh.
    wanted: HashSet<u64>,
}

impl WorkloadNames {
    /// Names from the cgroup2 hierarchy of this host (one walk now); without one (cgroup v1
    /// only), a handle that knows no name, with a warning.
    pub fn start() -> WorkloadNames {
        let resolver = match CgroupResolver::new(ResolverConfig::default()) {
            Ok(resolver) => Some(resolver),
            Err(e) => {
                log::warn!("workloads are not named: {e}");
                None
            }
        };
        WorkloadNames::with_resolver(resolver)
    }

    pub fn with_resolver(resolver: Option<CgroupResolver>) -> WorkloadNames {
        WorkloadNames {
            inner: Rc::new(RefCell::new(Inner {
                resolver,
                wanted: HashSet::new(),
            })),
        }
    }

    /// The cgroup `id` names, from the cache only; an id not cached is resolved at the next
    /// [`WorkloadNames::refresh`]. `None` for 0 (unknown) and ids not resolved (yet).
    pub fn cached(&self, id: u64) -> Option<Arc<Cgroup>> {
        if id == 0 {
            return None;
        }
        let mut inner = self.inner.borrow_mut();
        let resolver = inner.resolver.as_mut()?;
        if let Some(found) = resolver.cached(id) {
            return Some(found.cgroup);
        }
        if inner.wanted.len() < MAX_WANTED {
            inner.wanted.insert(id);
        }
        None
    }

    /// Whether `id` is worth waiting for: a real id the cache does not know yet (the next walk
    /// may find it). Marks it wanted.
    pub fn unresolved(&self, id: u64) -> bool {
        let worth = self
            .inner
            .borrow()
            .resolver
            .as_ref()
            .is_some_and(|r| !r.is_gone(id));
        worth && id != 0 && self.cached(id).is_none()
    }

    /// Walks made so far: a record held for a name waits at most until the next one.
    pub fn walks(&self) -> u64 {
        self.inner
            .borrow()
            .resolver
            .as_ref()
            .map_or(0, CgroupResolver::walks)
    }

    /// Resolves the ids looked up since the last call (one walk at most, rate limited by the
    /// resolver). Blocking file-system reads: call it from the refresh tick only.
    pub fn refresh(&self) {
        let mut inner = self.inner.borrow_mut();
        let Inner { resolver, wanted } = &mut *inner;
        let Some(resolver) = resolver.as_mut() else {
            wanted.clear();
            return;
        };
        let mut unresolved = HashSet::new();
        for id in wanted.drain() {
            if resolver.resolve(id).is_none() && !resolver.is_gone(id) {
                unresolved.insert(id);
            }
        }
        // Ids not found yet (no walk was due) stay wanted; those known gone are dropped.
        *wanted = unresolved;
    }

    /// At shutdown: one last walk now for the ids still wanted, whatever the rate limit.
    pub fn refresh_now(&self) {
        let mut inner = self.inner.borrow_mut();
        let Inner { resolver, wanted } = &mut *inner;
        if let Some(resolver) = resolver.as_mut()
            && !wanted.is_empty()
            && let Err(e) = resolver.walk(std::time::Instant::now())
        {
            log::debug!("cgroup walk failed: {e}");
        }
        wanted.clear();
    }
}
