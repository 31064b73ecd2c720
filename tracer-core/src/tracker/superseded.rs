//! Timewait sockets set aside until their exit is read (see `time_wait`): found by their
//! address, and taken in the order they were set aside once the kernel's exit table was read
//! past that time. Under churn nearly every birth sets one aside, so both are O(1) on average:
//! an address holds one or two of them, and the order is a queue.
use foldhash::HashMap;
use smallvec::SmallVec;
use std::collections::VecDeque;

use crate::model::SockId;

/// A set-aside socket's key: its address, when a newer socket born there set it aside, and its
/// own birth (0: unknown).
pub type Key = (SockId, u64, u64);

pub struct Superseded<V> {
    /// By address, in no particular order (an address rarely holds more than one).
    by_address: HashMap<SockId, SmallVec<[Held<V>; 1]>>,
    /// (set aside at, address), by time; entries removed meanwhile leave theirs behind, dropped
    /// when reached or when they outnumber the live ones.
    order: VecDeque<(u64, SockId)>,
    len: usize,
    /// The most held at once since the last `shrink` (see there).
    most: usize,
}

struct Held<V> {
    at: u64,
    born: u64,
    value: Box<V>,
}

impl<V> Default for Superseded<V> {
    fn default() -> Self {
        Superseded {
            by_address: HashMap::default(),
            order: VecDeque::new(),
            len: 0,
            most: 0,
        }
    }
}

impl<V> Superseded<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Sets `value` aside under `key`; returns what that key held before.
    pub fn insert(&mut self, key: Key, value: Box<V>) -> Option<Box<V>> {
        let (tw, at, born) = key;
        let held = self.by_address.entry(tw).or_default();
        if let Some(same) = held.iter_mut().find(|h| (h.at, h.born) == (at, born)) {
            return Some(std::mem::replace(&mut same.value, value));
        }
        held.push(Held { at, born, value });
        self.len += 1;
        self.most = self.most.max(self.len);
        // Births arrive nearly in time order: the place is at or near the back.
        let place = self.order.partition_point(|&(t, _)| t <= at);
        self.order.insert(place, (at, tw));
        if self.order.len() > 2 * self.len + 1024 {
            let by_address = &self.by_address;
            self.order.retain(|&(at, tw)| {
                by_address
                    .get(&tw)
                    .is_some_and(|held| held.iter().any(|h| h.at == at))
            });
        }
        None
    }

    /// The first key (by the time it was set aside, then its birth) at address `tw` set aside
    /// after `ts_ns` whose value `fits`.
    pub fn first_after(&self, tw: SockId, ts_ns: u64, fits: impl Fn(&V) -> bool) -> Option<Key> {
        self.by_address
            .get(&tw)?
            .iter()
            .filter(|h| h.at > ts_ns && fits(&h.value))
            .map(|h| (tw, h.at, h.born))
            .min()
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut V> {
        let (tw, at, born) = *key;
        self.by_address
            .get_mut(&tw)?
            .iter_mut()
            .find(|h| (h.at, h.born) == (at, born))
            .map(|h| &mut *h.value)
    }

    pub fn remove(&mut self, key: &Key) -> Option<Box<V>> {
        let (tw, at, born) = *key;
        let held = self.by_address.get_mut(&tw)?;
        let index = held.iter().position(|h| (h.at, h.born) == (at, born))?;
        let value = held.swap_remove(index).value;
        if held.is_empty() {
            self.by_address.remove(&tw);
        }
        self.len -= 1;
        Some(value)
    }

    /// Removes everything set aside before `until_ns`, oldest first, each with its key.
    pub fn take_before(&mut self, until_ns: u64, mut each: impl FnMut(Key, Box<V>)) {
        while let Some(&(at, tw)) = self.order.front() {
            if at >= until_ns {
                break;
            }
            self.order.pop_front();
            let Some(held) = self.by_address.get_mut(&tw) else {
                continue;
            };
            let mut taken: SmallVec<[Held<V>; 2]> = SmallVec::new();
            let mut i = 0;
            while i < held.len() {
                if held[i].at < until_ns {
                    taken.push(held.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if held.is_empty() {
                self.by_address.remove(&tw);
            }
            self.len -= taken.len();
            taken.sort_unstable_by_key(|h| (h.at, h.born));
            for h in taken {
                each((tw, h.at, h.born), h.value);
            }
        }
    }

    /// Shrinks the tables left sparse by a burst that has ended (see `Tracker::shrink`). Each
    /// read of the exit table empties them and, under churn, the next second fills them as
    /// much again: judged by the most they held since the last call, not by what they hold
    /// now, so that steady churn does not free and regrow them every second.
    pub fn shrink(&mut self) -> bool {
        let most = std::mem::replace(&mut self.most, self.len);
        if !super::sparse(self.by_address.capacity(), most) {
            return false;
        }
        let shrank = super::shrink_map(&mut self.by_address);
        super::shrink_queue(&mut self.order) | shrank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(set: &mut Superseded<&'static str>, until: u64) -> Vec<(Key, &'static str)> {
        let mut out = Vec::new();
        set.take_before(until, |key, value| out.push((key, *value)));
        out
    }

    #[test]
    fn the_same_key_replaces_and_returns_the_earlier_value() {
        let mut set = Superseded::default();
        assert!(set.insert((1, 10, 5), Box::new("a")).is_none());
        assert_eq!(set.insert((1, 10, 5), Box::new("b")).map(|v| *v), Some("a"));
        assert_eq!(set.len(), 1);
        assert_eq!(taken(&mut set, 11), vec![((1, 10, 5), "b")]);
        assert_eq!(set.len(), 0);
    }

    #[test]
    fn first_after_takes_the_earliest_fitting_one_set_aside_after_the_time() {
        let mut set = Superseded::default();
        set.insert((7, 30, 0), Box::new("late"));
        set.insert((7, 20, 9), Box::new("other"));
        set.insert((7, 20, 3), Box::new("early"));
        set.insert((8, 25, 0), Box::new("elsewhere"));
        assert_eq!(set.first_after(7, 10, |_| true), Some((7, 20, 3)));
        assert_eq!(set.first_after(7, 20, |_| true), Some((7, 30, 0)));
        assert_eq!(set.first_after(7, 10, |v| *v == "other"), Some((7, 20, 9)));
        assert_eq!(set.first_after(7, 30, |_| true), None);
        assert_eq!(set.first_after(9, 0, |_| true), None);
    }

    #[test]
    fn take_before_takes_by_time_whatever_order_they_came_in() {
        let mut set = Superseded::default();
        set.insert((1, 50, 0), Box::new("d"));
        set.insert((2, 10, 0), Box::new("a"));
        set.insert((3, 30, 0), Box::new("c"));
        set.insert((1, 20, 0), Box::new("b"));
        let removed = set.remove(&(3, 30, 0)).map(|v| *v);
        assert_eq!(removed, Some("c"));
        assert_eq!(
            taken(&mut set, 50),
            vec![((2, 10, 0), "a"), ((1, 20, 0), "b")]
        );
        assert_eq!(set.len(), 1);
        *set.get_mut(&(1, 50, 0)).expect("kept") = "e";
        assert_eq!(taken(&mut set, u64::MAX), vec![((1, 50, 0), "e")]);
        assert_eq!(set.len(), 0);
        assert!(set.order.is_empty());
    }

    #[test]
    fn tables_refilled_as_much_every_read_keep_their_memory_and_shrink_once_the_burst_ends() {
        let mut set = Superseded::default();
        let fill = |set: &mut Superseded<&'static str>, from: u64| {
            for at in from..from + 10_000 {
                set.insert((at, at, 0), Box::new("x"));
            }
        };
        fill(&mut set, 0);
        assert_eq!(taken(&mut set, 10_000).len(), 10_000);
        let capacity = set.by_address.capacity();
        assert!(!set.shrink(), "it held 10 000 since the last call");
        assert_eq!(set.by_address.capacity(), capacity);
        fill(&mut set, 10_000);
        assert_eq!(taken(&mut set, 20_000).len(), 10_000);
        assert!(!set.shrink());
        // The churn stopped: nothing held since the last call.
        assert!(set.shrink());
        assert!(set.by_address.capacity() < capacity);
    }

    #[test]
    fn removed_entries_do_not_grow_the_order_without_bound() {
        let mut set = Superseded::default();
        for at in 0..10_000u64 {
            set.insert((at, at, 0), Box::new("x"));
            set.remove(&(at, at, 0));
        }
        assert_eq!(set.len(), 0);
        assert!(set.order.len() <= 1024 + 1, "{}", set.order.len());
        // Nor at an address that keeps a live one all along.
        set.insert((7, 0, 0), Box::new("kept"));
        for at in 1..10_000u64 {
            set.insert((7, at, 0), Box::new("x"));
            set.remove(&(7, at, 0));
        }
        assert_eq!(set.len(), 1);
        assert!(set.order.len() <= 1024 + 3, "{}", set.order.len());
    }
}
