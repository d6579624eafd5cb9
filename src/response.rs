//! Decision → `CheckResponse`. Makes no decisions. Every denial carries a non-OK
//! gRPC status (real Envoy lets a request through on an OK or empty status) and an
//! explicit HTTP status (Envoy would otherwise answer 403 for everything).

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{
    BoolValue, ListValue, Struct, Value as PbValue, value::Kind,
};
use envoy_types::pb::google::rpc::Status;
use serde_json::{Map, Value};

use crate::decision::{Allow, Decision, Deny, DenyKind};

/// gRPC codes (google.rpc.Code).
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// The namespace Valet's dynamic metadata lands under in Envoy is the filter's;
/// inside it, these keys.
pub fn to_check_response(decision: Decision, realm: &str) -> CheckResponse {
    match decision {
        Decision::Allow(a) => allow(a),
        Decision::Deny(d) => deny(d, realm),
    }
}

fn allow(a: Allow) -> CheckResponse {
    let mut meta = HashMap::new();
    if let Some(route) = a.route {
        meta.insert("route".to_string(), string(route));
    }
    if let Some(reason) = a.reason {
        meta.insert("reason".to_string(), string(reason.label().to_string()));
    }
    if let Some(p) = a.provider {
        meta.insert("provider".to_string(), string(p));
    }
    if a.dry_run {
        meta.insert(
            "dry_run".to_string(),
            PbValue {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    if let Some(claims) = a.claims {
        meta.insert("claims".to_string(), object(&claims));
    }
    CheckResponse {
        status: Some(Status {
            code: OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: a
                .set_headers
                .into_iter()
                .map(|(k, v)| overwrite(k, v))
                .collect(),
            headers_to_remove: a.remove_headers,
            query_parameters_to_remove: a.remove_query,
            ..Default::default()
        })),
        dynamic_metadata: Some(Struct { fields: meta }),
    }
}

fn deny(d: Deny, realm: &str) -> CheckResponse {
    let status = d.kind.http_status();
    let code = match d.kind {
        DenyKind::NoToken | DenyKind::InvalidToken | DenyKind::InvalidDpopProof => UNAUTHENTICATED,
        DenyKind::InsufficientScope | DenyKind::Forbidden => PERMISSION_DENIED,
        DenyKind::BadRequest | DenyKind::TooLarge => INVALID_ARGUMENT,
        DenyKind::Unavailable => UNAVAILABLE,
    };
    let mut headers = vec![
        overwrite("content-type".into(), "application/json".into()),
        overwrite("cache-control".into(), "no-store".into()),
    ];
    if let Some(challenge) = challenge(&d, realm) {
        headers.push(overwrite("www-authenticate".into(), challenge));
    }
    let mut body = serde_json::json!({
        "error": d.reason.label(),
        "error_description": d.description,
        "status": status,
    });
    if let Some(route) = &d.route {
        body["route"] = Value::String(route.clone());
    }
    let mut meta = HashMap::new();
    meta.insert("reason".to_string(), string(d.reason.label().to_string()));
    if let Some(route) = d.route {
        meta.insert("route".to_string(), string(route));
    }
    CheckResponse {
        status: Some(Status {
            code,
            message: d.reason.label().to_string(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body: body.to_string(),
        })),
        dynamic_metadata: Some(Struct { fields: meta }),
    }
}

/// RFC 6750 §3: no `error` when there was no token; `invalid_token` when it is bad;
/// `insufficient_scope` with the scopes the route needs.
pub fn challenge(d: &Deny, realm: &str) -> Option<String> {
    let mut base = match &d.dpop_algs {
        // RFC 9449 §7.1: the DPoP scheme, with the algorithms proofs may use.
        Some(algs) => format!("DPoP realm=\"{realm}\", algs=\"{algs}\""),
        None => format!("Bearer realm=\"{realm}\""),
    };
    // RFC 9728 §5.1: where the client learns how to get a token for this resource.
    if let Some(url) = &d.resource_metadata {
        base.push_str(&format!(", resource_metadata=\"{}\"", quoted(url)));
    }
    match d.kind {
        DenyKind::NoToken => Some(base),
        DenyKind::InvalidDpopProof => Some(format!(
            "{base}, error=\"invalid_dpop_proof\", error_description=\"{}\"",
            quoted(&d.description)
        )),
        DenyKind::InvalidToken => Some(format!(
            "{base}, error=\"invalid_token\", error_description=\"{}\"",
            quoted(&d.description)
        )),
        DenyKind::InsufficientScope => Some(format!(
            "{base}, error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
            quoted(&d.description),
            quoted(d.scope.as_deref().unwrap_or(""))
        )),
        DenyKind::Forbidden | DenyKind::BadRequest | DenyKind::TooLarge | DenyKind::Unavailable => {
            None
        }
    }
}

/// RFC 6750 limits these values to printable ASCII without `"` and `\`.
fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
        .collect()
}

#[allow(deprecated)] // `append` is deprecated but Envoy 1.40 reads it, not append_action.
fn overwrite(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            ..Default::default()
        }),
        append: Some(BoolValue { value: false }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string(s: String) -> PbValue {
    PbValue {
        kind: Some(Kind::StringValue(s)),
    }
}

fn object(map: &Map<String, Value>) -> PbValue {
    PbValue {
        kind: Some(Kind::StructValue(Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), json(v))).collect(),
        })),
    }
}

fn json(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json).collect(),
        }),
        Value::Object(map) => return object(map),
    };
    PbValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Reason;

    #[test]
    fn challenges_follow_rfc_6750() {
        let missing = Deny::new(Reason::MissingToken, DenyKind::NoToken, "no token");
        assert_eq!(
            challenge(&missing, "valet").as_deref(),
            Some("Bearer realm=\"valet\"")
        );
        let bad = Deny::new(
            Reason::Expired,
            DenyKind::InvalidToken,
            "the token has \"expired\"",
        );
        assert_eq!(
            challenge(&bad, "valet").as_deref(),
            Some(
                "Bearer realm=\"valet\", error=\"invalid_token\", error_description=\"the token has expired\""
            )
        );
        let mut scope = Deny::new(Reason::InsufficientScope, DenyKind::InsufficientScope, "x");
        scope.scope = Some("orders:read orders:write".into());
        assert!(
            challenge(&scope, "r")
                .unwrap()
                .ends_with("scope=\"orders:read orders:write\"")
        );
        let no_route = Deny::new(Reason::NoRoute, DenyKind::Forbidden, "x");
        assert_eq!(challenge(&no_route, "r"), None);
    }

    #[test]
    fn denials_are_never_ok() {
        for kind in [
            DenyKind::NoToken,
            DenyKind::InvalidToken,
            DenyKind::InvalidDpopProof,
            DenyKind::InsufficientScope,
            DenyKind::Forbidden,
            DenyKind::BadRequest,
            DenyKind::TooLarge,
            DenyKind::Unavailable,
        ] {
            let r = to_check_response(Decision::Deny(Deny::new(Reason::NoRoute, kind, "x")), "v");
            assert_ne!(r.status.unwrap().code, OK);
            let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
                panic!("no denied response")
            };
            assert_eq!(d.status.unwrap().code, i32::from(kind.http_status()));
        }
    }
}
