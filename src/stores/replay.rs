//! The DPoP replay cache: the ids of accepted proofs, each kept until its
//! acceptance window has ended and never dropped before. When it is full, new
//! proofs are refused (the Check is denied `dpop_replay_full`) rather than a
//! spent proof forgotten, which would let it be replayed.
//!
//! An id is 16 bytes of SHA-256 over the key's thumbprint and the `jti`, in a
//! hash set and a queue in order of expiry: 17 bytes per set bucket and 20 per
//! queue slot, at most twice that after either grows, so under 80 bytes an id.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};

pub type ProofId = [u8; 16];

/// What spending a proof id did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Not seen inside its window: now spent.
    Fresh,
    /// Spent before, inside its window: a replay.
    Replayed,
    /// Not seen, and no room: refused, not spent.
    Full,
}

pub struct ReplayCache {
    /// Seconds an id is kept from its acceptance: the longest a proof accepted
    /// now can still be presented (max_age + 2 × skew, + 1 s for whole seconds).
    ttl: u64,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<ProofId>,
    /// (Unix second the id may go, id), in acceptance order.
    order: VecDeque<(u32, ProofId)>,
}

impl ReplayCache {
    pub fn new(window: Duration, capacity: u64) -> Self {
        ReplayCache {
            ttl: window.as_secs() + u64::from(window.subsec_nanos() > 0),
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            inner: Mutex::default(),
        }
    }

    pub fn id(thumbprint: &str, jti: &str) -> ProofId {
        let d = digest(&SHA256, format!("{thumbprint}\0{jti}").as_bytes());
        d.as_ref()[..16].try_into().expect("SHA-256 is 32 bytes")
    }

    /// Spends `id` at `now` (Unix seconds), unless it was spent inside its window
    /// or the cache is full of ids still inside theirs.
    pub fn spend(&self, id: ProofId, now: u64) -> Spend {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expire(now);
        if inner.seen.contains(&id) {
            return Spend::Replayed;
        }
        if inner.seen.len() >= self.capacity {
            return Spend::Full;
        }
        inner.seen.insert(id);
        inner.order.push_back((deadline(now + self.ttl), id));
        Spend::Fresh
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    pub fn ttl(&self) -> u64 {
        self.ttl
    }

    /// Takes over every id `old` still holds (a reload that changed the DPoP
    /// settings), each kept for the longer of the two windows, even past this
    /// cache's capacity: spent proofs stay spent; new ones wait for room.
    pub fn adopt(&self, old: &ReplayCache) {
        let from = old.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut to = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &(until, id) in &from.order {
            let accepted = u64::from(until).saturating_sub(old.ttl);
            let until = deadline((accepted + self.ttl).max(u64::from(until)));
            if to.seen.insert(id) {
                to.order.push_back((until, id));
            }
        }
    }
}

impl Inner {
    /// Drops ids whose window has ended. Only from the front: if the clock
    /// stepped back, later ids wait behind an earlier one (kept longer, never less).
    fn expire(&mut self, now: u64) {
        while let Some(&(until, id)) = self.order.front() {
            if u64::from(until) > now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&id);
        }
    }
}

fn deadline(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_id_stays_spent_for_its_window_and_full_refuses_new_ones() {
        let c = ReplayCache::new(Duration::from_secs(71), 3);
        let t = 1_000_000;
        let ids: Vec<_> = (0..5)
            .map(|i| ReplayCache::id("key", &format!("j{i}")))
            .collect();
        assert_eq!(c.spend(ids[0], t), Spend::Fresh);
        assert_eq!(c.spend(ids[0], t + 70), Spend::Replayed);
        assert_eq!(c.spend(ids[1], t + 1), Spend::Fresh);
        assert_eq!(c.spend(ids[2], t + 2), Spend::Fresh);
        assert_eq!(c.spend(ids[3], t + 3), Spend::Full, "full: refused");
        assert_eq!(c.spend(ids[3], t + 3), Spend::Full, "and not spent");
        assert_eq!(c.spend(ids[0], t + 3), Spend::Replayed, "never evicted");
        // Once the first window ends, its room is free again.
        assert_eq!(c.spend(ids[3], t + 71), Spend::Fresh);
        assert_eq!(c.spend(ids[0], t + 71), Spend::Full);
        assert_eq!(c.len(), 3);
        assert_eq!(ReplayCache::id("key", "j0"), ids[0]);
        assert_ne!(ReplayCache::id("other", "j0"), ids[0]);
    }

    #[test]
    fn a_reload_keeps_every_spent_id_for_the_longer_window() {
        let old = ReplayCache::new(Duration::from_secs(10), 100);
        let t = 1_000_000;
        for i in 0..50 {
            assert_eq!(
                old.spend(ReplayCache::id("k", &i.to_string()), t),
                Spend::Fresh
            );
        }
        // Smaller and with a longer window: every id is kept, for the new window.
        let new = ReplayCache::new(Duration::from_secs(60), 10);
        new.adopt(&old);
        assert_eq!(new.len(), 50);
        let id = ReplayCache::id("k", "7");
        assert_eq!(new.spend(id, t + 59), Spend::Replayed);
        assert_eq!(new.spend(ReplayCache::id("k", "new"), t + 59), Spend::Full);
        assert_eq!(new.spend(ReplayCache::id("k", "new"), t + 60), Spend::Fresh);
        assert!(new.spend(id, t + 60) != Spend::Replayed);
    }
}
