//! Socket keys and their 64-bit hashes: the indexes and sets that only need to find a socket
//! by its 4-tuple, or to ask whether a key is there, hold the hash instead of the key.
use std::hash::{BuildHasher as _, Hash};
use std::marker::PhantomData;
use std::sync::OnceLock;

use foldhash::{HashMap, HashSet};

use crate::model::{SockId, Tuple};

/// A socket's key across namespaces.
pub type Key = (u32, Tuple);

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
        super::shrink_map(&mut self.map)
    }
}

/// Keys held as 64-bit hashes, for membership only: 8 bytes a key instead of about 48, which
/// matters for the sets a resync builds of every socket on a busy host. Two keys collide with
/// probability 2^-64.
#[derive(Clone, Debug, Default)]
pub struct KeyHashes(HashSet<u64>);

impl KeyHashes {
    pub fn with_capacity(capacity: usize) -> Self {
        Self(HashSet::with_capacity_and_hasher(
            capacity,
            Default::default(),
        ))
    }

    /// The set of `keys`, sized once for `capacity` of them.
    pub fn sized(capacity: usize, keys: impl IntoIterator<Item = Key>) -> Self {
        let mut set = Self::with_capacity(capacity);
        for key in keys {
            set.insert(&key);
        }
        set
    }

    pub fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }

    pub fn insert(&mut self, key: &Key) {
        self.0.insert(key_hash(key.0, &key.1));
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.0.contains(&key_hash(key.0, &key.1))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Key> for KeyHashes {
    fn from_iter<I: IntoIterator<Item = Key>>(keys: I) -> Self {
        Self::sized(0, keys)
    }
}

/// The timewait sockets a dump listed: every one as a key hash (to tell which of the table's are
/// gone), and in full only those the TIME_WAIT table did not know when the dump was asked for,
/// the only ones it may add. A busy host's timewait sockets would otherwise be held as 44-byte
/// keys for a moment.
#[derive(Clone, Debug, Default)]
pub struct Listed {
    all: KeyHashes,
    new: Vec<Key>,
}

impl Listed {
    /// `known`: the table held it when the dump was asked for.
    pub fn insert(&mut self, key: Key, known: bool) {
        self.all.insert(&key);
        if !known {
            self.new.push(key);
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.all.contains(key)
    }

    /// The listed sockets the table did not know.
    pub fn new_keys(&self) -> &[Key] {
        &self.new
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

/// Every key as one the table did not know.
impl FromIterator<Key> for Listed {
    fn from_iter<I: IntoIterator<Item = Key>>(keys: I) -> Self {
        let mut listed = Self::default();
        for key in keys {
            listed.insert(key, false);
        }
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{NETNS, loopback};

    #[test]
    fn key_hashes_tell_keys_apart_by_namespace_and_every_part_of_the_tuple() {
        let keys: Vec<Key> = (0..20_000u16)
            .flat_map(|port| [(NETNS, loopback(port, 80)), (NETNS + 1, loopback(port, 80))])
            .chain([(NETNS, loopback(80, 1)), (NETNS, loopback(1, 81))])
            .collect();
        let set: KeyHashes = keys.iter().copied().collect();
        assert_eq!(set.len(), keys.len(), "no two keys share a hash");
        assert!(keys.iter().all(|key| set.contains(key)));
        assert!(!set.contains(&(NETNS + 2, loopback(1, 80))));
        assert!(!set.contains(&(NETNS, loopback(80, 2))));
        let mut grown = KeyHashes::with_capacity(1);
        assert!(grown.is_empty());
        grown.insert(&keys[0]);
        grown.insert(&keys[0]);
        assert_eq!(grown.len(), 1);
    }

    #[test]
    fn a_listing_keeps_every_key_as_a_hash_and_only_new_ones_whole() {
        let (known, new) = ((NETNS, loopback(40000, 80)), (NETNS, loopback(40001, 80)));
        let mut listed = Listed::default();
        assert!(listed.is_empty());
        listed.insert(known, true);
        listed.insert(new, false);
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&known) && listed.contains(&new));
        assert!(!listed.contains(&(NETNS + 1, loopback(40000, 80))));
        assert_eq!(listed.new_keys(), [new]);
    }
}
