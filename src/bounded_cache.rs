//! A map bounded by entries and by weight, each entry living until its own
//! deadline, the least recently used out first when room is needed: the
//! verified-token cache, introspection's answers and misuse's windows.
//!
//! Ours rather than a crate's: moka (and what it instantiated: crossbeam,
//! parking_lot...) was a quarter of our lib's LLVM IR (912k lines, 686k
//! without; this module 5k), compiled twice per test run (lib, lib-test), and
//! this is the little of it we use. README "Build cost" has the timings.
//!
//! Sharded, because `get` runs on every Check from every tokio worker: a key
//! hashes to one of up to 16 shards, each a mutex over a hash map and an LRU
//! list (slab indices, no unsafe), held for a lookup and a relink. The bounds
//! are global (two atomics), so a shard may hold anything from nothing to the
//! whole capacity and an entry heavy enough to fill the cache still fits. Room
//! is made on every insert, before it returns (inserts running at the same
//! time exceed the bounds by at most their own entries meanwhile): the
//! inserting shard's least recently used entries first, then the other shards'
//! in turn. That is LRU within a shard and close to it across shards (keys
//! spread evenly). Each
//! entry is evicted at most once, so an insert costs amortized O(1); nothing
//! ever scans the cache. Expired entries go when found (a `get`), when they
//! reach the LRU end, or when an insert finds one there.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

/// Why an entry left before anyone removed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Its deadline passed.
    Expired,
    /// Room was needed (`max_entries` or `max_weight`), or it alone weighed more.
    Evicted,
}

type OnRemoval = Box<dyn Fn(Removal) + Send + Sync>;

/// `T` is the clock the deadlines are in (Unix seconds, `Instant`...): the
/// caller passes `now`, so an injected clock is honoured.
pub struct BoundedCache<K, V, T> {
    shards: Box<[Mutex<Shard<K, V, T>>]>,
    hasher: RandomState,
    max_entries: u64,
    max_weight: u64,
    entries: AtomicU64,
    weight: AtomicU64,
    /// Where the next insert that needs room elsewhere starts looking.
    cursor: AtomicUsize,
    /// Called under a shard's lock: it must not use the cache.
    on_removal: Option<OnRemoval>,
}

const NIL: u32 = u32::MAX;

struct Node<K, V, T> {
    key: K,
    value: V,
    expires: T,
    weight: u32,
    /// Towards the most recently used end.
    prev: u32,
    next: u32,
}

struct Shard<K, V, T> {
    map: HashMap<K, u32>,
    slots: Vec<Option<Node<K, V, T>>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next out.
    tail: u32,
}

impl<K, V, T> Shard<K, V, T> {
    fn node(&self, i: u32) -> &Node<K, V, T> {
        self.slots[i as usize]
            .as_ref()
            .expect("a linked slot is used")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<K, V, T> {
        self.slots[i as usize]
            .as_mut()
            .expect("a linked slot is used")
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.node_mut(p).next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.node_mut(n).prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let head = self.head;
        {
            let n = self.node_mut(i);
            n.prev = NIL;
            n.next = head;
        }
        match head {
            NIL => self.tail = i,
            h => self.node_mut(h).prev = i,
        }
        self.head = i;
    }

    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone, T: Ord + Copy> BoundedCache<K, V, T> {
    /// At most `max_entries` entries and `max_weight` in weight (either 0: the
    /// cache holds nothing).
    pub fn new(max_entries: u64, max_weight: u64) -> Self {
        // Small caches are one shard, exactly LRU; a shard per 64 entries up to 16.
        let shards = (max_entries / 64).clamp(1, 16).next_power_of_two().min(16) as usize;
        BoundedCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        slots: Vec::new(),
                        free: Vec::new(),
                        head: NIL,
                        tail: NIL,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            max_entries,
            max_weight,
            entries: AtomicU64::new(0),
            weight: AtomicU64::new(0),
            cursor: AtomicUsize::new(0),
            on_removal: None,
        }
    }

    /// Told of every entry that expires or is evicted (not of one replaced).
    pub fn on_removal(mut self, f: impl Fn(Removal) + Send + Sync + 'static) -> Self {
        self.on_removal = Some(Box::new(f));
        self
    }

    fn shard_of(&self, key: &K) -> usize {
        self.hasher.hash_one(key) as usize & (self.shards.len() - 1)
    }

    fn lock(&self, s: usize) -> MutexGuard<'_, Shard<K, V, T>> {
        // A panic under the lock leaves the shard consistent (no callback panics
        // midway through a relink): keep using it.
        self.shards[s].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live value, now the most recently used; an expired one is removed.
    pub fn get(&self, key: &K, now: T) -> Option<V> {
        let mut shard = self.lock(self.shard_of(key));
        let i = *shard.map.get(key)?;
        if shard.node(i).expires <= now {
            self.remove(&mut shard, i, Some(Removal::Expired));
            return None;
        }
        shard.touch(i);
        Some(shard.node(i).value.clone())
    }

    /// Whether a live entry is there, without making it more recently used.
    pub fn contains(&self, key: &K, now: T) -> bool {
        let shard = self.lock(self.shard_of(key));
        shard
            .map
            .get(key)
            .is_some_and(|&i| now < shard.node(i).expires)
    }

    /// Holds `value` until `expires` (nothing if that is not after `now`),
    /// replacing any entry of `key`, and makes room before returning.
    pub fn insert(&self, key: K, value: V, weight: u32, expires: T, now: T) {
        let s = self.shard_of(&key);
        let mut shard = self.lock(s);
        if expires <= now || self.max_entries == 0 || u64::from(weight) > self.max_weight {
            if let Some(&i) = shard.map.get(&key) {
                self.remove(&mut shard, i, None);
            }
            if expires > now && self.max_entries > 0 {
                self.report(Removal::Evicted);
            }
            return;
        }
        let i = match shard.map.get(&key) {
            Some(&i) => {
                let n = shard.node_mut(i);
                let old = std::mem::replace(&mut n.weight, weight);
                n.value = value;
                n.expires = expires;
                self.weight.fetch_sub(u64::from(old), Relaxed);
                self.weight.fetch_add(u64::from(weight), Relaxed);
                shard.touch(i);
                i
            }
            None => self.link(&mut shard, key, value, weight, expires),
        };
        self.make_room(s, shard, i, now);
    }

    /// The live value of `key`, or `make()`'s, held until `expires` with a
    /// weight of 1. `renew` moves a found entry's deadline to `expires` too
    /// (an idle timeout). `make` runs under the shard's lock: keep it cheap.
    pub fn get_or_insert_with(
        &self,
        key: K,
        now: T,
        expires: T,
        renew: bool,
        make: impl FnOnce() -> V,
    ) -> V {
        let s = self.shard_of(&key);
        let mut shard = self.lock(s);
        if let Some(&i) = shard.map.get(&key) {
            if now < shard.node(i).expires {
                shard.touch(i);
                let n = shard.node_mut(i);
                if renew {
                    n.expires = expires;
                }
                return n.value.clone();
            }
            self.remove(&mut shard, i, Some(Removal::Expired));
        }
        let value = make();
        if expires <= now || self.max_entries == 0 || self.max_weight == 0 {
            return value;
        }
        let i = self.link(&mut shard, key, value.clone(), 1, expires);
        self.make_room(s, shard, i, now);
        value
    }

    /// Entries held, expired ones not yet removed included.
    pub fn len(&self) -> u64 {
        self.entries.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight held.
    pub fn weight(&self) -> u64 {
        self.weight.load(Relaxed)
    }

    fn over(&self) -> bool {
        self.entries.load(Relaxed) > self.max_entries || self.weight.load(Relaxed) > self.max_weight
    }

    fn report(&self, why: Removal) {
        if let Some(f) = &self.on_removal {
            f(why);
        }
    }

    fn link(&self, shard: &mut Shard<K, V, T>, key: K, value: V, weight: u32, expires: T) -> u32 {
        let node = Node {
            key: key.clone(),
            value,
            expires,
            weight,
            prev: NIL,
            next: NIL,
        };
        let i = match shard.free.pop() {
            Some(i) => {
                shard.slots[i as usize] = Some(node);
                i
            }
            None => {
                shard.slots.push(Some(node));
                u32::try_from(shard.slots.len() - 1).expect("a shard holds under 2^32 entries")
            }
        };
        shard.push_front(i);
        shard.map.insert(key, i);
        self.entries.fetch_add(1, Relaxed);
        self.weight.fetch_add(u64::from(weight), Relaxed);
        i
    }

    /// Unlinks slot `i`, reporting `why` (None: replaced or refused, not reported).
    fn remove(&self, shard: &mut Shard<K, V, T>, i: u32, why: Option<Removal>) {
        shard.unlink(i);
        let node = shard.slots[i as usize]
            .take()
            .expect("a linked slot is used");
        shard.map.remove(&node.key);
        shard.free.push(i);
        self.entries.fetch_sub(1, Relaxed);
        self.weight.fetch_sub(u64::from(node.weight), Relaxed);
        if let Some(why) = why {
            self.report(why);
        }
    }

    /// Evicts the least recently used entry of `shard` (never `keep`).
    fn evict_tail(&self, shard: &mut Shard<K, V, T>, keep: u32, now: T) -> bool {
        let t = shard.tail;
        if t == NIL || t == keep {
            return false;
        }
        let why = if shard.node(t).expires <= now {
            Removal::Expired
        } else {
            Removal::Evicted
        };
        self.remove(shard, t, Some(why));
        true
    }

    /// Back within both bounds after an insert into shard `s` (slot `new`).
    fn make_room(&self, s: usize, mut shard: MutexGuard<'_, Shard<K, V, T>>, new: u32, now: T) {
        while self.over() {
            if !self.evict_tail(&mut shard, new, now) {
                break;
            }
        }
        // An expired entry at the LRU end goes now, over the bound or not: the
        // cache does not keep dead entries until it fills.
        if shard.tail != NIL && shard.node(shard.tail).expires <= now {
            self.evict_tail(&mut shard, new, now);
        }
        drop(shard);
        if !self.over() {
            return;
        }
        // This shard holds only the new entry: the room is in the others. One
        // lock at a time (no lock order to keep), starting where the last left off.
        let n = self.shards.len();
        let start = self.cursor.fetch_add(1, Relaxed);
        for k in 0..n {
            let other = (start + k) % n;
            if other == s {
                continue;
            }
            let mut shard = self.lock(other);
            while self.over() && self.evict_tail(&mut shard, NIL, now) {}
            if !self.over() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn counting(
        max_entries: u64,
        max_weight: u64,
    ) -> (BoundedCache<u32, u32, u64>, Arc<[AtomicU64; 2]>) {
        let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let s = seen.clone();
        let c = BoundedCache::new(max_entries, max_weight).on_removal(move |why| {
            s[(why == Removal::Evicted) as usize].fetch_add(1, Relaxed);
        });
        (c, seen)
    }

    #[test]
    fn an_entry_lives_until_its_deadline_exactly() {
        let (c, seen) = counting(10, 10);
        c.insert(1, 10, 1, 100, 0);
        assert_eq!(c.get(&1, 99), Some(10));
        assert!(c.contains(&1, 99));
        assert!(!c.contains(&1, 100), "gone at the deadline");
        assert_eq!(c.get(&1, 100), None, "gone at the deadline");
        assert_eq!(c.len(), 0, "and removed when found");
        assert_eq!(seen[0].load(Relaxed), 1, "one expiry");
        assert_eq!(seen[1].load(Relaxed), 0, "no eviction");
        c.insert(2, 20, 1, 5, 5);
        assert_eq!(c.get(&2, 0), None, "already expired: never held");
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let (c, seen) = counting(3, 100);
        for k in 1..=3 {
            c.insert(k, k, 1, 100, 0);
        }
        assert_eq!(c.get(&1, 0), Some(1), "1 is now the most recent");
        assert!(c.contains(&2, 0), "contains does not make 2 recent");
        c.insert(4, 4, 1, 100, 0);
        assert_eq!(c.get(&2, 0), None, "2 was the least recently used");
        c.insert(5, 5, 1, 100, 0);
        assert_eq!(c.get(&3, 0), None);
        for k in [1, 4, 5] {
            assert_eq!(c.get(&k, 0), Some(k), "{k} stays");
        }
        assert_eq!(c.len(), 3);
        assert_eq!(seen[1].load(Relaxed), 2, "two evictions");
        assert_eq!(seen[0].load(Relaxed), 0);
    }

    #[test]
    fn an_expired_entry_evicted_for_room_counts_as_expired() {
        let (c, seen) = counting(2, 100);
        c.insert(1, 1, 1, 10, 0);
        c.insert(2, 2, 1, 100, 0);
        c.insert(3, 3, 1, 100, 20);
        assert_eq!(seen[0].load(Relaxed), 1, "1 had expired");
        assert_eq!(seen[1].load(Relaxed), 0);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn weight_bounds_too() {
        let (c, seen) = counting(100, 10);
        for k in 0..10 {
            c.insert(k, k, 3, 100, 0);
        }
        assert!(c.weight() <= 10, "{}", c.weight());
        assert_eq!(c.len(), 3, "three of weight 3 fit in 10");
        assert_eq!(c.get(&9, 0), Some(9), "the newest is kept");
        assert_eq!(seen[1].load(Relaxed), 7);
        c.insert(100, 100, 10, 100, 0);
        assert_eq!(c.len(), 1, "one entry of the whole weight fits");
        c.insert(101, 101, 11, 100, 0);
        assert_eq!(c.get(&101, 0), None, "heavier than the cache: never held");
        assert_eq!(c.get(&100, 0), Some(100), "and it took no room");
        assert_eq!(
            seen[1].load(Relaxed),
            7 + 3 + 1,
            "refused counts as evicted"
        );
    }

    #[test]
    fn a_replaced_entry_is_not_reported_and_its_weight_is_updated() {
        let (c, seen) = counting(10, 10);
        c.insert(1, 1, 8, 100, 0);
        c.insert(1, 2, 2, 100, 0);
        assert_eq!((c.len(), c.weight()), (1, 2));
        assert_eq!(c.get(&1, 0), Some(2));
        assert_eq!(seen[0].load(Relaxed) + seen[1].load(Relaxed), 0);
    }

    #[test]
    fn get_or_insert_makes_once_and_renews_when_asked() {
        let c: BoundedCache<u32, u32, u64> = BoundedCache::new(10, 10);
        assert_eq!(c.get_or_insert_with(1, 0, 10, false, || 1), 1);
        assert_eq!(c.get_or_insert_with(1, 5, 50, false, || 2), 1, "found");
        assert_eq!(c.get(&1, 10), None, "not renewed: gone at 10");
        assert_eq!(c.get_or_insert_with(2, 0, 10, true, || 2), 2);
        assert_eq!(c.get_or_insert_with(2, 9, 19, true, || 3), 2);
        assert_eq!(c.get(&2, 18), Some(2), "renewed to 19");
        assert_eq!(
            c.get_or_insert_with(2, 19, 29, true, || 4),
            4,
            "idle past 19"
        );
    }

    #[test]
    fn a_zero_bound_holds_nothing() {
        let (c, seen) = counting(0, 0);
        c.insert(1, 1, 1, 100, 0);
        assert_eq!(c.get(&1, 0), None);
        assert_eq!(c.get_or_insert_with(2, 0, 100, false, || 2), 2);
        assert_eq!(c.len(), 0);
        assert_eq!(seen[1].load(Relaxed), 0, "nothing to evict from nothing");
    }

    #[test]
    fn sharded_caches_keep_both_bounds_under_threads() {
        let (c, seen) = counting(1000, 5000);
        assert_eq!(c.shards.len(), 16);
        let c = Arc::new(c);
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..5000u32 {
                        let k = t * 1_000_000 + i;
                        c.insert(k, k, 1 + i % 9, 100, 0);
                        assert!(c.len() <= 1000 + 8 && c.weight() <= 5000 + 8 * 9);
                        c.get(&(k / 2), 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(c.len() <= 1000, "{}", c.len());
        assert!(c.weight() <= 5000, "{}", c.weight());
        let held: u64 = c
            .shards
            .iter()
            .map(|s| s.lock().unwrap().map.len() as u64)
            .sum();
        assert_eq!(held, c.len(), "the count is the shards' sum");
        assert_eq!(seen[1].load(Relaxed), 8 * 5000 - c.len());
        // Keys spread evenly: the cache fills, not one shard.
        assert!(c.weight() > 4000, "{}", c.weight());
    }

    #[test]
    fn one_entry_may_take_a_whole_sharded_cache() {
        let c: BoundedCache<u32, u32, u64> = BoundedCache::new(10_000, 1 << 20);
        for k in 0..1000 {
            c.insert(k, k, 100, 100, 0);
        }
        c.insert(5000, 5000, 1 << 20, 100, 0);
        assert_eq!(c.get(&5000, 0), Some(5000));
        assert_eq!((c.len(), c.weight()), (1, 1 << 20));
    }
}
