//! Who is calling: `require.principals` (workload identities), `require.any_of`
//! (either-or requirements, compiled into one [`Requirement`] whose alternatives
//! are decided over the one token read and verified with their union), and
//! providers of API keys.

use std::sync::Arc;

use super::{asks_nothing, requirement};
use crate::config::Problems;
use crate::config::file::RequireFile;
use crate::policy::principal::Principal;
use crate::policy::require::Requirement;
use crate::provider::{Provider, TokenSource};

/// A whole `require` block: one requirement, or the union of its alternatives.
pub fn compile(
    mut rf: RequireFile,
    at: &str,
    providers: &[Arc<Provider>],
    p: &mut Problems,
) -> Requirement {
    if rf.any_of.is_empty() {
        return requirement(rf, at, providers, p);
    }
    if !asks_nothing(&rf) {
        p.error(
            format!("{at}.any_of"),
            "any_of cannot be combined with other requirements: put them in each alternative",
        );
    }
    let alternatives: Vec<Requirement> = std::mem::take(&mut rf.any_of)
        .into_iter()
        .enumerate()
        .map(|(k, alt)| {
            let aat = format!("{at}.any_of[{k}]");
            if !alt.any_of.is_empty() {
                p.error(
                    format!("{aat}.any_of"),
                    "alternatives do not nest: list every alternative in the one any_of",
                );
            }
            requirement(alt, &aat, providers, p)
        })
        .collect();
    if alternatives.len() == 1 {
        p.warn(
            format!("{at}.any_of"),
            "one alternative is no choice: write its requirements in `require` itself",
        );
    }
    let token_alts = || alternatives.iter().filter(|a| a.needs_token);
    let needs_token = token_alts().next().is_some();
    // Verified against the providers any alternative takes (empty: any).
    let mut union: Vec<usize> = Vec::new();
    if !token_alts().any(|a| a.providers.is_empty()) {
        for i in token_alts().flat_map(|a| a.providers.iter().copied()) {
            if !union.contains(&i) {
                union.push(i);
            }
        }
    }
    let mut sources: Vec<TokenSource> = Vec::new();
    for s in token_alts().flat_map(|a| a.sources.iter()) {
        if !sources.contains(s) {
            sources.push(s.clone());
        }
    }
    Requirement {
        providers: union,
        sources,
        needs_token,
        any_of: alternatives,
        ..Default::default()
    }
}

/// `providers[].api_keys.file`: a provider of API keys takes nothing else, and
/// its file must have read (its problems are placed like the policy's own).
pub fn api_key_file(
    pf: &crate::config::file::ProviderFile,
    file: &str,
    at: &str,
    base: &std::path::Path,
    inputs: &crate::policy::Inputs,
    p: &mut Problems,
) -> std::path::PathBuf {
    let at = format!("{at}.api_keys");
    if pf.jwks.is_some() || pf.introspection.is_some() {
        p.error(
            &at,
            "a provider of API keys takes no JWTs: put jwks and introspection in a provider of their own",
        );
    }
    if !pf.audiences.is_empty() {
        p.error(
            &at,
            "API keys carry no audience: leave audiences out (require claims on routes instead)",
        );
    }
    let path = base.join(file);
    match inputs.api_keys.get(&path) {
        Some(Ok(())) => {}
        Some(Err(crate::config::LoadError::Invalid(errors))) => {
            p.errors.extend(errors.iter().cloned());
        }
        Some(Err(e)) => p.error(format!("{at}.file"), e.to_string()),
        None => p.error(format!("{at}.file"), "the key file was not read"),
    }
    path
}

/// `require.principals`: SPIFFE IDs or `.../*`, each checked here.
pub fn principals(list: &[String], at: &str, p: &mut Problems) -> Vec<Principal> {
    list.iter()
        .enumerate()
        .filter_map(|(j, text)| match Principal::parse(text) {
            Ok(principal) => Some(principal),
            Err(why) => {
                p.error(
                    format!("{at}.principals[{j}]"),
                    format!("{text:?} is not a SPIFFE ID pattern: {why}"),
                );
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::LoadError;
    use crate::load::parse;
    use crate::policy::Access;

    const PROVIDER: &str = "providers:\n  - name: corp\n    issuer: https://idp/\n    audiences: [api]\n    jwks: { file: jwks.json }\n  - name: partners\n    issuer: https://partners/\n    jwks: { file: jwks.json }\n";

    fn errors(src: &str) -> Vec<String> {
        match parse(src, Path::new("/p/valet.yaml")) {
            Err(LoadError::Invalid(e)) => e.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("accepted:\n{src}"),
        }
    }

    #[test]
    fn bad_principals_and_alternatives_are_errors_with_their_position() {
        let src = format!(
            "{PROVIDER}routes:
  - name: a
    require:
      principals: [spiffe://cluster.local/ns/billing/sa/worker, 'spiffe://cluster.local/ns/*/sa/x']
  - name: b
    require:
      scopes: [x]
      any_of:
        - {{ principals: ['spiffe://cluster.local/ns/../sa/*'] }}
        - {{ scopes: [y], any_of: [{{ scopes: [z] }}] }}
        - {{ principals: [spiffe://Cluster.local/x] }}
"
        );
        let e = errors(&src);
        let find = |needle: &str| {
            e.iter()
                .find(|t| t.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {e:#?}"))
                .clone()
        };
        assert!(
            find("only wildcard is a trailing /*").starts_with("/p/valet.yaml:12:65:"),
            "{e:#?}"
        );
        assert!(find("any_of cannot be combined").starts_with("/p/valet.yaml:17:9:"));
        assert!(find("dot segments").starts_with("/p/valet.yaml:17:26:"));
        assert!(find("alternatives do not nest").starts_with("/p/valet.yaml:18:34:"));
        assert!(find("the trust domain has 'C'").starts_with("/p/valet.yaml:19:26:"));
        assert_eq!(e.len(), 5, "{e:#?}");
    }

    #[test]
    fn a_policy_of_workload_routes_waits_for_no_keys() {
        let src = format!(
            "{PROVIDER}routes:\n  - name: w\n    require: {{ principals: ['spiffe://td/ns/a/*'] }}\n"
        );
        let c = parse(&src, Path::new("/p/valet.yaml")).unwrap();
        assert!(c.policy.required_providers.is_empty());
    }

    #[test]
    fn the_union_reads_and_verifies_the_one_token() {
        let src = format!(
            "{PROVIDER}routes:
  - name: workload-only
    require: {{ principals: ['spiffe://td/ns/a/*'] }}
  - name: either
    require:
      any_of:
        - {{ principals: [spiffe://td/ns/a/sa/b] }}
        - {{ providers: [partners], scopes: [x] }}
        - {{ providers: [corp], principals: [spiffe://td/ns/c/sa/d] }}
"
        );
        let c = parse(&src, Path::new("/p/valet.yaml")).unwrap();
        let Access::Require(w) = &c.policy.routes[0].access else {
            panic!()
        };
        assert!(!w.needs_token, "principals alone need no token");
        assert!(w.sources.is_empty());
        let Access::Require(e) = &c.policy.routes[1].access else {
            panic!()
        };
        assert!(e.needs_token);
        assert_eq!(e.providers, vec![1, 0]);
        assert_eq!(e.any_of.len(), 3);
        assert!(!e.any_of[0].needs_token);
        assert!(e.any_of[2].needs_token, "a provider is asked of the token");
    }
}
