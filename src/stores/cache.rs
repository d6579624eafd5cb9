//! The verified-token cache: a token that verified once is not verified again
//! until it expires. Keyed by SHA-256 of the token (never the token itself),
//! bounded by entries and bytes (an entry weighs what its parsed claims take on
//! the heap, not what the token takes on the wire), an entry lives exactly until
//! the token's `exp` and only while the provider's key set is the one that verified it. It holds
//! verified claims, not decisions: every Check still evaluates its route.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::bytes::Bytes;
use serde_json::{Map, Value};

use crate::bounded_cache::{BoundedCache, Removal};
use crate::telemetry;

pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

pub type TokenHash = [u8; 32];

pub struct Entry {
    pub provider: usize,
    /// The id of the key set that verified the token: another set means re-verify.
    pub keyset: u64,
    pub kid: Option<Arc<str>>,
    pub claims: Arc<Map<String, Value>>,
    /// The claims as Envoy's dynamic metadata, encoded when the token verified.
    pub metadata: Option<Bytes>,
    /// The provider's `claims_to_headers` of the claims.
    pub headers: Arc<[(String, String)]>,
    /// Unix seconds; the entry is gone at this instant (the cache's deadline, in
    /// the `now` of each `get`: moved time is honoured).
    pub exp: u64,
}

/// What a Check's answer takes from the claims, made once per verified token.
#[derive(Default)]
pub struct Extras {
    pub metadata: Option<Bytes>,
    pub headers: Arc<[(String, String)]>,
}

pub struct VerifiedCache {
    /// Deadlines in Unix seconds.
    cache: Option<BoundedCache<TokenHash, Arc<Entry>, u64>>,
    /// `max_bytes / max_entries`: what an entry weighs at least (README).
    min_weight: u32,
    /// `valet_verify_cache_total` (hit, miss), made on first use under the
    /// Valet's recorder.
    counters: std::sync::OnceLock<[metrics::Counter; 2]>,
}

/// The entry, its `Arc`, the key and the cache's bookkeeping for one entry.
const ENTRY_OVERHEAD: usize = 256;

/// What one allocation of `n` bytes takes from the allocator (glibc: an 8-byte
/// header, 16-byte granules, 32 bytes at least).
fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).next_multiple_of(16).max(32)
    }
}

/// An estimate, on the high side, of the heap parsed claims occupy. A map member
/// is a key string and a value in a B-tree node, whose nodes are about half full
/// when built in order: twice the slot per member.
pub fn claims_heap_bytes(claims: &Map<String, Value>) -> usize {
    const SLOT: usize = size_of::<String>() + size_of::<Value>();
    claims
        .iter()
        .map(|(k, v)| 2 * SLOT + heap(k.len()) + value_heap_bytes(v))
        .sum::<usize>()
        + heap(size_of::<usize>() * 3)
}

fn value_heap_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => heap(s.len()),
        Value::Array(items) => {
            heap(items.len() * size_of::<Value>())
                + items.iter().map(value_heap_bytes).sum::<usize>()
        }
        Value::Object(m) => claims_heap_bytes(m),
    }
}

static EVICTIONS: AtomicU64 = AtomicU64::new(0);

impl VerifiedCache {
    /// `max_entries == 0` disables the cache.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        if max_entries == 0 || max_bytes == 0 {
            return VerifiedCache {
                cache: None,
                min_weight: 1,
                counters: Default::default(),
            };
        }
        let min_weight = (max_bytes / max_entries).clamp(1, u64::from(u32::MAX)) as u32;
        let cache = BoundedCache::new(max_entries, max_bytes).on_removal(|why| {
            if why == Removal::Evicted {
                EVICTIONS.fetch_add(1, Ordering::Relaxed);
                telemetry::verify_cache_evicted();
            }
        });
        VerifiedCache {
            cache: Some(cache),
            min_weight,
            counters: Default::default(),
        }
    }

    pub fn disabled() -> Self {
        Self::new(0, 0)
    }

    pub fn hash(token: &str) -> TokenHash {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    pub fn get(&self, key: &TokenHash, now: u64) -> Option<Arc<Entry>> {
        let cache = self.cache.as_ref()?;
        let [hit, miss] = self.counters.get_or_init(telemetry::verify_cache_counters);
        let found = cache.get(key, now);
        if found.is_some() { hit } else { miss }.increment(1);
        found
    }

    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &self,
        key: TokenHash,
        token_len: usize,
        provider: usize,
        keyset: u64,
        kid: Option<Arc<str>>,
        claims: Arc<Map<String, Value>>,
        extras: Extras,
        exp: u64,
        now: u64,
    ) {
        let Some(cache) = &self.cache else { return };
        if exp <= now {
            return;
        }
        // What the entry really holds: a token of many tiny claims is small on the
        // wire and ten times larger parsed. `token_len` only sets a floor.
        let held = ENTRY_OVERHEAD
            + kid.as_ref().map_or(0, |k| heap(k.len()))
            + claims_heap_bytes(&claims).max(token_len)
            + extras.metadata.as_ref().map_or(0, |m| heap(m.len()))
            + extras
                .headers
                .iter()
                .map(|(k, v)| 2 * size_of::<String>() + heap(k.len()) + heap(v.len()))
                .sum::<usize>();
        let bytes = held.min(u32::MAX as usize) as u32;
        let entry = Entry {
            provider,
            keyset,
            kid,
            claims,
            metadata: extras.metadata,
            headers: extras.headers,
            exp,
        };
        cache.insert(key, Arc::new(entry), bytes.max(self.min_weight), exp, now);
    }

    pub fn entries(&self) -> u64 {
        self.cache.as_ref().map_or(0, BoundedCache::len)
    }

    pub fn evictions() -> u64 {
        EVICTIONS.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Arc<Map<String, Value>> {
        Arc::new(Map::new())
    }

    #[test]
    fn entries_expire_at_exp_and_are_bounded() {
        let now = crate::clock::system_unix();
        let c = VerifiedCache::new(10, 1024 * 1024);
        let k = VerifiedCache::hash("a.b.c");
        c.insert(
            k,
            5,
            0,
            1,
            None,
            claims(),
            Extras::default(),
            now + 100,
            now,
        );
        assert!(c.get(&k, now).is_some());
        assert!(c.get(&k, now + 100).is_none(), "gone at exp exactly");
        c.insert(
            VerifiedCache::hash("expired"),
            5,
            0,
            1,
            None,
            claims(),
            Extras::default(),
            now,
            now,
        );
        assert!(
            c.get(&VerifiedCache::hash("expired"), now).is_none(),
            "never cached"
        );
        for i in 0..100 {
            c.insert(
                VerifiedCache::hash(&format!("t{i}")),
                5,
                0,
                1,
                None,
                claims(),
                Extras::default(),
                now + 100,
                now,
            );
        }
        assert!(c.entries() <= 10, "{}", c.entries());
    }

    #[test]
    fn bytes_bound_too() {
        let now = crate::clock::system_unix();
        let c = VerifiedCache::new(1000, 64 * 1024);
        for i in 0..100 {
            c.insert(
                VerifiedCache::hash(&format!("t{i}")),
                8 * 1024,
                0,
                1,
                None,
                claims(),
                Extras::default(),
                now + 100,
                now,
            );
        }
        assert!(c.entries() <= 8, "{}", c.entries());
    }

    #[test]
    fn many_tiny_claims_weigh_what_they_take_parsed() {
        let mut wide = Map::new();
        for i in 0..900 {
            wide.insert(format!("c{i}"), Value::from(0));
        }
        let json = serde_json::to_string(&wide).unwrap().len();
        let weight = claims_heap_bytes(&wide);
        // ~9 bytes of JSON per member against a key string and a node slot parsed.
        assert!(weight > 10 * json, "{weight} vs {json}");
        let nested: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "roles": ["a", "b", "c"], "addr": {"city": "x".repeat(100)}
        }))
        .unwrap();
        assert!(claims_heap_bytes(&nested) > 100 + 3 * size_of::<Value>());

        let now = crate::clock::system_unix();
        let c = VerifiedCache::new(1000, 1024 * 1024);
        let wide = Arc::new(wide);
        for i in 0..100 {
            let k = VerifiedCache::hash(&format!("w{i}"));
            c.insert(
                k,
                json,
                0,
                1,
                None,
                wide.clone(),
                Extras::default(),
                now + 100,
                now,
            );
        }
        let fits = (1024 * 1024) / weight;
        assert!(c.entries() as usize <= fits, "{} > {fits}", c.entries());
    }

    #[test]
    fn disabled_caches_nothing() {
        let now = crate::clock::system_unix();
        let c = VerifiedCache::new(0, 0);
        let k = VerifiedCache::hash("x");
        c.insert(
            k,
            5,
            0,
            1,
            None,
            claims(),
            Extras::default(),
            now + 100,
            now,
        );
        assert!(c.get(&k, now).is_none());
        assert!(!c.enabled());
    }
}
