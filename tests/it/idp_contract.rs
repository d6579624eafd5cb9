//! The contract of the test IdP (tests/idp/server.mjs, npm `oidc-provider`) that
//! Valet's introspection and DPoP / mTLS tests rely on, checked against the IdP
//! alone (no Valet): opaque tokens introspect (RFC 7662) active with the expected
//! members and inactive once revoked (RFC 7009); a DPoP proof (RFC 9449) built by
//! tests/it/common/idp.rs binds the token to the proof key's RFC 7638 thumbprint; a
//! certificate header binds it to `x5t#S256` (RFC 8705).

use crate::common::idp;

use std::time::{SystemTime, UNIX_EPOCH};

use idp::*;
use serde_json::json;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn opaque_tokens_introspect_active_until_revoked() {
    // Its own IdP: it rotates the keys (at the end).
    let idp = Idp::start();
    let (endpoint, client_id, client_secret) = idp.introspection();
    assert_eq!(endpoint, format!("{}/token/introspection", idp.issuer));
    assert_eq!(
        (client_id, client_secret),
        ("valet-introspector", "valet-introspector-secret")
    );

    // Scope is intersected with the resource's scopes (other:read is not orders').
    let token = idp.opaque_token("orders:read other:read").await;
    let r = idp.introspect(&token).await;
    assert_eq!(r["active"], true, "{r}");
    assert_eq!(r["scope"], "orders:read", "{r}");
    assert_eq!(r["aud"], ORDERS, "{r}");
    assert_eq!(r["iss"], idp.issuer.as_str(), "{r}");
    assert_eq!(r["client_id"], "valet-opaque", "{r}");
    assert_eq!(r["sub"], "valet-opaque", "{r}");
    assert_eq!(r["token_type"], "Bearer", "{r}");
    assert!(r.get("cnf").is_none(), "{r}");
    let (exp, iat) = (r["exp"].as_i64().unwrap(), r["iat"].as_i64().unwrap());
    assert_eq!(exp - iat, 300, "{r}");
    assert!((iat - now()).abs() <= 5 && exp > now(), "{r}");

    // Another resource gives another aud; no resource gives no aud.
    let other = idp
        .introspect(&idp.opaque_token_for(Some(OTHER), "other:read").await)
        .await;
    assert_eq!(
        (&other["active"], &other["aud"]),
        (&json!(true), &json!(OTHER))
    );
    let bare = idp
        .introspect(&idp.opaque_token_for(None, "orders:read").await)
        .await;
    assert_eq!(bare["active"], true, "{bare}");
    assert!(bare.get("aud").is_none(), "{bare}");

    // Unknown tokens and JWT access tokens (the IdP does not store those) are inactive.
    assert_eq!(
        idp.introspect("no-such-token").await,
        json!({"active": false})
    );
    let jwt = idp.token(ORDERS, "orders:read").await;
    assert_eq!(idp.introspect(&jwt).await, json!({"active": false}));

    // Revoked: inactive. Another live token is unaffected.
    let kept = idp.opaque_token("orders:write").await;
    idp.revoke(&token).await;
    assert_eq!(idp.introspect(&token).await, json!({"active": false}));
    assert_eq!(idp.introspect(&kept).await["active"], true);
    // Revoking again (now unknown) is still 200, per RFC 7009.
    idp.revoke(&token).await;

    // Opaque tokens live in the IdP's store, which survives key rotation.
    idp.admin("/__rotate").await;
    assert_eq!(idp.introspect(&kept).await["active"], true);
}

#[tokio::test]
async fn opaque_tokens_expire() {
    // Not 1 s: `exp` is whole seconds, so a token issued late in a second could be
    // expired before a loaded machine introspects it (seen once with four test threads).
    let idp = Idp::start_with(&[("IDP_ACCESS_TOKEN_TTL", "3")]);
    let token = idp.opaque_token("orders:read").await;
    let r = idp.introspect(&token).await;
    assert_eq!(r["active"], true, "{r}");
    let exp = r["exp"].as_i64().unwrap();
    while now() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(idp.introspect(&token).await, json!({"active": false}));
}

#[tokio::test]
async fn dpop_proofs_bind_tokens_to_the_key_thumbprint() {
    let idp = Idp::shared();
    let key = DpopKey::generate();
    let proof = key.proof("POST", &idp.token_endpoint(), None);

    let token = idp.dpop_token(ORDERS, "orders:read", &proof).await;
    assert_eq!(jwt_header(&token)["typ"], "at+jwt");
    let claims = jwt_payload(&token);
    assert_eq!(
        claims["cnf"],
        json!({ "jkt": key.thumbprint() }),
        "{claims}"
    );
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["scope"], "orders:read", "{claims}");

    // The same proof again: replay, refused (replay detection by jti).
    let (status, body) = idp
        .token_request(JWT_CLIENT, Some(ORDERS), "orders:read", &[("dpop", &proof)])
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");

    // A proof for another URL, or a stale one: invalid_dpop_proof.
    let wrong_htu = key.proof("POST", &format!("{}/other", idp.issuer), None);
    let stale = key.proof_with(&json!({
        "jti": "stale-1", "htm": "POST", "htu": idp.token_endpoint(), "iat": now() - 600,
    }));
    for bad in [wrong_htu, stale] {
        let (status, body) = idp
            .token_request(JWT_CLIENT, Some(ORDERS), "orders:read", &[("dpop", &bad)])
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_dpop_proof")),
            "{body}"
        );
    }

    // Another key, another thumbprint; opaque DPoP tokens show it when introspected.
    let key2 = DpopKey::generate();
    assert_ne!(key.thumbprint(), key2.thumbprint());
    let opaque = idp
        .opaque_dpop_token(
            ORDERS,
            "orders:read",
            &key2.proof("POST", &idp.token_endpoint(), None),
        )
        .await;
    let r = idp.introspect(&opaque).await;
    assert_eq!(r["active"], true, "{r}");
    assert_eq!(r["token_type"], "DPoP", "{r}");
    assert_eq!(r["cnf"], json!({ "jkt": key2.thumbprint() }), "{r}");

    // Without a proof the same client still gets plain Bearer tokens.
    let bearer = jwt_payload(&idp.token(ORDERS, "orders:read").await);
    assert!(bearer.get("cnf").is_none(), "{bearer}");
}

#[tokio::test]
async fn client_certificate_header_binds_tokens_to_x5t_s256() {
    let idp = Idp::shared();
    assert_eq!(cert_thumbprint(CLIENT_CERT_PEM), CLIENT_CERT_X5T_S256);
    let token = idp.mtls_token(ORDERS, "orders:read", CLIENT_CERT_PEM).await;
    let claims = jwt_payload(&token);
    assert_eq!(
        claims["cnf"],
        json!({ "x5t#S256": CLIENT_CERT_X5T_S256 }),
        "{claims}"
    );
    assert_eq!(claims["client_id"], "valet-mtls", "{claims}");

    // That client gets no token without a certificate.
    let (status, body) = idp
        .token_request(MTLS_CLIENT, Some(ORDERS), "orders:read", &[])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
}

#[test]
fn jwk_thumbprint_matches_rfc7638() {
    // RFC 7638 section 3.1.
    let jwk = json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    });
    assert_eq!(
        jwk_thumbprint(&jwk),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    // The ath of a DPoP proof is the same kind of hash, over the token.
    assert_eq!(ath("abc"), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
}

#[test]
fn dpop_proofs_verify_with_their_embedded_key() {
    // The proof verifies with jsonwebtoken (what Valet uses) given the header's jwk.
    let key = DpopKey::generate();
    let proof = key.proof("GET", "https://api.example/orders", Some("tok"));
    let header = jwt_header(&proof);
    assert_eq!(header["typ"], "dpop+jwt");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["jwk"], key.jwk());
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(header["jwk"].clone()).unwrap();
    let dk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    let data = jsonwebtoken::decode::<serde_json::Value>(&proof, &dk, &v).unwrap();
    assert_eq!(data.claims["htm"], "GET");
    assert_eq!(data.claims["htu"], "https://api.example/orders");
    assert_eq!(data.claims["ath"], ath("tok"));
    assert!(data.claims["jti"].as_str().unwrap().len() >= 16);
}
