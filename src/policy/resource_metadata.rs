//! RFC 9728 OAuth 2.0 Protected Resource Metadata: for each protected resource
//! (a group of routes) the document clients fetch from
//! `/.well-known/oauth-protected-resource[/path]` to learn which authorization
//! servers issue tokens for it and how to present them, and the URL that 401
//! challenges point to with `resource_metadata=`. Built when the policy loads.

use serde_json::{Value, json};

use super::{Access, Binding, Route};
use crate::config::Problems;
use crate::config::file::ResourceFile;
use crate::provider::{Provider, TokenSource, algorithm_name};

pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

#[derive(Debug)]
pub struct ProtectedResource {
    pub resource: String,
    /// Where the document is served, on the resource's own host.
    pub metadata_url: String,
    /// The path part of `metadata_url`, for proxies and HTTP mode.
    pub well_known_path: String,
    /// The JSON document, rendered once.
    pub document: String,
    /// Indices of the routes it covers.
    pub routes: Vec<usize>,
}

/// Compiles `protected_resources`; returns them and, per route, the index of its resource.
pub fn compile(
    files: Vec<ResourceFile>,
    routes: &[Route],
    providers: &[std::sync::Arc<Provider>],
    dpop_algs: &[jsonwebtoken::Algorithm],
    p: &mut Problems,
) -> (Vec<ProtectedResource>, Vec<Option<usize>>) {
    let mut of_route: Vec<Option<usize>> = vec![None; routes.len()];
    let mut out = Vec::new();
    for (i, f) in files.into_iter().enumerate() {
        let at = format!("protected_resources[{i}]");
        let Some((origin, path)) = split_resource(&f.resource, &format!("{at}.resource"), p) else {
            continue;
        };
        let well_known_path = if path == "/" || path.is_empty() {
            WELL_KNOWN.to_string()
        } else {
            format!("{WELL_KNOWN}{path}")
        };
        if out
            .iter()
            .any(|r: &ProtectedResource| r.well_known_path == well_known_path)
        {
            p.error(
                format!("{at}.resource"),
                "another protected resource has the same path",
            );
        }
        let covered: Vec<usize> = match &f.routes {
            Some(names) => names
                .iter()
                .enumerate()
                .filter_map(|(j, n)| {
                    let found = routes.iter().position(|r| r.name.as_str() == n.as_str());
                    if found.is_none() {
                        p.error(format!("{at}.routes[{j}]"), format!("unknown route {n:?}"));
                    }
                    found
                })
                .collect(),
            None => (0..routes.len())
                .filter(|r| matches!(routes[*r].access, Access::Require(_)))
                .filter(|r| of_route[*r].is_none())
                .collect(),
        };
        for r in &covered {
            if of_route[*r].replace(out.len()).is_some() {
                p.error(
                    format!("{at}.routes"),
                    format!(
                        "route {:?} is already in another protected resource",
                        routes[*r].name
                    ),
                );
            }
        }
        // Each alternative a token can meet (`any_of`), not the workload ones.
        let requirements: Vec<_> = covered
            .iter()
            .filter_map(|r| match &routes[*r].access {
                Access::Require(req) => Some(req.alternatives()),
                Access::Anonymous => None,
            })
            .flatten()
            .filter(|a| a.needs_token)
            .collect();
        let mut issuers: Vec<String> = Vec::new();
        let mut scopes: Vec<String> = Vec::new();
        let mut methods: Vec<&str> = Vec::new();
        for req in &requirements {
            for (k, prov) in providers.iter().enumerate() {
                // A provider of API keys is no authorization server.
                if (req.providers.is_empty() || req.providers.contains(&k))
                    && prov.api_keys.is_none()
                    && !issuers.contains(&prov.issuer)
                {
                    issuers.push(prov.issuer.clone());
                }
            }
            for s in req.scopes.iter().chain(&req.any_scopes) {
                if !scopes.contains(s) {
                    scopes.push(s.clone());
                }
            }
            for source in &req.sources {
                let m = match source {
                    TokenSource::Header { .. } => "header",
                    TokenSource::Query(_) => "query",
                    TokenSource::Cookie(_) => continue,
                };
                if !methods.contains(&m) {
                    methods.push(m);
                }
            }
        }
        let binding = |b: Binding| requirements.iter().any(|r| r.binding == Some(b));
        let mut doc = json!({
            "resource": f.resource,
            "authorization_servers": f.authorization_servers.unwrap_or(issuers),
            "scopes_supported": f.scopes_supported.unwrap_or(scopes),
            "bearer_methods_supported": methods,
            "dpop_signing_alg_values_supported":
                dpop_algs.iter().map(|a| algorithm_name(*a)).collect::<Vec<_>>(),
            "tls_client_certificate_bound_access_tokens": binding(Binding::Mtls) || binding(Binding::Any),
        });
        if !requirements.is_empty()
            && requirements
                .iter()
                .all(|r| r.binding == Some(Binding::Dpop))
        {
            doc["dpop_bound_access_tokens_required"] = Value::Bool(true);
        }
        if let Some(n) = f.resource_name {
            doc["resource_name"] = Value::String(n);
        }
        if let Some(d) = f.resource_documentation {
            doc["resource_documentation"] = Value::String(d);
        }
        out.push(ProtectedResource {
            metadata_url: format!("{origin}{well_known_path}"),
            resource: f.resource,
            well_known_path,
            document: serde_json::to_string_pretty(&doc).unwrap_or_default(),
            routes: covered,
        });
    }
    (out, of_route)
}

/// `https://host[:port]` and the path of a resource identifier.
fn split_resource(text: &str, at: &str, p: &mut Problems) -> Option<(String, String)> {
    let url = match reqwest::Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            p.error(at, format!("{text:?} is not a URL: {e}"));
            return None;
        }
    };
    if url.fragment().is_some() || url.query().is_some() {
        p.error(
            at,
            "a resource identifier has no query or fragment (RFC 9728 §1.2)",
        );
        return None;
    }
    match url.scheme() {
        "https" => {}
        "http" => p.warn(at, "RFC 9728 resource identifiers use https"),
        _ => {
            p.error(at, "an https URL");
            return None;
        }
    }
    if url.host_str().is_none_or(str::is_empty) || text.contains('"') {
        p.error(at, "an https URL with a host");
        return None;
    }
    let origin = url.origin().ascii_serialization();
    // The path as written (a trailing slash is part of the identifier), "" for the root.
    let path = if url.path() == "/" { "" } else { url.path() };
    Some((origin, path.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn documents_and_urls_follow_rfc_9728() {
        let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/config/jwks.json");
        let src = format!(
            "providers:\n  - name: corp\n    issuer: https://idp.example.com/\n    audiences: [a]\n    jwks: {{ file: {jwks} }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read], binding: dpop }}\n  - name: pub\n    match: {{ path: /health }}\n    anonymous: true\n  - name: admin\n    match: {{ path_prefix: /admin }}\n    require: {{ any_scopes: [admin] }}\nprotected_resources:\n  - resource: https://api.example.com/orders\n    resource_name: Orders\n    routes: [orders]\n  - resource: https://api.example.com\n"
        );
        let cfg = crate::load::parse(&src, std::path::Path::new("/tmp/v.yaml")).unwrap();
        let r = &cfg.policy.protected_resources;
        assert_eq!(
            r[0].metadata_url,
            "https://api.example.com/.well-known/oauth-protected-resource/orders"
        );
        assert_eq!(
            r[0].well_known_path,
            "/.well-known/oauth-protected-resource/orders"
        );
        assert_eq!(
            r[1].metadata_url,
            "https://api.example.com/.well-known/oauth-protected-resource"
        );
        assert_eq!(cfg.policy.route_resource, vec![Some(0), None, Some(1)]);
        let doc: serde_json::Value = serde_json::from_str(&r[0].document).unwrap();
        assert_eq!(doc["resource"], "https://api.example.com/orders");
        assert_eq!(
            doc["authorization_servers"],
            serde_json::json!(["https://idp.example.com/"])
        );
        assert_eq!(doc["scopes_supported"], serde_json::json!(["orders:read"]));
        assert_eq!(
            doc["bearer_methods_supported"],
            serde_json::json!(["header"])
        );
        assert_eq!(doc["dpop_bound_access_tokens_required"], true);
        assert_eq!(doc["resource_name"], "Orders");
        let doc: serde_json::Value = serde_json::from_str(&r[1].document).unwrap();
        assert_eq!(doc["scopes_supported"], serde_json::json!(["admin"]));
        assert!(doc.get("dpop_bound_access_tokens_required").is_none());

        let bad = src.replace(
            "https://api.example.com/orders",
            "https://api.example.com/o?x=1#f",
        );
        let err = crate::load::parse(&bad, std::path::Path::new("/tmp/v.yaml"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("protected_resources[0].resource: a resource identifier has no query"),
            "{err}"
        );
    }
}
