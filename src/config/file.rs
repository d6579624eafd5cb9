//! The serde mirror of the YAML file: data only, no checks beyond shape.
//! Unknown keys are rejected everywhere so a typo is an error, not a silent no-op.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: ListenFile,
    /// The `realm` of `WWW-Authenticate` challenges.
    pub realm: Option<String>,
    #[serde(default)]
    pub providers: Vec<ProviderFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    pub default: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    pub cache: Option<CacheFile>,
    pub limits: Option<LimitsFile>,
    pub revocation: Option<RevocationFile>,
    pub dpop: Option<DpopFile>,
    /// A store shared by the replicas of a fleet.
    pub store: Option<StoreFile>,
    #[serde(default)]
    pub protected_resources: Vec<ResourceFile>,
    pub audit: Option<super::observe::AuditFile>,
    pub tracing: Option<super::observe::TracingFile>,
    pub misuse: Option<super::observe::MisuseFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpopFile {
    pub max_age: Option<String>,
    pub clock_skew: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub replay_cache_entries: Option<u64>,
    /// With `store`: `refuse` or `local` when the store cannot spend a proof.
    pub on_store_error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub redis: RedisFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    pub url: String,
    pub key_prefix: Option<String>,
    pub timeout: Option<String>,
    pub password_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationFile {
    /// Exactly one of `file` and `uri`.
    pub file: Option<String>,
    pub uri: Option<String>,
    /// For `uri`: how often it is asked, one fetch's timeout, and how long the
    /// list may go unconfirmed before it is reported stale.
    pub refresh_interval: Option<String>,
    pub timeout: Option<String>,
    pub max_stale: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_token_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub grpc: Option<String>,
    pub admin: Option<String>,
    pub http: Option<String>,
    /// `nginx`, `traefik` or `envoy`: which proxy calls `http`, hence which one
    /// header family describes the original request.
    pub http_proxy: Option<String>,
    /// `xfcc`: HTTP mode takes the caller's workload identity from Envoy's
    /// `x-forwarded-client-cert` (only with `http_proxy: envoy`).
    pub http_client_cert: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub name: String,
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Absent only for a provider whose tokens are all introspected.
    pub jwks: Option<JwksFile>,
    pub introspection: Option<IntrospectionFile>,
    pub algorithms: Option<Vec<String>>,
    pub clock_skew: Option<String>,
    pub tokens_from: Option<Vec<TokenSourceFile>>,
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub forward_token: bool,
    /// Claims put in Envoy's dynamic metadata; `["*"]` for all. Default: [`crate::provider::DEFAULT_METADATA_CLAIMS`].
    pub metadata_claims: Option<Vec<String>>,
    /// API keys instead of tokens: a file of key digests and their claims.
    pub api_keys: Option<ApiKeysFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysFile {
    pub file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionFile {
    pub endpoint: String,
    pub client_id: String,
    pub client_secret_file: String,
    pub timeout: Option<String>,
    pub cache_ttl: Option<String>,
    pub negative_cache_ttl: Option<String>,
    pub cache_entries: Option<u64>,
    #[serde(default)]
    pub jwts: bool,
    pub failure_threshold: Option<u32>,
    pub open_for: Option<String>,
    pub max_in_flight: Option<usize>,
    pub negative_cache_entries: Option<u64>,
    pub max_in_flight_per_client: Option<u32>,
    pub revalidation_reserve: Option<usize>,
    pub inactive_budget: Option<u32>,
    pub inactive_per_second: Option<u32>,
    pub max_backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksFile {
    pub file: Option<String>,
    pub uri: Option<String>,
    pub discovery: Option<bool>,
    pub refresh_interval: Option<String>,
    pub min_refresh: Option<String>,
    pub max_refresh: Option<String>,
    pub timeout: Option<String>,
    pub unknown_kid_wait: Option<String>,
    pub unknown_kid_spread: Option<String>,
    pub unknown_kid_waiters: Option<usize>,
    pub cache_dir: Option<String>,
    pub max_stale: Option<String>,
}

/// Exactly one of `header`, `cookie`, `query`; checked when compiling.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSourceFile {
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub cookie: Option<String>,
    pub query: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: MatchFile,
    #[serde(default)]
    pub anonymous: bool,
    pub require: Option<RequireFile>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub hosts: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub path_template: Option<String>,
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireFile {
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub any_scopes: Vec<String>,
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub claims: BTreeMap<String, serde_yaml::Value>,
    /// `mtls`, `dpop` or `any`: the token must be sender-constrained.
    pub binding: Option<String>,
    /// SPIFFE IDs (or `.../*`) the caller's workload identity must be one of.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Alternatives, each a whole requirement: the first that holds allows.
    #[serde(default)]
    pub any_of: Vec<RequireFile>,
}

/// One of `protected_resources` (RFC 9728 metadata).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    /// The resource identifier: an https URL without query or fragment.
    pub resource: String,
    /// Routes whose challenges point here; default: every route that needs a token.
    pub routes: Option<Vec<String>>,
    pub authorization_servers: Option<Vec<String>>,
    pub scopes_supported: Option<Vec<String>>,
    pub resource_name: Option<String>,
    pub resource_documentation: Option<String>,
}
