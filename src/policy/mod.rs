//! The compiled policy: providers, routes in file order, and the default action.
//! Immutable once built; a reload builds a new one and swaps it whole.

mod compile;
pub mod index;
pub mod require;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;

pub use compile::compile;
pub use require::{RequireError, Requirement};
pub use route::{Access, Mismatch, Route};

use crate::provider::Provider;
use crate::request::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Allow,
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
    /// Verified tokens of this policy's providers; a new policy starts empty.
    pub cache: crate::check::cache::VerifiedCache,
    /// Longer tokens are refused unread (`malformed_token`).
    pub max_token_bytes: usize,
    pub index: index::RouteIndex,
    /// The emergency denylist, checked after verification.
    pub revocation: Option<Arc<crate::revocation::Revocation>>,
    /// DPoP proof settings and the replay cache of accepted proofs.
    pub dpop: crate::check::binding::Dpop,
    /// RFC 9728 metadata documents, and per route (by index) its resource.
    pub protected_resources: Vec<crate::resource_metadata::ProtectedResource>,
    pub route_resource: Vec<Option<usize>>,
}

/// Process settings read once at start; a reload cannot change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Envoy's ext_authz gRPC (and grpc.health.v1); `off` disables it.
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The same decisions over plain HTTP (Envoy http_service, nginx auth_request,
    /// Traefik forwardAuth); off unless set.
    pub http: Option<SocketAddr>,
    /// Which proxy calls `http` (`listen.http_proxy`): the one header family trusted.
    pub http_proxy: crate::http_authz::HttpProxy,
}

impl Policy {
    /// The first route, in file order, that fits the request. A route Envoy
    /// names (`context_extensions: { valet_route: NAME }`) is not taken on trust:
    /// Envoy compares some spellings of a path or host differently, and its
    /// choice could be a later, weaker route. Valet matches by itself; a route
    /// that should only ever be chosen by name says so with
    /// `match: { context: { valet_route: NAME } }`.
    pub fn route_for(&self, req: &Request) -> Option<&Route> {
        self.index
            .candidates(&req.path)
            .map(|i| &self.routes[i])
            .find(|r| r.matches(req))
    }

    /// Names of required providers that have no keys yet; empty when ready.
    pub fn providers_without_keys(&self) -> Vec<&str> {
        self.required_providers
            .iter()
            .map(|i| &self.providers[*i])
            .filter(|p| p.jwks != crate::provider::JwksSource::None)
            .filter(|p| p.keys.load().is_none_or(|k| k.is_empty()))
            .map(|p| &*p.name)
            .collect()
    }

    /// Takes over what must outlive a reload: the denylist of the same file keeps
    /// its watch state (and its last good list if the file is broken now).
    pub fn inherit(&mut self, old: &Policy) {
        if let (Some(new), Some(old)) = (&self.revocation, &old.revocation)
            && new.path == old.path
        {
            self.revocation = Some(old.clone());
        }
        // An unchanged introspection endpoint keeps its cache and circuit state.
        for provider in &mut self.providers {
            let old_one = old
                .provider(&provider.name)
                .and_then(|o| o.introspection.clone())
                .filter(|o| o.issuer == provider.issuer);
            if let (Some(p), Some(old_one)) = (Arc::get_mut(provider), old_one)
                && p.introspection
                    .as_ref()
                    .is_some_and(|n| n.settings == old_one.settings)
            {
                p.introspection = Some(old_one);
            }
        }
        // Proofs accepted under the old policy must stay spent.
        let (new, old) = (&self.dpop.replay, &old.dpop.replay);
        if new.ttl() == old.ttl() && new.capacity() == old.capacity() {
            self.dpop.replay = old.clone();
        } else {
            new.adopt(old);
        }
    }

    /// The RFC 9728 metadata URL a route's challenges point to.
    pub fn resource_metadata_url(&self, route: &str) -> Option<&str> {
        let i = self.index.by_name(route)?;
        let r = (*self.route_resource.get(i)?)?;
        Some(self.protected_resources[r].metadata_url.as_str())
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| &*p.name == name)
    }
}
