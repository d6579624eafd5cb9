//! File types → runtime types. Pure apart from resolving paths; reports every
//! problem it finds instead of stopping at the first.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use regex::RegexBuilder;
use serde_yaml::Value as Yaml;

use super::dpop::{self as binding, Binding, Dpop};
use super::require::{ClaimRequirement, Requirement};
use super::route::{Access, HostMatch, PathMatch, Route, TemplateSegment};
use super::{CacheSettings, DefaultAction, Inputs, Listen, Policy};
use crate::config::file::{
    FileConfig, IntrospectionFile, JwksFile, MatchFile, ProviderFile, RequireFile, RouteFile,
};
use crate::config::{Problems, parse_duration};
use crate::provider::{
    ClaimPath, IntrospectionSettings, JwksSource, Provider, RemoteJwks, RemoteLocation,
    TokenSource, algorithm_by_name, default_algorithms,
};
use crate::request::{host, normalize};

pub const DEFAULT_GRPC: &str = "127.0.0.1:9001";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
const DEFAULT_SKEW_SECS: u64 = 60;
/// Compiled regexes are bounded so one route cannot eat the sidecar's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles the parsed file. Pure: what lies outside the file (secrets, whether
/// the denylist reads) comes in `inputs`; every problem goes to `p`.
pub fn compile(
    file: FileConfig,
    base: &Path,
    inputs: &Inputs,
    p: &mut Problems,
) -> (Listen, Policy) {
    let listen = Listen {
        grpc: optional_addr(
            file.listen.grpc.as_deref(),
            Some(DEFAULT_GRPC),
            "listen.grpc",
            p,
        ),
        admin: optional_addr(
            file.listen.admin.as_deref(),
            Some(DEFAULT_ADMIN),
            "listen.admin",
            p,
        ),
        http: optional_addr(file.listen.http.as_deref(), None, "listen.http", p),
        http_proxy: crate::config::listen::compile_proxy(&file.listen, p),
        http_xfcc: crate::config::listen::compile_client_cert(&file.listen, p),
    };
    if listen.grpc.is_none() && listen.http.is_none() {
        p.error("listen", "turn on at least one of grpc and http");
    }
    let realm = file.realm.unwrap_or_else(|| "valet".into());
    if realm
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        p.error(
            "realm",
            "must not contain quotes, backslashes or control characters",
        );
    }
    let default = match file.default.as_deref() {
        None | Some("deny") => DefaultAction::Deny,
        Some("allow") => {
            p.warn(
                "default",
                "requests that match no route are allowed without a token",
            );
            DefaultAction::Allow
        }
        Some(other) => {
            p.error("default", format!("must be deny or allow, not {other:?}"));
            DefaultAction::Deny
        }
    };

    let mut providers = Vec::new();
    let mut seen = HashSet::new();
    for (i, pf) in file.providers.into_iter().enumerate() {
        let at = format!("providers[{i}]");
        if !seen.insert(pf.name.clone()) {
            p.error(
                format!("{at}.name"),
                format!("duplicate provider name {:?}", pf.name),
            );
        }
        providers.push(Arc::new(provider(pf, &at, base, inputs, p)));
    }

    let mut identity_headers: Vec<String> = Vec::new();
    for prov in &providers {
        for (_, h) in &prov.claims_to_headers {
            if !identity_headers.contains(h) {
                identity_headers.push(h.clone());
            }
        }
    }

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, rf) in file.routes.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        if !names.insert(rf.name.clone()) {
            p.error(
                format!("{at}.name"),
                format!("duplicate route name {:?}", rf.name),
            );
        }
        routes.push(route(rf, &at, &providers, p));
    }
    if routes.is_empty() {
        p.warn("routes", "no routes: every request gets the default action");
    }
    for (j, later) in routes.iter().enumerate() {
        if let Some(i) = (0..j).find(|i| covers(&routes[*i], later)) {
            p.warn(
                format!("routes[{j}].match"),
                format!(
                    "route {:?} is never reached: routes[{i}] ({:?}) matches every request it does",
                    later.name, routes[i].name
                ),
            );
        }
    }

    let mut required_providers: Vec<usize> = Vec::new();
    for r in &routes {
        // A route of workloads alone waits for no provider's keys.
        if let Access::Require(req) = &r.access
            && req.needs_token
        {
            let wanted: Vec<usize> = if req.providers.is_empty() {
                (0..providers.len()).collect()
            } else {
                req.providers.clone()
            };
            for i in wanted {
                if !required_providers.contains(&i) {
                    required_providers.push(i);
                }
            }
        }
    }
    required_providers.sort_unstable();
    if file.dry_run {
        p.warn(
            "dry_run",
            "dry run: nothing is denied, denials are only recorded",
        );
    }
    let cache = match &file.cache {
        None => CacheSettings::default(),
        Some(c) => CacheSettings {
            max_entries: c.max_entries.unwrap_or(CacheSettings::DEFAULT_MAX_ENTRIES),
            max_bytes: c.max_bytes.unwrap_or(CacheSettings::DEFAULT_MAX_BYTES),
        },
    };
    let max_token_bytes = file
        .limits
        .as_ref()
        .and_then(|l| l.max_token_bytes)
        .unwrap_or(super::MAX_TOKEN_BYTES);
    if !(256..=1024 * 1024).contains(&max_token_bytes) {
        p.error("limits.max_token_bytes", "must be between 256 and 1048576");
    }
    let revocation = file
        .revocation
        .and_then(|r| super::denylist::compile(r, inputs.denylist.as_ref(), base, p));
    let on_store_error = file.dpop.as_ref().and_then(|d| d.on_store_error.clone());
    if on_store_error.is_some() && file.store.is_none() {
        p.error("dpop.on_store_error", "applies with `store` only");
    }
    let store = super::store::compile(file.store, on_store_error.as_deref(), inputs, base, p);
    let dpop = dpop_settings(file.dpop, p);
    let (protected_resources, route_resource) = super::resource_metadata::compile(
        file.protected_resources,
        &routes,
        &providers,
        &dpop.algorithms,
        p,
    );
    let policy = Policy {
        audit: super::observe::audit(file.audit, p),
        tracing: super::observe::tracing(file.tracing, p),
        misuse: super::observe::misuse(file.misuse, p),
        protected_resources,
        route_resource,
        dpop,
        revocation,
        store,
        index: super::index::RouteIndex::build(&routes),
        max_token_bytes,
        cache,
        dry_run: file.dry_run,
        required_providers,
        routes,
        providers,
        default,
        realm,
        identity_headers: identity_headers.into(),
    };
    (listen, policy)
}

/// An optional duration field: `default` when absent; an error at `at` (and the
/// default, so compiling goes on) when it does not parse.
fn duration_or(text: Option<&str>, at: &str, default: Duration, p: &mut Problems) -> Duration {
    match text {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|e| {
            p.error(at, e);
            default
        }),
    }
}

fn dpop_settings(file: Option<crate::config::file::DpopFile>, p: &mut Problems) -> Dpop {
    let Some(f) = file else {
        return Dpop::default();
    };
    let max_age = duration_or(
        f.max_age.as_deref(),
        "dpop.max_age",
        binding::DEFAULT_MAX_AGE,
        p,
    );
    let skew = duration_or(
        f.clock_skew.as_deref(),
        "dpop.clock_skew",
        binding::DEFAULT_SKEW,
        p,
    );
    let algorithms = match f.algorithms {
        None => Dpop::default().algorithms,
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match algorithm_by_name(n) {
                Some(a) if !crate::provider::is_hmac(a) => Some(a),
                _ => {
                    p.error(
                        format!("dpop.algorithms[{i}]"),
                        format!("{n:?} is not an asymmetric algorithm Valet verifies"),
                    );
                    None
                }
            })
            .collect(),
    };
    if algorithms.is_empty() {
        p.error("dpop.algorithms", "at least one algorithm");
    }
    let entries = f
        .replay_cache_entries
        .unwrap_or(binding::DEFAULT_REPLAY_ENTRIES);
    if entries == 0 {
        p.error(
            "dpop.replay_cache_entries",
            "0 would let every proof be replayed",
        );
    }
    if max_age > Duration::from_secs(3600) {
        p.error("dpop.max_age", "at most 1h: proofs are meant to be fresh");
    }
    if skew > Duration::from_secs(300) {
        p.error("dpop.clock_skew", "at most 5m");
    }
    Dpop::new(max_age, skew, algorithms, entries)
}

/// True when every request `b` matches is matched by `a` (conservatively: only
/// the cases that can be proven from the match fields).
fn covers(a: &Route, b: &Route) -> bool {
    let context = a.context.iter().all(|kv| b.context.contains(kv));
    let hosts =
        a.hosts.is_empty() || (!b.hosts.is_empty() && b.hosts.iter().all(|h| a.hosts.contains(h)));
    let methods = a.methods.is_empty()
        || (!b.methods.is_empty() && b.methods.iter().all(|m| a.methods.contains(m)));
    let under = |prefix: &str, path: &str| {
        prefix == "/"
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.is_empty() || r.starts_with('/'))
    };
    let path = match (&a.path, &b.path) {
        (PathMatch::Any, _) => true,
        (PathMatch::Prefix(pa), PathMatch::Prefix(pb)) => under(pa, pb),
        (PathMatch::Prefix(pa), PathMatch::Exact(eb)) => under(pa, eb),
        (PathMatch::Prefix(pa), PathMatch::Template(segs)) => {
            let literal: Vec<&str> = segs
                .iter()
                .map_while(|s| match s {
                    TemplateSegment::Literal(l) => Some(l.as_str()),
                    TemplateSegment::Variable(_) => None,
                })
                .collect();
            under(pa, &format!("/{}", literal.join("/")))
        }
        (PathMatch::Exact(ea), PathMatch::Exact(eb)) => ea == eb,
        _ => false,
    };
    context && hosts && methods && path
}

/// An address, `off`, or absent (then the default, which may be off).
fn optional_addr(
    text: Option<&str>,
    default: Option<&str>,
    at: &str,
    p: &mut Problems,
) -> Option<SocketAddr> {
    match text.or(default) {
        None | Some("off") => None,
        Some(t) => Some(addr(t, at, p)),
    }
}

fn addr(text: &str, at: &str, p: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        p.error(
            at,
            format!("{text:?} is not an address like 127.0.0.1:9001"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Metric labels and log fields use these names, so keep them plain.
fn check_name(name: &str, at: &str, p: &mut Problems) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !ok {
        p.error(
            at,
            format!("{name:?}: names are 1-64 letters, digits, '-', '_', '.' or ':', starting with a letter or digit"),
        );
    }
}

fn header_name(name: &str, at: &str, p: &mut Problems) -> String {
    let lower = name.to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        p.error(at, format!("{name:?} is not a valid header name"));
    }
    lower
}

fn provider(
    pf: ProviderFile,
    at: &str,
    base: &Path,
    inputs: &Inputs,
    p: &mut Problems,
) -> Provider {
    check_name(&pf.name, &format!("{at}.name"), p);
    if pf.issuer.is_empty() {
        p.error(format!("{at}.issuer"), "must not be empty");
    }
    let api_keys = pf
        .api_keys
        .as_ref()
        .map(|k| identity::api_key_file(&pf, &k.file, at, base, inputs, p));
    if pf.audiences.is_empty() && api_keys.is_none() {
        p.warn(
            format!("{at}.audiences"),
            "no audiences: tokens minted for any resource of this issuer are accepted",
        );
    }

    let jwks = match &pf.jwks {
        Some(j) => jwks_source(j, &pf.issuer, at, base, p),
        None => {
            if pf.introspection.is_none() && api_keys.is_none() {
                p.error(
                    at,
                    "set jwks (to verify JWTs) or introspection (to ask the issuer), or both",
                );
            } else if pf.introspection.as_ref().is_some_and(|i| !i.jwts) {
                p.warn(
                    format!("{at}.introspection.jwts"),
                    "no jwks: this provider's JWTs are introspected too (jwts: true is implied)",
                );
            }
            JwksSource::None
        }
    };
    let introspection = pf.introspection.as_ref().map(|i| {
        let at = format!("{at}.introspection");
        let mut settings = introspection_settings(i, &at, base, inputs, p);
        settings.jwts |= matches!(jwks, JwksSource::None);
        settings
    });

    let algorithms = match &pf.algorithms {
        None => default_algorithms(),
        Some(names) => {
            if names.is_empty() {
                p.error(
                    format!("{at}.algorithms"),
                    "must list at least one algorithm",
                );
            }
            names
                .iter()
                .enumerate()
                .filter_map(|(j, n)| {
                    let found = algorithm_by_name(n);
                    if found.is_none() {
                        let why = if n.eq_ignore_ascii_case("none") {
                            "unsigned tokens (alg none) are never accepted".to_string()
                        } else {
                            format!("unsupported algorithm {n:?}")
                        };
                        p.error(format!("{at}.algorithms[{j}]"), why);
                    }
                    found
                })
                .collect()
        }
    };

    let clock_skew_secs = match pf.clock_skew.as_deref().map(parse_duration) {
        None => DEFAULT_SKEW_SECS,
        Some(Ok(d)) => {
            if d.as_secs() > 300 {
                p.warn(
                    format!("{at}.clock_skew"),
                    "more than 5m of skew keeps expired tokens alive",
                );
            }
            d.as_secs()
        }
        Some(Err(e)) => {
            p.error(format!("{at}.clock_skew"), e);
            DEFAULT_SKEW_SECS
        }
    };

    let sources = match pf.tokens_from {
        None => vec![TokenSource::bearer()],
        Some(list) => {
            if list.is_empty() {
                p.error(format!("{at}.tokens_from"), "must list at least one source");
            }
            list.into_iter()
                .enumerate()
                .filter_map(|(j, s)| {
                    let sat = format!("{at}.tokens_from[{j}]");
                    match (s.header, s.cookie, s.query, s.prefix) {
                        (Some(h), None, None, prefix) => Some(TokenSource::Header {
                            name: header_name(&h, &format!("{sat}.header"), p),
                            prefix: prefix.unwrap_or_default(),
                        }),
                        (None, Some(c), None, None) if !c.is_empty() => {
                            Some(TokenSource::Cookie(c))
                        }
                        (None, None, Some(q), None) if !q.is_empty() => Some(TokenSource::Query(q)),
                        (None, _, _, Some(_)) => {
                            p.error(sat, "prefix goes with header only");
                            None
                        }
                        _ => {
                            p.error(sat, "set exactly one of header, cookie, query (non-empty)");
                            None
                        }
                    }
                })
                .collect()
        }
    };

    let claims_to_headers = pf
        .claims_to_headers
        .iter()
        .map(|(claim, header)| {
            let hat = format!("{at}.claims_to_headers.{claim}");
            let h = header_name(header, &hat, p);
            if matches!(
                h.as_str(),
                "host"
                    | "authorization"
                    | "cookie"
                    | "content-length"
                    | "transfer-encoding"
                    | "connection"
            ) || h.starts_with(':')
            {
                p.error(hat, format!("{h:?} cannot carry identity"));
            }
            (ClaimPath(claim.clone()), h)
        })
        .collect();

    Provider {
        name: pf.name.into(),
        issuer: pf.issuer,
        audiences: pf.audiences,
        algorithms,
        clock_skew_secs,
        sources,
        claims_to_headers,
        forward_token: pf.forward_token,
        jwks,
        introspection,
        metadata_claims: crate::provider::MetadataClaims::from_config(pf.metadata_claims),
        api_keys,
    }
}

fn introspection_settings(
    f: &IntrospectionFile,
    at: &str,
    base: &Path,
    inputs: &Inputs,
    p: &mut Problems,
) -> IntrospectionSettings {
    let mut duration = |value: &Option<String>, name: &str, default: Duration| {
        duration_or(value.as_deref(), &format!("{at}.{name}"), default, p)
    };
    // Below Envoy's usual ext_authz timeout (250ms in `valet envoy-config`), so that
    // a slow IdP is answered by Valet (503) rather than by Envoy's own timeout.
    let timeout = duration(&f.timeout, "timeout", Duration::from_millis(150));
    let cache_ttl = duration(&f.cache_ttl, "cache_ttl", Duration::from_secs(60));
    let negative_cache_ttl = duration(
        &f.negative_cache_ttl,
        "negative_cache_ttl",
        Duration::from_secs(10),
    );
    let open_for = duration(&f.open_for, "open_for", Duration::from_secs(10));
    let max_backoff = duration(&f.max_backoff, "max_backoff", Duration::from_secs(30));
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        p.error(
            format!("{at}.timeout"),
            "between 1ms and 10s (Envoy's ext_authz budget is 200ms by default)",
        );
    }
    check_url(&f.endpoint, &format!("{at}.endpoint"), p);
    if f.client_id.is_empty() {
        p.error(format!("{at}.client_id"), "must not be empty");
    }
    let path = base.join(&f.client_secret_file);
    let client_secret = match inputs.secrets.get(&path) {
        // Secret files usually end with a newline the secret does not have.
        Some(Ok(s)) if !s.trim().is_empty() => s.trim_end_matches(['\n', '\r']).to_string(),
        Some(Ok(_)) => {
            p.error(format!("{at}.client_secret_file"), "the file is empty");
            String::new()
        }
        Some(Err(e)) => {
            p.error(
                format!("{at}.client_secret_file"),
                format!("cannot read {}: {e}", path.display()),
            );
            String::new()
        }
        None => {
            p.error(
                format!("{at}.client_secret_file"),
                format!("{} was not read", path.display()),
            );
            String::new()
        }
    };
    let failure_threshold = f.failure_threshold.unwrap_or(5);
    if failure_threshold == 0 {
        p.error(format!("{at}.failure_threshold"), "at least 1");
    }
    for (name, d, min, max) in [
        (
            "cache_ttl",
            cache_ttl,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
        ),
        (
            "negative_cache_ttl",
            negative_cache_ttl,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
        (
            "open_for",
            open_for,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
        (
            "max_backoff",
            max_backoff,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
    ] {
        if d < min || d > max {
            p.error(
                format!("{at}.{name}"),
                format!("between {min:?} and {max:?}"),
            );
        }
    }
    let cache_entries = f.cache_entries.unwrap_or(100_000);
    if cache_entries == 0 {
        p.error(
            format!("{at}.cache_entries"),
            "at least 1: every introspected token would be asked about twice",
        );
    }
    let max_in_flight = f.max_in_flight.unwrap_or(64);
    if !(1..=10_000).contains(&max_in_flight) {
        p.error(format!("{at}.max_in_flight"), "between 1 and 10000");
    }
    let negative_cache_entries = f.negative_cache_entries.unwrap_or(10_000);
    if negative_cache_entries == 0 {
        p.error(
            format!("{at}.negative_cache_entries"),
            "at least 1: every unknown token would reach the IdP at each use",
        );
    }
    // Defaults in proportion to max_in_flight: a quarter per client, an eighth kept
    // for re-validations (none when there is a single slot).
    let max_in_flight_per_client = f
        .max_in_flight_per_client
        .unwrap_or((max_in_flight / 4).clamp(1, u32::MAX as usize) as u32);
    if max_in_flight_per_client == 0 || max_in_flight_per_client as usize > max_in_flight {
        p.error(
            format!("{at}.max_in_flight_per_client"),
            "between 1 and max_in_flight",
        );
    }
    let revalidation_reserve = f.revalidation_reserve.unwrap_or(max_in_flight / 8);
    if revalidation_reserve >= max_in_flight.max(1) {
        p.error(
            format!("{at}.revalidation_reserve"),
            "below max_in_flight: new tokens need a slot too",
        );
    }
    let inactive_budget = f.inactive_budget.unwrap_or(20);
    if !(1..=100_000).contains(&inactive_budget) {
        p.error(format!("{at}.inactive_budget"), "between 1 and 100000");
    }
    let inactive_per_second = f.inactive_per_second.unwrap_or(2);
    if !(1..=100_000).contains(&inactive_per_second) {
        p.error(format!("{at}.inactive_per_second"), "between 1 and 100000");
    }
    IntrospectionSettings {
        endpoint: f.endpoint.clone(),
        client_id: f.client_id.clone(),
        client_secret,
        timeout,
        cache_ttl,
        negative_cache_ttl,
        cache_entries,
        jwts: f.jwts,
        failure_threshold,
        open_for,
        max_in_flight,
        negative_cache_entries,
        max_in_flight_per_client,
        revalidation_reserve,
        inactive_budget,
        inactive_per_second,
        max_backoff,
    }
}

fn jwks_source(j: &JwksFile, issuer: &str, at: &str, base: &Path, p: &mut Problems) -> JwksSource {
    let at = format!("{at}.jwks");
    let mut duration = |value: &Option<String>, name: &str, default: Duration| {
        duration_or(value.as_deref(), &format!("{at}.{name}"), default, p)
    };
    let refresh_interval = duration(
        &j.refresh_interval,
        "refresh_interval",
        Duration::from_secs(300),
    );
    let min_refresh = duration(&j.min_refresh, "min_refresh", Duration::from_secs(30));
    let max_refresh = duration(&j.max_refresh, "max_refresh", Duration::from_secs(3600));
    let timeout = duration(&j.timeout, "timeout", Duration::from_secs(5));
    let unknown_kid_wait = duration(
        &j.unknown_kid_wait,
        "unknown_kid_wait",
        Duration::from_millis(100),
    );
    let unknown_kid_spread = duration(&j.unknown_kid_spread, "unknown_kid_spread", Duration::ZERO);
    let max_stale = duration(&j.max_stale, "max_stale", Duration::from_secs(24 * 3600));
    let location = match (&j.file, &j.uri, j.discovery.unwrap_or(false)) {
        (Some(f), None, false) => {
            let remote_only = [
                ("refresh_interval", j.refresh_interval.is_some()),
                ("min_refresh", j.min_refresh.is_some()),
                ("max_refresh", j.max_refresh.is_some()),
                ("timeout", j.timeout.is_some()),
                ("unknown_kid_wait", j.unknown_kid_wait.is_some()),
                ("unknown_kid_spread", j.unknown_kid_spread.is_some()),
                ("unknown_kid_waiters", j.unknown_kid_waiters.is_some()),
                ("cache_dir", j.cache_dir.is_some()),
                ("max_stale", j.max_stale.is_some()),
            ];
            for (name, set) in remote_only {
                if set {
                    p.error(
                        format!("{at}.{name}"),
                        "applies to uri and discovery only; a file is re-read when it changes",
                    );
                }
            }
            return JwksSource::File(base.join(f));
        }
        (None, Some(uri), false) => {
            check_url(uri, &format!("{at}.uri"), p);
            RemoteLocation::Uri(uri.clone())
        }
        (None, None, true) => {
            check_url(issuer, &format!("{at}.discovery"), p);
            RemoteLocation::Discovery
        }
        _ => {
            p.error(at.clone(), "set exactly one of file, uri, discovery: true");
            RemoteLocation::Discovery
        }
    };
    if min_refresh > refresh_interval || refresh_interval > max_refresh {
        p.error(
            at.clone(),
            "need min_refresh <= refresh_interval <= max_refresh",
        );
    }
    if timeout.is_zero() || unknown_kid_wait > Duration::from_secs(1) {
        p.error(
            at.clone(),
            "timeout must be positive and unknown_kid_wait at most 1s (Envoy's budget is 200ms by default)",
        );
    }
    if unknown_kid_spread + unknown_kid_wait > Duration::from_secs(1) {
        p.error(
            format!("{at}.unknown_kid_spread"),
            "unknown_kid_spread + unknown_kid_wait at most 1s: it is how long the first token of a rotated key may wait",
        );
    }
    let unknown_kid_waiters = j
        .unknown_kid_waiters
        .unwrap_or(crate::provider::DEFAULT_UNKNOWN_KID_WAITERS);
    if !(1..=100_000).contains(&unknown_kid_waiters) {
        p.error(format!("{at}.unknown_kid_waiters"), "between 1 and 100000");
    }
    JwksSource::Remote(RemoteJwks {
        location,
        refresh_interval,
        min_refresh,
        max_refresh,
        timeout,
        unknown_kid_wait,
        unknown_kid_spread,
        unknown_kid_waiters,
        cache_dir: j.cache_dir.as_ref().map(|d| base.join(d)),
        max_stale,
    })
}

/// JWKS and discovery URLs: http(s) only, from config only.
fn check_url(text: &str, at: &str, p: &mut Problems) {
    match reqwest::Url::parse(text) {
        Ok(u) if u.scheme() == "https" => {}
        Ok(u) if u.scheme() == "http" => {
            p.warn(
                at,
                "plain http: keys can be forged in transit unless this is loopback",
            );
        }
        Ok(u) => p.error(
            at,
            format!("scheme {:?}: only http and https are fetched", u.scheme()),
        ),
        Err(e) => p.error(at, format!("{text:?} is not a URL: {e}")),
    }
}

fn route(rf: RouteFile, at: &str, providers: &[Arc<Provider>], p: &mut Problems) -> Route {
    check_name(&rf.name, &format!("{at}.name"), p);
    let m = route_match(&rf.matches, &format!("{at}.match"), p);
    let access = match (rf.anonymous, rf.require) {
        (true, Some(_)) => {
            p.error(
                format!("{at}.require"),
                "an anonymous route cannot require anything",
            );
            Access::Anonymous
        }
        (true, None) => Access::Anonymous,
        (false, req) => {
            if let Some(r) = &req
                && asks_nothing(r)
                && r.any_of.is_empty()
            {
                p.warn(
                    format!("{at}.require"),
                    "requires nothing beyond a valid token; say so by leaving `require` out, or list what is needed",
                );
            }
            let requirement = identity::compile(
                req.unwrap_or_default(),
                &format!("{at}.require"),
                providers,
                p,
            );
            if requirement.needs_token && providers.is_empty() {
                p.error(
                    at,
                    "this route needs a token but no providers are configured (or set anonymous: true)",
                );
            }
            Access::Require(requirement)
        }
    };
    Route {
        name: rf.name.into(),
        hosts: m.0,
        methods: m.1,
        path: m.2,
        context: rf.matches.context.into_iter().collect(),
        access,
        dry_run: rf.dry_run,
    }
}

fn route_match(
    mf: &MatchFile,
    at: &str,
    p: &mut Problems,
) -> (Vec<HostMatch>, Vec<String>, PathMatch) {
    let hosts = mf
        .hosts
        .iter()
        .flatten()
        .enumerate()
        .map(|(j, h)| {
            let hat = format!("{at}.hosts[{j}]");
            // Hosts are compared in lower case: an upper-case literal is no mistake.
            let h = h.to_ascii_lowercase();
            if h == "*" || h.is_empty() {
                p.error(&hat, "leave hosts out to match any host");
            } else if h.chars().skip(1).any(|c| c == '*')
                || (h.starts_with('*') && !h.starts_with("*."))
            {
                p.error(&hat, "only a leading \"*.\" wildcard is supported");
            } else if let Some(why) = host::literal_problem(&h) {
                p.error(&hat, format!("{h:?} can never match: {why}"));
            }
            match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(h),
            }
        })
        .collect();
    let methods = mf
        .methods
        .iter()
        .flatten()
        .enumerate()
        .map(|(j, m)| {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                p.error(
                    format!("{at}.methods[{j}]"),
                    format!("{m:?} is not an HTTP method"),
                );
            }
            m.to_ascii_uppercase()
        })
        .collect();

    let set = [
        mf.path.is_some(),
        mf.path_prefix.is_some(),
        mf.path_regex.is_some(),
        mf.path_template.is_some(),
    ];
    if set.iter().filter(|s| **s).count() > 1 {
        p.error(
            at,
            "use only one of path, path_prefix, path_regex, path_template",
        );
    }
    let path = if let Some(path) = &mf.path {
        PathMatch::Exact(normalized(path, &format!("{at}.path"), p))
    } else if let Some(prefix) = &mf.path_prefix {
        let n = normalized(prefix, &format!("{at}.path_prefix"), p);
        let n = if n.len() > 1 {
            n.trim_end_matches('/').to_string()
        } else {
            n
        };
        PathMatch::Prefix(n)
    } else if let Some(re) = &mf.path_regex {
        match RegexBuilder::new(&format!("^(?:{re})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Ok(r) => PathMatch::Regex(r),
            Err(e) => {
                let msg = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_string();
                p.error(format!("{at}.path_regex"), format!("invalid regex: {msg}"));
                PathMatch::Any
            }
        }
    } else if let Some(t) = &mf.path_template {
        template(t, &format!("{at}.path_template"), p)
    } else {
        PathMatch::Any
    };
    (hosts, methods, path)
}

/// Paths in policy must be in the canonical form requests are matched in
/// (`request::normalize`), or they could never match, or match one spelling of a
/// resource and not another.
fn normalized(path: &str, at: &str, p: &mut Problems) -> String {
    match normalize(path) {
        Ok(n) if n == path => n,
        Ok(n) => {
            p.error(
                at,
                format!(
                    "{path:?} is not in canonical form, and requests are matched in it: write {n:?}"
                ),
            );
            n
        }
        Err(e) => {
            p.error(at, format!("{path:?} can never match: {e}"));
            path.to_string()
        }
    }
}

fn template(t: &str, at: &str, p: &mut Problems) -> PathMatch {
    if !t.starts_with('/') {
        p.error(at, "must start with /");
        return PathMatch::Any;
    }
    let mut vars = HashSet::new();
    let mut segments = Vec::new();
    for seg in t[1..].split('/') {
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(var) => {
                let ok =
                    !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    p.error(
                        at,
                        format!("{{{var}}}: variable names are letters, digits and _"),
                    );
                } else if !vars.insert(var.to_string()) {
                    p.error(at, format!("variable {{{var}}} appears twice"));
                }
                segments.push(TemplateSegment::Variable(var.to_string()));
            }
            None => {
                if seg.contains(['{', '}']) {
                    p.error(
                        at,
                        format!("{seg:?}: a variable must be a whole segment, like {{id}}"),
                    );
                } else if seg.is_empty() && t != "/" {
                    p.error(at, "empty segment (double or trailing slash)");
                } else if matches!(seg, "." | "..") {
                    p.error(at, "dot segments never match a normalised path");
                } else if !seg.is_empty() {
                    let literal = format!("/{seg}");
                    match normalize(&literal) {
                        Ok(n) if n == literal => {}
                        Ok(n) => p.error(
                            at,
                            format!(
                                "segment {seg:?} is not in canonical form, and requests are matched in it: write {:?}",
                                &n[1..]
                            ),
                        ),
                        Err(e) => p.error(at, format!("segment {seg:?} can never match: {e}")),
                    }
                }
                segments.push(TemplateSegment::Literal(seg.to_string()));
            }
        }
    }
    PathMatch::Template(segments)
}

/// A `require` block that names nothing a token or a caller must have.
pub(super) fn asks_nothing(r: &RequireFile) -> bool {
    r.scopes.is_empty()
        && r.any_scopes.is_empty()
        && r.providers.is_empty()
        && r.audiences.is_empty()
        && r.claims.is_empty()
        && r.binding.is_none()
        && r.principals.is_empty()
}

/// One requirement (a whole `require` block, or one of its `any_of`).
pub(super) fn requirement(
    rf: RequireFile,
    at: &str,
    providers: &[Arc<Provider>],
    p: &mut Problems,
) -> Requirement {
    let provider_idx: Vec<usize> = rf
        .providers
        .iter()
        .enumerate()
        .filter_map(|(j, name)| {
            let idx = providers.iter().position(|pr| *pr.name == **name);
            if idx.is_none() {
                p.error(
                    format!("{at}.providers[{j}]"),
                    format!("unknown provider {name:?}"),
                );
            }
            idx
        })
        .collect();
    for (field, list) in [("scopes", &rf.scopes), ("any_scopes", &rf.any_scopes)] {
        for (j, s) in list.iter().enumerate() {
            if s.is_empty()
                || s.chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\')
            {
                p.error(
                    format!("{at}.{field}[{j}]"),
                    format!("{s:?}: a scope is one non-empty word without quotes (list several as separate items)"),
                );
            }
        }
    }
    let claims: Vec<ClaimRequirement> = rf
        .claims
        .iter()
        .filter_map(|(name, value)| {
            let cat = format!("{at}.claims.{name}");
            let values = match value {
                Yaml::Sequence(items) if !items.is_empty() => {
                    items.iter().map(|v| claim_value(v, &cat, p)).collect()
                }
                Yaml::Sequence(_) => {
                    p.error(&cat, "an empty list matches nothing");
                    return None;
                }
                v => vec![claim_value(v, &cat, p)],
            };
            Some(ClaimRequirement {
                path: ClaimPath(name.clone()),
                values: values.into_iter().flatten().collect(),
            })
        })
        .collect();
    let mut sources: Vec<TokenSource> = Vec::new();
    for (i, prov) in providers.iter().enumerate() {
        if provider_idx.is_empty() || provider_idx.contains(&i) {
            for s in &prov.sources {
                if !sources.contains(s) {
                    sources.push(s.clone());
                }
            }
        }
    }
    let binding = rf.binding.as_deref().and_then(|b| match b {
        "mtls" => Some(Binding::Mtls),
        "dpop" => Some(Binding::Dpop),
        "any" => Some(Binding::Any),
        other => {
            p.error(
                format!("{at}.binding"),
                format!("must be mtls, dpop or any, not {other:?}"),
            );
            None
        }
    });
    let principals = identity::principals(&rf.principals, at, p);
    // Principals alone are checked on the connection, not on a token.
    let needs_token = principals.is_empty()
        || !(rf.scopes.is_empty()
            && rf.any_scopes.is_empty()
            && provider_idx.is_empty()
            && rf.audiences.is_empty()
            && claims.is_empty()
            && binding.is_none());
    Requirement {
        binding,
        providers: provider_idx,
        sources: if needs_token { sources } else { Vec::new() },
        scopes: rf.scopes,
        any_scopes: rf.any_scopes,
        audiences: rf.audiences,
        claims,
        principals,
        needs_token,
        any_of: Vec::new(),
    }
}

fn claim_value(v: &Yaml, at: &str, p: &mut Problems) -> Option<serde_json::Value> {
    match v {
        Yaml::String(s) => Some(serde_json::Value::String(s.clone())),
        Yaml::Bool(b) => Some(serde_json::Value::Bool(*b)),
        Yaml::Number(n) => serde_json::to_value(n).ok(),
        _ => {
            p.error(
                at,
                "claim values are strings, numbers or booleans (or a list of them: any of)",
            );
            None
        }
    }
}

mod identity;
#[cfg(test)]
mod tests;
