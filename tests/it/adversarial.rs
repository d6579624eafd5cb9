//! The RFC 8725 checklist, as tokens an attacker would send: each is denied with
//! the right reason, and the server keeps answering.

use crate::common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const POLICY: &str = "providers:\n  - name: corp\n    issuer: https://idp.test/\n    audiences: [orders-api]\n    jwks: { file: jwks.json }\n    algorithms: [RS256, ES256, ES384, EdDSA]\nroutes:\n  - name: r\n    match: { path_prefix: / }\n";

fn b64(v: &str) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn es256(header: &Value, claims: &Value) -> String {
    let (key, _) = signing_key(Algorithm::ES256);
    sign_raw(header, claims, &key, Algorithm::ES256)
}

#[tokio::test]
async fn the_rfc_8725_corpus() {
    let v = Valet::in_process(POLICY);
    let mut c = v.client().await;
    let good = claims("");
    let ok_header = json!({"alg": "ES256", "kid": "ec256-1"});
    assert!(
        check(&mut c, get("/").bearer(&es256(&ok_header, &good)))
            .await
            .allowed()
    );

    let mut cases: Vec<(String, String, &str)> = Vec::new();
    let mut add = |name: &str, token: String, reason: &'static str| {
        cases.push((name.to_string(), token, reason))
    };

    // ES256 signature in DER (as some libraries emit) instead of the raw r||s form.
    {
        let t = es256(&ok_header, &good);
        let (msg, sig) = t.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let (r, s) = raw.split_at(32);
        let int = |x: &[u8]| {
            let mut v = x
                .iter()
                .skip_while(|b| **b == 0)
                .copied()
                .collect::<Vec<u8>>();
            if v.first().is_some_and(|b| *b >= 0x80) {
                v.insert(0, 0);
            }
            let mut out = vec![0x02, v.len() as u8];
            out.extend(v);
            out
        };
        let (ri, si) = (int(r), int(s));
        let mut der = vec![0x30, (ri.len() + si.len()) as u8];
        der.extend(ri);
        der.extend(si);
        add(
            "ES256 DER signature",
            format!("{msg}.{}", URL_SAFE_NO_PAD.encode(der)),
            "bad_signature",
        );
    }
    // kid games.
    add(
        "kid path traversal",
        es256(
            &json!({"alg": "ES256", "kid": "../../../../etc/passwd"}),
            &good,
        ),
        "unknown_key",
    );
    add(
        "kid huge",
        es256(&json!({"alg": "ES256", "kid": "k".repeat(8000)}), &good),
        "unknown_key",
    );
    add(
        "kid not a string",
        es256(&json!({"alg": "ES256", "kid": 7}), &good),
        "malformed_token",
    );
    add(
        "kid null byte",
        es256(&json!({"alg": "ES256", "kid": "ec256-1\u{0}"}), &good),
        "unknown_key",
    );
    // Keys named by the token.
    add(
        "x5c",
        es256(
            &json!({"alg": "ES256", "kid": "ec256-1", "x5c": ["MIIB"]}),
            &good,
        ),
        "malformed_token",
    );
    add(
        "jku",
        es256(
            &json!({"alg": "ES256", "kid": "ec256-1", "jku": "http://127.0.0.1:1/"}),
            &good,
        ),
        "malformed_token",
    );
    add(
        "crit",
        es256(
            &json!({"alg": "ES256", "kid": "ec256-1", "crit": ["b64"], "b64": false}),
            &good,
        ),
        "malformed_token",
    );
    // Nested and encrypted.
    let inner = es256(&ok_header, &good);
    add(
        "nested JWT as payload",
        es256(
            &json!({"alg": "ES256", "kid": "ec256-1", "cty": "JWT"}),
            &Value::String(inner),
        ),
        "malformed_token",
    );
    add(
        "JWE",
        format!(
            "{}.{}.{}.{}.{}",
            b64(r#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#),
            "a",
            "b",
            "c",
            "d"
        ),
        "malformed_token",
    );
    add(
        "enc in a JWS header",
        es256(
            &json!({"alg": "ES256", "kid": "ec256-1", "enc": "A256GCM"}),
            &good,
        ),
        "malformed_token",
    );
    // Duplicate keys: in the header refused; in the claims the last wins (RFC 7519 §4).
    let dup_header = r#"{"alg":"ES256","kid":"ec256-1","alg":"none"}"#;
    {
        let (key, _) = signing_key(Algorithm::ES256);
        let msg = format!("{}.{}", b64(dup_header), b64(&good.to_string()));
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::ES256).unwrap();
        add(
            "duplicate alg in header",
            format!("{msg}.{sig}"),
            "malformed_token",
        );
    }
    // exp of every wrong shape.
    for (name, exp) in [
        ("exp string", json!("9999999999")),
        ("exp null", json!(null)),
        ("exp array", json!([9999999999u64])),
        ("exp negative", json!(-1)),
        ("exp zero", json!(0)),
        ("exp fractional past", json!(1.5)),
    ] {
        let mut cl = good.clone();
        cl["exp"] = exp;
        let reason = if name.contains("negative") || name.contains("zero") || name.contains("past")
        {
            "expired"
        } else {
            "malformed_token"
        };
        add(name, es256(&ok_header, &cl), reason);
    }
    {
        let payload = good
            .to_string()
            .replace(&format!("\"exp\":{}", good["exp"]), "\"exp\":1e400");
        let (key, _) = signing_key(Algorithm::ES256);
        let msg = format!("{}.{}", b64(&ok_header.to_string()), b64(&payload));
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::ES256).unwrap();
        add("exp 1e400", format!("{msg}.{sig}"), "malformed_token");
    }
    // Look-alike issuers and audiences of the wrong type.
    for (name, iss) in [
        ("Cyrillic e", "https://idp.t\u{0435}st/"),
        ("trailing space", "https://idp.test/ "),
        ("upper case", "HTTPS://IDP.TEST/"),
        ("no slash", "https://idp.test"),
    ] {
        let mut cl = good.clone();
        cl["iss"] = json!(iss);
        add(name, es256(&ok_header, &cl), "issuer_not_allowed");
    }
    for (name, aud) in [
        ("aud number", json!(7)),
        ("aud null", json!(null)),
        ("aud numbers", json!([1, 2])),
        ("aud object", json!({"orders-api": true})),
        ("aud prefix", json!("orders-api-evil")),
    ] {
        let mut cl = good.clone();
        cl["aud"] = aud;
        add(name, es256(&ok_header, &cl), "audience_not_allowed");
    }
    // Encodings.
    let t = es256(&ok_header, &good);
    add("padding", format!("{t}=="), "malformed_token");
    add(
        "standard base64 chars",
        t.replace('-', "+").replace('_', "/") + "+/",
        "malformed_token",
    );
    add("trailing garbage", format!("{t}.x"), "malformed_token");
    add("thousands of dots", ".".repeat(5000), "malformed_token");
    add("200 KiB", "a".repeat(200 << 10), "malformed_token");
    // Past the CheckRequest cap (--max-message-bytes, 256 KiB): refused unread.
    add("a megabyte", "a".repeat(1 << 20), "request_too_large");
    add("empty parts", "..".to_string(), "malformed_token");

    for (name, token, reason) in &cases {
        let a = check(&mut c, get("/").bearer(token)).await;
        assert!(!a.allowed(), "{name} was allowed");
        assert_eq!(a.reason(), *reason, "{name}");
    }
    // Still serving after all of it.
    assert!(
        check(&mut c, get("/").bearer(&es256(&ok_header, &good)))
            .await
            .allowed()
    );
    eprintln!(
        "{} adversarial tokens denied with the expected reason",
        cases.len()
    );
}

/// Sends `bytes` as the CheckRequest message, whatever they hold.
async fn check_raw(v: &Valet, bytes: Vec<u8>) -> envoy_types::ext_authz::v3::pb::CheckResponse {
    use tonic::codec::{Codec, EncodeBuf, Encoder};

    struct Raw;
    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use prost::bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = envoy_types::ext_authz::v3::pb::CheckResponse;
        type Encoder = RawEncoder;
        type Decoder = tonic_prost::ProstDecoder<Self::Decode>;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> Self::Decoder {
            Default::default()
        }
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", v.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(bytes),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/envoy.service.auth.v3.Authorization/Check",
        ),
        Raw,
    )
    .await
    .expect("Check must never fail as a gRPC error")
    .into_inner()
}

#[tokio::test]
async fn a_check_request_prost_cannot_decode_is_a_deny_not_an_error() {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    use prost::Message;

    let v = Valet::in_process(POLICY);
    // A header value that is not UTF-8: encode "\u{e9}\u{e9}" (C3 A9 C3 A9), then
    // turn those bytes into FF FE FF FE, which no `string` field may hold.
    let good = get("/")
        .header("x-odd", "\u{e9}\u{e9}")
        .build()
        .encode_to_vec();
    let at = good
        .windows(4)
        .position(|w| w == [0xc3, 0xa9, 0xc3, 0xa9])
        .unwrap();
    let mut bad = good.clone();
    bad[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xff, 0xfe]);
    // And a message cut short in the middle of a field.
    let truncated = good[..good.len() - 3].to_vec();
    for bytes in [bad, truncated] {
        let r = check_raw(&v, bytes).await;
        let status = r.status.unwrap_or_default();
        assert_eq!(status.code, 3, "INVALID_ARGUMENT: {status:?}");
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("not a denial: {:?}", r.http_response);
        };
        assert_eq!(d.status.map(|s| s.code), Some(400));
        let body: Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["error"], "malformed_request", "{body}");
    }
    // The server keeps answering, and the metric says why.
    let mut c = v.client().await;
    assert_eq!(check(&mut c, get("/")).await.reason(), "missing_token");
    assert_eq!(
        v.metric(
            "valet_check_total{decision=\"deny\",reason=\"malformed_request\",route=\"_none\"}"
        )
        .await,
        Some(2.0)
    );
}
