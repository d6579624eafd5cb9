//! The compiled policy: providers, routes in file order, and the default action.
//! Data only, immutable once built: `compile` reads no file, builds no cache and
//! starts no task (the loader reads what it needs and passes it in; runtime
//! state lives in `stores`, beside it). A reload builds a new one and swaps it
//! whole.

mod compile;
pub mod denylist;
pub mod dpop;
pub mod index;
pub mod observe;
pub mod principal;
pub mod require;
pub mod resource_metadata;
pub mod route;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::config::Listen;
pub use compile::compile;
pub use dpop::{Binding, Dpop};
pub use require::{RequireError, Requirement};
pub use route::{Access, Mismatch, Route};

use crate::provider::Provider;
use crate::request::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Allow,
}

/// Real access tokens are a few KiB at most; anything larger is refused unread
/// (the default of `limits.max_token_bytes`).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What `compile` needs from outside the policy file, read by the loader: the
/// client secret files (by path as written, joined to the base) and whether the
/// denylist could be read (its problems are placed like the file's own).
#[derive(Default)]
pub struct Inputs {
    pub secrets: HashMap<PathBuf, Result<String, String>>,
    pub denylist: Option<Result<(), crate::config::LoadError>>,
    /// Whether each API key file (by path, joined to the base) could be read.
    pub api_keys: HashMap<PathBuf, Result<(), crate::config::LoadError>>,
}

/// `cache:` — bounds of the verified-token cache; `max_entries: 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl CacheSettings {
    pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
    pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

pub struct Policy {
    pub routes: Vec<Route>,
    pub providers: Vec<Arc<Provider>>,
    pub default: DefaultAction,
    /// The `realm` of every challenge.
    pub realm: String,
    /// Every header Valet sets on allow. Inbound copies are removed on every route,
    /// anonymous ones too, so a client can never smuggle its own `x-user-id`.
    pub identity_headers: Arc<[String]>,
    /// Providers some route accepts tokens from: readiness waits for their keys.
    pub required_providers: Vec<usize>,
    /// Every route in dry-run: nothing is denied, everything is recorded.
    pub dry_run: bool,
    /// Bounds of the verified-token cache (`cache:`).
    pub cache: CacheSettings,
    /// Longer tokens are refused unread (`malformed_token`).
    pub max_token_bytes: usize,
    pub index: index::RouteIndex,
    /// Where the emergency denylist comes from, checked after verification (the
    /// list itself is read by the loader or its task and kept in the stores).
    pub revocation: Option<denylist::DenylistSource>,
    /// DPoP proof settings.
    pub dpop: Dpop,
    /// The store a fleet shares (`store:`), if any.
    pub store: Option<store::StoreSettings>,
    /// RFC 9728 metadata documents, and per route (by index) its resource.
    pub protected_resources: Vec<resource_metadata::ProtectedResource>,
    pub route_resource: Vec<Option<usize>>,
    /// `audit:`, `tracing:` (read at start) and `misuse:`.
    pub audit: observe::Audit,
    pub tracing: Option<observe::Tracing>,
    pub misuse: Option<observe::Misuse>,
}

impl Policy {
    /// The first route, in file order, that fits the request. A route Envoy
    /// names (`context_extensions: { valet_route: NAME }`) is not taken on trust:
    /// Envoy compares some spellings of a path or host differently, and its
    /// choice could be a later, weaker route. Valet matches by itself; a route
    /// that should only ever be chosen by name says so with
    /// `match: { context: { valet_route: NAME } }`.
    pub fn route_for(&self, req: &Request) -> Option<&Route> {
        self.route_index_for(req).map(|i| &self.routes[i])
    }

    /// The same route, as its index into `routes`.
    pub fn route_index_for(&self, req: &Request) -> Option<usize> {
        self.index
            .candidates(&req.path)
            .find(|i| self.routes[*i].matches(req))
    }

    /// The RFC 9728 metadata URL a route's challenges point to.
    pub fn resource_metadata_url(&self, route: &str) -> Option<&str> {
        self.resource_metadata_url_of(self.index.by_name(route)?)
    }

    /// The same, for the route at index `route`.
    pub fn resource_metadata_url_of(&self, route: usize) -> Option<&str> {
        let r = (*self.route_resource.get(route)?)?;
        Some(self.protected_resources[r].metadata_url.as_str())
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| &*p.name == name)
    }
}
