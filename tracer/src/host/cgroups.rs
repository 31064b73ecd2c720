//! Cgroup ids to cgroup paths and workloads. The kernel programs read a socket's cgroup id
//! (`sk->sk_cgrp_data.cgroup->kn->id`); on 64-bit kernels that is the kernfs node id, which is
//! also the inode number of the cgroup's directory in the cgroup2 mount (`stat -c %i`), and is
//! not reused (its high 32 bits count generations). So a walk of the hierarchy comparing the
//! inode numbers `readdir` returns finds the path, without `open_by_handle_at`.
//!
//! [`CgroupResolver`] keeps what it found in a bounded LRU cache; an unknown id starts a new
//! walk (at most one per [`ResolverConfig::rescan_interval`], each bounded in directories and
//! depth). A cached id keeps its path after its cgroup is removed, flagged
//! [`Resolved::removed`], so the connections of a stopped container are still named. An id that
//! a complete walk made after it was first asked for did not find can never appear (its cgroup
//! existed when the socket was made, and ids are not reused): it is remembered as gone and costs
//! no further walk. A renamed cgroup (v2 allows renames within a parent; systemd and the
//! runtimes never do) keeps its old path until a walk passes by it again.
//!
//! Walks are blocking file-system reads (each cgroup directory lists its interface files too):
//! 14 to 35 ms for 2 000 cgroups on the 2-core test machines. Callers on a hot path use
//! [`CgroupResolver::cached`] and resolve unknown ids off it.
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashSet, HashSetExt};
use lru::LruCache;
use procfs::process::MountInfo;

use tracer_core::workload::Workload;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] procfs::ProcError),
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mountinfo): \
         mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("cannot read the cgroup2 mount {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the cgroup v2 hierarchy is mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// `/sys/fs/cgroup` (unified layout) or `/sys/fs/cgroup/unified` (hybrid layout).
    pub mount_point: PathBuf,
    /// The hierarchy's directory the mount shows, `/` unless a subtree was bind-mounted; paths
    /// are given from it (inside a cgroup namespace, from the namespace's root).
    pub root: String,
}

/// The cgroup2 mount listed in `/proc/self/mountinfo`.
pub fn find_cgroup2_mount() -> Result<Cgroup2Mount, CgroupError> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(CgroupError::Mountinfo)?;
    pick_cgroup2_mount(&mounts.0).ok_or(CgroupError::NoCgroup2)
}

/// The best of the cgroup2 mounts: one of the whole hierarchy rather than a bind-mounted
/// subtree, at a usual place (`/sys/fs/cgroup`, then `/sys/fs/cgroup/unified`) rather than
/// elsewhere, then the shortest mount point.
pub fn pick_cgroup2_mount(mounts: &[MountInfo]) -> Option<Cgroup2Mount> {
    let usual = |path: &Path| {
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .position(|usual| path == Path::new(usual))
            .unwrap_or(2)
    };
    mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .min_by_key(|m| {
            (
                m.root != "/",
                usual(&m.mount_point),
                m.mount_point.as_os_str().len(),
            )
        })
        .map(|m| Cgroup2Mount {
            mount_point: m.mount_point.clone(),
            root: m.root.clone(),
        })
}

/// Bounds of the resolver's cache and walks.
#[derive(Clone, Copy, Debug)]
pub struct ResolverConfig {
    /// Cgroups kept (resolved ones, removed ones included), and ids remembered as gone.
    pub capacity: NonZeroUsize,
    /// Least time between two walks started by unknown ids.
    pub rescan_interval: Duration,
    /// Most directories one walk visits; a walk that stops there is incomplete.
    pub max_dirs: usize,
    /// Deepest level one walk descends to (the root is level 0).
    pub max_depth: usize,
}

impl Default for ResolverConfig {
    fn default() -> ResolverConfig {
        ResolverConfig {
            capacity: NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN),
            rescan_interval: Duration::from_secs(1),
            max_dirs: 100_000,
            max_depth: 32,
        }
    }
}

/// A cgroup: its id, its path from the hierarchy's root, and the workload the path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub id: u64,
    /// As `/proc/<pid>/cgroup` writes it: `/system.slice/nginx.service`, `/` for the root.
    pub path: String,
    pub workload: Workload,
}

/// What the resolver knows of an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub cgroup: Arc<Cgroup>,
    /// A complete walk since the cgroup was last seen did not find it: it has been removed, and
    /// this is the last name seen for it.
    pub removed: bool,
}

/// What one walk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkSummary {
    /// Cgroup directories visited, the root included.
    pub dirs: usize,
    /// The walk stopped at [`ResolverConfig::max_dirs`] or [`ResolverConfig::max_depth`].
    pub truncated: bool,
}

struct Entry {
    cgroup: Arc<Cgroup>,
    /// The number of the last walk that saw the cgroup.
    seen_in: u64,
}

/// Cgroup ids to [`Cgroup`]s, cached and bounded; see the module documentation.
pub struct CgroupResolver {
    mount: Cgroup2Mount,
    config: ResolverConfig,
    known: LruCache<u64, Entry>,
    /// Ids a complete walk did not find after they were asked for.
    gone: LruCache<u64, ()>,
    /// Ids asked for since the last walk and not found yet (at most `capacity`).
    pending: HashSet<u64>,
    walks: u64,
    last_complete_walk: u64,
    last_walk_at: Option<Instant>,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 mount of `/proc/self/mountinfo`, filled by a first walk.
    pub fn new(config: ResolverConfig) -> Result<CgroupResolver, CgroupError> {
        CgroupResolver::with_mount(find_cgroup2_mount()?, config)
    }

    /// A resolver for `mount`, filled by a first walk (which fails if the mount cannot be read).
    pub fn with_mount(
        mount: Cgroup2Mount,
        config: ResolverConfig,
    ) -> Result<CgroupResolver, CgroupError> {
        let mut resolver = CgroupResolver {
            known: LruCache::new(config.capacity),
            gone: LruCache::new(config.capacity),
            pending: HashSet::new(),
            mount,
            config,
            walks: 0,
            last_complete_walk: 0,
            last_walk_at: None,
        };
        resolver.walk(Instant::now())?;
        Ok(resolver)
    }

    pub fn mount(&self) -> &Cgroup2Mount {
        &self.mount
    }

    /// Walks made so far, the first included.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Cgroups in the cache (removed ones included).
    pub fn cached_len(&self) -> usize {
        self.known.len()
    }

    /// What the cache knows of `id`, without touching the file system.
    pub fn cached(&mut self, id: u64) -> Option<Resolved> {
        let last_complete_walk = self.last_complete_walk;
        self.known.get(&id).map(|entry| Resolved {
            cgroup: Arc::clone(&entry.cgroup),
            removed: entry.seen_in < last_complete_walk,
        })
    }

    /// A complete walk after `id` was asked for did not find it: it will never be named.
    pub fn is_gone(&self, id: u64) -> bool {
        self.gone.contains(&id)
    }

    /// `id`'s cgroup: from the cache, or else from a new walk if none ran in the last
    /// [`ResolverConfig::rescan_interval`]. `None` for an id not found (yet, or ever: a later
    /// call after the interval tries again, unless the id is known to be gone).
    pub fn resolve(&mut self, id: u64) -> Option<Resolved> {
        self.resolve_at(id, Instant::now())
    }

    /// [`CgroupResolver::resolve`] at time `now` (tests pass their own clock).
    pub fn resolve_at(&mut self, id: u64, now: Instant) -> Option<Resolved> {
        if let Some(found) = self.cached(id) {
            return Some(found);
        }
        if self.gone.contains(&id) {
            return None;
        }
        if self.pending.len() < self.config.capacity.get() {
            self.pending.insert(id);
        }
        let due = self
            .last_walk_at
            .is_none_or(|last| now.saturating_duration_since(last) >= self.config.rescan_interval);
        if due {
            // A walk that fails (the mount vanished) leaves the cache as it was.
            if let Err(e) = self.walk(now) {
                log::debug!("cgroup walk failed: {e}");
            }
            return self.cached(id);
        }
        None
    }

    /// Walks the hierarchy now, whatever the rate limit: refreshes the paths of cached cgroups,
    /// resolves the ids asked for, and fills the cache's free room with the others.
    pub fn walk(&mut self, now: Instant) -> Result<WalkSummary, CgroupError> {
        self.last_walk_at = Some(now);
        let top = self.mount.mount_point.clone();
        let root_id = std::fs::metadata(&top)
            .map_err(|source| CgroupError::Mount {
                path: top.clone(),
                source,
            })?
            .ino();
        self.walks += 1;
        let base = self.mount.root.trim_end_matches('/').to_owned();
        let mut summary = WalkSummary::default();
        let mut stack = vec![(top, base, root_id, 0_usize)];
        while let Some((dir, path, id, depth)) = stack.pop() {
            if summary.dirs >= self.config.max_dirs {
                summary.truncated = true;
                break;
            }
            summary.dirs += 1;
            self.visit(id, if path.is_empty() { "/" } else { &path });
            // A cgroup removed during the walk: skip it.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                // Directories waiting on the stack count toward the bound too, so that one
                // huge directory cannot grow it past `max_dirs`.
                if depth >= self.config.max_depth
                    || summary.dirs + stack.len() >= self.config.max_dirs
                {
                    summary.truncated = true;
                    break;
                }
                let name = entry.file_name();
                let child = format!("{path}/{}", name.to_string_lossy());
                stack.push((entry.path(), child, entry.ino(), depth + 1));
            }
        }
        if !summary.truncated {
            self.last_complete_walk = self.walks;
            for id in self.pending.drain() {
                self.gone.put(id, ());
            }
        }
        Ok(summary)
    }

    fn visit(&mut self, id: u64, path: &str) {
        let walk = self.walks;
        if let Some(entry) = self.known.peek_mut(&id) {
            entry.seen_in = walk;
            if entry.cgroup.path != path {
                entry.cgroup = Arc::new(cgroup(id, path));
            }
            return;
        }
        let asked = self.pending.remove(&id);
        // Prefill only into free room: a walk never evicts what was asked for.
        if asked || self.known.len() < self.known.cap().get() {
            let cgroup = Arc::new(cgroup(id, path));
            self.known.push(
                id,
                Entry {
                    cgroup,
                    seen_in: walk,
                },
            );
        }
    }
}

fn cgroup(id: u64, path: &str) -> Cgroup {
    Cgroup {
        id,
        path: path.to_owned(),
        workload: Workload::from_cgroup_path(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(text: &str) -> Vec<MountInfo> {
        text.lines()
            .map(|line| MountInfo::from_line(line).expect("fixture line"))
            .collect()
    }

    #[test]
    fn picks_the_cgroup2_mount_of_each_layout() {
        let hybrid = mounts(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
             40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
        );
        assert_eq!(
            pick_cgroup2_mount(&hybrid),
            Some(Cgroup2Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            })
        );
        let unified = mounts(
            "25 22 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n\
             90 25 0:22 /system.slice/foo.service /run/foo/cgroup rw,relatime - cgroup2 cgroup2 rw\n\
             91 25 0:22 / /mnt/elsewhere rw,relatime - cgroup2 cgroup2 rw",
        );
        assert_eq!(
            pick_cgroup2_mount(&unified),
            Some(Cgroup2Mount {
                mount_point: "/sys/fs/cgroup".into(),
                root: "/".into()
            })
        );
        // Inside a container that only sees its own subtree.
        let subtree = mounts(
            "600 590 0:22 /kubepods.slice/x.slice /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw",
        );
        assert_eq!(
            pick_cgroup2_mount(&subtree),
            Some(Cgroup2Mount {
                mount_point: "/sys/fs/cgroup".into(),
                root: "/kubepods.slice/x.slice".into()
            })
        );
        let v1_only = mounts(
            "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
             22 1 0:5 / /proc rw - proc proc rw",
        );
        assert_eq!(pick_cgroup2_mount(&v1_only), None);
    }

    /// A plain directory tree stands in for the hierarchy: the walk only reads directories and
    /// their inode numbers.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(name: &str) -> TempTree {
            let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            TempTree(dir)
        }

        fn mkdir(&self, rel: &str) -> u64 {
            let dir = self.0.join(rel);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::metadata(&dir).expect("stat").ino()
        }

        fn mount(&self) -> Cgroup2Mount {
            Cgroup2Mount {
                mount_point: self.0.clone(),
                root: "/".into(),
            }
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_cache_stays_bounded_keeps_what_was_asked_and_follows_removals_and_renames() {
        let tree = TempTree::new("tracer-cgroups-cache");
        let a = tree.mkdir("system.slice/a.service");
        let b = tree.mkdir("system.slice/b.service");
        let config = ResolverConfig {
            capacity: NonZeroUsize::new(3).expect("non-zero"),
            rescan_interval: Duration::ZERO,
            ..ResolverConfig::default()
        };
        let mut resolver = CgroupResolver::with_mount(tree.mount(), config).expect("walk");
        // Root, system.slice and one service fill the cache; the first walk evicts nothing.
        assert_eq!(resolver.cached_len(), 3);
        let first = [a, b]
            .into_iter()
            .filter(|id| resolver.cached(*id).is_some())
            .count();
        assert_eq!(first, 1);
        // Asking for the other one walks and makes room for it.
        let c = tree.mkdir("system.slice/c.service");
        for (id, name) in [(a, "a.service"), (b, "b.service"), (c, "c.service")] {
            let found = resolver.resolve(id).expect("resolved");
            assert_eq!(found.cgroup.workload.name, name);
            assert_eq!(found.cgroup.path, format!("/system.slice/{name}"));
            assert_eq!(resolver.cached_len(), 3);
        }
        // Removed: kept with its last name, flagged after a complete walk.
        std::fs::remove_dir(tree.0.join("system.slice/c.service")).expect("rmdir");
        assert!(!resolver.cached(c).expect("cached").removed);
        resolver.walk(Instant::now()).expect("walk");
        let gone = resolver.cached(c).expect("last name kept");
        assert!(gone.removed);
        assert_eq!(gone.cgroup.workload.name, "c.service");
        // Renamed: the next walk that passes by gives the new path.
        std::fs::rename(
            tree.0.join("system.slice/b.service"),
            tree.0.join("system.slice/b2.service"),
        )
        .expect("rename");
        resolver.resolve(b).expect("cached");
        resolver.walk(Instant::now()).expect("walk");
        let renamed = resolver.resolve(b).expect("renamed");
        assert_eq!(renamed.cgroup.workload.name, "b2.service");
        assert!(!renamed.removed);
    }

    #[test]
    fn finds_this_machines_mount_and_the_root_cgroup() {
        let mount = find_cgroup2_mount().expect("a cgroup2 mount on the test machine");
        let root = std::fs::metadata(&mount.mount_point).expect("stat").ino();
        let mut resolver =
            CgroupResolver::with_mount(mount.clone(), ResolverConfig::default()).expect("walk");
        let found = resolver.cached(root).expect("the root cgroup is cached");
        assert_eq!(found.cgroup.path, mount.root);
        assert!(!found.removed);
    }

    #[test]
    fn bounds_hold_on_the_real_hierarchy() {
        let mount = find_cgroup2_mount().expect("a cgroup2 mount on the test machine");
        let config = ResolverConfig {
            capacity: NonZeroUsize::new(1).expect("non-zero"),
            max_dirs: 1,
            ..ResolverConfig::default()
        };
        let mut resolver = CgroupResolver::with_mount(mount, config).expect("walk");
        let summary = resolver.walk(Instant::now()).expect("walk");
        assert_eq!(summary.dirs, 1);
        assert_eq!(resolver.cached_len(), 1);
        // An id that no walk can find, with incomplete walks: never declared gone.
        assert_eq!(resolver.resolve(u64::MAX), None);
        assert!(!resolver.gone.contains(&u64::MAX));
    }

    #[test]
    fn an_unknown_id_walks_once_per_interval_and_then_is_gone() {
        let mount = find_cgroup2_mount().expect("a cgroup2 mount on the test machine");
        let config = ResolverConfig {
            rescan_interval: Duration::from_secs(60),
            ..ResolverConfig::default()
        };
        let mut resolver = CgroupResolver::with_mount(mount, config).expect("walk");
        let start = resolver.last_walk_at.expect("first walk");
        let walks = resolver.walks;
        // Within the interval: no walk.
        assert_eq!(resolver.resolve_at(u64::MAX, start), None);
        assert_eq!(resolver.walks, walks);
        // After it: one walk, which does not find the id, so it is gone for good.
        let later = start + Duration::from_secs(60);
        assert_eq!(resolver.resolve_at(u64::MAX, later), None);
        assert_eq!(resolver.walks, walks + 1);
        assert!(resolver.gone.contains(&u64::MAX));
        let much_later = later + Duration::from_secs(600);
        assert_eq!(resolver.resolve_at(u64::MAX, much_later), None);
        assert_eq!(resolver.walks, walks + 1);
    }
}
