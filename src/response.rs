//! Decision → `CheckResponse`. Makes no decisions. Every denial carries a non-OK
//! gRPC status (real Envoy lets a request through on an OK or empty status) and an
//! explicit HTTP status (Envoy would otherwise answer 403 for everything).

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus,
};
use envoy_types::pb::google::protobuf::{
    BoolValue, ListValue, Struct, Value as PbValue, value::Kind,
};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use serde_json::{Map, Value};

use crate::decision::{Allow, Decision, Deny, DenyKind};
use crate::provider::MetadataClaims;

/// gRPC codes (google.rpc.Code).
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// The answer the gRPC service sends. An allow is written straight from the
/// decision, without building prost's `CheckResponse` (its maps and strings were
/// a third of a cached Check's allocations), with the claims' metadata bytes
/// encoded once per verified token; a denial goes through prost.
#[derive(Debug)]
pub enum Answer {
    Allow(Allow),
    Proto(CheckResponse),
}

impl Answer {
    pub fn of(decision: Decision, realm: &str) -> Answer {
        match decision {
            Decision::Allow(a) => Answer::Allow(a),
            Decision::Deny(d) => Answer::Proto(deny(d, realm)),
        }
    }
}

impl Message for Answer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Answer::Allow(a) => encode_allow(a, buf),
            Answer::Proto(r) => r.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        _: u32,
        _: WireType,
        _: &mut impl prost::bytes::Buf,
        _: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded: Valet only sends answers.
        #[allow(deprecated)]
        Err(prost::DecodeError::new("an Answer is only encoded"))
    }

    fn encoded_len(&self) -> usize {
        match self {
            Answer::Allow(a) => allow_len(a),
            Answer::Proto(r) => r.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Answer::Proto(CheckResponse::default());
    }
}

/// The namespace Valet's dynamic metadata lands under in Envoy is the filter's;
/// inside it, these keys.
pub fn to_check_response(decision: Decision, realm: &str) -> CheckResponse {
    match decision {
        Decision::Allow(a) => allow(a),
        Decision::Deny(d) => deny(d, realm),
    }
}

/// What Envoy reads of an allow, as prost's message: the bytes [`Answer`] sends, decoded.
fn allow(a: Allow) -> CheckResponse {
    CheckResponse::decode(Answer::Allow(a).encode_to_vec().as_slice())
        .expect("an allow Valet encodes decodes")
}

// Field numbers (envoy.service.auth.v3, google.protobuf.Struct/Value, envoy.config.core.v3).
const RESPONSE_STATUS: u32 = 1;
const RESPONSE_OK: u32 = 3;
const RESPONSE_METADATA: u32 = 4;
const OK_HEADERS: u32 = 2;
const OK_HEADERS_TO_REMOVE: u32 = 5;
const OK_QUERY_TO_REMOVE: u32 = 8;
const OPTION_HEADER: u32 = 1;
const OPTION_APPEND: u32 = 2;
const OPTION_APPEND_ACTION: u32 = 3;
const HEADER_KEY: u32 = 1;
const HEADER_VALUE: u32 = 2;
const STRUCT_FIELDS: u32 = 1;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const VALUE_STRING: u32 = 3;
const VALUE_BOOL: u32 = 4;

/// A length-delimited field of `n` bytes (every tag here is below 16: one key byte).
fn ld_len(n: usize) -> usize {
    1 + encoded_len_varint(n as u64) + n
}

fn put_ld(tag: u32, n: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(n as u64, buf);
}

fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    put_ld(tag, s.len(), buf);
    buf.put_slice(s.as_bytes());
}

/// A `HeaderValueOption` that overwrites: `append: false` (a `BoolValue` with its
/// default, an empty message) for Envoy versions that read it, and
/// `append_action: OVERWRITE_IF_EXISTS_OR_ADD` (2).
fn option_len(k: &str, v: &str) -> usize {
    ld_len(ld_len(k.len()) + ld_len(v.len())) + 2 + 2
}

fn put_option(k: &str, v: &str, buf: &mut impl BufMut) {
    put_ld(OK_HEADERS, option_len(k, v), buf);
    put_ld(OPTION_HEADER, ld_len(k.len()) + ld_len(v.len()), buf);
    put_str(HEADER_KEY, k, buf);
    put_str(HEADER_VALUE, v, buf);
    put_ld(OPTION_APPEND, 0, buf);
    encode_key(OPTION_APPEND_ACTION, WireType::Varint, buf);
    encode_varint(HeaderAppendAction::OverwriteIfExistsOrAdd as u64, buf);
}

fn ok_len(a: &Allow) -> usize {
    let headers: usize = a.headers_set().map(|(k, v)| ld_len(option_len(k, v))).sum();
    let removed: usize = a.removed_headers().map(|h| ld_len(h.len())).sum();
    let query: usize = a.remove_query.iter().map(|q| ld_len(q.len())).sum();
    headers + removed + query
}

/// A `Struct` entry whose value is a string.
fn string_entry_len(key: &str, value: &str) -> usize {
    ld_len(ld_len(key.len()) + ld_len(ld_len(value.len())))
}

fn put_string_entry(key: &str, value: &str, buf: &mut impl BufMut) {
    put_ld(
        STRUCT_FIELDS,
        ld_len(key.len()) + ld_len(ld_len(value.len())),
        buf,
    );
    put_str(ENTRY_KEY, key, buf);
    put_ld(ENTRY_VALUE, ld_len(value.len()), buf);
    put_str(VALUE_STRING, value, buf);
}

/// `dry_run: true`: an entry of a 7-byte key and a 2-byte `Value`.
const DRY_RUN_ENTRY_LEN: usize = 2 + (2 + 7) + (2 + 2);

fn metadata_len(a: &Allow) -> usize {
    a.route.as_ref().map_or(0, |r| string_entry_len("route", r))
        + a.reason
            .map_or(0, |r| string_entry_len("reason", r.label()))
        + a.provider
            .as_ref()
            .map_or(0, |p| string_entry_len("provider", p))
        + if a.dry_run { DRY_RUN_ENTRY_LEN } else { 0 }
        + a.claims_metadata.as_ref().map_or(0, Bytes::len)
}

fn allow_len(a: &Allow) -> usize {
    2 + ld_len(ok_len(a)) + ld_len(metadata_len(a))
}

fn encode_allow(a: &Allow, buf: &mut impl BufMut) {
    // status: { code: 0 }, an empty message.
    put_ld(RESPONSE_STATUS, 0, buf);
    put_ld(RESPONSE_OK, ok_len(a), buf);
    for (k, v) in a.headers_set() {
        put_option(k, v, buf);
    }
    for h in a.removed_headers() {
        put_str(OK_HEADERS_TO_REMOVE, h, buf);
    }
    for q in &a.remove_query {
        put_str(OK_QUERY_TO_REMOVE, q, buf);
    }
    put_ld(RESPONSE_METADATA, metadata_len(a), buf);
    if let Some(route) = &a.route {
        put_string_entry("route", route, buf);
    }
    if let Some(reason) = a.reason {
        put_string_entry("reason", reason.label(), buf);
    }
    if let Some(p) = &a.provider {
        put_string_entry("provider", p, buf);
    }
    if a.dry_run {
        put_ld(STRUCT_FIELDS, DRY_RUN_ENTRY_LEN - 2, buf);
        put_str(ENTRY_KEY, "dry_run", buf);
        put_ld(ENTRY_VALUE, 2, buf);
        encode_key(VALUE_BOOL, WireType::Varint, buf);
        encode_varint(1, buf);
    }
    // A Struct's fields are a repeated field: the claims entry, encoded when the
    // token verified, is appended as it is.
    if let Some(claims) = &a.claims_metadata {
        buf.put_slice(claims);
    }
}

/// The `claims` entry of dynamic metadata (a one-field `Struct`, encoded) with the
/// claims `which` lets through; None when none is.
pub fn claims_metadata(claims: &Map<String, Value>, which: &MetadataClaims) -> Option<Bytes> {
    let fields: HashMap<String, PbValue> = claims
        .iter()
        .filter(|(k, _)| which.includes(k))
        .map(|(k, v)| (k.clone(), json(v)))
        .collect();
    if fields.is_empty() {
        return None;
    }
    let value = PbValue {
        kind: Some(Kind::StructValue(Struct { fields })),
    };
    let entry = Struct {
        fields: HashMap::from([("claims".to_string(), value)]),
    };
    Some(Bytes::from(entry.encode_to_vec()))
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
        body["route"] = Value::String(route.to_string());
    }
    let mut meta = HashMap::new();
    meta.insert("reason".to_string(), string(d.reason.label().to_string()));
    if let Some(route) = d.route {
        meta.insert("route".to_string(), string(route.to_string()));
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

    /// prost's encoding of an allow, as Valet built it before writing it by hand.
    fn reference(a: &Allow, claims: &Map<String, Value>) -> CheckResponse {
        use envoy_types::ext_authz::v3::pb::OkHttpResponse;
        let mut meta = HashMap::new();
        if let Some(route) = &a.route {
            meta.insert("route".to_string(), string(route.to_string()));
        }
        if let Some(reason) = a.reason {
            meta.insert("reason".to_string(), string(reason.label().to_string()));
        }
        if let Some(p) = &a.provider {
            meta.insert("provider".to_string(), string(p.to_string()));
        }
        if a.dry_run {
            let v = PbValue {
                kind: Some(Kind::BoolValue(true)),
            };
            meta.insert("dry_run".to_string(), v);
        }
        if !claims.is_empty() {
            meta.insert("claims".to_string(), object(claims));
        }
        CheckResponse {
            status: Some(Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: a
                    .headers_set()
                    .map(|(k, v)| overwrite(k.to_string(), v.to_string()))
                    .collect(),
                headers_to_remove: a.removed_headers().map(str::to_owned).collect(),
                query_parameters_to_remove: a.remove_query.clone(),
                ..Default::default()
            })),
            dynamic_metadata: Some(Struct { fields: meta }),
        }
    }

    #[test]
    fn allows_written_by_hand_decode_as_prost_would_encode_them() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"sub":"alice","aud":["a","b"],"exp":1.5e9,"scope":"x y","nested":{"k":[1,true,null]},"iss":"https://idp/"}"#,
        )
        .unwrap();
        let which = MetadataClaims::All;
        let base = || Allow {
            route: Some("orders-read".into()),
            reason: Some(Reason::Verified),
            provider: Some("corp".into()),
            identity_headers: vec!["x-user-id".to_string(), "x-tenant".to_string()].into(),
            ..Default::default()
        };
        let mut cases = vec![base()];
        let mut full = base();
        full.set_headers = vec![
            ("x-user-id".into(), "alice".into()),
            ("cookie".into(), "a=1".repeat(100)),
        ];
        full.remove_headers = vec!["authorization".into(), "dpop".into()];
        full.remove_query = vec!["access_token".into()];
        full.claims_metadata = claims_metadata(&claims, &which);
        cases.push(full);
        let mut dry = base();
        dry.dry_run = true;
        dry.reason = Some(Reason::MissingToken);
        dry.provider = None;
        cases.push(dry);
        cases.push(Allow::default());
        for a in cases {
            let shown = if a.claims_metadata.is_some() {
                claims.clone()
            } else {
                Map::new()
            };
            let want = reference(&a, &shown);
            let bytes = Answer::Allow(a).encode_to_vec();
            assert_eq!(CheckResponse::decode(bytes.as_slice()).unwrap(), want);
        }
    }

    #[test]
    fn metadata_claims_pick_what_envoy_sees() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"sub":"alice","email":"a@x","exp":5}"#).unwrap();
        let decode = |b: Bytes| Struct::decode(b).unwrap();
        let default = decode(claims_metadata(&claims, &MetadataClaims::default()).unwrap());
        let Some(Kind::StructValue(s)) = &default.fields["claims"].kind else {
            panic!("claims not a struct")
        };
        let mut keys: Vec<_> = s.fields.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["exp", "sub"]);
        assert!(claims_metadata(&claims, &MetadataClaims::Only(vec![])).is_none());
        let all = MetadataClaims::from_config(Some(vec!["*".into()]));
        let all = decode(claims_metadata(&claims, &all).unwrap());
        let Some(Kind::StructValue(s)) = &all.fields["claims"].kind else {
            panic!("claims not a struct")
        };
        assert_eq!(s.fields.len(), 3);
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
            assert_ne!(r.status.unwrap().code, 0);
            let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
                panic!("no denied response")
            };
            assert_eq!(d.status.unwrap().code, i32::from(kind.http_status()));
        }
    }
}
