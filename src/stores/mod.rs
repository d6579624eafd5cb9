//! Runtime state beside the compiled policy: each provider's key cell and
//! introspector (caches, circuit, gate), the verified-token cache, the DPoP
//! replay cache and the denylist. A [`Snapshot`] pairs one policy with its
//! stores; it is what `State` swaps and what a Check reads.
//!
//! A reload builds new stores with [`Stores::carry`], keeping what is unchanged
//! by a stable identity:
//!
//! | store | kept across a reload when | else |
//! |---|---|---|
//! | key cell (and its task) | same provider name, issuer and `jwks` source (`jwks::Supervisor`) | new cell, keys fetched again |
//! | introspector: answers, circuit, gate | same provider name, issuer and introspection settings | new, empty |
//! | verified-token cache | same `cache:` bounds and every provider the same name, issuer, audiences, algorithms, skew, `jwks` source, introspection and `metadata_claims` (entries hold the encoded metadata), in the same order | new, empty |
//! | DPoP replay cache | same window and capacity | new, taking over every spent proof |
//! | API key table (per provider) | same file, provider name and issuer | the table just read |
//! | shared store connection | same `store:` settings | a new connection |
//! | denylist | same file, or same URL and settings | the list just read (a URL: the old list until its first answer) |

pub mod cache;
pub mod replay;

use std::ops::Deref;
use std::sync::Arc;

use crate::api_keys::ApiKeys;
use crate::introspection::Introspector;
use crate::jwks::KeyCell;
use crate::policy::{CacheSettings, Policy};
use crate::provider::{JwksSource, Provider};
use crate::revocation::Revocation;
use crate::shared_store::SharedStore;
use cache::VerifiedCache;
use replay::ReplayCache;

pub struct Stores {
    /// By provider index, like `Policy::providers`.
    pub keys: Vec<Arc<KeyCell>>,
    pub introspectors: Vec<Option<Arc<Introspector>>>,
    pub verified: Arc<VerifiedCache>,
    /// `jti`s of accepted DPoP proofs, per key, kept for the acceptance window.
    pub replay: Arc<ReplayCache>,
    pub revocation: Option<Arc<Revocation>>,
    /// By provider index: the live key table of each provider of API keys.
    /// Without one (stores built without `with_api_keys`) no key is accepted.
    pub api_keys: Vec<Option<Arc<ApiKeys>>>,
    /// The store the fleet shares (`store:`), if any.
    pub shared: Option<Arc<SharedStore>>,
}

/// One compiled policy and the stores that go with it.
pub struct Snapshot {
    pub policy: Policy,
    pub stores: Stores,
}

impl Deref for Snapshot {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.policy
    }
}

impl Snapshot {
    pub fn new(policy: Policy, stores: Stores) -> Self {
        Snapshot { policy, stores }
    }

    /// A denylist URL whose first list has not arrived: not ready, since its
    /// revocations would not be enforced.
    pub fn denylist_pending(&self) -> bool {
        self.stores
            .revocation
            .as_ref()
            .is_some_and(|r| !r.is_loaded())
    }

    /// Names of required providers that have no keys yet; empty when ready.
    pub fn providers_without_keys(&self) -> Vec<&str> {
        self.policy
            .required_providers
            .iter()
            .filter(|i| self.policy.providers[**i].jwks != JwksSource::None)
            .filter(|i| self.stores.keys[**i].load().is_none_or(|k| k.is_empty()))
            .map(|i| &*self.policy.providers[*i].name)
            .collect()
    }
}

impl Stores {
    /// Fresh stores for `policy`: `keys` from whoever loads keys (one cell per
    /// provider, in order), `revocation` the list the loader just read.
    pub fn new(policy: &Policy, keys: Vec<Arc<KeyCell>>, revocation: Option<Revocation>) -> Self {
        Self::carry(policy, keys, revocation, None)
    }

    /// Stores for `policy` with no key tasks: empty cells the caller publishes
    /// to (the CLI, tests, benches).
    pub fn detached(policy: &Policy, revocation: Option<Revocation>) -> Self {
        let keys = policy
            .providers
            .iter()
            .map(|_| Arc::new(KeyCell::default()))
            .collect();
        Self::new(policy, keys, revocation)
    }

    /// Stores for a reloaded `policy`, keeping from `old` what is unchanged (see
    /// the table above).
    pub fn carry(
        policy: &Policy,
        keys: Vec<Arc<KeyCell>>,
        revocation: Option<Revocation>,
        old: Option<&Snapshot>,
    ) -> Self {
        // The same store settings keep the connection.
        let shared = policy.store.as_ref().map(|settings| {
            old.and_then(|o| o.stores.shared.clone())
                .filter(|s| &s.settings == settings)
                .unwrap_or_else(|| Arc::new(SharedStore::new(settings.clone())))
        });
        let introspectors = policy
            .providers
            .iter()
            .map(|p| {
                let settings = p.introspection.as_ref()?;
                let kept = old.and_then(|o| {
                    let i = o.policy.providers.iter().position(|q| q.name == p.name)?;
                    o.stores.introspectors[i]
                        .clone()
                        .filter(|i| i.issuer == p.issuer && &i.settings == settings)
                });
                kept.or_else(
                    || match Introspector::new(&p.name, &p.issuer, settings.clone()) {
                        Ok(i) => Some(Arc::new(i)),
                        Err(e) => {
                            // Only when the HTTP client cannot be built: its tokens
                            // are answered introspection_unavailable.
                            tracing::error!(provider = %p.name, "introspection off: {e}");
                            None
                        }
                    },
                )
            })
            .collect::<Vec<Option<Arc<Introspector>>>>();
        for i in introspectors.iter().flatten() {
            i.share(shared.clone());
        }
        let verified = old
            .filter(|o| {
                o.policy.cache == policy.cache
                    && same_verifiers(&o.policy.providers, &policy.providers)
            })
            .map(|o| o.stores.verified.clone())
            .unwrap_or_else(|| Arc::new(verified_cache(policy.cache)));
        let replay = Arc::new(ReplayCache::new(
            policy.dpop.replay_window(),
            policy.dpop.replay_entries,
        ));
        // Proofs accepted under the old policy must stay spent.
        let replay = match old.map(|o| &o.stores.replay) {
            Some(o) if o.ttl() == replay.ttl() && o.capacity() == replay.capacity() => o.clone(),
            Some(o) => {
                replay.adopt(o);
                replay
            }
            None => replay,
        };
        // The denylist of the same source keeps its watch state (and its last
        // good list if the source is broken now); a new URL starts from the list
        // in force until its first answer.
        let revocation = match (revocation, old.and_then(|o| o.stores.revocation.as_ref())) {
            (Some(new), Some(old)) if new.source == old.source => Some(old.clone()),
            (Some(new), Some(old)) => {
                new.adopt(old);
                Some(Arc::new(new))
            }
            (new, _) => new.map(Arc::new),
        };
        Stores {
            keys,
            introspectors,
            verified,
            replay,
            revocation,
            api_keys: Vec::new(),
            shared,
        }
    }

    /// The providers' API key tables: `loaded` (just read by the loader) unless
    /// `old` watches the same file for the same provider and issuer, which is
    /// kept (with its last good table if the file is broken now).
    pub fn with_api_keys(
        mut self,
        policy: &Policy,
        loaded: Vec<ApiKeys>,
        old: Option<&Snapshot>,
    ) -> Self {
        let mut loaded: Vec<Option<ApiKeys>> = loaded.into_iter().map(Some).collect();
        let olds: Vec<&Arc<ApiKeys>> = old
            .map(|o| o.stores.api_keys.iter().flatten().collect())
            .unwrap_or_default();
        self.api_keys = policy
            .providers
            .iter()
            .map(|p| {
                let path = p.api_keys.as_ref()?;
                let slot = loaded.iter_mut().find(|k| {
                    k.as_ref()
                        .is_some_and(|k| &k.path == path && k.provider == p.name)
                })?;
                let new = slot.take()?;
                let kept = olds.iter().find(|o| {
                    o.path == new.path && o.provider == new.provider && o.issuer == new.issuer
                });
                Some(kept.map_or_else(|| Arc::new(new), |o| (*o).clone()))
            })
            .collect();
        self
    }

    /// The live API key tables, for the watch task.
    pub fn api_key_files(&self) -> Vec<Arc<ApiKeys>> {
        self.api_keys.iter().flatten().cloned().collect()
    }
}

fn verified_cache(c: CacheSettings) -> VerifiedCache {
    VerifiedCache::new(c.max_entries, c.max_bytes)
}

/// Entries name providers by index and hold claims verified under a provider's
/// settings: the cache is kept only if every provider verifies the same way.
fn same_verifiers(old: &[Arc<Provider>], new: &[Arc<Provider>]) -> bool {
    old.len() == new.len()
        && old.iter().zip(new).all(|(a, b)| {
            a.name == b.name
                && a.issuer == b.issuer
                && a.audiences == b.audiences
                && a.algorithms == b.algorithms
                && a.clock_skew_secs == b.clock_skew_secs
                && a.jwks == b.jwks
                && a.introspection == b.introspection
                && a.metadata_claims == b.metadata_claims
        })
}

#[cfg(test)]
mod tests;
