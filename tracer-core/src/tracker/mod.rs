//! The trackers: the connection table and, inside it, the TIME_WAIT table.
mod connections;
mod time_wait;

pub use connections::{
    JOURNAL_MAX, Key, KeyHashes, KeySet, ResyncOutcome, Snapshot, Tracker, TrackerConfig,
};
pub use time_wait::{TimeWaitConfig, TimeWaitTable};

use foldhash::HashMap;

use crate::model::Tuple;

/// A 64-bit hash of a socket's namespace and 4-tuple, for sets that only ask whether they hold
/// a key (a quarter or less of the key's own size; two keys collide with probability 2^-64).
pub(crate) fn key_hash(netns: u32, tuple: &Tuple) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0).hash_one((netns, tuple))
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
