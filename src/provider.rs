//! A compiled identity provider: who issues tokens, where they are found, which
//! algorithms and audiences are accepted, where its keys come from. Data only:
//! its live key set and introspection state are in the stores (`stores`).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;

/// Checks that may wait for a refetch at once, per provider (`jwks.unknown_kid_waiters`).
/// A waiting Check holds no admission slot, only its request: this bounds that memory.
pub const DEFAULT_UNKNOWN_KID_WAITERS: usize = 128;

pub struct Provider {
    pub name: Arc<str>,
    pub issuer: String,
    /// The token's `aud` must contain one of these; empty means not checked.
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub clock_skew_secs: u64,
    pub sources: Vec<TokenSource>,
    /// (claim path, lower-cased header name), set on allow.
    pub claims_to_headers: Vec<(ClaimPath, String)>,
    pub forward_token: bool,
    pub jwks: JwksSource,
    /// RFC 7662 introspection, for opaque tokens (and JWTs if it says so); its
    /// caches and circuit are the stores' `Introspector`.
    pub introspection: Option<IntrospectionSettings>,
    /// Which verified claims go to Envoy's dynamic metadata.
    pub metadata_claims: MetadataClaims,
    /// `api_keys.file`: this provider takes API keys (the live table is the
    /// stores' `ApiKeys`), not JWTs.
    pub api_keys: Option<PathBuf>,
}

/// What Envoy's access logs and RBAC rules most often read: who (`sub`,
/// `client_id`/`azp`), for what (`aud`, `scope`/`scp`), from whom (`iss`), until when (`exp`).
pub const DEFAULT_METADATA_CLAIMS: &[&str] = &[
    "sub",
    "iss",
    "aud",
    "scope",
    "scp",
    "client_id",
    "azp",
    "exp",
];

/// The claims of a verified token Valet puts in dynamic metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataClaims {
    All,
    /// Top-level claim names; empty: no `claims` field at all.
    Only(Vec<String>),
}

impl MetadataClaims {
    /// `metadata_claims` as written: absent is the default list, `["*"]` all.
    pub fn from_config(names: Option<Vec<String>>) -> Self {
        match names {
            None => MetadataClaims::Only(
                DEFAULT_METADATA_CLAIMS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            Some(n) if n.iter().any(|c| c == "*") => MetadataClaims::All,
            Some(n) => MetadataClaims::Only(n),
        }
    }

    pub fn includes(&self, claim: &str) -> bool {
        match self {
            MetadataClaims::All => true,
            MetadataClaims::Only(names) => names.iter().any(|n| n == claim),
        }
    }
}

impl Default for MetadataClaims {
    fn default() -> Self {
        MetadataClaims::from_config(None)
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// What the policy says about one provider's introspection endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct IntrospectionSettings {
    pub endpoint: String,
    pub client_id: String,
    /// Read from `client_secret_file` when the policy loads; never logged.
    pub client_secret: String,
    pub timeout: Duration,
    /// Longest an active answer is trusted (it is also never trusted past `exp`).
    pub cache_ttl: Duration,
    /// How long an inactive answer is remembered.
    pub negative_cache_ttl: Duration,
    pub cache_entries: u64,
    /// Introspect this issuer's JWTs too, instead of verifying them locally.
    pub jwts: bool,
    /// Consecutive failures that open the circuit, and how long it stays open.
    pub failure_threshold: u32,
    pub open_for: Duration,
    /// Introspection requests in flight at once; past it a miss is answered at once.
    pub max_in_flight: usize,
    /// Inactive answers are cached apart (so they never evict active ones).
    pub negative_cache_entries: u64,
    /// Slots one client (Envoy's `source.address`) may hold for new tokens.
    pub max_in_flight_per_client: u32,
    /// Slots only re-validations of tokens answered active before may take.
    pub revalidation_reserve: usize,
    /// New tokens of one client not answered active that it may owe, and how many
    /// a second it is forgiven: past the budget, its new tokens are not introspected.
    pub inactive_budget: u32,
    pub inactive_per_second: u32,
    /// Longest pause of suspect clients when the IdP answers 429 / 503 + Retry-After.
    pub max_backoff: Duration,
}

impl fmt::Debug for IntrospectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Where a provider's keys come from, and how often they are refreshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local file, re-read when it changes.
    File(PathBuf),
    /// An HTTP(S) JWKS URL, or OIDC discovery from the issuer.
    Remote(RemoteJwks),
    /// No keys: every token of this provider is introspected.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    pub location: RemoteLocation,
    /// Interval between refreshes, before Cache-Control and jitter.
    pub refresh_interval: Duration,
    /// Lower bound of any refresh interval, and of refetches on an unknown kid.
    pub min_refresh: Duration,
    /// Upper bound when Cache-Control asks for longer.
    pub max_refresh: Duration,
    /// Whole-request timeout of one fetch.
    pub timeout: Duration,
    /// How long a Check waits for the refetch an unknown kid triggered.
    pub unknown_kid_wait: Duration,
    /// An unknown-kid refetch starts within a random [0, this]: a fleet spreads its refetches.
    pub unknown_kid_spread: Duration,
    /// Checks that may wait at once; past it an unknown kid is answered at once.
    pub unknown_kid_waiters: usize,
    /// Where the last good set is kept across restarts.
    pub cache_dir: Option<PathBuf>,
    /// A cached set older than this is not used at start.
    pub max_stale: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteLocation {
    Uri(String),
    /// `{issuer}/.well-known/openid-configuration` → `jwks_uri`.
    Discovery,
}

/// Where a token may be found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `name` is lower-case; `prefix` is compared case-insensitively (HTTP auth
    /// schemes are case-insensitive) and may be empty.
    Header {
        name: String,
        prefix: String,
    },
    Cookie(String),
    Query(String),
}

impl TokenSource {
    pub fn bearer() -> Self {
        TokenSource::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        }
    }
}

/// A claim name, or a dotted path into nested objects (`realm_access.roles`).
/// A claim whose own name contains dots (`https://example.com/roles`) is found too:
/// the whole name is tried before the path is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(pub String);

impl ClaimPath {
    pub fn lookup<'a>(
        &self,
        claims: &'a serde_json::Map<String, serde_json::Value>,
    ) -> Option<&'a serde_json::Value> {
        if let Some(v) = claims.get(&self.0) {
            return Some(v);
        }
        let mut parts = self.0.split('.');
        let mut current = claims.get(parts.next()?)?;
        for part in parts {
            current = current.as_object()?.get(part)?;
        }
        Some(current)
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every algorithm Valet verifies, by its JOSE name.
pub const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
];

/// The default: the asymmetric ones. HMAC must be asked for by name.
pub fn default_algorithms() -> Vec<Algorithm> {
    ALGORITHMS
        .iter()
        .map(|(_, a)| *a)
        .filter(|a| !is_hmac(*a))
        .collect()
}

pub fn algorithm_by_name(name: &str) -> Option<Algorithm> {
    ALGORITHMS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

pub fn algorithm_name(alg: Algorithm) -> &'static str {
    ALGORITHMS
        .iter()
        .find(|(_, a)| *a == alg)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_paths_walk_objects_and_prefer_whole_names() {
        let claims = json!({
            "sub": "alice",
            "realm_access": { "roles": ["admin"] },
            "https://example.com/roles": "x",
        });
        let claims = claims.as_object().unwrap();
        assert_eq!(
            ClaimPath("sub".into()).lookup(claims),
            Some(&json!("alice"))
        );
        assert_eq!(
            ClaimPath("realm_access.roles".into()).lookup(claims),
            Some(&json!(["admin"]))
        );
        assert_eq!(
            ClaimPath("https://example.com/roles".into()).lookup(claims),
            Some(&json!("x"))
        );
        assert_eq!(
            ClaimPath("realm_access.missing".into()).lookup(claims),
            None
        );
        assert_eq!(ClaimPath("sub.deeper".into()).lookup(claims), None);
    }

    #[test]
    fn default_algorithms_exclude_hmac() {
        let algs = default_algorithms();
        assert!(algs.contains(&Algorithm::RS256));
        assert!(algs.contains(&Algorithm::EdDSA));
        assert!(!algs.iter().any(|a| is_hmac(*a)));
    }
}
