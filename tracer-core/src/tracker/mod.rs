//! The trackers: the connection table and, inside it, the TIME_WAIT table.
mod connections;
mod keys;
mod superseded;
mod time_wait;

pub use connections::{JOURNAL_MAX, Known, ResyncOutcome, Snapshot, Tracker, TrackerConfig};
pub use keys::{Key, KeyHashes, Listed};
pub(crate) use keys::{SockIndex, key_hash};
pub use time_wait::{TimeWaitConfig, TimeWaitTable};

use foldhash::HashMap;

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

/// Drops from `order` (by time) and `map` what was recorded before `before`; a key recorded
/// again since keeps its newer entry in `map`.
pub(crate) fn forget_until<K: std::hash::Hash + Eq + Copy>(
    order: &mut std::collections::VecDeque<(u64, K)>,
    map: &mut HashMap<K, u64>,
    before: u64,
) {
    while let Some(&(ts, key)) = order.front() {
        if ts >= before {
            break;
        }
        order.pop_front();
        if map.get(&key) == Some(&ts) {
            map.remove(&key);
        }
    }
}
