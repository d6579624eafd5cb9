//! What a route requires of verified claims, and the check itself.

use serde_json::{Map, Value};

use crate::provider::{ClaimPath, TokenSource};

#[derive(Debug, Default)]
pub struct Requirement {
    /// Indices into the policy's providers; empty means any provider.
    pub providers: Vec<usize>,
    /// All of these.
    pub scopes: Vec<String>,
    /// At least one of these.
    pub any_scopes: Vec<String>,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    pub claims: Vec<ClaimRequirement>,
    /// Where to look for the token: the sources of the allowed providers, in
    /// order, without repeats.
    pub sources: Vec<TokenSource>,
    /// The token must be bound to a certificate or DPoP key (`require.binding`).
    pub binding: Option<super::Binding>,
    /// The caller's workload identity must be one of these (`require.principals`).
    pub principals: Vec<super::principal::Principal>,
    /// Whether a token is needed: false only for an alternative that asks for
    /// principals and nothing a token carries.
    pub needs_token: bool,
    /// `require.any_of`: the first alternative that holds allows. When set, the
    /// fields above are the union the one token is read and verified with
    /// (`providers`, `sources`, `needs_token`), and ask nothing themselves.
    pub any_of: Vec<Requirement>,
}

#[derive(Debug)]
pub struct ClaimRequirement {
    pub path: ClaimPath,
    /// The claim must equal one of these, or, when it is an array, contain one.
    pub values: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequireError {
    /// The scopes the route asks for, as the `scope` of the challenge.
    #[error("insufficient scope")]
    InsufficientScope { required: String },
    #[error("audience not allowed")]
    AudienceNotAllowed,
    #[error("claim {claim} does not match")]
    ClaimMismatch { claim: String },
}

impl Requirement {
    /// What is decided in turn: the `any_of` alternatives, or this one.
    pub fn alternatives(&self) -> &[Requirement] {
        if self.any_of.is_empty() {
            std::slice::from_ref(self)
        } else {
            &self.any_of
        }
    }

    /// Whether `principal` (empty when the proxy sent none) is one this asks for;
    /// true when it asks for none.
    pub fn principal_allowed(&self, principal: &str) -> bool {
        self.principals.is_empty()
            || (!principal.is_empty() && self.principals.iter().any(|p| p.matches(principal)))
    }

    pub fn check(&self, claims: &Map<String, Value>) -> Result<(), RequireError> {
        if !self.scopes.is_empty() || !self.any_scopes.is_empty() {
            let has = |wanted: &String| scopes(claims).any(|s| s == wanted);
            let all = self.scopes.iter().all(has);
            let any = self.any_scopes.is_empty() || self.any_scopes.iter().any(has);
            if !(all && any) {
                let mut required = self.scopes.clone();
                required.extend(self.any_scopes.iter().cloned());
                return Err(RequireError::InsufficientScope {
                    required: required.join(" "),
                });
            }
        }
        if !self.audiences.is_empty() && !audience_contains(claims, &self.audiences) {
            return Err(RequireError::AudienceNotAllowed);
        }
        for req in &self.claims {
            let ok = req.path.lookup(claims).is_some_and(|got| {
                req.values.iter().any(|want| match got {
                    Value::Array(items) => items.iter().any(|i| same(i, want)),
                    v => same(v, want),
                })
            });
            if !ok {
                return Err(RequireError::ClaimMismatch {
                    claim: req.path.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Scopes from `scope` and `scp`, each a space-separated string or an array.
pub fn scopes(claims: &Map<String, Value>) -> impl Iterator<Item = &str> {
    ["scope", "scp"]
        .into_iter()
        .filter_map(|name| claims.get(name))
        .flat_map(|v| -> Box<dyn Iterator<Item = &str>> {
            match v {
                Value::String(s) => Box::new(s.split_ascii_whitespace()),
                Value::Array(items) => Box::new(items.iter().filter_map(Value::as_str)),
                _ => Box::new(std::iter::empty()),
            }
        })
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
pub fn audience_contains(claims: &Map<String, Value>, allowed: &[String]) -> bool {
    match claims.get("aud") {
        Some(Value::String(a)) => allowed.iter().any(|x| x == a),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .any(|a| allowed.iter().any(|x| x == a)),
        _ => false,
    }
}

/// Equality that treats `1` and `1.0` as the same number.
fn same(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => got == want,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn req(scopes: &[&str], any: &[&str]) -> Requirement {
        Requirement {
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            any_scopes: any.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn scopes_come_in_every_shape() {
        let r = req(&["orders:read", "orders:write"], &[]);
        for shape in [
            json!({"scope": "orders:read orders:write"}),
            json!({"scope": ["orders:read", "orders:write"]}),
            json!({"scp": "orders:write  orders:read"}),
            json!({"scp": ["orders:read", "orders:write"]}),
            json!({"scope": "orders:read", "scp": ["orders:write"]}),
        ] {
            assert_eq!(r.check(&claims(shape.clone())), Ok(()), "{shape}");
        }
        let err = r
            .check(&claims(json!({"scope": "orders:read"})))
            .unwrap_err();
        assert_eq!(
            err,
            RequireError::InsufficientScope {
                required: "orders:read orders:write".into()
            }
        );
        assert!(r.check(&claims(json!({"scope": 7}))).is_err());
        assert!(r.check(&claims(json!({}))).is_err());
    }

    #[test]
    fn any_scopes_need_one() {
        let r = req(&[], &["a", "b"]);
        assert!(r.check(&claims(json!({"scope": "b"}))).is_ok());
        assert!(r.check(&claims(json!({"scope": "c"}))).is_err());
        let both = req(&["x"], &["a", "b"]);
        assert!(both.check(&claims(json!({"scope": "x a"}))).is_ok());
        assert!(both.check(&claims(json!({"scope": "a b"}))).is_err());
    }

    #[test]
    fn audiences_accept_string_or_array() {
        let r = Requirement {
            audiences: vec!["orders-api".into()],
            ..Default::default()
        };
        assert!(r.check(&claims(json!({"aud": "orders-api"}))).is_ok());
        assert!(
            r.check(&claims(json!({"aud": ["x", "orders-api"]})))
                .is_ok()
        );
        assert_eq!(
            r.check(&claims(json!({"aud": ["x"]}))),
            Err(RequireError::AudienceNotAllowed)
        );
        assert!(r.check(&claims(json!({"aud": 5}))).is_err());
    }

    #[test]
    fn claims_compare_scalars_and_look_into_arrays() {
        let r = Requirement {
            claims: vec![
                ClaimRequirement {
                    path: ClaimPath("tenant".into()),
                    values: vec![json!("acme")],
                },
                ClaimRequirement {
                    path: ClaimPath("realm_access.roles".into()),
                    values: vec![json!("admin")],
                },
                ClaimRequirement {
                    path: ClaimPath("level".into()),
                    values: vec![json!(3)],
                },
                ClaimRequirement {
                    path: ClaimPath("email_verified".into()),
                    values: vec![json!(true)],
                },
            ],
            ..Default::default()
        };
        let good = json!({"tenant": "acme", "realm_access": {"roles": ["user", "admin"]}, "level": 3.0, "email_verified": true});
        assert_eq!(r.check(&claims(good)), Ok(()));
        let bad = json!({"tenant": "acme", "realm_access": {"roles": ["user"]}, "level": 3, "email_verified": true});
        assert_eq!(
            r.check(&claims(bad)),
            Err(RequireError::ClaimMismatch {
                claim: "realm_access.roles".into()
            })
        );
        let wrong_type = json!({"tenant": "acme", "realm_access": {"roles": ["admin"]}, "level": "3", "email_verified": true});
        assert!(r.check(&claims(wrong_type)).is_err());
        let missing = json!({"tenant": "acme", "realm_access": {"roles": ["admin"]}, "level": 3});
        assert!(r.check(&claims(missing)).is_err());
    }
}
