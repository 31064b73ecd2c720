//! The trackers: the connection table and, inside it, the TIME_WAIT table.
mod connections;
mod time_wait;

pub use connections::{
    JOURNAL_MAX, Key, KeyHashes, KeySet, ResyncOutcome, Snapshot, Tracker, TrackerConfig,
};
pub use time_wait::{TimeWaitConfig, TimeWaitTable};

use std::hash::{BuildHasher as _, Hash};
use std::marker::PhantomData;
use std::sync::OnceLock;

use foldhash::HashMap;

use crate::model::{SockId, Tuple};

/// A 64-bit hash of a socket's namespace and 4-tuple, for sets that only ask whether they hold
/// a key (a quarter or less of the key's own size; two keys collide with probability 2^-64).
pub(crate) fn key_hash(netns: u32, tuple: &Tuple) -> u64 {
    hash_of(&(netns, tuple))
}

/// The hash behind [`key_hash`] and [`SockIndex`], seeded once per process: the keys come from
/// the network, and a seed nobody knows keeps anyone from choosing two that collide.
fn hash_of<K: Hash + ?Sized>(key: &K) -> u64 {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(key)
}

/// Sockets by a 64-bit hash of a key (a 4-tuple, with or without its namespace): 16 bytes a
/// slot instead of up to 56 with the key itself. Two keys collide with probability 2^-64; the
/// callers check the socket they find against its own record anyway.
pub(crate) struct SockIndex<K: ?Sized> {
    map: HashMap<u64, SockId>,
    key: PhantomData<fn(&K)>,
}

impl<K: Hash + ?Sized> SockIndex<K> {
    pub fn new() -> Self {
        SockIndex {
            map: HashMap::default(),
            key: PhantomData,
        }
    }

    pub fn get(&self, key: &K) -> Option<SockId> {
        self.map.get(&hash_of(key)).copied()
    }

    pub fn insert(&mut self, key: &K, sock: SockId) {
        self.map.insert(hash_of(key), sock);
    }

    /// Removes `key` only while it still points at `sock` (a newer socket may hold it since).
    pub fn remove_if(&mut self, key: &K, sock: SockId) -> bool {
        let hash = hash_of(key);
        if self.map.get(&hash) == Some(&sock) {
            self.map.remove(&hash);
            return true;
        }
        false
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn shrink(&mut self) -> bool {
        shrink_map(&mut self.map)
    }
}

/// A table is worth shrinking once it holds under a quarter of its capacity, and the capacity is
/// large enough to matter.
fn sparse(capacity: usize, len: usize) -> bool {
    capacity > 4096 && capacity > 4 * len
}

pub(crate) fn shrink_map<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) -> bool {
    if sparse(map.capacity(), map.len()) {
        map.shrink_to(map.len() * 2);
        return true;
    }
    false
}

pub(crate) fn shrink_queue<T>(queue: &mut std::collections::VecDeque<T>) -> bool {
    if sparse(queue.capacity(), queue.len()) {
        queue.shrink_to(queue.len() * 2);
        return true;
    }
    false
}
